//! The long-running worker: one task per projector, one waker, clean shutdown.
//!
//! [`Daemon::build`] checks what it was asked to run; [`Daemon::run_until_stopped`]
//! prepares the database (see `prepare`: migrations, projector tables,
//! replays), then runs every selected projector in a task of its own (see
//! `driver`), so that a slow or parked projector never holds the others back,
//! until the shutdown future resolves or, with `once`, until every projector has
//! caught up with the newest event that was committed when it started.
//! [`Daemon::spawn`] runs it in the background behind a [`Handle`].
//!
//! Every task the daemon starts is owned by it and ends with it: the projector
//! tasks, the waker, the HTTP server and the systemd watchdog.

mod cadence;
mod driver;
mod prepare;
mod wakeup;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Settings};
use crate::db;
use crate::ops::{self, metrics::Metrics, progress::Progress, Liveness};
use crate::projector::{Projector, Registry};
use crate::worker::Worker;
use driver::{Driver, Ops};
use wakeup::Waker;

pub use crate::bookkeeping::Failure;
pub use prepare::{migrate, select};
pub use wakeup::CHANNEL;

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
    pub parked: Vec<Failure>,
    /// Rebuilds swapped in by this run (`--rebuild`, or a changed definition).
    pub swaps: Vec<crate::rebuild::Swapped>,
}

/// A daemon ready to run: its projectors chosen and its connections resolved,
/// nothing opened yet.
pub struct Daemon {
    settings: Settings,
    registry: Registry,
    options: RunOptions,
    selected: Vec<Arc<dyn Projector>>,
    /// For batches (and the HTTP endpoints).
    pg: db::PgConfig,
    /// For LISTEN and the start-up preparation.
    session: db::PgConfig,
}

impl Daemon {
    /// Checks the projectors asked for (bad names are rejected before anything
    /// touches the database) and resolves the connections as `settings.database`
    /// says.
    pub fn build(
        settings: Settings,
        registry: Registry,
        options: RunOptions,
    ) -> anyhow::Result<Daemon> {
        let configs = db::configs(&settings.database)?;
        Daemon::build_with(settings, registry, options, configs.url, configs.listen_url)
    }

    /// [`Daemon::build`] with explicit connection configurations: `pg` for
    /// batches, `session` for LISTEN and the start-up preparation (migrations,
    /// projector tables, replays).
    pub fn build_with(
        settings: Settings,
        registry: Registry,
        options: RunOptions,
        pg: db::PgConfig,
        session: db::PgConfig,
    ) -> anyhow::Result<Daemon> {
        let registry = registry.with_upcasters(&crate::feed::Upcasters::new(&settings.upcasters)?);
        let selected = select(&settings, &registry, &options)?;
        Ok(Daemon {
            settings,
            registry,
            options,
            selected,
            pg,
            session,
        })
    }

