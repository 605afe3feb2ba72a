//! A set batch: a range of the log folded in SQL (`Fold::Set`, `Fold::StreamSet`),
//! with the plan settings its statements run under, the events of a stream
//! delivered ahead of their place, and a long stream-set range applied in parts.

use std::time::Instant;

use super::apply::{apply_set, count_range};
use super::isolate::{
    event_types, named_event, rolled_back, Isolated, ROLLBACK_TO_SAVEPOINT, SAVEPOINT,
};
use super::parts::{self, PARTS_FROM};
use super::{Step, Transaction, Transient, Worker};
use crate::bookkeeping::Checkpoint;
use crate::db::{Db, Statements};
use crate::feed::{self, EventRange, Horizon, Position};
use crate::projector::SetFold;

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
/// Only once the log has grown past `feed::GENERIC_PLANS_FROM_BYTES`: a generic
/// plan made on a near-empty log scans it, and keeps scanning it as it grows
/// (see `feed::plan_mode`). Below that, this plans for the values.
///
/// A live batch usually follows a live batch, so the batch's first statement
/// ([`BATCH_START`]) already sets this when the previous one ran so; this is
/// sent only when that guess was wrong one way, [`PLAN_FOR_VALUES`] when it
/// was wrong the other way.
static PLAN_GENERICALLY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {}", feed::plan_mode("true")));

/// Undoes what [`BATCH_START`] set, guessing a generic plan, for a batch that
/// turned out not to be live, for the rest of its transaction. Never back to
/// PostgreSQL's `auto`, which would make and keep a generic plan of its own
/// after five executions, whatever size the log has then.
const PLAN_FOR_VALUES: &str =
    "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit TO DEFAULT";

/// For the rest of this batch transaction: plan each statement for this batch's
/// range, without JIT. A paced catch-up runs the same statements over ranges of
/// about a second each (see `worker::pace`):
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

impl Worker {
    /// The size of the next set batch, and whether it must hold exactly that many
    /// events: counting a small batch through the index is cheap, and keeps it at
    /// its size when ids and positions disagree.
    pub(super) fn batch_end_args(&self) -> (u32, bool) {
        let exact = self.isolating_until.is_some() || self.limit <= EXACT_BATCH_END_BELOW;
        (self.limit, exact)
    }

    /// `end`: the batch's end if the step's first round trip found it already;
    /// `planning_generically`: whether that round trip set generic plans.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn set_batch(
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
        // show its progress (see `worker::parts`); not while isolating a failure.
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
                    (true, false) => Db::execute(&tx, &PLAN_GENERICALLY, &[]).await.map(drop),
                    (false, true) => tx.batch_execute(PLAN_FOR_VALUES).await,
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
            tx.ready(&PLAN_GENERICALLY, &[]).await?;
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
}
