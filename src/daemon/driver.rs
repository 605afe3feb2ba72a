//! One projector's loop: step the worker, then decide from the [`Step`] how long
//! to wait before the next one, until shutdown, parking, or (with a target)
//! catching up.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cadence::{self, Cadence};
use super::wakeup::Wakeups;
use crate::bookkeeping::Failure;
use crate::config::DaemonSettings;
use crate::feed::{Horizon, Position};
use crate::ops::{metrics::Metrics, progress::Progress, Liveness};
use crate::util::Backoff;
use crate::worker::{ArchiveError, Step, Transient, Worker};

/// How long after its last batch a projector keeps polling rather than arming
/// the wake-up flag, and how often it polls meanwhile.
const LINGER: Duration = Duration::from_millis(100);
const LINGER_POLL: Duration = cadence::BASE;

/// How often a catch-up (`--once`) held back by an open transaction looks again.
const BLOCKED_CATCH_UP_POLL: Duration = Duration::from_millis(20);

/// What the projector tasks report to.
#[derive(Clone)]
pub(super) struct Ops {
    pub metrics: Arc<Metrics>,
    pub progress: Arc<Progress>,
    pub liveness: Arc<Liveness>,
}

/// After a step: go on at once, or stop with what to report.
enum Next {
    Continue,
    Stop(Option<Failure>),
}

/// A projector's task. With a target (`--once`), database errors that outlast
/// `daemon.connect_timeout_ms` end the run instead of being retried forever.
pub(super) struct Driver {
    worker: Worker,
    name: String,
    settings: DaemonSettings,
    wakeups: Wakeups,
    token: CancellationToken,
    target: Option<Position>,
    ops: Ops,
    backoff: Backoff,
    /// Since when every step has failed with a database error.
    failing_since: Option<Instant>,
    /// The transaction holding the horizon back, and since when.
    blocked: Option<(u64, Instant)>,
    /// The blocker already warned about.
    warned_blocker: Option<u64>,
    /// When the last batch with events committed.
    last_progress: Instant,
    /// How long between live batches, by the rate of the log.
    cadence: Cadence,
    /// Cancelled once this run's rebuild of the projector ends (swapped, parked
    /// or failed); `None` when this run rebuilds nothing of it.
    rebuild_done: Option<CancellationToken>,
    /// With a target, the tables were found built with another definition after
    /// that rebuild had ended.
    outdated_after_rebuild: bool,
}

impl Driver {
    pub fn new(
        worker: Worker,
        settings: DaemonSettings,
        wakeups: Wakeups,
        token: CancellationToken,
        target: Option<Position>,
        ops: Ops,
    ) -> Driver {
        Driver {
            name: worker.name().to_string(),
            worker,
            settings,
            wakeups,
            token,
            target,
            ops,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            failing_since: None,
            blocked: None,
            warned_blocker: None,
            last_progress: Instant::now()
                .checked_sub(LINGER)
                .unwrap_or_else(Instant::now),
            cadence: Cadence::default(),
            rebuild_done: None,
            outdated_after_rebuild: false,
        }
    }

    /// `done` is cancelled when this run's rebuild of the projector ends.
    pub fn rebuilt_beside(mut self, done: CancellationToken) -> Driver {
        self.rebuild_done = Some(done);
        self
    }

    /// Steps until shutdown, parking, or (with a target) caught up.
    pub async fn run(mut self) -> anyhow::Result<Option<Failure>> {
        let result = self.drive().await;
        self.ops.liveness.retire(&self.name);
        result
    }

    async fn drive(&mut self) -> anyhow::Result<Option<Failure>> {
        // The archive comes before the table's first batch; its transient errors
        // are retried as a batch's are.
        let mut archive_read = false;
        while !self.token.is_cancelled() {
            self.ops.liveness.beat(&self.name);
            // A wake-up that arrives while we work must not be lost, and one that
            // arrived before we started this round is already accounted for.
            self.wakeups.mark_seen();
            let started = std::time::Instant::now();
            let step = if archive_read {
                self.worker.step().await
            } else {
                match self.worker.read_archive().await {
                    Ok(_) => {
                        archive_read = true;
                        self.failing_since = None;
                        self.backoff.reset();
                        continue;
                    }
                    Err(ArchiveError::Transient(e)) => Err(e),
                    Err(ArchiveError::Fatal(e)) => return Err(e),
                }
            };
            if step.is_ok() {
                self.failing_since = None;
            }
            let next = match step {
                Ok(Step::Applied { events, upto, full }) => {
                    self.applied(events, upto, full, started).await
                }
                Ok(Step::Idle { horizon, position }) => self.idle(horizon, position).await,
                Ok(Step::Busy) => self.busy().await,
                Ok(Step::Outdated) => self.outdated().await,
                Ok(Step::Parked(failure)) => Next::Stop(Some(failure)),
                Ok(Step::Retry(delay)) => self.retry(delay).await,
                Err(e) => self.failed(e).await?,
            };
            if let Next::Stop(parked) = next {
                return Ok(parked);
            }
        }
        Ok(None)
    }

