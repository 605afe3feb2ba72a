//! What a projector is, and the registry the daemon runs them from.
//!
//! A projector is a left fold over the log that keeps its own tables. The daemon
//! hands it events in batches, inside a transaction, and commits the projector's
//! writes together with its checkpoint: a batch is applied entirely or not at all,
//! so after any crash the projection is exactly the fold of the events up to its
//! checkpoint. A projector therefore never needs its own deduplication.
//!
//! There are two ways to receive a batch ([`Feed`]):
//! - [`Feed::Events`]: decoded [`Event`]s, each stream's events in `sequence` order.
//!   Right for folds whose result depends on order (a stream's state).
//! - [`Feed::Set`]: an [`EventRange`] to fold in SQL, inside the database, with no
//!   round trip per event. The events of the range arrive as a set, so this is only
//!   for folds that do not depend on order (sums, counts), where it makes a rebuild
//!   run at the speed of a single `INSERT … SELECT`.
//! - [`Feed::StreamSet`]: an [`EventRange`] too, with the guarantee that folding
//!   each stream's events of the range in `sequence` order follows the stream's
//!   order: every earlier event of a stream is already applied or in the range.
//!   Right for per-stream state folded in SQL (`ORDER BY stream_id, sequence`),
//!   which makes a rebuild of stream snapshots set-based too.

mod registry;

pub use registry::Registry;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Transaction;

use crate::feed::{in_range, Position};

/// The transaction a batch is applied in: a pooled connection's, which derefs to
/// [`tokio_postgres::Transaction`]. Its `query`, `query_one`, `query_opt` and
/// `execute` (and [`crate::db::Db`]'s) send statements as
/// `database.prepared_statements` says: by default prepared once per connection
/// and reused, which spares the server parsing a projector's statement every
/// batch (and planning it, on live batches, for a projector that allows generic
/// plans: [`Projector::generic_plans`]); with `false`, unnamed, which a
/// transaction-mode pooler passes through. Other tokio-postgres methods reached
/// through the deref (`prepare`, `query_raw`, ...) always prepare a named
/// statement: behind such a pooler, avoid them. Statements are kept by their
/// text, so put values in parameters, never in the SQL.
pub type BatchTransaction<'a> = crate::db::Session<deadpool_postgres::Transaction<'a>>;

/// One event of the log, as a projector receives it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub position: Position,
    pub stream_id: String,
    pub stream_type: String,
    pub event_type: String,
    pub event_version: i32,
    /// Numbers keep their exact decimal text (serde_json's `arbitrary_precision`):
    /// parse money with `rust_decimal`, never through `f64`.
    pub payload: Value,
    pub metadata: Value,
    pub occurred_at: DateTime<Utc>,
    pub sequence: i64,
}

/// Which events a projector consumes. Filtering happens in the query, so a
/// projector is not woken, nor its checkpoint moved, by events it ignores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// `None`: every event type.
    pub event_types: Option<Vec<String>>,
    /// `None`: every stream type.
    pub stream_types: Option<Vec<String>>,
}

impl EventFilter {
    pub fn all() -> EventFilter {
        EventFilter::default()
    }

    pub fn event_types(types: &[&str]) -> EventFilter {
        EventFilter {
            event_types: Some(types.iter().map(|t| t.to_string()).collect()),
            stream_types: None,
        }
    }

    pub fn in_streams_of(mut self, types: &[&str]) -> EventFilter {
        self.stream_types = Some(types.iter().map(|t| t.to_string()).collect());
        self
    }
}

/// How a projector receives its batches; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Events,
    Set,
    StreamSet,
}

/// The events of one batch of a [`Feed::Set`] or [`Feed::StreamSet`] projector:
/// the events whose position is in `(after, upto]`, less those delivered ahead by
/// an earlier batch, plus those this batch delivers ahead (a [`Feed::StreamSet`]
/// stream's earlier events whose position lies beyond `upto`; see `src/feed/order.rs`).
/// The projector applies its own filter on top.
#[derive(Debug, Clone)]
pub struct EventRange {
    pub after: Position,
    pub upto: Position,
    after_tx: String,
    upto_tx: String,
    skip: Vec<i64>,
    ahead: Vec<i64>,
}

impl EventRange {
    /// The daemon builds the range of each batch; public so that tests can
    /// explain the statements a projector runs over one.
    pub fn new(after: Position, upto: Position, skip: Vec<i64>, ahead: Vec<i64>) -> EventRange {
        EventRange {
            after,
            upto,
            after_tx: after.tx_text(),
            upto_tx: upto.tx_text(),
            skip,
            ahead,
        }
    }

