//! One projector's batch loop: lock, read, apply, checkpoint, commit.
//!
//! Every batch is one transaction:
//! 1. take the projector's advisory lock (skip the round if another instance has it);
//! 2. read the checkpoint and the horizon (pipelined), then the events after the
//!    checkpoint and below the horizon;
//! 3. `SAVEPOINT`, hand the batch to the projector;
//! 4. move the checkpoint in the same transaction and commit.
//!
//! A batch the projector rejects is rolled back to the savepoint and narrowed
//! (halved, or cut just before the event the projector named) until the failing
//! event stands alone; the good events before it commit on their own. The lone
//! event is retried with backoff up to `max_attempts`, then parked or
//! dead-lettered, all recorded under the same lock.
//!
//! A worker is handed its [`Target`] (the live tables or a rebuild's) and keeps
//! its books through `bookkeeping`; it knows nothing of the daemon or of
//! rebuilds, which drive it. By job:
//! - this file: the worker, its first round trip and its commit;
//! - `events`: a batch of decoded events; `set`: a batch folded in SQL, with
//!   `parts` (a long stream-set range in parts of a few streams), `pace` (how
//!   long a catch-up range is) and `apply` (one fold over one range);
//! - `isolate`: narrowing a rejected batch to its failing event, retries,
//!   parking and dead letters.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod apply;
mod archived;
mod events;
mod isolate;
mod pace;
mod parts;
mod set;
mod target;

use crate::bookkeeping::{self as checkpoint, Failure, State};
use crate::config::{DaemonSettings, ProjectorSettings};
use crate::db::{self, Pool};
use crate::feed::{self, Horizon, Position};
use crate::projector::{Fold, Projector};
use crate::util::one_line;
use pace::Pace;
use tokio_postgres::types::ToSql;

pub use archived::ArchiveError;
pub use target::{search_path_first, Target};

/// The pooled transaction a batch runs in.
pub(crate) type Transaction<'a> = db::Session<deadpool_postgres::Transaction<'a>>;

/// What one call of [`Worker::step`] did.
#[derive(Debug)]
pub enum Step {
    /// Committed a batch. `full`: it was cut at the batch size, so more events are
    /// waiting.
    Applied {
        events: u64,
        upto: Position,
        full: bool,
    },
    /// Nothing to read below the horizon.
    Idle {
        horizon: Horizon,
        position: Position,
    },
    /// Another instance holds the projector.
    Busy,
    /// The tables were built with another definition of the projector: nothing
    /// is applied to them until a rebuild swaps in this one.
    Outdated,
    /// The projector is parked on a failed event.
    Parked(Failure),
    /// An event failed and will be retried after the delay.
    Retry(Duration),
}

/// An error that is not about the data: retried with backoff, never counted
/// against an event. Shown as one line (logs and `--once`'s error quote it); the
/// error it came from is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
pub enum Transient {
    #[error("{}", one_line(&db::error_text(.0)))]
    Database(#[from] tokio_postgres::Error),
    #[error("{}", pool_error_text(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The projector's [`ProjectorError::Unavailable`]: a sink's broker.
    ///
    /// [`ProjectorError::Unavailable`]: crate::projector::ProjectorError::Unavailable
    #[error("{0}")]
    Unavailable(String),
    /// The archive's store did not answer for a segment a replay must read.
    #[error("{0}")]
    Archive(String),
}

fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    one_line(&match e {
        deadpool_postgres::PoolError::Backend(pg) => db::error_text(pg),
        other => other.to_string(),
    })
}

/// A batch's first statement: keeps the horizon (`feed::KeptHorizonWith`) and,
/// for the rest of the transaction, sets `$1`, whether its commit waits for its
/// WAL to be flushed (`daemon.synchronous_commit`); `$2`, when given, the most
/// parallel workers a statement may start; `$3`, whether it plans generically
/// ([`PLAN_GENERICALLY`]; for its values if not). One statement for what were
/// three, a hundred times a second.
static BATCH_START: std::sync::LazyLock<feed::KeptHorizonWith> = std::sync::LazyLock::new(|| {
    feed::KeptHorizonWith::new(&format!(
        "set_config('synchronous_commit', CASE WHEN $1 THEN 'on' ELSE 'off' END, true),
         set_config('max_parallel_workers_per_gather',
                    coalesce($2, current_setting('max_parallel_workers_per_gather')), true),
         {}",
        feed::plan_mode("$3")
    ))
});

