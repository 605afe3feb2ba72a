//! `order_snapshots`: each order stream's current state, the article's
//! `projectOrder` fold kept incrementally.
//!
//! The state depends on the order of the stream's events, so this projector takes
//! decoded events ([`Feed::Events`]), which the daemon delivers in `sequence`
//! order per stream. Every event either starts a state (`OrderCreated`) or sets a
//! few keys of it, so a batch reduces each stream to one full state or one patch:
//! full states are upserted, patches are merged (`state || patch`) in the
//! database, and no stored state is read back into the daemon.

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
        let changes = changes(events)?;
        let mut full = (Vec::new(), Vec::new(), Vec::new());
        let mut patch = (Vec::new(), Vec::new(), Vec::new());
        // (stream, first event needing a stored snapshot, whether the batch recreates it)
        let mut must_exist: Vec<(&str, usize, bool)> = Vec::new();
        for (stream, change) in &changes {
            let into = if change.full { &mut full } else { &mut patch };
            into.0.push(*stream);
            into.1.push(change.sequence);
            into.2.push(Value::Object(change.state.clone()).to_string());
            if let Some(first) = change.needs_stored {
                must_exist.push((*stream, first, change.full));
            }
        }
        // A stream whose batch began without OrderCreated must have had a stored
        // snapshot: ask before the upsert below writes one.
        let mut stored: std::collections::HashSet<String> = std::collections::HashSet::new();
        let recreated: Vec<&str> = must_exist
            .iter()
            .filter(|(_, _, full)| *full)
            .map(|(s, _, _)| *s)
            .collect();
        if !recreated.is_empty() {
            for row in tx
                .query(
                    "SELECT stream_id FROM order_snapshots WHERE stream_id = ANY($1)",
                    &[&recreated],
                )
                .await?
            {
                stored.insert(row.get(0));
            }
        }
        if !full.0.is_empty() {
            tx.execute(
                "INSERT INTO order_snapshots (stream_id, sequence, state, projected_at)
                 SELECT s, q, j::jsonb, now() FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(s, q, j)
                 ON CONFLICT (stream_id) DO UPDATE
                    SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, projected_at = EXCLUDED.projected_at",
                &[&full.0, &full.1, &full.2],
            )
            .await?;
        }
        // Streams without an OrderCreated in this batch merge their changes into the
        // stored state in the database: no state travels to us and back.
        if !patch.0.is_empty() {
            for row in tx
                .query(
                    "UPDATE order_snapshots AS o
                        SET state = o.state || u.j::jsonb, sequence = u.q, projected_at = now()
                       FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(s, q, j)
                      WHERE o.stream_id = u.s
                  RETURNING o.stream_id",
                    &[&patch.0, &patch.1, &patch.2],
                )
                .await?
            {
                stored.insert(row.get(0));
            }
        }
        if let Some((_, first, _)) = must_exist
            .iter()
            .filter(|(s, _, _)| !stored.contains(*s))
            .min_by_key(|(_, first, _)| *first)
        {
            let event = &events[*first];
            return Err(ProjectorError::event(
                event,
                format!(
                    "{} on stream {} before its OrderCreated",
                    event.event_type, event.stream_id
                ),
            ));
        }
        Ok(())
    }
}

/// What a batch does to one stream.
struct Change {
    /// `state` is the whole state (the batch has the stream's OrderCreated), or
    /// only the keys to merge into the stored state.
    full: bool,
    state: Map<String, Value>,
    sequence: i64,
    /// The first event that needs a stored snapshot, if the batch did not begin
    /// the stream with an OrderCreated.
    needs_stored: Option<usize>,
}

/// Folds the batch per stream, in delivery order. Each event either starts a new
/// state (OrderCreated) or sets some keys of it, so a stream's events in a batch
/// reduce to one full state or one merge patch.
fn changes(events: &[Event]) -> Result<Vec<(&str, Change)>, ProjectorError> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_stream: HashMap<&str, Change> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        let stream = event.stream_id.as_str();
        let entry = by_stream.entry(stream).or_insert_with(|| {
            order.push(stream);
            Change {
                full: false,
                state: Map::new(),
                sequence: 0,
                needs_stored: None,
            }
        });
        if event.event_type == "OrderCreated" {
            entry.state = created(event)?;
            entry.full = true;
        } else {
            if !entry.full && entry.needs_stored.is_none() {
                entry.needs_stored = Some(i);
            }
            entry.state.extend(changed_keys(event));
        }
        entry.sequence = event.sequence;
    }
    Ok(order
        .into_iter()
        .map(|s| {
            (
                s,
                by_stream
                    .remove(s)
                    .expect("every stream in order has a change"),
            )
        })
        .collect())
}

/// The state an `OrderCreated` starts.
fn created(event: &Event) -> Result<Map<String, Value>, ProjectorError> {
    let Some(p) = event.payload.as_object() else {
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
    Ok(s)
}

/// The keys a later event sets in the state.
fn changed_keys(event: &Event) -> Map<String, Value> {
    let mut s = Map::new();
    let at = || Value::String(timestamp(event));
    match event.event_type.as_str() {
        "OrderPaid" => {
            s.insert("status".into(), "paid".into());
            s.insert("paidAt".into(), at());
        }
        "OrderShipped" => {
            s.insert("status".into(), "shipped".into());
            s.insert("shippedAt".into(), at());
            let address = event.payload.as_object().and_then(|p| p.get("address"));
            if let Some(address) = address.filter(|a| !a.is_null()) {
                s.insert("shippingAddress".into(), address.clone());
            }
        }
        "OrderCancelled" => {
            s.insert("status".into(), "cancelled".into());
        }
        _ => {}
    }
    s
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