    /// The ids of the events delivered ahead with this batch.
    pub fn ahead(&self) -> &[i64] {
        &self.ahead
    }

    /// The batch's events as a `FROM` item with the columns of `events`, to alias
    /// (`FROM {source} e`), with placeholders `$1`–`$6`: bind
    /// [`EventRange::params`] first and number your own parameters from `$7`.
    ///
    /// Your filters on it stay outside the reads of the log: each branch is fenced
    /// with `OFFSET 0`, so the range is read through the position index (and the
    /// ids delivered ahead through the primary key), whatever the table's
    /// statistics and whatever other indexes the application keeps on `events`
    /// (see `src/feed/reader.rs`).
    pub fn source() -> String {
        // Two branches rather than one condition with OR: each keeps its own index
        // (the position index for the range, the primary key for the few ahead).
        format!(
            "((SELECT e.* FROM events e
                WHERE {range} AND e.id <> ALL($5::bigint[])
               OFFSET 0)
              UNION ALL
              (SELECT e.* FROM events e WHERE e.id = ANY($6::bigint[]) OFFSET 0))",
            range = in_range("e")
        )
    }

    pub fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.after_tx,
            &self.after.id,
            &self.upto_tx,
            &self.upto.id,
            &self.skip,
            &self.ahead,
        ]
    }
}

/// Why a projector could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// This event cannot be folded (a malformed payload, an impossible order of
    /// events). Retried, then parked or dead-lettered per `on_error`.
    #[error("event {event_id}: {message}")]
    Event { event_id: i64, message: String },
    /// A database error. Data errors are treated like a bad event once the batch has
    /// been narrowed to one; connection errors are retried without limit.
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

impl ProjectorError {
    pub fn event(event: &Event, message: impl Into<String>) -> ProjectorError {
        ProjectorError::Event {
            event_id: event.id,
            message: message.into(),
        }
    }
}

/// A read model kept current by the daemon. Register it in a [`Registry`] by name.
///
/// Every method runs inside a transaction the daemon owns and commits; a projector
/// must not commit or roll back itself.
#[async_trait]
pub trait Projector: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the name used on the command line.
    fn name(&self) -> &str;

    /// The version of this projector's definition. Bump it when what the
    /// projection holds changes (a new column, a different fold): `pgfold run`
    /// then rebuilds it beside the live copy and swaps it in (see `src/rebuild`).
    fn version(&self) -> u32 {
        1
    }

    /// What identifies this projector's definition, stored with its checkpoint:
    /// when it differs from the one the tables were built with, `run` rebuilds
    /// them. For a Rust projector its [`Projector::version`]; a projector defined
    /// by data (a SQL projection) returns a hash of that data.
    fn fingerprint(&self) -> String {
        format!("v{}", self.version())
    }

    /// The events it consumes.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    fn feed(&self) -> Feed {
        Feed::Events
    }

    /// Set feeds: whether the daemon may run this projector's statements with
    /// generic plans (`plan_cache_mode = force_generic_plan`, JIT off) on small
    /// batches, the live ones, instead of planning them on every batch. Opt in
    /// once the generic plan is known to be good for a range of a few thousand
    /// events: `PREPARE` the statement, `SET plan_cache_mode =
    /// force_generic_plan`, and check that `EXPLAIN EXECUTE` reads the range
    /// through the position index (`pgfold_events_position`) rather than
    /// scanning the log. Large batches (catch-up, replay) are always planned for
    /// their values, and so is every batch with `database.prepared_statements =
    /// false`: an unnamed statement is planned anew each time anyway.
    fn generic_plans(&self) -> bool {
        false
    }

    /// Creates its tables if they do not exist. Run by `pgfold migrate`.
    async fn setup(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError>;

    /// Empties its tables, ahead of a replay from the first event.
    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError>;

    /// [`Feed::Events`]: folds `events` into the projection.
    async fn apply(
        &self,
        tx: &BatchTransaction<'_>,
        events: &[Event],
    ) -> Result<(), ProjectorError> {
        let _ = (tx, events);
        Err(ProjectorError::Other(format!(
            "projector {} declares Feed::Events but does not implement apply",
            self.name()
        )))
    }

    /// [`Feed::Set`] and [`Feed::StreamSet`]: folds the range into the projection in
    /// SQL and returns how many events it consumed.
    async fn apply_range(
        &self,
        tx: &BatchTransaction<'_>,
        range: &EventRange,
    ) -> Result<u64, ProjectorError> {
        let _ = (tx, range);
        Err(ProjectorError::Other(format!(
            "projector {} declares a set feed but does not implement apply_range",
            self.name()
        )))
    }
}
