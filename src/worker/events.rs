//! A batch of decoded events (`Fold::Events`): read within the count and byte
//! budgets, each stream's events put in `sequence` order, handed to the fold.

use super::isolate::{rolled_back, Isolated, SAVEPOINT};
use super::{Step, Transaction, Transient, Worker};
use crate::bookkeeping::Checkpoint;
use crate::db::{self, Db};
use crate::feed::{self, EventFilter, Horizon, Upcasters};
use crate::projector::{EventFold, ProjectorError, Tx};
use crate::util::one_line;

/// Where a read through upcasters is rolled back to when they fail on an event.
const READ_SAVEPOINT: &str = "SAVEPOINT read";
const ROLLBACK_TO_READ_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT read";

impl Worker {
    pub(super) async fn events_batch(
        &mut self,
        tx: Transaction<'_>,
        ck: Checkpoint,
        horizon: Horizon,
        fold: &dyn EventFold,
    ) -> Result<Step, Transient> {
        let filter = self.projector.filter();
        // An upcaster can fail on an event (a cast of a malformed value): the
        // read fails, and the event is found and isolated like one the fold
        // rejects, rather than the read retried for ever.
        let upcast = !filter.upcasters.is_empty();
        if upcast {
            Db::execute(&tx, READ_SAVEPOINT, &[]).await?;
        }
        let read = match feed::read_events(
            &tx,
            ck.position,
            horizon,
            &filter,
            self.limit,
            self.batch_bytes,
        )
        .await
        {
            Err(e) if upcast && !db::is_transient(&e) => {
                return self.upcast_failed(tx, ck, horizon, e).await;
            }
            read => read?,
        };
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
        let batch = match feed::order_batch(&tx, read, &ck.ahead, &filter, self.batch_bytes).await {
            Err(e) if upcast && !db::is_transient(&e) => {
                return self.upcast_failed(tx, ck, horizon, e).await;
            }
            batch => batch?,
        };
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

    /// The read of a batch failed in the projector's upcasters (`e`): finds the
    /// first event of the batch they fail on, probing each as stored in delivery
    /// order (a row's stream's earlier events delivered ahead for it, then the
    /// row), and isolates it as if the fold had rejected it. `e` is returned, and
    /// the read retried, only when no event fails alone: the failure was not the
    /// events'.
    async fn upcast_failed(
        &mut self,
        tx: Transaction<'_>,
        ck: Checkpoint,
        horizon: Horizon,
        e: tokio_postgres::Error,
    ) -> Result<Step, Transient> {
        Db::execute(&tx, ROLLBACK_TO_READ_SAVEPOINT, &[]).await?;
        let filter = self.projector.filter();
        let stored = EventFilter {
            upcasters: Upcasters::none(),
            ..filter.clone()
        };
        let rows = feed::read_events(
            &tx,
            ck.position,
            horizon,
            &stored,
            self.limit,
            self.batch_bytes,
        )
        .await?
        .rows;
        let probe = filter.upcasters.probe();
        for (index, row) in rows.iter().enumerate() {
            let mut delivered = Vec::new();
            if row.predecessor_later {
                delivered = feed::delivered_ahead_of(&tx, &row.event, &stored).await?;
                delivered.retain(|ahead| !ck.ahead.contains(&ahead.id));
            }
            delivered.push(row.event.clone());
            for event in &delivered {
                Db::execute(&tx, READ_SAVEPOINT, &[]).await?;
                let Err(failed) = Db::query(&tx, &probe, &[&event.id]).await else {
                    continue;
                };
                if db::is_transient(&failed) {
                    return Err(failed.into());
                }
                Db::execute(&tx, ROLLBACK_TO_READ_SAVEPOINT, &[]).await?;
                let rejected = ProjectorError::event(
                    event,
                    format!(
                        "upcasting {} from version {}: {}",
                        event.event_type,
                        event.event_version,
                        one_line(&db::error_text(&failed))
                    ),
                );
                if index > 0 {
                    // The rows before it are applied first, on their own.
                    let upto = rows.last().map_or(row.event.position, |r| r.event.position);
                    return self
                        .isolate(tx, rejected, &ck, Isolated::Narrow(index as u32), upto, &[])
                        .await;
                }
                // The row and the events delivered ahead for it fail together;
                // those beyond the row are recorded as delivered, so that the
                // checkpoint passes them once they are dealt with.
                let isolated = Isolated::Alone {
                    event_id: event.id,
                    event_type: event.event_type.clone(),
                    others: delivered
                        .iter()
                        .filter(|other| other.id != event.id)
                        .map(|other| (other.id, other.event_type.clone()))
                        .collect(),
                };
                let ahead: Vec<_> = delivered
                    .iter()
                    .filter(|ahead| ahead.id != row.event.id)
                    .map(|ahead| (ahead.id, ahead.position))
                    .collect();
                return self
                    .isolate(tx, rejected, &ck, isolated, row.event.position, &ahead)
                    .await;
            }
        }
        Err(e.into())
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