    /// Runs until `shutdown` resolves (or, with `once`, until caught up). After
    /// `shutdown`, every projector finishes its batch and every task ends before
    /// this returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<Outcome> {
        let token = CancellationToken::new();
        let run = self.run(token.clone());
        tokio::pin!(run, shutdown);
        let mut stopping = false;
        loop {
            tokio::select! {
                outcome = &mut run => return outcome,
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    token.cancel();
                }
            }
        }
    }

    /// Runs in a task of its own, until [`Handle::stop`] (or, with `once`, until
    /// caught up).
    pub fn spawn(self) -> Handle {
        let token = CancellationToken::new();
        let task = tokio::spawn(self.run(token.clone()));
        Handle { token, task }
    }

    async fn run(self, token: CancellationToken) -> anyhow::Result<Outcome> {
        let Daemon {
            settings,
            registry,
            options,
            selected,
            pg,
            session,
        } = self;
        let mut client = tokio::select! {
            // `run` waits for its database however long it takes; `--once` gives up.
            c = db::connect_with_retry(&session, options.once.then(|| settings.daemon.connect_timeout())) => c?,
            _ = token.cancelled() => return Ok(Outcome::default()),
        };
        tracing::info!(database = %db::describe(&session), "connected");
        let progress = Arc::new(Progress::new(settings.log.format == LogFormat::Text));
        let archive = match &settings.archive {
            Some(a) => Some(crate::archive::Store::open(&a.url)?),
            None => None,
        };
        let Some(newest) = prepare::prepare(
            &mut client,
            &registry,
            &options,
            &selected,
            &progress,
            (&settings, archive.as_ref()),
            &token,
        )
        .await?
        else {
            // Stopped while the archive's store was unreachable, before
            // anything was emptied.
            return Ok(Outcome::default());
        };
        let target = options.once.then_some(newest);
        let rebuilds = registry.resolve(&options.rebuild)?;
        let builds = crate::rebuild::prepare(&mut client, &selected, &rebuilds).await?;
        for b in &builds {
            let label = crate::rebuild::label(b.projector.name());
            progress.begin(&label, b.from, newest.id);
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
        // The tasks that serve the projectors; they end when `token` is cancelled.
        let mut services = JoinSet::new();
        if let Some(listen) = &settings.http.listen {
            let state = ops::http::HttpState {
                metrics: ops.metrics.clone(),
                liveness: ops.liveness.clone(),
                pool: pool.clone(),
                registry: registry.clone(),
                stall_after: settings.daemon.stall_warn_after(),
            };
            services.spawn(ops::http::serve(listen, state, token.clone()).await?);
        }
        if let (Some(a), Some(_)) = (&settings.archive, &archive) {
            if let Some(every) = a.interval()? {
                services.spawn(archive_every(
                    every,
                    session.clone(),
                    a.clone(),
                    (ops.metrics.clone(), ops.progress.clone()),
                    token.clone(),
                ));
            }
        }
        let (waker, wakeups) = Waker::new(session, pool.clone(), settings.daemon.poll_interval());
        services.spawn(waker.run(token.clone()));

        let mut drivers = JoinSet::new();
        // Each rebuild's end, for the live projector waiting on its swap.
        let rebuild_done: std::collections::HashMap<String, CancellationToken> = builds
            .iter()
            .map(|b| (b.projector.name().to_string(), CancellationToken::new()))
            .collect();
        for p in selected {
            let worker = Worker::new(
                p.clone(),
                settings.projector(p.name()),
                &settings.daemon,
                pool.clone(),
            )
            .on_part(ops.progress.reporter(&ops.liveness, p.name()))
            .on_segment(ops.progress.segment_reporter(&ops.liveness, p.name()))
            .with_archive(archive.clone());
            ops.liveness.beat(p.name());
            let mut driver = Driver::new(
                worker,
                settings.daemon.clone(),
                wakeups.clone(),
                token.clone(),
                target,
                ops.clone(),
            );
            if let Some(done) = rebuild_done.get(p.name()) {
                driver = driver.rebuilt_beside(done.clone());
            }
            drivers.spawn(driver.run());
        }
        let swaps = Arc::new(std::sync::Mutex::new(Vec::new()));
        for build in builds {
            let name = build.projector.name().to_string();
            let done = rebuild_done.get(&name).cloned().unwrap_or_default();
            let drive = crate::rebuild::drive(
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
                archive.clone(),
            );
            drivers.spawn(async move {
                let _done = done.drop_guard();
                drive.await
            });
        }
        tracing::info!(projectors = drivers.len(), "running");
        ops::systemd::ready();
        if let Some(watchdog) = ops::systemd::watchdog(ops.liveness.clone(), token.clone()) {
            services.spawn(watchdog);
        }

        let result = supervise(drivers, &token).await.map(|mut outcome| {
            outcome.swaps = std::mem::take(&mut *swaps.lock().unwrap_or_else(|e| e.into_inner()));
            outcome
        });
        ops::systemd::stopping();
        token.cancel();
        while services.join_next().await.is_some() {}
        pool.close();
        result
    }
}

