//! The benchmark of issues 4, 11 and 16: rebuild speed, live latency (and commit to
//! `wait_for`), what keeping the read models current costs the writers with pgfold
//! and with inline triggers, and the daemon's CPU per live event by size of the log.
//!
//! ```sh
//! cargo bench --bench bench -- [--events N] [--rate R] [--writers W] [--seconds T]
//! ```
//!
//! See `docs/benchmark.md` for every option and what the report means. Progress
//! goes to stderr as it runs; the report is printed to stdout at the end.
//!
//! One file per phase (`load`, `replay`, `sql`, `live`, `write`, `livecost`, `large`,
//! `sinks`, `archive`);
//! what several phases use is in `common`, what the tests use too in
//! `pgfold::testkit`.

mod archive;
mod common;
mod large;
mod live;
mod livecost;
mod load;
mod replay;
mod sinks;
mod sql;
mod write;

use std::fmt::Write as _;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use pgfold::testkit::db::{self, connect, scalar_text};

/// The real binary, built by cargo for this benchmark.
const PGFOLD: &str = env!("CARGO_BIN_EXE_pgfold");
/// The server to benchmark on: an admin connection string (URL or key=value).
const ADMIN_URL: &str = "PGFOLD_BENCH_ADMIN_URL";

/// The command line as clap reads it; [`Args`] is what the phases use.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    override_usage = "cargo bench --bench bench -- [options]",
    about = "pgfold's benchmark: rebuild speed, live latency, write-side cost, live cost, large payloads, sinks, archive",
    after_help = "environment: PGFOLD_BENCH_ADMIN_URL (default \"postgres://postgres@127.0.0.1:5432/postgres\")"
)]
struct Cli {
    /// events to load (10M, 500k accepted)
    #[arg(long, value_name = "N", default_value = "1000000", value_parser = parse_count)]
    events: u64,
    /// live, live-cost, sinks and archive phases: total append rate, events/s
    #[arg(long, value_name = "R", default_value = "2000", value_parser = parse_count)]
    rate: u64,
    /// live, live-cost, sinks and archive phases: concurrent writers
    #[arg(long, value_name = "W", default_value = "8", value_parser = parse_count)]
    writers: u64,
    /// live, live-cost and sinks phases: duration in seconds
    #[arg(long, value_name = "T", default_value = "20", value_parser = parse_count)]
    seconds: u64,
    /// write-side phase: seconds per round
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_count)]
    write_seconds: u64,
    /// write-side phase: concurrent writers
    #[arg(long, value_name = "K", default_value = "8", value_parser = parse_count)]
    write_writers: u64,
    /// replay runs, write-side rounds and archive rounds
    #[arg(long, value_name = "K", default_value = "3", value_parser = parse_count)]
    runs: u64,
    /// benchmark database, dropped and recreated; the write side's are
    /// NAME_wa/_wm/_wb/_wt (dropped at the end), the live cost's NAME_lc<size>
    /// (kept), large payloads' NAME_large, the archive phase's NAME_as and NAME_ar
    /// (kept) and NAME_ap/_aw/_al (dropped)
    #[arg(long, value_name = "NAME", default_value = "pgfold_bench")]
    db: String,
    /// run only these phases: replay,sql,live,write,livecost,large,sinks,archive (--only
    /// load: just create and load the database; write, livecost, large and archive
    /// alone do not load it: they use databases of their own)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,
    /// keep an already loaded NAME (skip drop/create/load; for profiling, not for
    /// reported figures)
    #[arg(long)]
    reuse: bool,
    /// replay phase: also replay each built-in with an upcaster on every OrderPaid
    /// (`[[upcasters]]`, issue 27), against the same replay without
    #[arg(long)]
    upcast: bool,
    /// write-side B rounds: run only these projectors (default: all), to see what
    /// each one costs the writers
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    write_projectors: Vec<String>,
    /// live-cost phase: log sizes to measure at (default 100k,10M); each is
    /// loaded once into NAME_lc<size> and kept for later runs
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_values = ["100k", "10M"],
        hide_default_value = true
    )]
    live_cost_sizes: Vec<String>,
    /// passed by `cargo bench` to every bench target; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone)]
struct Args {
    events: u64,
    rate: u64,
    writers: usize,
    seconds: u64,
    write_seconds: u64,
    write_writers: usize,
    runs: usize,
    db: String,
    only: Vec<String>,
    reuse: bool,
    upcast: bool,
    write_projectors: Vec<String>,
    live_cost_sizes: Vec<u64>,
}

impl Args {
    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }

    /// The 1 M-event benchmark database is loaded only for the phases that use it.
    fn wants_main_db(&self) -> bool {
        ["load", "replay", "sql", "live", "sinks"]
            .iter()
            .any(|p| self.wants(p))
    }
}

/// "1000000", "1_000_000", "500k", "10M".
fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().replace('_', "");
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000.0),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000.0),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = digits
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    if v < 0.0 {
        bail!("{s:?} is negative");
    }
    Ok((v * mult).round() as u64)
}

