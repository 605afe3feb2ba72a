//! A place in the log: (writing transaction, event id).

use std::fmt;

/// Events are read and checkpointed in (transaction id, event id) order. Rows that
/// predate pgfold's migration have no transaction id and read as transaction 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Full 64-bit transaction id (`xid8`) of the writing transaction.
    pub tx: u64,
    /// The event's `events.id`; orders the events of one transaction.
    pub id: i64,
}

impl Position {
    /// Before every event.
    pub const START: Position = Position { tx: 0, id: 0 };

    /// The position of event `id`, written by transaction `tx`.
    pub fn new(tx: u64, id: i64) -> Position {
        Position { tx, id }
    }

    /// The transaction id as SQL wants it: bound as text and cast with `::xid8`,
    /// since tokio-postgres has no xid8 type.
    pub fn tx_text(&self) -> String {
        self.tx.to_string()
    }

    /// Parses an `xid8` read back as text.
    pub fn parse_tx(text: &str) -> Result<u64, std::num::ParseIntError> {
        text.parse()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tx, self.id)
    }
}

/// The SQL for an event's position, matching the `pgfold_events_position` index.
pub const POSITION_TX: &str = "COALESCE(e.tx_id, '0'::xid8)";
