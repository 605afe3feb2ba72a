//! The application side of the event store: appending with optimistic concurrency,
//! as the application would, and waiting until a projector has applied what was
//! appended (read your own writes). pgfold's own tests, examples and benchmark write
//! through this, so the daemon is always exercised against real application writes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

/// The unique index that turns a lost race into a conflict.
pub const STREAM_SEQUENCE_INDEX: &str = "idx_events_stream_sequence";

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The stream (aggregate) it joins; its sequence is counted per stream.
    pub stream_id: String,
    /// The kind of stream (`order`, ...); projectors may filter on it.
    pub stream_type: String,
    /// The kind of fact (`OrderPaid`, ...); projectors may filter on it.
    pub event_type: String,
    /// The version of the payload's schema; [`NewEvent::new`] sets 1.
    pub event_version: i32,
    /// The event's data, stored as JSONB.
    pub payload: Value,
    /// The application's metadata (correlation ids, user, ...); `{}` by default.
    pub metadata: Value,
    /// `None`: the database's `now()`.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// An event of version 1 with empty metadata, occurring at the database's
    /// `now()` when appended.
    pub fn new(
        stream_id: impl Into<String>,
        stream_type: &str,
        event_type: &str,
        payload: Value,
    ) -> NewEvent {
        NewEvent {
            stream_id: stream_id.into(),
            stream_type: stream_type.to_string(),
            event_type: event_type.to_string(),
            event_version: 1,
            payload,
            metadata: Value::Object(Default::default()),
            occurred_at: None,
        }
    }

    /// Sets when it happened instead of the append's `now()`: for back-dated
    /// or imported events (the torture test spreads orders over several days).
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> NewEvent {
        self.occurred_at = Some(at);
        self
    }
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended this stream's `sequence` first: re-read the stream
    /// (its state may have changed) and decide again.
    #[error("concurrency conflict on stream {stream_id} at sequence {sequence}")]
    Conflict {
        /// The stream both writers appended to.
        stream_id: String,
        /// The sequence that was already taken.
        sequence: i64,
    },
    /// The stream was archived whole (see the README's "Retention"): it takes no
    /// more events. Not a conflict: re-reading the stream would not help.
    #[error("stream {stream_id} is archived: {message}")]
    Archived {
        /// The stream appended to.
        stream_id: String,
        /// The server's message, naming the stream's last archived sequence.
        message: String,
    },
    /// Any other database failure, the conflict's unique violation excepted.
    #[error("failed to append to the event store: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// An appended event: `stream_id` and `sequence` are what [`wait_for`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// `events.id` of the new row.
    pub id: i64,
    /// The stream it was appended to.
    pub stream_id: String,
    /// Its place in the stream (1, 2, 3, ...).
    pub sequence: i64,
}

/// Appends `event` at `sequence`, which the caller expects to be the stream's next,
/// and returns the event's id (the caller already holds its stream and sequence for
/// [`wait_for`]). Runs in whatever transaction `client` is in.
pub async fn append<C: GenericClient>(
    client: &C,
    event: &NewEvent,
    sequence: i64,
) -> Result<i64, AppendError> {
    let result = client
        .query_one(
            "INSERT INTO events
               (stream_id, stream_type, event_type, event_version, payload, metadata, occurred_at, sequence)
             VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), $8)
             RETURNING id",
            &[
                &event.stream_id,
                &event.stream_type,
                &event.event_type,
                &event.event_version,
                &event.payload,
                &event.metadata,
                &event.occurred_at,
                &sequence,
            ],
        )
        .await;
    match result {
        Ok(row) => Ok(row.get(0)),
        Err(e) if is_sequence_conflict(&e) => Err(AppendError::Conflict {
            stream_id: event.stream_id.clone(),
            sequence,
        }),
        Err(e) if e.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) => {
            Err(AppendError::Archived {
                stream_id: event.stream_id.clone(),
                message: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |db| db.message().to_string()),
            })
        }
        Err(e) => Err(AppendError::Database(e)),
    }
}

fn is_sequence_conflict(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(STREAM_SEQUENCE_INDEX)
    })
}

/// The stream's highest sequence, 0 for a new stream.
pub async fn last_sequence<C: GenericClient>(
    client: &C,
    stream_id: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(max(sequence), 0) FROM events WHERE stream_id = $1",
            &[&stream_id],
        )
        .await?;
    Ok(row.get(0))
}

/// How many times [`append_next`] re-reads the stream before giving up.
pub const MAX_APPEND_ATTEMPTS: u32 = 20;

/// The usual application write: append `event` as the next event of its stream, in
/// a transaction of its own, retrying on conflict. Once it returns, the event is
/// committed: pass it to [`wait_for`] to read a projection that includes it.
pub async fn append_next(
    client: &mut tokio_postgres::Client,
    event: &NewEvent,
) -> Result<Appended, AppendError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let tx = client.transaction().await?;
        let sequence = last_sequence(&tx, &event.stream_id).await? + 1;
        match append(&tx, event, sequence).await {
            Ok(id) => {
                tx.commit().await?;
                return Ok(Appended {
                    id,
                    stream_id: event.stream_id.clone(),
                    sequence,
                });
            }
            Err(AppendError::Conflict { .. }) if tries < MAX_APPEND_ATTEMPTS => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `pgfold.wait_for`: waits until `projector` has applied the event at
/// (`stream_id`, `sequence`) and everything before it in that stream that it
/// consumes; false if `timeout` passes first. Call it after the append has
/// committed, outside any REPEATABLE READ or SERIALIZABLE transaction.
pub async fn wait_for<C: GenericClient>(
    client: &C,
    projector: &str,
    stream_id: &str,
    sequence: i64,
    timeout: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pgfold.wait_for($1, $2, $3, make_interval(secs => $4))",
            &[&projector, &stream_id, &sequence, &timeout.as_secs_f64()],
        )
        .await?;
    Ok(row.get(0))
}