    async fn applied(
        &mut self,
        events: u64,
        upto: Position,
        full: bool,
        started: std::time::Instant,
    ) -> Next {
        self.backoff.reset();
        if events > 0 {
            self.last_progress = Instant::now();
        }
        self.blocked = None;
        let ops = &self.ops;
        ops.metrics.horizon_stalled_for(0.0);
        ops.metrics
            .batch_applied(&self.name, events, started.elapsed().as_secs_f64());
        ops.progress.advance(&self.name, upto.id, events);
        tracing::debug!(projector = %self.name, events, position = %upto, "batch applied");
        if full || self.target.is_some() {
            // Catching up: no pause, and the rate of a catch-up is not the log's.
            self.cadence.paused();
        } else {
            // Caught up under a steady flow of writes: batches back to back
            // would each carry a handful of events and cost the database
            // (and the writers sharing its CPU) a dozen statements apiece.
            // Starting one batch per pause (LINGER_POLL, longer when the log
            // grows fast: see `cadence`) keeps the lag within it and gathers
            // the events that arrive meanwhile.
            let next = Instant::from_std(started) + self.cadence.next(started, upto.id);
            self.pause(Some(next), false).await;
        }
        Next::Continue
    }

    async fn idle(&mut self, horizon: Horizon, position: Position) -> Next {
        self.backoff.reset();
        self.cadence.paused();
        self.ops.progress.finish(&self.name);
        if let Some(target) = self.target {
            if horizon.covers(target) || position >= target {
                return Next::Stop(None);
            }
        }
        // Is an open transaction keeping newer events out of reach?
        match horizon.blocker {
            Some(tx) => self.held_back_by(tx).await,
            None => {
                self.blocked = None;
                self.ops.metrics.horizon_stalled_for(0.0);
            }
        }
        if self.target.is_some() {
            // Catching up: the blocker will finish; look again soon.
            self.pause(Some(Instant::now() + BLOCKED_CATCH_UP_POLL), true)
                .await;
            return Next::Continue;
        }
        // Under a steady flow of writes, arming the wake-up flag would make
        // nearly every writer notify (and queue on the notify lock) just to
        // wake a daemon that is about to look anyway. So for a while after
        // the last batch, look again every LINGER_POLL instead; arm only
        // once the flow has paused.
        if self.last_progress.elapsed() < LINGER {
            self.pause(Some(Instant::now() + LINGER_POLL), true).await;
            return Next::Continue;
        }
        self.wakeups.report_idle();
        self.pause(None, true).await;
        Next::Continue
    }

    /// Transaction `tx` keeps the horizon back: measure it, and warn once it has
    /// for `daemon.stall_warn_after_ms`.
    async fn held_back_by(&mut self, tx: u64) {
        let since = match self.blocked {
            Some((b, since)) if b == tx => since,
            _ => {
                self.blocked = Some((tx, Instant::now()));
                Instant::now()
            }
        };
        self.ops
            .metrics
            .horizon_stalled_for(since.elapsed().as_secs_f64());
        if since.elapsed() >= self.settings.stall_warn_after() && self.warned_blocker != Some(tx) {
            self.warned_blocker = Some(tx);
            self.worker.warn_stalled(tx, since.elapsed()).await;
        }
    }

    async fn busy(&mut self) -> Next {
        let next = Instant::now() + self.settings.poll_interval();
        self.pause(Some(next), true).await;
        Next::Continue
    }

    /// The tables wait for a rebuild to swap in this definition. A run waits for
    /// it; a catch-up (`--once`) waits only while its own rebuild of them runs,
    /// and looks once more after it ends (a swap made them current), since no one
    /// else is bound to swap them within the run.
    async fn outdated(&mut self) -> Next {
        match &self.rebuild_done {
            Some(done) if !done.is_cancelled() => {
                let done = done.clone();
                tokio::select! {
                    _ = done.cancelled() => {}
                    _ = self.busy() => {}
                }
                return Next::Continue;
            }
            _ if self.target.is_none() => return self.busy().await,
            _ => {}
        }
        if !std::mem::replace(&mut self.outdated_after_rebuild, true) {
            return Next::Continue;
        }
        tracing::warn!(
            projector = %self.name,
            "its tables were built with another definition and this run swaps none in: left as they are"
        );
        Next::Stop(None)
    }

    async fn retry(&mut self, delay: Duration) -> Next {
        self.ops.metrics.batch_failed(&self.name);
        if !delay.is_zero() {
            self.pause(Some(Instant::now() + delay), false).await;
        }
        Next::Continue
    }

    /// A database (or broker) error: retried with backoff; with a target, for at most
    /// `daemon.connect_timeout_ms`.
    async fn failed(&mut self, e: Transient) -> anyhow::Result<Next> {
        self.ops.metrics.batch_failed(&self.name);
        // A sink's broker, the archive's store, or the database.
        let what = match &e {
            Transient::Unavailable(why) => {
                // For `status`: the batches that failed for it were rolled back.
                self.worker.record_error(why).await;
                "broker"
            }
            Transient::Archive(why) => {
                self.worker.record_error(why).await;
                "archive"
            }
            _ => "database",
        };
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if self.target.is_some() && since.elapsed() >= self.settings.connect_timeout() {
            anyhow::bail!(
                "projector {}: {what} unavailable for {} ms (daemon.connect_timeout_ms): {e}",
                self.name,
                since.elapsed().as_millis()
            );
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(
            projector = %self.name,
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            "{what} error; retrying"
        );
        self.pause(Some(Instant::now() + delay), false).await;
        Ok(Next::Continue)
    }

    /// Waits for shutdown, or `until` (if given), or a wake-up (if `woken`).
    async fn pause(&mut self, until: Option<Instant>, woken: bool) {
        let deadline = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.token.cancelled() => {}
            _ = self.wakeups.wait(), if woken => {}
            _ = deadline => {}
        }
    }
}
