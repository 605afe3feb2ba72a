//! The command line: `run`, `migrate`, `status`. Errors end here, printed once, on
//! one line, with a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::daemon::{self, RunOptions};
use crate::feed::Upcasters;
use crate::projector::Registry;
use crate::{db, status, telemetry};

/// The parsed command line: global options and the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "pgfold",
    version,
    about = "Keeps projections of a PostgreSQL event store current"
)]
pub struct Cli {
    /// A TOML configuration file (see config/default.toml for every key).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; each variant's doc comment is its `--help` text.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the projectors until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Apply migrations and create the projectors' tables, then exit.
    Migrate,
    /// Show each projector's position, lag, state and last error.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one archive pass: move old events, as `[[archive.policy]]` says, from
    /// `events` to Parquet segments at `archive.url`; or check or read the archive.
    Archive {
        /// Print the streams, events and bytes each policy would move, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// `verify` or `show STREAM_ID`; none: run a pass.
        #[command(subcommand)]
        action: Option<ArchiveAction>,
    },
    /// Create a demo database, append sample orders and show the projections
    /// updating live until Ctrl-C.
    Demo {
        /// Name of the database to create (or reuse) on the configured server.
        #[arg(long, default_value = "pgfold_demo", value_name = "NAME")]
        database: String,
        /// Orders appended per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long, value_name = "SECONDS")]
        seconds: Option<u64>,
    },
}

/// What `pgfold archive` does besides a pass.
#[derive(Debug, Subcommand)]
pub enum ArchiveAction {
    /// Check every recorded segment: it exists, and its row count, id range and
    /// checksum match the record. Exits 3, naming the segment, on any mismatch.
    Verify,
    /// Print a stream's whole history, archive and table together, in `sequence`
    /// order, one JSON object per line.
    Show {
        /// The stream.
        #[arg(value_name = "STREAM_ID")]
        stream_id: String,
    },
}

/// `pgfold run`'s options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Catch every selected projector up to the newest committed event, then exit.
    #[arg(long)]
    pub once: bool,
    /// Rebuild this projection from the first event (repeatable; `all` for every one).
    #[arg(long, value_name = "NAME")]
    pub replay: Vec<String>,
    /// Rebuild this projection from the first event beside the live one, which
    /// keeps serving, then swap it in atomically (repeatable; `all` for every one).
    #[arg(long, value_name = "NAME")]
    pub rebuild: Vec<String>,
    /// Run only this projector (repeatable).
    #[arg(long, value_name = "NAME")]
    pub projector: Vec<String>,
}

