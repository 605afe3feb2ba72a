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

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::checkpoint::{self, Checkpoint, Failure, State};
use super::pace::Pace;
use super::parts::{self, PARTS_FROM};
use crate::config::{DaemonSettings, OnError, ProjectorSettings};
use crate::db::{self, Db, Pool, Statements};
use crate::feed::{self, EventRange, Horizon, Position};
use crate::projector::{EventFold, Fold, Projector, ProjectorError, SetBatch, SetFold, Tx};
use crate::util::one_line;
use tokio_postgres::types::ToSql;

/// The pooled transaction a batch runs in.
pub(super) type Transaction<'a> = db::Session<deadpool_postgres::Transaction<'a>>;

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
    #[error("{0}")]
    Unavailable(String),
}

fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    one_line(&match e {
        deadpool_postgres::PoolError::Backend(pg) => db::error_text(pg),
        other => other.to_string(),
    })
}

/// Set batches of at most this many events end exactly at their size.
const EXACT_BATCH_END_BELOW: u32 = 10_000;

/// A set batch spanning fewer event ids than this (a live one) runs its
/// statements with generic plans, when its projector allows it.
const GENERIC_PLANS_BELOW: i64 = 5_000;

/// For the rest of this batch transaction: reuse each prepared statement's
/// generic plan instead of planning it again for the batch's values. Live, the
/// same statements run a hundred times a second over a few dozen events, and
/// planning them was a quarter of the daemon's database CPU. PostgreSQL never
/// switches to the generic plan by itself here: it compares estimated costs, and
/// a generic plan, estimated from default selectivities, always looks dearer
/// than a custom one for a range it knows to be tiny.
///
/// JIT goes off with it: that same estimate can cross `jit_above_cost`, and the
/// plan would then be compiled on every execution (25 ms a batch, measured, for
/// `daily_revenue`'s fold of 30 events).
///
/// A live batch usually follows a live batch, so the batch's first statement
/// ([`BATCH_START`]) already sets this when the previous one ran so; this is
/// sent only when that guess was wrong one way, [`PLAN_AS_CONFIGURED`] when it
/// was wrong the other way.
const PLAN_GENERICALLY: &str = "SELECT set_config('plan_cache_mode', 'force_generic_plan', true),
        set_config('jit', 'off', true)";

/// Undoes what [`BATCH_START`] set, guessing a generic plan, for a batch that
/// turned out not to be live, for the rest of its transaction.
const PLAN_AS_CONFIGURED: &str = "SET LOCAL plan_cache_mode TO DEFAULT; SET LOCAL jit TO DEFAULT";

/// A batch's first statement: keeps the horizon (`feed::KeptHorizonWith`) and,
/// for the rest of the transaction, sets `$1`, whether its commit waits for its
/// WAL to be flushed (`daemon.synchronous_commit`); `$2`, when given, the most
/// parallel workers a statement may start; `$3`, whether it plans generically
/// ([`PLAN_GENERICALLY`]). One statement for what were three, a hundred times a
/// second.
static BATCH_START: std::sync::LazyLock<feed::KeptHorizonWith> = std::sync::LazyLock::new(|| {
    feed::KeptHorizonWith::new(
        "set_config('synchronous_commit', CASE WHEN $1 THEN 'on' ELSE 'off' END, true),
         set_config('max_parallel_workers_per_gather',
                    coalesce($2, current_setting('max_parallel_workers_per_gather')), true),
         CASE WHEN $3 THEN set_config('plan_cache_mode', 'force_generic_plan', true)
                           || set_config('jit', 'off', true) END",
    )
});

/// Where a batch the projector rejects is rolled back to.
const SAVEPOINT: &str = "SAVEPOINT apply";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT apply";

/// For the rest of this batch transaction: plan each statement for this batch's
/// range, without JIT. A paced catch-up runs the same statements over ranges of
/// about a second each (see `daemon::pace`):
/// - after five of them PostgreSQL may settle on a generic plan, costed for a
///   range of a few rows, and keep it for ranges of a hundred thousand
///   (measured: the `daily_revenue` replay took twice as long);
/// - JIT compiles each statement again, every range: up to a second each,
///   measured, where the range itself is meant to take one.
async fn plan_for_values<C: Db>(tx: &C) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT set_config('plan_cache_mode', 'force_custom_plan', true),
                set_config('jit', 'off', true)",
        &[],
    )
    .await?;
    Ok(())
}

