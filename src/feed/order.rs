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
//! [`crate::projector::Feed::StreamSet`] batches get the same repair, set-based:
//! the projector orders each stream by `sequence` itself, so only earlier events
//! beyond the batch's end matter; [`super::ahead_of_range`] finds them and they
//! join the batch's range (see [`crate::projector::EventRange`]).
//!
//! Cost: one probe of the `(stream_id, sequence)` index per event read, paid only by
//! the projectors that need an order; [`crate::projector::Feed::Set`] projectors
//! fold a set and pay nothing.

use std::collections::HashSet;

use crate::db::Db;

use super::reader::{later_predecessors, ReadRow};
use super::Position;
use crate::projector::{Event, EventFilter};

/// A batch in delivery order.
#[derive(Debug, Default)]
pub struct OrderedBatch {
    /// What the projector receives.
    pub events: Vec<Event>,
    /// For each delivered event, the index of the read row that brought it.
    pub origin: Vec<usize>,
    /// The checkpoint once the batch commits: the last row read.
    pub upto: Position,
    /// Delivered events beyond `upto`, to record in `pgfold.delivered_ahead`.
    pub ahead: Vec<(i64, Position)>,
}

/// Orders `rows` (as read, in position order) for delivery. `already_ahead` holds
/// the events delivered ahead by earlier batches.
pub async fn order_batch<C: Db>(
    client: &C,
    rows: Vec<ReadRow>,
    already_ahead: &HashSet<i64>,
    filter: &EventFilter,
) -> Result<OrderedBatch, tokio_postgres::Error> {
    let mut batch = OrderedBatch {
        upto: rows.last().map(|r| r.event.position).unwrap_or_default(),
        ..OrderedBatch::default()
    };
    let mut delivered: HashSet<i64> = HashSet::new();
    for (index, row) in rows.into_iter().enumerate() {
        let id = row.event.id;
        if already_ahead.contains(&id) || delivered.contains(&id) {
            continue;
        }
        if row.predecessor_later {
            for earlier in later_predecessors(client, &row.event, filter).await? {
                if already_ahead.contains(&earlier.id) || !delivered.insert(earlier.id) {
                    continue;
                }
                if earlier.position > batch.upto {
                    batch.ahead.push((earlier.id, earlier.position));
                }
                batch.events.push(earlier);
                batch.origin.push(index);
            }
        }
        delivered.insert(id);
        batch.events.push(row.event);
        batch.origin.push(index);
    }
    Ok(batch)
}
