//! The long-running worker: one task per projector, one waker, clean shutdown.
//!
//! [`run`] prepares the database (migrations, projector tables, replays), then
//! runs every selected projector in a task of its own, so that a slow or parked
//! projector never holds the others back, until the shutdown future resolves or,
//! with `once`, until every projector has caught up with the newest event that was
//! committed when it started.

pub mod checkpoint;
mod pace;
mod wakeup;
pub(crate) mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;
use crate::config::{DaemonSettings, Settings};
use crate::db::{self, Backoff};
use crate::feed::{self, Position};
use crate::ops::{self, metrics::Metrics, progress::Progress, Liveness};
use crate::projector::{Projector, ProjectorError, Registry, Tx};
use wakeup::{Waker, Wakeups};
use worker::{Step, Worker};

pub use wakeup::CHANNEL;

/// How long after its last batch a projector keeps polling rather than arming
/// the wake-up flag, and how often it polls meanwhile.
const LINGER: Duration = Duration::from_millis(100);
const LINGER_POLL: Duration = Duration::from_millis(10);

/// What `pgfold run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Catch up, then return.
    pub once: bool,
    /// Projectors to rebuild from the first event (`all` for every one).
    pub replay: Vec<String>,
    /// Projectors to rebuild beside the live projection and swap in (`all` for
    /// every one); see `src/rebuild`.
    pub rebuild: Vec<String>,
    /// Run only these (empty: every enabled projector).
    pub projectors: Vec<String>,
}

/// How a run ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Projectors parked on an event they could not apply.
    pub parked: Vec<ParkedProjector>,
    /// Rebuilds swapped in by this run (`--rebuild`, or a changed definition).
    pub swaps: Vec<crate::rebuild::Swapped>,
}

#[derive(Debug, Clone)]
pub struct ParkedProjector {
    pub projector: String,
    pub event_id: i64,
    pub event_type: String,
    pub error: String,
}

impl std::fmt::Display for ParkedProjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "projector {} failed at event {} ({}): {}",
            self.projector, self.event_id, self.event_type, self.error
        )
    }
}

/// Selects the projectors to run: `--projector` names, or every enabled one.
/// Unknown names, in the options or the configuration, are errors.
pub fn select(
    settings: &Settings,
    registry: &Registry,
    options: &RunOptions,
) -> anyhow::Result<Vec<Arc<dyn Projector>>> {
    for name in settings.projectors.keys() {
        if registry.get(name).is_none() {
            anyhow::bail!(
                "invalid configuration: unknown projector {:?} in [projectors] (known: {})",
                name,
                registry.names().join(", ")
            );
        }
    }
    let replay = registry.resolve(&options.replay)?;
    let rebuild = registry.resolve(&options.rebuild)?;
    if let Some(p) = rebuild
        .iter()
        .find(|p| replay.iter().any(|r| r.name() == p.name()))
    {
        anyhow::bail!(
            "projector {} cannot be both replayed and rebuilt in one run",
            p.name()
        );
    }
    let mut selected = if options.projectors.is_empty() {
        registry
            .iter()
            .filter(|p| settings.projector(p.name()).enabled)
            .cloned()
            .collect()
    } else {
        registry.resolve(&options.projectors)?
    };
    // A replayed or rebuilt projector runs, even if it was not otherwise selected.
    for p in replay.into_iter().chain(rebuild) {
        if !selected.iter().any(|q| q.name() == p.name()) {
            selected.push(p);
        }
    }
    Ok(selected)
}

/// Migrates the database and creates every registered projector's tables: what
/// `pgfold migrate` does, and needs DDL rights.
pub async fn migrate(pg: &db::PgConfig, registry: &Registry) -> anyhow::Result<()> {
    let mut client = db::connect(pg).await?;
    db::migrate::run(&client).await?;
    let all: Vec<Arc<dyn Projector>> = registry.iter().cloned().collect();
    validate(&mut client, &all).await?;
    for p in registry.iter() {
        setup(&mut client, p.as_ref()).await?;
    }
    Ok(())
}