pub struct Worker {
    projector: Arc<dyn Projector>,
    /// The checkpoint row (and advisory lock) it works under: the projector's
    /// name, or a rebuild's own key (see `src/rebuild`).
    key: String,
    /// A rebuild's build schema, put first on the `search_path` of every batch
    /// transaction so that the projector's unqualified names reach its new tables.
    schema: Option<String>,
    settings: ProjectorSettings,
    pool: Pool,
    /// The batch size for this projector's feed: the configured one, or for a set
    /// feed the paced one (see `daemon::pace`).
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
    /// Told of each part of a batch applied in parts (see `daemon::parts`), before
    /// the batch commits: (position, events consumed so far in the batch).
    on_part: Option<OnPart>,
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
        // Its catch-up is one range, applied in parts by stream (`daemon::parts`).
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
            schema: None,
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
        }
    }

    /// Calls `report` after each part of a batch applied in parts, with how far
    /// the batch has come (an event id) and the events consumed so far in it: the
    /// progress of a long stream-set catch-up, which commits only at its end.
    pub fn on_part(mut self, report: OnPart) -> Worker {
        self.on_part = Some(report);
        self
    }

    pub fn name(&self) -> &str {
        self.projector.name()
    }

    /// This worker applies batches under the checkpoint `key`, into the tables
    /// found first in `schema` (a rebuild beside the live projection).
    pub fn beside(mut self, key: &str, schema: &str) -> Worker {
        self.key = key.to_string();
        self.schema = Some(schema.to_string());
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
        let schema = async {
            match &self.schema {
                Some(schema) => crate::rebuild::enter(&tx, schema).await,
                None => Ok(()),
            }
        };
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
            return Ok(Step::Busy);
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

    /// The size of the next set batch, and whether it must hold exactly that many
    /// events: counting a small batch through the index is cheap, and keeps it at
    /// its size when ids and positions disagree.
    fn batch_end_args(&self) -> (u32, bool) {
        let exact = self.isolating_until.is_some() || self.limit <= EXACT_BATCH_END_BELOW;
        (self.limit, exact)
    }

    async fn events_batch(
        &mut self,
        tx: Transaction<'_>,
        ck: Checkpoint,
        horizon: Horizon,
        fold: &dyn EventFold,
    ) -> Result<Step, Transient> {
        let filter = self.projector.filter();
        let read = feed::read_events(
            &tx,
            ck.position,
            horizon,
            &filter,
            self.limit,
            self.batch_bytes,
        )
        .await?;
        if read.rows.is_empty() {
            return Ok(Step::Idle {
                horizon,
                position: ck.position,
            });
        }
        if !ck.ahead.contains(&read.rows[0].event.id) {
            self.warn_if_oversized(&read.rows[0]);
        }
        if read.cut_by_bytes {
            self.warn_cut_by_bytes(&read.rows);
        }
        let cut = read.cut_by_bytes;
        let batch = feed::order_batch(&tx, read, &ck.ahead, &filter, self.batch_bytes).await?;
        let read = batch.rows;
        let full = cut || read >= self.limit as usize;
        Db::execute(&tx, SAVEPOINT, &[]).await?;
        let result = if batch.events.is_empty() {
            Ok(())
        } else {
            fold.apply(&Tx::new(&tx), &batch.events).await
        };
        let had_ahead = !ck.ahead.is_empty();
        let events = batch.events.len() as u64;
        let e = match result {
            Ok(()) => {
                return self
                    .commit(tx, &batch.ahead, batch.upto, events, had_ahead, full)
                    .await
            }
            Err(e) => rolled_back(&tx, e).await?,
        };
        let named = match &e {
            ProjectorError::Event { event_id, .. } => batch
                .events
                .iter()
                .position(|ev| ev.id == *event_id)
                .map(|i| (batch.origin[i], &batch.events[i])),
            _ => None,
        };
        let isolated = if read > 1 {
            // Apply the events before the failing one (or the first half when
            // the projector did not say which one failed) on their own.
            Isolated::Narrow(named.map(|(row, _)| row).unwrap_or(read / 2).max(1) as u32)
        } else {
            // One row read, with any events delivered ahead for it: they fail
            // together. Unless the projector named one, blame the row read.
            let event = named
                .map(|(_, ev)| ev)
                .or(batch.events.last())
                .expect("a failed batch delivered events");
            Isolated::Alone {
                event_id: event.id,
                event_type: event.event_type.clone(),
                others: batch
                    .events
                    .iter()
                    .filter(|ev| ev.id != event.id)
                    .map(|ev| (ev.id, ev.event_type.clone()))
                    .collect(),
            }
        };
        self.isolate(tx, e, &ck, isolated, batch.upto, &batch.ahead)
            .await
    }

    /// `end`: the batch's end if the step's first round trip found it already;
    /// `planning_generically`: whether that round trip set generic plans.
    #[allow(clippy::too_many_arguments)]
    async fn set_batch(
        &mut self,
        tx: Transaction<'_>,
        ck: Checkpoint,
        horizon: Horizon,
        end: Option<Option<(Position, bool)>>,
        planning_generically: bool,
        started: Instant,
        fold: &dyn SetFold,
        stream_ordered: bool,
    ) -> Result<Step, Transient> {
        let end = match end {
            Some(end) => end,
            None => {
                let (limit, exact) = self.batch_end_args();
                feed::set_batch_end(&tx, ck.position, Some(horizon), limit, exact).await?
            }
        };
        let Some((upto, full)) = end else {
            return Ok(Step::Idle {
                horizon,
                position: ck.position,
            });
        };
        let span = upto.id - ck.position.id;
        // A long stream-set range is applied in parts of a few streams each, to
        // show its progress (see `daemon::parts`); not while isolating a failure.
        // Only a range that holds most of the log (a replay, a rebuild): the parts
        // walk the keys of every stream in the log and read each part's streams
        // by key, which for a short range of a long log (a daemon restarted
        // after a while) would be reading the whole log to fold a little of it.
        let in_parts = stream_ordered
            && self.isolating_until.is_none()
            && span >= PARTS_FROM
            && span >= upto.id / 2;
        // Parts run the same statements over different streams, each planned for
        // its own.
        let for_values = (self.pace.is_some() || in_parts) && span >= GENERIC_PLANS_BELOW;
        if for_values {
            plan_for_values(&tx).await?;
        }
        // An unnamed statement is parsed and planned again every time, so a
        // generic plan would save nothing there and may be worse than a custom one.
        let generic = fold.generic_plans()
            && tx.statements() == Statements::Prepared
            && (0..GENERIC_PLANS_BELOW).contains(&span);
        self.generic_plans = generic;
        let skip: Vec<i64> = ck.ahead.iter().copied().collect();
        let filter = self.projector.filter();
        // The plan setting, the probe for events to deliver ahead and the savepoint
        // depend on none of one another, and the batch needs none of their
        // answers: one round trip for the four, which a live batch pays a hundred
        // times a second. (The probe reads either way, under a generic plan or a
        // custom one; both read by position.) A stream set's batch is sent as if
        // the probe found nothing to deliver ahead, as it nearly always does; if
        // it finds some, that batch is rolled back and sent again with them.
        let (ahead, range, applied) = {
            let plan = async {
                match (generic, planning_generically && !for_values) {
                    (true, false) => Db::execute(&tx, PLAN_GENERICALLY, &[]).await.map(drop),
                    (false, true) => tx.batch_execute(PLAN_AS_CONFIGURED).await,
                    _ => Ok(()),
                }
            };
            let probe = async {
                match stream_ordered {
                    true => {
                        feed::ahead_of_range(&tx, ck.position, upto, !full, &skip, &filter).await
                    }
                    false => Ok(Vec::new()),
                }
            };
            // Sent ahead of the batch, so they must leave in order (see `step`).
            tx.ready(PLAN_GENERICALLY, &[]).await?;
            tx.ready(SAVEPOINT, &[]).await?;
            let prelude = async { tokio::try_join!(plan, probe, Db::execute(&tx, SAVEPOINT, &[])) };
            if in_parts || (stream_ordered && full) {
                // A catch-up: beside its batch, a round trip is nothing, and the
                // probe of a range cut short changes a planner setting for its own
                // statement (`feed::ahead_of_range`), which the batch must not be
                // sent under.
                let ((), ahead, _) = prelude.await?;
                let ids = ahead.iter().map(|(id, _)| *id).collect();
                let range = EventRange::new(ck.position, upto, skip, ids, &filter);
                let report = |position: i64, events: u64| {
                    if let Some(report) = &self.on_part {
                        report(position, events);
                    }
                };
                let applied = match in_parts {
                    true => {
                        parts::apply_in_parts(
                            &self.key,
                            &self.pool,
                            &tx,
                            fold,
                            &range,
                            self.full_limit,
                            &report,
                        )
                        .await
                    }
                    false => apply_set(&tx, fold, &range).await,
                };
                (ahead, range, applied)
            } else {
                let range = EventRange::new(ck.position, upto, skip.clone(), Vec::new(), &filter);
                let (sent, applied) = tokio::join!(prelude, apply_set(&tx, fold, &range));
                // Had one of these failed, the batch failed for it, not for its events.
                let ((), ahead, _) = sent?;
                let (range, applied) = match ahead.is_empty() {
                    true => (range, applied),
                    false => {
                        Db::execute(&tx, ROLLBACK_TO_SAVEPOINT, &[]).await?;
                        let ids = ahead.iter().map(|(id, _)| *id).collect();
                        let range = EventRange::new(ck.position, upto, skip, ids, &filter);
                        let applied = apply_set(&tx, fold, &range).await;
                        (range, applied)
                    }
                };
                (ahead, range, applied)
            }
        };
        let e = match applied {
            Ok(applied) => {
                let had_ahead = !ck.ahead.is_empty();
                let step = self
                    .commit(tx, &ahead, upto, applied, had_ahead, full)
                    .await?;
                // Only a range cut at its size measures the size; one that ran to
                // the newest event (live) says nothing about it.
                if let (Some(pace), true, None) = (&mut self.pace, full, self.isolating_until) {
                    pace.measured(upto.id - ck.position.id, started.elapsed());
                    self.full_limit = pace.limit();
                    self.limit = self.full_limit;
                }
                return Ok(step);
            }
            Err(e) => rolled_back(&tx, e).await?,
        };
        let isolated = if self.limit > 1 {
            // Halve what the range really holds, not the configured
            // maximum: a live batch of three events needs two rounds, not
            // twenty.
            let held = count_range(&tx, &range).await? as i64;
            Isolated::Narrow((held.clamp(1, i64::from(self.limit)) / 2) as u32)
        } else {
            // The range is one event, with any delivered ahead for it: they fail
            // together, and the SQL may have named which one.
            let mut unit: Vec<i64> = range.ahead().to_vec();
            unit.push(upto.id);
            let failing = named_event(&e)
                .filter(|id| unit.contains(id))
                .unwrap_or(upto.id);
            let mut types = event_types(&tx, &unit).await?;
            Isolated::Alone {
                event_id: failing,
                event_type: types.remove(&failing).unwrap_or_default(),
                others: types.into_iter().collect(),
            }
        };
        self.isolate(tx, e, &ck, isolated, upto, &ahead).await
    }

    /// Warns, once per event, that `row` alone exceeds the byte budget: it is
    /// applied by itself, and memory peaks with its size rather than the budget's.
    fn warn_if_oversized(&mut self, row: &feed::ReadRow) {
        if row.bytes <= self.batch_bytes || self.warned_oversized == Some(row.event.id) {
            return;
        }
        self.warned_oversized = Some(row.event.id);
        tracing::warn!(
            projector = self.projector.name(),
            event_id = row.event.id,
            stream_id = %row.event.stream_id,
            event_type = %row.event.event_type,
            bytes = row.bytes,
            batch_bytes = self.batch_bytes,
            "event larger than daemon.batch_bytes; applying it in a batch of its own"
        );
    }

    /// Warns, the first time it happens, that events are large enough for the byte
    /// budget to cut batches short of `batch_size`: why a catch-up runs at fewer
    /// events per batch, and which event to look at.
    fn warn_cut_by_bytes(&mut self, rows: &[feed::ReadRow]) {
        if self.warned_cut {
            return;
        }
        self.warned_cut = true;
        let Some(largest) = rows.iter().max_by_key(|r| r.bytes) else {
            return;
        };
        tracing::warn!(
            projector = self.projector.name(),
            events = rows.len(),
            bytes = rows.iter().map(|r| r.bytes).sum::<i64>(),
            batch_bytes = self.batch_bytes,
            largest_event_id = largest.event.id,
            largest_stream_id = %largest.event.stream_id,
            largest_bytes = largest.bytes,
            "large events: batches are cut at daemon.batch_bytes, short of daemon.batch_size (logged once)"
        );
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

    /// Shrinks the next batch to `keep` events to isolate a failure.
    fn narrow(&mut self, e: ProjectorError, keep: u32, failed_upto: Position) -> Step {
        tracing::debug!(
            projector = self.projector.name(),
            error = %e,
            keep,
            "batch failed; narrowing it to isolate the failing event"
        );
        self.limit = keep.clamp(1, self.limit);
        self.isolating_until = Some(
            self.isolating_until
                .map_or(failed_upto, |u| u.max(failed_upto)),
        );
        Step::Retry(Duration::ZERO)
    }

    /// Records the batch's events delivered ahead, moves the checkpoint to `upto`
    /// after `events` applied, and commits.
    async fn commit(
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

    /// A batch the projector rejected (rolled back to its savepoint): narrow the
    /// next one, or, once the failing event stands alone, retry it later, park
    /// the projector or dead-letter the event.
    async fn isolate(
        &mut self,
        tx: Transaction<'_>,
        e: ProjectorError,
        ck: &Checkpoint,
        isolated: Isolated,
        upto: Position,
        ahead: &[(i64, Position)],
    ) -> Result<Step, Transient> {
        match isolated {
            Isolated::Narrow(keep) => Ok(self.narrow(e, keep, upto)),
            Isolated::Alone {
                event_id,
                event_type,
                others,
            } => {
                let failure = Failure {
                    projector: self.key.clone(),
                    event_id,
                    event_type,
                    error: message_of(&e),
                    attempts: attempts_after(ck, event_id),
                };
                self.give_up_or_retry(tx, failure, &others, upto, ahead)
                    .await
            }
        }
    }

    /// After the lone failing event (with `others`, the events delivered with it)
    /// has failed once more: retry later, park, or dead-letter them all.
    async fn give_up_or_retry(
        &mut self,
        tx: Transaction<'_>,
        failure: Failure,
        others: &[(i64, String)],
        upto: Position,
        ahead: &[(i64, Position)],
    ) -> Result<Step, Transient> {
        let name = failure.projector.clone();
        let attempts = failure.attempts as u32;
        if attempts < self.settings.max_attempts {
            tracing::warn!(
                projector = %name,
                event_id = failure.event_id,
                event_type = %failure.event_type,
                attempt = attempts,
                max_attempts = self.settings.max_attempts,
                error = %failure.error,
                "event failed; will retry"
            );
            checkpoint::record_failure(&tx, &failure).await?;
            tx.commit().await?;
            return Ok(Step::Retry(retry_delay(attempts)));
        }
        match self.settings.on_error {
            OnError::Stop => {
                tracing::error!(
                    projector = %name,
                    event_id = failure.event_id,
                    event_type = %failure.event_type,
                    attempts,
                    error = %failure.error,
                    "event failed too many times; projector parked (on_error = \"stop\")"
                );
                checkpoint::park(&tx, &failure).await?;
                tx.commit().await?;
                Ok(Step::Parked(failure))
            }
            OnError::Skip => {
                tracing::warn!(
                    projector = %name,
                    event_id = failure.event_id,
                    event_type = %failure.event_type,
                    attempts,
                    error = %failure.error,
                    "event failed too many times; recorded as a dead letter (on_error = \"skip\")"
                );
                checkpoint::dead_letter(&tx, &failure).await?;
                // The stream's earlier events delivered with it cannot be applied
                // without it in the same transaction; they are skipped with it, and
                // recorded, never dropped in silence.
                for (id, event_type) in others {
                    let with = Failure {
                        projector: name.clone(),
                        event_id: *id,
                        event_type: event_type.clone(),
                        error: format!(
                            "skipped with event {} of the same stream, which failed: {}",
                            failure.event_id, failure.error
                        ),
                        attempts: failure.attempts,
                    };
                    checkpoint::dead_letter(&tx, &with).await?;
                }
                self.commit(tx, ahead, upto, 0, true, true).await
            }
        }
    }
}

/// The event a projector named: directly, or in SQL through `pgfold.bad_event`.
/// Applies a set batch; how many events it consumed: as the fold counted them,
/// or counted here in the same round trip.
pub(super) async fn apply_set(
    tx: &Transaction<'_>,
    fold: &dyn SetFold,
    range: &EventRange,
) -> Result<u64, ProjectorError> {
    let batch = SetBatch::new(range);
    fold.apply(&Tx::new(tx), &batch).await?;
    match batch.reported_count() {
        Some(events) => Ok(events),
        None => Ok(count_range(tx, range).await?),
    }
}

/// How many events a set batch's range holds, for the projector's filter.
async fn count_range(
    tx: &Transaction<'_>,
    range: &EventRange,
) -> Result<u64, tokio_postgres::Error> {
    let batch = SetBatch::new(range);
    let row = batch
        .query_one(&Tx::new(tx), "SELECT count(*) FROM batch", &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

fn named_event(e: &ProjectorError) -> Option<i64> {
    match e {
        ProjectorError::Event { event_id, .. } => Some(*event_id),
        ProjectorError::Database(pg) => {
            bad_event_parts(pg.as_db_error()?.message()).map(|(id, _)| id)
        }
        ProjectorError::Other(_) | ProjectorError::Unavailable(_) => None,
    }
}

/// `pgfold.bad_event`'s message, "event N: problem", as (N, problem).
fn bad_event_parts(text: &str) -> Option<(i64, &str)> {
    let (id, problem) = text.strip_prefix("event ")?.split_once(": ")?;
    Some((id.parse().ok()?, problem))
}

/// The event type of each of `ids`, in one query.
async fn event_types(
    tx: &Transaction<'_>,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, Transient> {
    Ok(tx
        .query(
            "SELECT id, event_type FROM events WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn attempts_after(ck: &Checkpoint, event_id: i64) -> i32 {
    if ck.failing_event_id == Some(event_id) {
        ck.attempts + 1
    } else {
        1
    }
}

/// How far isolating a rejected batch has come.
enum Isolated {
    /// Retry at once with the first `keep` events (rows read) only.
    Narrow(u32),
    /// The failing event stands alone, with `others` delivered with it.
    Alone {
        event_id: i64,
        event_type: String,
        others: Vec<(i64, String)>,
    },
}

/// After the projector rejected a batch: a connection error is not the event's
/// fault, and aborts the round instead of counting against the batch; any other
/// error is the batch's, and its work is rolled back to the savepoint.
async fn rolled_back(tx: &Transaction<'_>, e: ProjectorError) -> Result<ProjectorError, Transient> {
    match e {
        ProjectorError::Database(pg) if db::is_transient(&pg) => Err(Transient::Database(pg)),
        ProjectorError::Unavailable(why) => Err(Transient::Unavailable(why)),
        e => {
            Db::execute(tx, ROLLBACK_TO_SAVEPOINT, &[]).await?;
            Ok(e)
        }
    }
}

/// The text stored and shown for a failed event.
fn message_of(e: &ProjectorError) -> String {
    let text = match e {
        ProjectorError::Database(pg) => db::error_text(pg),
        ProjectorError::Event { message, .. } => message.clone(),
        ProjectorError::Other(e) => format!("{e:#}"),
        ProjectorError::Unavailable(why) => why.clone(),
    };
    // SQL raised through pgfold.bad_event already names the event.
    let problem = bad_event_parts(&text).map(|(_, problem)| problem.to_owned());
    let text = problem.unwrap_or(text);
    at_most(one_line(&text), MAX_ERROR_BYTES)
}

/// The longest error text stored (`last_error`, dead letters) and shown by
/// `status`. A projector's message, or PostgreSQL's, can quote the value that
/// failed, and that value can be a payload of megabytes.
const MAX_ERROR_BYTES: usize = 2048;

fn at_most(mut text: String, bytes: usize) -> String {
    if text.len() > bytes {
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(100u64 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(5))
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

    #[test]
    fn error_text_is_cut_at_a_char_boundary() {
        assert_eq!(at_most("short".into(), 2048), "short");
        let long = "é".repeat(2000);
        let cut = at_most(long, MAX_ERROR_BYTES);
        assert!(cut.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(cut.ends_with("é…"), "{cut}");
    }
}