/// The whole program, for `pgfold` itself and for an application's own binary
/// that registers more projectors.
pub fn main(registry: Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("pgfold: {}", first.trim_start_matches("error: "));
            eprintln!("pgfold: try 'pgfold --help'");
            return ExitCode::from(2);
        }
    };
    // An archive pass is a process of its own that ends with the pass, and
    // gave every freed page back at once only to fault the same pages in again
    // and zero them, segment after segment. Lone passes on a copy of the
    // benchmark's log, pgfold's CPU time and peak RSS with a purge delay of
    // 0 ms: 2.7 s, 69 MiB; 50 ms: 2.2 s, 87 MiB; 1 s (mimalloc's own): 2.0 s,
    // 110 MiB, too near the 128 MiB a pass must stay under.
    let purge_delay_ms = match cli.command {
        Command::Archive {
            dry_run: false,
            action: None,
        } => ARCHIVE_PURGE_DELAY_MS,
        _ => 0,
    };
    return_freed_memory(purge_delay_ms);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfold: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli, registry)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgfold: {}", crate::util::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli, registry: Registry) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    let registry =
        crate::sql_projections::load(registry, settings.daemon.projections_dir.as_deref())?;
    // Sinks publish events as the upcasters make them, like projectors fold them.
    let registry = crate::sinks::load(registry, &settings.sinks)?
        .with_upcasters(&Upcasters::new(&settings.upcasters)?);
    telemetry::init(&settings.log);
    for unused in registry.unused_upcasters() {
        tracing::warn!(upcaster = %unused, "no projector consumes this upcaster's event type: it applies to nothing");
    }
    if !settings.ignored_env.is_empty() {
        tracing::debug!(
            variables = %settings.ignored_env.join(" "),
            "PGFOLD_ variables without a double underscore are not configuration: ignored"
        );
    }
    match cli.command {
        Command::Migrate => {
            let pg = db::configs(&settings.database)?.listen_url;
            daemon::migrate(&pg, &registry).await?;
            eprintln!("pgfold: database is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let pg = db::configs(&settings.database)?.url;
            let client = db::connect(&pg).await?;
            let report = status::collect(
                &client,
                &registry,
                settings.daemon.stall_warn_after(),
                settings.archive.as_ref(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(if report.any_failed() {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Archive { dry_run, action } => archive(&settings, dry_run, action).await,
        Command::Demo {
            database,
            rate,
            seconds,
        } => {
            let options = crate::demo::DemoOptions {
                database,
                rate,
                duration: seconds.map(std::time::Duration::from_secs),
            };
            crate::demo::run(settings, registry, options, shutdown_signal()?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let options = RunOptions {
                once: args.once,
                replay: args.replay,
                rebuild: args.rebuild,
                projectors: args.projector,
            };
            let outcome = daemon::Daemon::build(settings, registry, options)?
                .run_until_stopped(shutdown_signal()?)
                .await?;
            if outcome.parked.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for parked in &outcome.parked {
                    eprintln!("pgfold: {parked}");
                }
                Ok(ExitCode::from(3))
            }
        }
    }
}

/// `pgfold archive`: a pass, `verify` or `show`.
async fn archive(
    settings: &Settings,
    dry_run: bool,
    action: Option<ArchiveAction>,
) -> anyhow::Result<ExitCode> {
    // A pass keeps a temporary table and a session lock: the session connection.
    let pg = db::configs(&settings.database)?.listen_url;
    let mut client = db::connect(&pg).await?;
    if !db::migrate::is_current(&client).await? {
        anyhow::bail!("the database needs migrating first (pgfold migrate)");
    }
    let store = match &settings.archive {
        Some(a) => Some(crate::archive::Store::open(&a.url)?),
        None => None,
    };
    match action {
        Some(ArchiveAction::Show { stream_id }) => {
            let mut out = std::io::stdout().lock();
            crate::archive::show(&client, store.as_ref(), &stream_id, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(ArchiveAction::Verify) => {
            let store =
                store.context("pgfold archive verify needs [archive] url in the configuration")?;
            let mut bad = 0;
            let segments = crate::archive::segments(&client, 0).await?;
            for s in &segments {
                match crate::archive::fetch_verified(&store, s, crate::archive::Check::Full).await {
                    Ok(_) => println!(
                        "ok {}: {} events, ids {}..{}",
                        s.label(&store),
                        s.events,
                        s.first_id,
                        s.last_id
                    ),
                    Err(e) => {
                        bad += 1;
                        eprintln!("pgfold: {}", crate::util::one_line(&format!("{e:#}")));
                    }
                }
            }
            if bad > 0 {
                eprintln!(
                    "pgfold: {bad} of {} segments failed verification",
                    segments.len()
                );
                return Ok(ExitCode::from(3));
            }
            eprintln!("pgfold: {} segments verified", segments.len());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let archive = settings
                .archive
                .as_ref()
                .context("pgfold archive needs an [archive] section with url and [[archive.policy]] in the configuration")?;
            let store = store.expect("opened with its settings");
            let progress = crate::ops::progress::Progress::new(
                settings.log.format == crate::config::LogFormat::Text,
            );
            let outcome = crate::archive::run_pass(
                &mut client,
                &pg,
                archive,
                &store,
                dry_run,
                crate::archive::Process::Own,
                Some(&progress),
            )
            .await?;
            for (i, (policy, moved)) in archive.policy.iter().zip(&outcome.policies).enumerate() {
                println!(
                    "policy {} ({}, after {}{}{}): {} streams, {} events, {} bytes{}",
                    i + 1,
                    policy.stream_types.join(", "),
                    policy.after,
                    if policy.whole_streams {
                        ", whole streams"
                    } else {
                        ", event by event"
                    },
                    policy
                        .retention_class
                        .as_deref()
                        .map(|c| format!(", retention_class {c}"))
                        .unwrap_or_default(),
                    moved.streams,
                    moved.events,
                    moved.bytes,
                    if dry_run { " would move" } else { "" }
                );
            }
            if let Some(holder) = &outcome.held_back_by {
                println!("held back by: {holder}");
            }
            if !dry_run {
                println!(
                    "archived {} events in {} segments ({} bytes){}",
                    outcome.events,
                    outcome.segments,
                    outcome.bytes,
                    match outcome.rested.is_zero() {
                        true => String::new(),
                        false => format!(
                            "; rested {:.1} s while the application was writing",
                            outcome.rested.as_secs_f64()
                        ),
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once, for a
/// shutdown that is taking too long.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use futures_util::StreamExt;
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    Ok(async move {
        if let Some(signal) = signals.next().await {
            tracing::info!(signal, "shutting down");
            tokio::spawn(async move {
                if signals.next().await.is_some() {
                    eprintln!("pgfold: second signal, exiting now");
                    std::process::exit(130);
                }
            });
        }
    })
}

/// mimalloc's `purge_delay` option (its index in `mi_option_t`, the same in
/// mimalloc 2 and 3; libmimalloc-sys names only the older options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay of a `pgfold archive` pass (see `main`).
const ARCHIVE_PURGE_DELAY_MS: std::ffi::c_long = 50;

/// With mimalloc as the allocator (pgfold's binary, and the examples): give freed
/// memory back to the system `after_ms` milliseconds after it is freed (0: at
/// once; an archive pass waits a little, see `main`). By default mimalloc 3
/// purges freed pages after 1 s, arenas after 10 s, and only when the thread
/// that owns them allocates again; the worker thread that decoded a batch of
/// large events then idles, and the batch's memory stayed resident (measured:
/// 64 MiB an idle minute after a replay of 1.9 MB events, against 27 MiB before
/// it; 36 MiB with this). Harmless when another allocator is the global one:
/// mimalloc then holds nothing.
fn return_freed_memory(after_ms: std::ffi::c_long) {
    // SAFETY: sets one integer option; called before the runtime, or any
    // other thread that could read it concurrently, is started.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, after_ms) }
}