/// Checks every projector's statements against the database before anything
/// runs (see [`Projector::validate`]): in one transaction, rolled back, after
/// creating the tables of those that have none yet. The first error stops the
/// command, and nothing has changed.
async fn validate(
    client: &mut db::Client,
    projectors: &[Arc<dyn Projector>],
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    for p in projectors {
        let t = Tx::new(&tx);
        let outcome = async {
            if !checkpoint::exists(&tx, p.name()).await? {
                p.setup(&t).await?;
            }
            p.validate(&t).await
        };
        outcome.await.map_err(|e| match e {
            // A SQL projection's errors name its file and statement already.
            ProjectorError::Other(e) => e,
            e => anyhow::anyhow!(
                "projector {}: {}",
                p.name(),
                crate::config::one_line(&e.to_string())
            ),
        })?;
    }
    // Dropped: rolled back.
    Ok(())
}

async fn setup(client: &mut db::Client, p: &dyn Projector) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    p.setup(&Tx::new(&tx))
        .await
        .with_context(|| format!("failed to create the tables of projector {}", p.name()))?;
    if checkpoint::register(&tx, p.name()).await? {
        crate::rebuild::record_fingerprint(&tx, p).await?;
    }
    checkpoint::record_filter(&tx, p).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs the daemon until `shutdown` resolves (or, with `once`, until caught up),
/// connecting as `settings.database` says.
pub async fn run(
    settings: &Settings,
    registry: &Registry,
    options: &RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Outcome> {
    // Bad names are rejected before anything touches the database.
    select(settings, registry, options)?;
    let configs = db::configs(&settings.database)?;
    run_with(
        settings,
        registry,
        options,
        configs.url,
        configs.listen_url,
        shutdown,
    )
    .await
}

/// [`run`] against explicit connection configurations: `pg` for batches, `session`
/// for LISTEN and the start-up preparation (migrations, projector tables, replays).
pub async fn run_with(
    settings: &Settings,
    registry: &Registry,
    options: &RunOptions,
    pg: db::PgConfig,
    session: db::PgConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Outcome> {
    let selected = select(settings, registry, options)?;
    let token = CancellationToken::new();
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }

    let mut client = tokio::select! {
        // `run` waits for its database however long it takes; `--once` gives up.
        c = db::connect_with_retry(&session, options.once.then(|| settings.daemon.connect_timeout())) => c?,
        _ = token.cancelled() => return Ok(Outcome::default()),
    };
    tracing::info!(database = %db::describe(&session), "connected");
    if !db::migrate::is_current(&client).await? {
        db::migrate::run(&client)
            .await
            .context("the database needs migrating and this role cannot (run `pgfold migrate` with a role that has DDL rights)")?;
    }
    validate(&mut client, &selected).await?;
    for p in &selected {
        if !checkpoint::exists(&client, p.name()).await? {
            setup(&mut client, p.as_ref()).await?;
        }
        checkpoint::record_filter(&client, p.as_ref()).await?;
        if checkpoint::unpark(&client, p.name()).await? {
            tracing::info!(projector = p.name(), "retrying a parked projector");
        }
    }
    let replay = registry.resolve(&options.replay)?;
    for p in &replay {
        rewind(&mut client, p.as_ref()).await?;
    }
    let builds =
        crate::rebuild::prepare(&mut client, &selected, &registry.resolve(&options.rebuild)?)
            .await?;
    let newest = feed::newest(&client).await?.unwrap_or(Position::START);
    let target = options.once.then_some(newest);
    // A replay, or a --once run, is a catch-up worth showing progress for.
    let progress = Arc::new(Progress::new(settings.log.format == LogFormat::Text));
    for p in &selected {
        if options.once || replay.iter().any(|r| r.name() == p.name()) {
            let from: i64 = client
                .query_one(
                    "SELECT position_id FROM pgfold.projectors WHERE name = $1",
                    &[&p.name()],
                )
                .await?
                .get(0);
            progress.begin(p.name(), from, newest.id);
        }
    }
    for b in &builds {
        progress.begin(
            &crate::rebuild::label(b.projector.name()),
            b.from,
            newest.id,
        );
    }
    drop(client);

    let pool = db::pool(&pg, settings.database.pool_size)?;
    let ops = Ops {
        metrics: Arc::new(Metrics::new()),
        progress,
        // Generous: a replay batch of a million events can take a few seconds.
        liveness: Arc::new(Liveness::new(
            settings.daemon.poll_interval() * 5 + Duration::from_secs(60),
        )),
    };
    let http_task = match &settings.http.listen {
        Some(listen) => {
            let state = ops::http::HttpState {
                metrics: ops.metrics.clone(),
                liveness: ops.liveness.clone(),
                pool: pool.clone(),
                registry: registry.clone(),
                stall_after: settings.daemon.stall_warn_after(),
            };
            Some(ops::http::serve(listen, state, token.clone()).await?)
        }
        None => None,
    };
    let (waker, wakeups) = Waker::new(session, pool.clone(), settings.daemon.poll_interval());
    let waker_task = tokio::spawn(waker.run(token.clone()));

    let swaps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for p in selected {
        let worker = Worker::new(
            p.clone(),
            settings.projector(p.name()),
            &settings.daemon,
            pool.clone(),
        );
        ops.liveness.beat(p.name());
        tasks.spawn(drive(
            worker,
            settings.daemon.clone(),
            wakeups.clone(),
            token.clone(),
            target,
            ops.clone(),
        ));
    }
    for build in builds {
        let name = build.projector.name().to_string();
        tasks.spawn(crate::rebuild::drive(
            build,
            settings.projector(&name),
            settings.daemon.clone(),
            pool.clone(),
            token.clone(),
            options.once,
            crate::rebuild::Reporting {
                metrics: ops.metrics.clone(),
                progress: ops.progress.clone(),
                liveness: ops.liveness.clone(),
                swaps: swaps.clone(),
            },
        ));
    }
    tracing::info!(projectors = tasks.len(), "running");
    ops::systemd::ready();
    ops::systemd::spawn_watchdog(ops.liveness.clone(), token.clone());

    let mut outcome = Outcome::default();
    let swaps_done = swaps;
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(Some(parked))) => outcome.parked.push(parked),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                token.cancel();
                failure.get_or_insert(e);
            }
            Err(e) => {
                token.cancel();
                failure.get_or_insert(anyhow::anyhow!("a projector task panicked: {e}"));
            }
        }
    }
    ops::systemd::stopping();
    token.cancel();
    let _ = waker_task.await;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    pool.close();
    outcome.swaps = std::mem::take(&mut *swaps_done.lock().unwrap_or_else(|e| e.into_inner()));
    match failure {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// What the projector tasks report to.
#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    liveness: Arc<Liveness>,
}

