//! Rebuild without downtime: build a projection afresh *beside* the live one,
//! then swap it in, atomically.
//!
//! - **Build beside.** The projector's tables are created in a schema of their
//!   own, `pgfold_build_<name>`, and filled from the first event by an ordinary
//!   worker (`worker`) under a checkpoint row of its own, `<name>.build` (with its own
//!   advisory lock, delivered-ahead events and dead letters). Every build
//!   transaction puts the build schema first on its `search_path`, so a projector
//!   that addresses its tables by unqualified name (the rule for every projector)
//!   reads and writes the new copy without knowing it. The live projection keeps
//!   advancing meanwhile, in this instance or in others.
//! - **Swap.** Once the build has nothing left below the horizon, one transaction
//!   takes both projectors' locks, checks that again, moves the live checkpoint to
//!   the build's position, and moves the live tables to `pgfold_retired_<name>` and
//!   the new ones into their place (see [`swap`]). Readers see the old complete
//!   state until it commits and the new one after.
//! - **Definitions.** Each projector's [`Projector::fingerprint`] is stored with its
//!   checkpoint; `run` rebuilds a projector whose tables were built with another.
//!
//! A build survives a crash: its tables and checkpoint commit together, as any
//! projector's do, and the next `run` resumes it from its checkpoint.

pub mod swap;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::bookkeeping::{self as checkpoint, record_fingerprint, Failure};
use crate::config::{DaemonSettings, ProjectorSettings};
use crate::db::{self, Pool};
use crate::ops::{metrics::Metrics, progress::Progress, Liveness};
use crate::projector::Projector;
use crate::util::Backoff;
use crate::worker::{search_path_first, ArchiveError, Step, Target, Transient, Worker};

/// Longest projector name that leaves room for the schema prefixes within
/// PostgreSQL's 63-byte identifiers.
const MAX_NAME: usize = 63 - "pgfold_retired_".len();

/// The checkpoint row (and advisory lock) of `name`'s build.
pub use crate::bookkeeping::build_key as key;

/// The schema a build of `name` creates its tables in.
pub fn build_schema(name: &str) -> String {
    format!("pgfold_build_{name}")
}

/// The schema the replaced tables of `name` are kept in until its next rebuild.
pub fn retired_schema(name: &str) -> String {
    format!("pgfold_retired_{name}")
}

/// A build to run: which projector, from where.
pub struct Build {
    /// The projector rebuilt.
    pub projector: Arc<dyn Projector>,
    /// Its build's checkpoint row ([`key`]).
    pub key: String,
    /// The schema the build's tables are in ([`build_schema`]).
    pub schema: String,
    /// Where the build's checkpoint stands (0 for a fresh build).
    pub from: i64,
}