pub struct Worker {
    projector: Arc<dyn Projector>,
    /// The checkpoint row (and advisory lock) it works under: the projector's
    /// name, or a rebuild's own key (see [`Target`]).
    key: String,
    /// Where its batches write: the live tables, or a rebuild's beside them.
    target: Target,
    settings: ProjectorSettings,
    pool: Pool,
    /// The batch size for this projector's feed: the configured one, or for a set
    /// feed the paced one (see `worker::pace`).
    full_limit: u32,
    /// Set feeds: sizes catch-up ranges to take about a second each.
    pace: Option<Pace>,
    /// The current one: smaller while a failing event is being isolated.
    limit: u32,
    /// While isolating: the end of the batch that failed. The full size comes back
    /// once the checkpoint has passed it.
    isolating_until: Option<Position>,
    /// `daemon.batch_bytes`, for decoded-events batches.
    batch_bytes: i64,
    /// The last event found larger than `batch_bytes`: it is read again on every
    /// retry, and is worth one warning, not one per attempt.
    warned_oversized: Option<i64>,
    /// Whether the byte budget has cut a batch yet: said once, not every batch.
    warned_cut: bool,
    /// Whether this instance has said that its definition is not the one the
    /// tables were built with (see `Checkpoint::built_with`).
    warned_definition: bool,
    /// The checkpoint as this worker last loaded or moved it: where the next
    /// batch probably starts (checked against the one loaded before use).
    seen: Option<Position>,
    /// `daemon.synchronous_commit`.
    synchronous_commit: bool,
    /// Whether the last set batch ran with generic plans: the next one's guess.
    generic_plans: bool,
    /// Told of each part of a batch applied in parts (see `worker::parts`), before
    /// the batch commits: (position, events consumed so far in the batch).
    on_part: Option<OnPart>,
    /// Told of each archived segment applied (committed): (its last event id,
    /// the events it applied).
    on_segment: Option<OnPart>,
    /// Where archived segments are read from (`archive.url`), if configured.
    archive: Option<crate::archive::Store>,
}

/// What [`Worker::on_part`] calls.
pub type OnPart = Arc<dyn Fn(i64, u64) + Send + Sync>;

impl Worker {
    pub fn new(
        projector: Arc<dyn Projector>,
        settings: ProjectorSettings,
        daemon: &DaemonSettings,
        pool: Pool,
    ) -> Worker {
        // A set fold's catch-up is paced into ranges that show progress. A stream
        // set's is not: a stream whose events fall into two ranges has its snapshot
        // written by the first and patched by the second, and the order_snapshots
        // replay took 4x as long in ranges as in one statement (issue 18's note).
        // Its catch-up is one range, applied in parts by stream (`worker::parts`).
        let pace = match projector.fold() {
            Fold::Set(_) => Some(Pace::new(daemon.set_batch_size)),
            Fold::Events(_) | Fold::StreamSet(_) => None,
        };
        let full_limit = match projector.fold() {
            Fold::Events(_) => daemon.batch_size,
            Fold::Set(_) | Fold::StreamSet(_) => {
                pace.as_ref().map_or(daemon.set_batch_size, Pace::limit)
            }
        };
        Worker {
            key: projector.name().to_string(),
            target: Target::Live,
            projector,
            settings,
            pool,
            full_limit,
            pace,
            limit: full_limit,
            isolating_until: None,
            batch_bytes: i64::try_from(daemon.batch_bytes).unwrap_or(i64::MAX),
            warned_oversized: None,
            warned_cut: false,
            warned_definition: false,
            seen: None,
            synchronous_commit: daemon.synchronous_commit,
            generic_plans: false,
            on_part: None,
            on_segment: None,
            archive: None,
        }
    }