/// `archive.interval`: a pass every `every`, on a connection of its own (a pass
/// keeps a temporary table and a session lock), until shutdown. A failed pass
/// deleted nothing; it is logged, counted, and tried again next time.
///
/// Each pass runs on threads of its own (`archive::on_own_threads`), with a
/// store of its own, so that it can lower their priority while the
/// application writes without lowering the projectors'.
async fn archive_every(
    every: Duration,
    session: db::PgConfig,
    settings: crate::config::ArchiveSettings,
    (metrics, progress): (Arc<Metrics>, Arc<Progress>),
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (session, settings, progress, cancelled) = (
            session.clone(),
            settings.clone(),
            progress.clone(),
            token.clone(),
        );
        let pass = crate::archive::on_own_threads(move |process| async move {
            let pass = async {
                let store = crate::archive::Store::open(&settings.url)?;
                let mut client = db::connect(&session).await?;
                crate::archive::run_pass(
                    &mut client,
                    &session,
                    &settings,
                    &store,
                    false,
                    process,
                    Some(&progress),
                )
                .await
            };
            tokio::select! {
                _ = cancelled.cancelled() => None,
                outcome = pass => Some(outcome),
            }
        });
        // At shutdown the pass sees the token itself, and ends at once.
        let outcome = match pass {
            Ok(pass) => match pass.await {
                Ok(Some(outcome)) => outcome,
                Ok(None) => return,
                Err(_) => Err(anyhow::anyhow!(
                    "the archive pass's thread ended without a result"
                )),
            },
            Err(e) => Err(anyhow::anyhow!(
                "cannot start the archive pass's threads: {e}"
            )),
        };
        match outcome {
            Ok(o) => {
                metrics.archive_pass(Some((o.events as u64, o.bytes as u64)));
                tracing::info!(
                    events = o.events,
                    segments = o.segments,
                    bytes = o.bytes,
                    held_back_by = o.held_back_by.as_deref().unwrap_or("-"),
                    "archive pass done"
                );
            }
            Err(e) => {
                metrics.archive_pass(None);
                tracing::warn!(error = %crate::util::one_line(&format!("{e:#}")), "archive pass failed; nothing was deleted, trying again in archive.interval");
            }
        }
    }
}

/// Waits for every projector task; the first failure (an error or a panic)
/// stops the others and is the result.
async fn supervise(
    mut drivers: JoinSet<anyhow::Result<Option<Failure>>>,
    token: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut failure = None;
    while let Some(joined) = drivers.join_next().await {
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
    match failure {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// A daemon running in a task of its own ([`Daemon::spawn`]). Dropping it stops
/// the daemon too.
pub struct Handle {
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<Outcome>>,
}

impl Handle {
    /// Asks the daemon to stop, as the shutdown future of
    /// [`Daemon::run_until_stopped`] does, and waits until it has.
    pub async fn stop(self) -> anyhow::Result<Outcome> {
        self.token.cancel();
        self.join().await
    }

    /// Waits until the daemon ends by itself (with `once`, caught up; or failed).
    pub async fn join(mut self) -> anyhow::Result<Outcome> {
        match (&mut self.task).await {
            Ok(outcome) => outcome,
            Err(e) => Err(anyhow::anyhow!("the daemon task panicked: {e}")),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Runs the daemon until `shutdown` resolves (or, with `once`, until caught up),
/// connecting as `settings.database` says.
pub async fn run(
    settings: &Settings,
    registry: &Registry,
    options: &RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Outcome> {
    Daemon::build(settings.clone(), registry.clone(), options.clone())?
        .run_until_stopped(shutdown)
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
    Daemon::build_with(
        settings.clone(),
        registry.clone(),
        options.clone(),
        pg,
        session,
    )?
    .run_until_stopped(shutdown)
    .await
}
