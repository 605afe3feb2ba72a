//! A batch of decoded events (`Fold::Events`): read within the count and byte
//! budgets, each stream's events put in `sequence` order, handed to the fold.

use super::isolate::{rolled_back, Isolated, SAVEPOINT};
use super::{Step, Transaction, Transient, Worker};
use crate::bookkeeping::Checkpoint;
use crate::db::Db;
use crate::feed::{self, Horizon};
use crate::projector::{EventFold, ProjectorError, Tx};

impl Worker {
    pub(super) async fn events_batch(
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

    /// Warns, once per event, that `row` alone exceeds the byte budget: it is
    /// applied by itself, and memory peaks with its size rather than the budget's.
    pub(super) fn warn_if_oversized(&mut self, row: &feed::ReadRow) {
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
    pub(super) fn warn_cut_by_bytes(&mut self, rows: &[feed::ReadRow]) {
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
}