/// Decides which of `selected` to rebuild, and prepares each build (its schema,
/// tables and checkpoint row) or finds the one a previous run left:
/// - every projector named by `--rebuild` (`explicit`);
/// - a projector whose stored fingerprint differs from its definition's;
/// - a projector with a build in progress (an interrupted run).
///
/// A stored fingerprint of NULL (a row from before fingerprints were kept) is
/// adopted as the current one.
pub async fn prepare(
    client: &mut db::Client,
    selected: &[Arc<dyn Projector>],
    explicit: &[Arc<dyn Projector>],
) -> anyhow::Result<Vec<Build>> {
    let mut builds = Vec::new();
    for p in selected {
        if !p.has_tables() {
            // Nothing to build beside (a sink): a changed definition, such as
            // an upcaster added for what it publishes, holds from its next
            // event on.
            record_fingerprint(&**client, p.as_ref()).await?;
            continue;
        }
        let name = p.name();
        let current = p.fingerprint();
        let row = client
            .query_one(
                "SELECT l.fingerprint, b.fingerprint, b.build_reason
                   FROM pgfold.projectors l
                   LEFT JOIN pgfold.projectors b ON b.name = $2
                  WHERE l.name = $1",
                &[&name, &key(name)],
            )
            .await?;
        let stored: Option<String> = row.get(0);
        let building: Option<String> = row.get(1);
        let building_reason: Option<String> = row.get(2);
        let stored = match stored {
            Some(s) => s,
            None => {
                record_fingerprint(&**client, p.as_ref()).await?;
                current.clone()
            }
        };
        let reason = if explicit.iter().any(|e| e.name() == name) {
            "requested with --rebuild".to_string()
        } else if stored != current {
            match crate::feed::changed_upcasters(&stored, &current) {
                Some(upcasters) => format!("definition changed: {upcasters}"),
                None => format!(
                    "definition changed: tables built with {stored}, the projector is now {current}"
                ),
            }
        } else if building.is_some() {
            building_reason.unwrap_or_else(|| "resuming a rebuild".into())
        } else {
            continue;
        };
        if name.len() > MAX_NAME {
            anyhow::bail!(
                "cannot rebuild projector {name} beside its live tables: its name is longer than {MAX_NAME} characters"
            );
        }
        builds.push(begin(client, p.clone(), &reason, building.as_deref()).await?);
    }
    Ok(builds)
}

/// Starts the build of `p`, or resumes the one in progress if it builds the
/// current definition.
async fn begin(
    client: &mut db::Client,
    p: Arc<dyn Projector>,
    reason: &str,
    building: Option<&str>,
) -> anyhow::Result<Build> {
    let name = p.name().to_string();
    let (key, schema) = (key(&name), build_schema(&name));
    let tx = client.transaction().await?;
    // Another instance may be running the build: wait for its batch to end.
    checkpoint::lock(&tx, &key).await?;
    let schema_exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await?
        .is_some();
    if building == Some(p.fingerprint().as_str()) && schema_exists {
        if checkpoint::unpark(&tx, &key).await? {
            tracing::info!(projector = %name, "retrying a parked rebuild");
        }
        let from: i64 = tx
            .query_one(
                "SELECT position_id FROM pgfold.projectors WHERE name = $1",
                &[&key],
            )
            .await?
            .get(0);
        tx.commit().await?;
        tracing::info!(projector = %name, position = from, reason, "resuming the rebuild beside the live tables");
        return Ok(Build {
            projector: p,
            key,
            schema,
            from,
        });
    }
    // A fresh build: any earlier one (another definition, or its schema lost) goes.
    let drop_create: String = tx
        .query_one(
            "SELECT format('DROP SCHEMA IF EXISTS %1$I CASCADE; CREATE SCHEMA %1$I', $1::text)",
            &[&schema],
        )
        .await?
        .get(0);
    tx.batch_execute(&drop_create)
        .await
        .with_context(|| format!("cannot create the build schema {schema} (rebuilding needs the CREATE privilege on the database)"))?;
    tx.execute("DELETE FROM pgfold.projectors WHERE name = $1", &[&key])
        .await?;
    search_path_first(&tx, &schema).await?;
    p.setup(&crate::projector::Tx::new(&tx))
        .await
        .with_context(|| format!("failed to create the tables of projector {name} in {schema}"))?;
    let tables: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
            &[&schema],
        )
        .await?
        .get(0);
    if tables == 0 {
        anyhow::bail!(
            "cannot rebuild projector {name} beside its live tables: its setup created no table in {schema} (create tables by unqualified name, in setup)"
        );
    }
    checkpoint::register(&tx, &key).await?;
    // The build consumes what the projector does: with its filter recorded, the
    // build's checkpoint holds back from archiving only those events (a row
    // without one holds back every event).
    let filter = p.filter();
    tx.execute(
        "UPDATE pgfold.projectors
            SET build_of = $2, fingerprint = $3, build_reason = $4, build_started_at = now(),
                event_types = $5, stream_types = $6
          WHERE name = $1",
        &[
            &key,
            &name,
            &p.fingerprint(),
            &reason,
            &filter.event_types,
            &filter.stream_types,
        ],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(projector = %name, reason, "rebuilding beside the live tables, from the first event");
    Ok(Build {
        projector: p,
        key,
        schema,
        from: 0,
    })
}

