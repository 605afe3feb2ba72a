//! Keeping each stream in `sequence` order when transaction ids disagree with it.
//!
//! A transaction gets its id at its first write, not at commit. An application that
//! writes something else before appending (an outbox row, an idempotency key) can
//! hold an *older* id than a transaction that appended the stream's previous event
//! and committed first:
//!
//! ```text
//! T2: BEGIN; INSERT INTO outbox ...                -- T2 gets xid 100
//! T1: append(S, sequence 1); COMMIT                -- xid 101
//! T2: reads S at sequence 1; append(S, sequence 2); COMMIT
//! ```
//!
//! Read in (transaction, id) order, sequence 2 (100) comes before sequence 1 (101).
//! Reordering inside a batch is not enough: the two can fall into different
//! batches, and sequence 1 may even be above the horizon when sequence 2 is read.
//!
//! The repair: the reading query returns, for each event, whether its stream's
//! previous event (the nearest one the projector consumes) has a later position.
//! For such an event, its stream's earlier events with later positions
//! (necessarily committed: the writer read them before appending) are delivered
//! first, in `sequence` order. Those that lie beyond the batch are recorded in
//! `pgfold.delivered_ahead` in the same transaction, and skipped when the
//! checkpoint reaches them. Exactly-once holds because the record commits
//! atomically with the projection and the checkpoint.
//!
//! [`crate::projector::Fold::StreamSet`] batches get the same repair, set-based:
//! the projector orders each stream by `sequence` itself, so only earlier events
//! beyond the batch's end matter; [`super::ahead_of_range`] finds them and they
//! join the batch's range (see [`super::EventRange`]).
//!
//! Cost: one probe of the `(stream_id, sequence)` index per event read, paid only by
//! the projectors that need an order; [`crate::projector::Fold::Set`] projectors
//! fold a set and pay nothing.

use std::collections::HashSet;

use crate::db::Db;

use super::reader::{later_predecessors, ReadBatch};
use super::Position;
use super::{Event, EventFilter};

/// A batch in delivery order.
#[derive(Debug, Default)]
pub struct OrderedBatch {
    /// What the projector receives.
    pub events: Vec<Event>,
    /// For each delivered event, the index of the read row that brought it.
    pub origin: Vec<usize>,
    /// How many of the rows read the batch holds: fewer than were read when the
    /// events to deliver ahead would have taken it over its byte budget.
    pub rows: usize,
    /// The checkpoint once the batch commits: the last row it holds.
    pub upto: Position,
    /// Delivered events beyond `upto`, to record in `pgfold.delivered_ahead`.
    pub ahead: Vec<(i64, Position)>,
}

/// Orders `read` (rows in position order) for delivery. `already_ahead` holds
/// the events delivered ahead by earlier batches. Events delivered ahead count
/// against `budget` like the rows read: a row whose stream's earlier events do not
/// fit beside the rows read ends the batch before it, unless it is the first row,
/// which goes with them whatever they weigh (and alone, when they exceed the budget).
pub async fn order_batch<C: Db>(
    tx: &C,
    read: ReadBatch,
    already_ahead: &HashSet<i64>,
    filter: &EventFilter,
    budget: i64,
) -> Result<OrderedBatch, tokio_postgres::Error> {
    let mut batch = OrderedBatch::default();
    // Every row read is held until the batch is applied, so all of them count.
    let mut used: i64 = read.rows.iter().map(|r| r.bytes).sum();
    let mut delivered: HashSet<i64> = HashSet::new();
    for (index, row) in read.rows.into_iter().enumerate() {
        let id = row.event.id;
        if already_ahead.contains(&id) || delivered.contains(&id) {
            batch.rows = index + 1;
            batch.upto = row.event.position;
            continue;
        }
        let mut last = false;
        if row.predecessor_later {
            let (mut earlier, fit) =
                later_predecessors(tx, &row.event, filter, budget - used).await?;
            if !fit {
                if index > 0 {
                    break;
                }
                earlier = later_predecessors(tx, &row.event, filter, i64::MAX)
                    .await?
                    .0;
                last = true;
            }
            for earlier in earlier {
                if already_ahead.contains(&earlier.event.id) || !delivered.insert(earlier.event.id)
                {
                    continue;
                }
                used += earlier.bytes;
                let earlier = earlier.event;
                batch.ahead.push((earlier.id, earlier.position));
                batch.events.push(earlier);
                batch.origin.push(index);
            }
        }
        delivered.insert(id);
        batch.rows = index + 1;
        batch.upto = row.event.position;
        batch.events.push(row.event);
        batch.origin.push(index);
        if last {
            break;
        }
    }
    // Only those beyond the batch's end are delivered ahead of their place.
    let upto = batch.upto;
    batch.ahead.retain(|(_, position)| *position > upto);
    Ok(batch)
}

/// The events the repair delivers ahead of `event` (its stream's earlier events
/// with later positions), whatever they weigh, in `sequence` order: to find which
/// event of a batch a read through upcasters failed on, read with `filter` as
/// stored.
pub async fn delivered_ahead_of<C: Db>(
    tx: &C,
    event: &Event,
    filter: &EventFilter,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let (earlier, _) = later_predecessors(tx, event, filter, i64::MAX).await?;
    Ok(earlier.into_iter().map(|row| row.event).collect())
}