/// Empties a projector and rewinds it to the first event, under its lock.
async fn rewind(client: &mut db::Client, p: &dyn Projector) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    checkpoint::lock(&tx, p.name()).await?;
    let target = feed::newest(&tx).await?;
    p.reset(&Tx::new(&tx))
        .await
        .with_context(|| format!("failed to reset projector {}", p.name()))?;
    checkpoint::rewind(&tx, p.name(), target).await?;
    crate::rebuild::record_fingerprint(&tx, p).await?;
    tx.commit().await?;
    tracing::info!(projector = p.name(), "replaying from the first event");
    Ok(())
}

/// A projector's task: steps until shutdown, parking, or (with a target) caught up.
/// With a target (`--once`), database errors that outlast
/// `daemon.connect_timeout_ms` end the run instead of being retried forever.
async fn drive(
    mut worker: Worker,
    settings: DaemonSettings,
    mut wakeups: Wakeups,
    token: CancellationToken,
    target: Option<Position>,
    ops: Ops,
) -> anyhow::Result<Option<ParkedProjector>> {
    let name = worker.name().to_string();
    let result = drive_loop(&mut worker, &settings, &mut wakeups, &token, target, &ops).await;
    ops.liveness.retire(&name);
    result
}

async fn drive_loop(
    worker: &mut Worker,
    settings: &DaemonSettings,
    wakeups: &mut Wakeups,
    token: &CancellationToken,
    target: Option<Position>,
    ops: &Ops,
) -> anyhow::Result<Option<ParkedProjector>> {
    let name = worker.name().to_string();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut blocked: Option<(u64, tokio::time::Instant)> = None;
    let mut warned_blocker = None;
    let mut last_progress = tokio::time::Instant::now()
        .checked_sub(LINGER)
        .unwrap_or_else(tokio::time::Instant::now);
    while !token.is_cancelled() {
        ops.liveness.beat(&name);
        // A wake-up that arrives while we work must not be lost, and one that
        // arrived before we started this round is already accounted for.
        wakeups.mark_seen();
        let started = std::time::Instant::now();
        let step = worker.step().await;
        if step.is_ok() {
            failing_since = None;
        }
        match step {
            Ok(Step::Applied { events, upto, full }) => {
                backoff.reset();
                if events > 0 {
                    last_progress = tokio::time::Instant::now();
                }
                blocked = None;
                ops.metrics.horizon_stalled_for(0.0);
                ops.metrics
                    .batch_applied(&name, events, started.elapsed().as_secs_f64());
                ops.progress.advance(&name, upto.id, events);
                tracing::debug!(projector = %name, events, position = %upto, "batch applied");
                if !full && target.is_none() {
                    // Caught up under a steady flow of writes: batches back to back
                    // would each carry a handful of events and cost the database
                    // (and the writers sharing its CPU) a dozen round trips apiece.
                    // Starting at most one batch per LINGER_POLL keeps the lag
                    // within it and gathers the events that arrive meanwhile.
                    let next = tokio::time::Instant::from_std(started) + LINGER_POLL;
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::sleep_until(next) => {}
                    }
                }
                continue;
            }
            Ok(Step::Idle { horizon, position }) => {
                backoff.reset();
                ops.progress.finish(&name);
                if let Some(target) = target {
                    if horizon.covers(target) || position >= target {
                        return Ok(None);
                    }
                }
                // Is an open transaction keeping newer events out of reach?
                match horizon.blocker {
                    Some(tx) => {
                        let since = match blocked {
                            Some((b, since)) if b == tx => since,
                            _ => {
                                blocked = Some((tx, tokio::time::Instant::now()));
                                tokio::time::Instant::now()
                            }
                        };
                        ops.metrics
                            .horizon_stalled_for(since.elapsed().as_secs_f64());
                        if since.elapsed() >= settings.stall_warn_after()
                            && warned_blocker != Some(tx)
                        {
                            warned_blocker = Some(tx);
                            worker.warn_stalled(tx, since.elapsed()).await;
                        }
                    }
                    None => {
                        blocked = None;
                        ops.metrics.horizon_stalled_for(0.0);
                    }
                }
                if target.is_some() {
                    // Catching up: the blocker will finish; look again soon.
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = wakeups.wait() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                    continue;
                }
                // Under a steady flow of writes, arming the wake-up flag would make
                // nearly every writer notify (and queue on the notify lock) just to
                // wake a daemon that is about to look anyway. So for a while after
                // the last batch, look again every LINGER_POLL instead; arm only
                // once the flow has paused.
                if last_progress.elapsed() < LINGER {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = wakeups.wait() => {}
                        _ = tokio::time::sleep(LINGER_POLL) => {}
                    }
                    continue;
                }
                wakeups.report_idle();
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = wakeups.wait() => {}
                }
            }
            Ok(Step::Busy) => {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = wakeups.wait() => {}
                    _ = tokio::time::sleep(settings.poll_interval()) => {}
                }
            }
            Ok(Step::Parked {
                event_id,
                event_type,
                error,
            }) => {
                return Ok(Some(ParkedProjector {
                    projector: name,
                    event_id,
                    event_type,
                    error,
                }));
            }
            Ok(Step::Retry(delay)) => {
                ops.metrics.batch_failed(&name);
                if !delay.is_zero() {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            Err(e) => {
                ops.metrics.batch_failed(&name);
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if target.is_some() && since.elapsed() >= settings.connect_timeout() {
                    anyhow::bail!(
                        "projector {name}: database unavailable for {} ms (daemon.connect_timeout_ms): {e}",
                        since.elapsed().as_millis()
                    );
                }
                let delay = backoff.next_delay();
                tracing::warn!(
                    projector = %name,
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "database error; retrying"
                );
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    Ok(None)
}