/// What a build task reports to.
pub struct Reporting {
    /// The `pgfold_rebuild_*` counters.
    pub metrics: Arc<Metrics>,
    /// The progress bar (or log lines) of the build.
    pub progress: Arc<Progress>,
    /// The task's heartbeat, for `/healthz` and the watchdog.
    pub liveness: Arc<Liveness>,
    /// Where a task records its swap, for the run's [`crate::daemon::Outcome`].
    pub swaps: Arc<std::sync::Mutex<Vec<Swapped>>>,
}

/// A rebuild swapped in.
#[derive(Debug, Clone)]
pub struct Swapped {
    /// The projector swapped.
    pub projector: String,
    /// How long the swap queued for the exclusive locks on the live tables
    /// (behind readers holding them; at most `swap::LOCK_TIMEOUT`).
    pub lock_wait: Duration,
    /// How long it then held them, until its commit.
    pub lock_held: Duration,
}

/// How the build is labelled in progress and liveness.
pub fn label(name: &str) -> String {
    format!("{name} (rebuild)")
}

/// A build's task: applies batches into the build schema until it has caught up,
/// then swaps it in and ends. With `once`, a swap refused (a view depends on the
/// tables) ends the run with that error; otherwise the build keeps up and the
/// swap is tried again now and then.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    build: Build,
    settings: ProjectorSettings,
    daemon: DaemonSettings,
    pool: Pool,
    token: CancellationToken,
    once: bool,
    ops: Reporting,
    archive: Option<crate::archive::Store>,
) -> anyhow::Result<Option<Failure>> {
    let name = build.projector.name().to_string();
    let fingerprint = build.projector.fingerprint();
    let label = label(&name);
    let target = Target::Beside {
        key: build.key.clone(),
        schema: build.schema.clone(),
    };
    let mut worker = Worker::new(build.projector.clone(), settings, &daemon, pool.clone())
        .into(target)
        .on_part(ops.progress.reporter(&ops.liveness, &label))
        .on_segment(ops.progress.segment_reporter(&ops.liveness, &label))
        .with_archive(archive);
    // The build's history starts in the archive: read before its first batch.
    // A missing or corrupt segment stops the build there, long before its swap;
    // an unreachable database or store is retried as a batch's error is.
    let mut archive_read = false;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    // Swap attempts that found the live projector's lock taken, or readers in
    // the way: retried soon, with a growing pause.
    let mut swap_backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    let mut refused: Option<tokio::time::Instant> = None;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let result = loop {
        if token.is_cancelled() {
            break Ok(None);
        }
        ops.liveness.beat(&label);
        let started = std::time::Instant::now();
        let step = if archive_read {
            worker.step().await
        } else {
            match worker.read_archive().await {
                Ok(_) => {
                    archive_read = true;
                    failing_since = None;
                    backoff.reset();
                    continue;
                }
                Err(ArchiveError::Transient(e)) => Err(e),
                Err(ArchiveError::Fatal(e)) => break Err(e.context(format!("rebuild of {name}"))),
            }
        };
        if step.is_ok() {
            failing_since = None;
        }
        let pause = match step {
            Ok(Step::Applied { events, upto, .. }) => {
                backoff.reset();
                ops.metrics
                    .rebuild_batch(&name, events, started.elapsed().as_secs_f64());
                ops.progress.advance(&label, upto.id, events);
                continue;
            }
            Ok(Step::Idle { .. }) => {
                ops.progress.finish(&label);
                if refused.is_some_and(|at| at.elapsed() < REFUSED_RETRY) {
                    daemon.poll_interval()
                } else {
                    match swap::attempt(&pool, build.projector.as_ref()).await {
                        Ok(swap::Outcome::Swapped { wait, held }) => {
                            ops.metrics.rebuild_swapped(&name, held.as_secs_f64());
                            ops.swaps
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Swapped {
                                    projector: name.clone(),
                                    lock_wait: wait,
                                    lock_held: held,
                                });
                            tracing::info!(
                                projector = %name,
                                lock_wait_ms = wait.as_secs_f64() * 1000.0,
                                exclusive_lock_ms = held.as_secs_f64() * 1000.0,
                                retired = %retired_schema(&name),
                                "rebuilt projection swapped in; the previous tables are kept in the retired schema"
                            );
                            break Ok(None);
                        }
                        // New events arrived below the horizon: apply them first.
                        Ok(swap::Outcome::Pending) => Duration::ZERO,
                        Ok(swap::Outcome::Busy | swap::Outcome::LockTimeout) => {
                            ops.metrics.rebuild_swap_retried(&name);
                            swap_backoff.next_delay()
                        }
                        Ok(swap::Outcome::Refused(why)) => {
                            if once {
                                break Err(anyhow::anyhow!(why));
                            }
                            if refused.is_none() {
                                tracing::error!(projector = %name, "{why}; the build keeps up and the swap is tried again every {} s", REFUSED_RETRY.as_secs());
                            }
                            refused = Some(tokio::time::Instant::now());
                            daemon.poll_interval()
                        }
                        Err(_) if !build_is_ours(&pool, &build.key, &fingerprint).await => {
                            tracing::info!(projector = %name, "another instance swapped the rebuild in, or took it over");
                            break Ok(None);
                        }
                        Err(e) => {
                            ops.metrics.rebuild_swap_retried(&name);
                            tracing::warn!(projector = %name, error = %e, "swap failed; retrying");
                            backoff.next_delay()
                        }
                    }
                }
            }
            Ok(Step::Busy | Step::Outdated)
                if !build_is_ours(&pool, &build.key, &fingerprint).await =>
            {
                tracing::info!(projector = %name, "another instance swapped the rebuild in, or took it over");
                break Ok(None);
            }
            Ok(Step::Busy | Step::Outdated) => daemon.poll_interval(),
            Ok(Step::Parked(failure)) => break Ok(Some(failure)),
            Ok(Step::Retry(delay)) => delay,
            Err(_) if !build_is_ours(&pool, &build.key, &fingerprint).await => {
                tracing::info!(projector = %name, "another instance swapped the rebuild in, or took it over");
                break Ok(None);
            }
            Err(e) => {
                let what = match e {
                    Transient::Archive(_) => "archive",
                    _ => "database",
                };
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if once && since.elapsed() >= daemon.connect_timeout() {
                    break Err(anyhow::anyhow!(
                        "rebuild of {name}: {what} unavailable for {} ms (daemon.connect_timeout_ms): {e}",
                        since.elapsed().as_millis()
                    ));
                }
                let delay = backoff.next_delay();
                tracing::warn!(projector = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "rebuild: {what} error; retrying");
                delay
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    };
    ops.liveness.retire(&label);
    result
}

/// Whether the build's checkpoint row is still there, building this definition:
/// another instance's swap deletes it, and another instance's fresh build of
/// another definition replaces it. When that cannot be told, it is.
async fn build_is_ours(pool: &Pool, key: &str, fingerprint: &str) -> bool {
    let Ok(client) = pool.get().await else {
        return true;
    };
    client
        .query_opt(
            "SELECT fingerprint IS NOT DISTINCT FROM $2 FROM pgfold.projectors WHERE name = $1",
            &[&key, &fingerprint],
        )
        .await
        .map_or(true, |row| row.is_some_and(|r| r.get::<_, bool>(0)))
}

/// How long after a refused swap (a view in the way) it is tried again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);