    /// Calls `report` after each part of a batch applied in parts, with how far
    /// the batch has come (an event id) and the events consumed so far in it: the
    /// progress of a long stream-set catch-up, which commits only at its end.
    pub fn on_part(mut self, report: OnPart) -> Worker {
        self.on_part = Some(report);
        self
    }

    /// Calls `report` after each archived segment applied, with its last event
    /// id and the events it applied, counted for good (see
    /// [`Worker::read_archive`]); a segment's row groups go to
    /// [`Worker::on_part`] while it is applied.
    pub fn on_segment(mut self, report: OnPart) -> Worker {
        self.on_segment = Some(report);
        self
    }

    /// Reads archived segments from `store` (see [`Worker::read_archive`]).
    pub fn with_archive(mut self, store: Option<crate::archive::Store>) -> Worker {
        self.archive = store;
        self
    }

    pub fn name(&self) -> &str {
        self.projector.name()
    }

    /// This worker applies batches into `target`, under its checkpoint row.
    pub fn into(mut self, target: Target) -> Worker {
        self.key = target.key(self.projector.name());
        self.target = target;
        self
    }

    /// Runs one batch transaction.
    pub async fn step(&mut self) -> Result<Step, Transient> {
        let started = Instant::now();
        let mut conn = self.pool.get().await?;
        // Statements are sent as database.prepared_statements says (db::Session).
        let tx = conn.transaction().await?;
        let name = self.key.clone();
        // Everything up to the batch's end travels in one round trip: a live batch
        // runs a hundred times a second, and each round trip costs the daemon and
        // its backend more CPU than most of the statements in it. None of these
        // statements depends on another's answer, and the server runs them in the
        // order sent:
        // - the lock first, so that the checkpoint's statement (a later snapshot)
        //   sees what the lock's last holder committed; if it is not granted, the
        //   answers of the rest are dropped;
        // - the horizon before anything reads events, as it must be;
        // - a set feed's batch end from the checkpoint this worker last saw, with
        //   the horizon the statement before it kept in the transaction; it is
        //   used only if the checkpoint loaded turns out to be that one.
        // A rebuild's batches reach its build schema first.
        let schema = self.target.enter(&tx);
        // A decoded batch is a few thousand rows at most: starting parallel
        // workers for it costs more than it saves.
        let serial = matches!(self.projector.fold(), Fold::Events(_)).then_some("0");
        // Guessed from the last batch: a live batch follows a live batch.
        let generic = self.generic_plans && !matches!(self.projector.fold(), Fold::Events(_));
        let start_params: [&(dyn ToSql + Sync); 3] = [&self.synchronous_commit, &serial, &generic];
        let guess = match (self.projector.fold(), self.seen) {
            (Fold::Set(_) | Fold::StreamSet(_), Some(seen)) => Some((seen, self.batch_end_args())),
            _ => None,
        };
        let end = async {
            match guess {
                Some((seen, (limit, exact))) => feed::set_batch_end(&tx, seen, None, limit, exact)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        // The server runs them in the order their messages leave, and a statement
        // not yet prepared on this connection would leave only after its
        // preparation's answer, behind the ones sent after it: ready them first
        // (a no-op once done on a connection).
        checkpoint::ready_lock_and_load(&tx, &name).await?;
        BATCH_START.ready(&tx, &start_params).await?;
        if let Some((_, (_, exact))) = guess {
            feed::ready_set_batch_end(&tx, exact).await?;
        }
        let (locked, ck, horizon, (), end) = tokio::try_join!(
            checkpoint::try_lock(&tx, &name),
            checkpoint::load(&tx, &name),
            BATCH_START.run(&tx, &start_params),
            schema,
            end
        )?;
        if !locked {
            return Ok(Step::Busy);
        }
        self.seen = Some(ck.position);
        // Applies only into tables built with this definition: an instance whose
        // definition changed serves the old tables as they stand until its
        // rebuild swaps in, and one still running the old definition stops once
        // the new one is in.
        let fingerprint = self.projector.fingerprint();
        if !ck.built_with(&fingerprint) {
            if !self.warned_definition {
                self.warned_definition = true;
                tracing::warn!(
                    projector = self.projector.name(),
                    checkpoint = %name,
                    fingerprint = %fingerprint,
                    "the tables were built with another definition of this projector: not applying batches until a rebuild swaps in this one (or run the definition they hold)"
                );
            }
            return Ok(Step::Outdated);
        }
        if ck.state == State::Failed {
            return Ok(Step::Parked(checkpoint::failure(&tx, &name).await?));
        }
        if let Some(until) = self.isolating_until {
            if ck.position >= until {
                self.isolating_until = None;
                self.limit = self.full_limit;
            }
        }
        // The guessed end holds if it was read from this checkpoint, for this size.
        let end = match guess {
            Some((seen, args)) if seen == ck.position && args == self.batch_end_args() => end,
            _ => None,
        };
        let projector = self.projector.clone();
        match projector.fold() {
            Fold::Events(fold) => self.events_batch(tx, ck, horizon, fold).await,
            Fold::Set(fold) => {
                self.set_batch(tx, ck, horizon, end, generic, started, fold, false)
                    .await
            }
            Fold::StreamSet(fold) => {
                self.set_batch(tx, ck, horizon, end, generic, started, fold, true)
                    .await
            }
        }
    }

    /// Records the batch's events delivered ahead, moves the checkpoint to `upto`
    /// after `events` applied, and commits.
    pub(super) async fn commit(
        &mut self,
        tx: Transaction<'_>,
        ahead: &[(i64, Position)],
        upto: Position,
        events: u64,
        had_ahead: bool,
        full: bool,
    ) -> Result<Step, Transient> {
        let name = &self.key;
        // One round trip for the insert, the checkpoint's move and the commit: the
        // insert adds rows the move's delete never reaches (they lie beyond
        // `upto`).
        checkpoint::ready_advance(&tx, ahead, had_ahead).await?;
        let last = async |tx: &Transaction<'_>| {
            tokio::try_join!(
                checkpoint::record_ahead(tx, name, ahead),
                checkpoint::advance(tx, name, upto, events, had_ahead)
            )
        };
        tx.commit_behind(last).await?;
        self.seen = Some(upto);
        Ok(Step::Applied { events, upto, full })
    }

    /// Records `why` as the projector's last error, outside any batch: for an
    /// error whose batches were rolled back (a sink's broker is unreachable), so
    /// that `status` shows it. Best effort: the database may be what is down.
    pub async fn record_error(&self, why: &str) {
        if let Ok(client) = self.pool.get().await {
            let _ = checkpoint::record_error(&client, &self.key, why).await;
        }
    }

    /// Logs who holds the horizon back, once it has done so for `for_how_long`.
    pub async fn warn_stalled(&self, tx: u64, for_how_long: Duration) {
        let who = match self.pool.get().await {
            Ok(client) => feed::blocker(&client, tx).await.ok().flatten(),
            Err(_) => None,
        };
        let held_ms = for_how_long.as_millis() as u64;
        match who {
            Some(b) => {
                tracing::warn!(
                projector = self.name(),
                blocking_pid = b.pid,
                blocking_state = b.state.as_deref().unwrap_or("not visible to this role"),
                transaction_age_s = b.transaction_age_seconds.unwrap_or(-1.0),
                query = b.query_start.as_deref().unwrap_or("not visible to this role"),
                held_ms,
                "an open transaction is keeping new events from being read; waiting for it to end"
            )
            }
            None => tracing::warn!(
                projector = self.name(),
                transaction = tx,
                held_ms,
                "an open transaction (no longer visible) kept new events from being read"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_error_keeps_its_source_and_its_one_line_text() {
        let e = Transient::from(deadpool_postgres::PoolError::Closed);
        assert_eq!(
            e.to_string(),
            one_line(&deadpool_postgres::PoolError::Closed.to_string())
        );
        let source = std::error::Error::source(&e).expect("the pool error is the source");
        assert!(source
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some_and(|p| matches!(p, deadpool_postgres::PoolError::Closed)));
    }
}
