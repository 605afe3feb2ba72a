use std::process::ExitCode;

fn main() -> ExitCode {
    pgfold::cli::main(pgfold::projectors::builtin())
}
