use std::process::ExitCode;

/// glibc's allocator fragments under the batch loop's pattern (many short-lived
/// JSON values freed on other threads): mimalloc keeps peak RSS flat and spends
/// far less time in malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pgfold::cli::main(pgfold::projectors::builtin())
}
