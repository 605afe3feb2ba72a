//! An event as a projector receives it, and which events a projector consumes.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Position, Upcasters};

/// One event of the log, as a projector receives it.
#[derive(Debug, Clone)]
pub struct Event {
    /// `events.id`: unique, and what `pgfold.bad_event` and dead letters name.
    pub id: i64,
    /// Where the daemon read it: the order of the log (see [`Position`]).
    pub position: Position,
    /// The stream (aggregate) it belongs to.
    pub stream_id: String,
    /// The kind of stream (`order`, ...).
    pub stream_type: String,
    /// The kind of fact (`OrderPaid`, ...).
    pub event_type: String,
    /// The version of the payload's schema: as the application wrote it, or the
    /// last version of its type's chain of upcasters (`[[upcasters]]`), which
    /// have already rewritten `payload` to that version.
    pub event_version: i32,
    /// Numbers keep their exact decimal text (serde_json's `arbitrary_precision`):
    /// parse money with `rust_decimal`, never through `f64`.
    pub payload: Value,
    /// The application's metadata (correlation ids, user, ...).
    pub metadata: Value,
    /// When the application says it happened.
    pub occurred_at: DateTime<Utc>,
    /// Its place in its stream: 1, 2, 3, ... with no gaps.
    pub sequence: i64,
}

/// Which events a projector consumes, and the upcasters they are read through.
/// Filtering happens in the query, so a projector is not woken, nor its
/// checkpoint moved, by events it ignores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EventFilter {
    /// `None`: every event type.
    pub event_types: Option<Vec<String>>,
    /// `None`: every stream type.
    pub stream_types: Option<Vec<String>>,
    /// The upcasters of the event types it consumes. A projector leaves this
    /// empty: the registry sets it from the configuration (see
    /// [`crate::projector::Registry::with_upcasters`]).
    pub upcasters: Upcasters,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> EventFilter {
        EventFilter::default()
    }

    /// Only events of these types.
    pub fn event_types(types: &[&str]) -> EventFilter {
        EventFilter {
            event_types: Some(types.iter().map(|t| t.to_string()).collect()),
            ..EventFilter::default()
        }
    }

    /// Further, only events of streams of these types.
    pub fn in_streams_of(mut self, types: &[&str]) -> EventFilter {
        self.stream_types = Some(types.iter().map(|t| t.to_string()).collect());
        self
    }
}
