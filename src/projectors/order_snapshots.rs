//! `order_snapshots`: each order stream's current state, the article's
//! `projectOrder` fold kept incrementally.
//!
//! The state depends on the order of the stream's events, so this projector takes
//! decoded events ([`Feed::Events`]), which the daemon delivers in `sequence`
//! order per stream. A batch loads the snapshots of the streams it touches, folds
//! in memory and writes each touched stream back once.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_postgres::Transaction;

use crate::projector::{Event, EventFilter, Projector, ProjectorError};

pub struct OrderSnapshots;

const STREAM_TYPE: &str = "order";
const EVENT_TYPES: [&str; 4] = [
    "OrderCreated",
    "OrderPaid",
    "OrderShipped",
    "OrderCancelled",
];

#[async_trait]
impl Projector for OrderSnapshots {
    fn name(&self) -> &str {
        "order_snapshots"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::event_types(&EVENT_TYPES).in_streams_of(&[STREAM_TYPE])
    }

    async fn setup(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS order_snapshots (
               stream_id TEXT PRIMARY KEY,
               sequence BIGINT NOT NULL,
               state JSONB NOT NULL,
               projected_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
             )",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE order_snapshots").await?;
        Ok(())
    }

    async fn apply(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        let mut streams: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let mut snapshots: HashMap<String, (i64, Option<Map<String, Value>>)> = HashMap::new();
        for row in tx
            .query(
                "SELECT stream_id, sequence, state FROM order_snapshots WHERE stream_id = ANY($1)",
                &[&streams],
            )
            .await?
        {
            let state = match row.get::<_, Value>(2) {
                Value::Object(map) => Some(map),
                _ => None,
            };
            snapshots.insert(row.get(0), (row.get(1), state));
        }
        // Folded in delivery order; a stream's entry ends up with its last state.
        for event in events {
            let entry = snapshots
                .entry(event.stream_id.clone())
                .or_insert((0, None));
            let state = fold(entry.1.take(), event)?;
            *entry = (event.sequence, Some(state));
        }
        let mut ids = Vec::with_capacity(snapshots.len());
        let mut sequences = Vec::with_capacity(snapshots.len());
        let mut states = Vec::with_capacity(snapshots.len());
        for stream in streams {
            if let Some((sequence, Some(state))) = snapshots.remove(stream) {
                ids.push(stream.to_string());
                sequences.push(sequence);
                states.push(Value::Object(state).to_string());
            }
        }
        tx.execute(
            "INSERT INTO order_snapshots (stream_id, sequence, state, projected_at)
             SELECT s, q, j::jsonb, now() FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(s, q, j)
             ON CONFLICT (stream_id) DO UPDATE
                SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, projected_at = EXCLUDED.projected_at",
            &[&ids, &sequences, &states],
        )
        .await?;
        Ok(())
    }
}

/// One step of the fold. Events other than `OrderCreated` need the order to exist.
fn fold(
    state: Option<Map<String, Value>>,
    event: &Event,
) -> Result<Map<String, Value>, ProjectorError> {
    let payload = event.payload.as_object();
    if event.event_type == "OrderCreated" {
        let Some(p) = payload else {
            return Err(ProjectorError::event(
                event,
                format!(
                    "payload is {}, expected an object",
                    json_kind(&event.payload)
                ),
            ));
        };
        let mut s = Map::new();
        for key in ["orderId", "customerId", "items"] {
            s.insert(key.to_string(), p.get(key).cloned().unwrap_or(Value::Null));
        }
        s.insert("status".into(), "pending".into());
        return Ok(s);
    }
    let Some(mut s) = state else {
        return Err(ProjectorError::event(
            event,
            format!(
                "{} on stream {} before its OrderCreated",
                event.event_type, event.stream_id
            ),
        ));
    };
    let at = Value::String(timestamp(event));
    match event.event_type.as_str() {
        "OrderPaid" => {
            s.insert("status".into(), "paid".into());
            s.insert("paidAt".into(), at);
        }
        "OrderShipped" => {
            s.insert("status".into(), "shipped".into());
            s.insert("shippedAt".into(), at);
            if let Some(address) = payload
                .and_then(|p| p.get("address"))
                .filter(|a| !a.is_null())
            {
                s.insert("shippingAddress".into(), address.clone());
            }
        }
        "OrderCancelled" => {
            s.insert("status".into(), "cancelled".into());
        }
        _ => {}
    }
    Ok(s)
}

/// `occurred_at` as stored in the state: RFC 3339, UTC, microseconds.
pub fn timestamp(event: &Event) -> String {
    event
        .occurred_at
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