/// A comma-separated list without blanks.
fn list(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl TryFrom<Cli> for Args {
    type Error = anyhow::Error;

    fn try_from(cli: Cli) -> Result<Args> {
        let args = Args {
            events: cli.events,
            rate: cli.rate,
            writers: cli.writers as usize,
            seconds: cli.seconds,
            write_seconds: cli.write_seconds,
            write_writers: cli.write_writers as usize,
            runs: cli.runs as usize,
            db: cli.db,
            only: list(cli.only),
            reuse: cli.reuse,
            upcast: cli.upcast,
            write_projectors: list(cli.write_projectors),
            live_cost_sizes: list(cli.live_cost_sizes)
                .iter()
                .map(|s| parse_count(s))
                .collect::<Result<_>>()?,
        };
        if args.events == 0 || args.rate == 0 || args.writers == 0 || args.runs == 0 {
            bail!("--events, --rate, --writers and --runs must be positive");
        }
        if args.write_writers == 0 || args.write_seconds == 0 || args.seconds == 0 {
            bail!("--seconds, --write-seconds and --write-writers must be positive");
        }
        if args.db.is_empty()
            || !args
                .db
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bail!("--db must be lowercase letters, digits and _");
        }
        if args.live_cost_sizes.is_empty() || args.live_cost_sizes.contains(&0) {
            bail!("--live-cost-sizes must be positive counts, e.g. 100k,10M");
        }
        for p in &args.only {
            if ![
                "load", "replay", "sql", "live", "write", "livecost", "large", "sinks", "archive",
            ]
            .contains(&p.as_str())
            {
                bail!(
                    "--only takes load, replay, sql, live, write, livecost, large, sinks, archive; not {p:?}"
                );
            }
        }
        Ok(args)
    }
}

/// The allocator of pgfold's binary, for the child run as pgfold (see
/// `large::AS_PGFOLD`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if std::env::var_os(large::AS_PGFOLD).is_some() {
        return pgfold::cli::main(pgfold::projectors::builtin().register(large::NotesLength));
    }
    let args = match Args::try_from(Cli::parse()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nBENCHMARK FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The run

struct Env {
    args: Args,
    admin: String,
    url: String,
    report: String,
}

async fn run(args: Args) -> Result<()> {
    let admin = db::admin_url(ADMIN_URL);
    let url = db::with_dbname(&admin, &args.db);
    let mut env = Env {
        args,
        admin,
        url,
        report: String::new(),
    };
    let started = Instant::now();
    // Two runs on one database would drop it under each other: hold a lock named
    // after it (session-level, on the admin connection) for the whole run.
    let guard = connect(&env.admin).await?;
    let free: bool = guard
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('pgfold-bench:' || $1, 0))",
            &[&env.args.db],
        )
        .await?
        .get(0);
    if !free {
        bail!(
            "another benchmark run is using database {} on this server: wait for it, or pass --db OTHER",
            env.args.db
        );
    }
    header(&mut env).await?;
    if env.args.wants_main_db() {
        load::load(&mut env).await?;
    }
    if env.args.wants("replay") {
        replay::replay(&mut env).await?;
    }
    if env.args.wants("sql") {
        sql::sql_projections(&mut env).await?;
    }
    if env.args.wants("live") {
        live::live(&mut env).await?;
    }
    if env.args.wants("write") {
        write::write_side(&mut env).await?;
    }
    if env.args.wants("livecost") {
        livecost::live_cost(&mut env).await?;
    }
    if env.args.wants("large") {
        large::large_payloads(&mut env).await?;
    }
    if env.args.wants("sinks") {
        sinks::sinks(&mut env).await?;
    }
    if env.args.wants("archive") {
        archive::archive(&mut env).await?;
    }
    writeln!(
        env.report,
        "\nTotal benchmark time: {:.0} s. Load average at the end: {}.",
        started.elapsed().as_secs_f64(),
        load_average()
    )?;
    println!("\n{}", env.report);
    drop(guard);
    Ok(())
}

/// The machine's load averages over 1, 5 and 15 minutes, as /proc/loadavg has them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The source the daemon was built from: commit, and whether src/ had changes.
fn source_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "migrations",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            format!(
                "commit {commit}{}",
                if dirty {
                    " with uncommitted changes in src/, migrations/ or Cargo.*"
                } else {
                    ""
                }
            )
        }
        None => "unknown (not a git checkout)".to_string(),
    }
}

async fn header(env: &mut Env) -> Result<()> {
    let admin = connect(&env.admin).await?;
    let version = scalar_text(&admin, "SELECT split_part(version(), ' on ', 1)").await?;
    let mut settings = Vec::new();
    for name in [
        "shared_buffers",
        "work_mem",
        "synchronous_commit",
        "max_wal_size",
    ] {
        let v = scalar_text(&admin, &format!("SELECT current_setting('{name}')")).await?;
        settings.push(format!("{name}={v}"));
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let a = &env.args;
    let r = &mut env.report;
    writeln!(r, "pgfold benchmark (issue 4)")?;
    writeln!(r, "==========================")?;
    writeln!(
        r,
        "machine: {cpus} CPUs (shared with other work: figures are noisy; compare the ratios, \
         which come from the same run)"
    )?;
    writeln!(r, "server:  {version}; {}", settings.join(", "))?;
    writeln!(
        r,
        "pgfold:  {} (built by this cargo bench)",
        source_version()
    )?;
    writeln!(r, "load average at start: {}", load_average())?;
    writeln!(
        r,
        "options: events={} rate={}/s writers={} seconds={} write-seconds={} write-writers={} runs={} db={} \
         live-cost-sizes={}{}",
        a.events,
        a.rate,
        a.writers,
        a.seconds,
        a.write_seconds,
        a.write_writers,
        a.runs,
        a.db,
        a.live_cost_sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        if a.reuse { " (reused, not fresh)" } else { "" }
    )?;
    Ok(())
}
