//! The projector contract, and the registry the daemon runs projectors from.
//!
//! A projector is a left fold over the log that keeps its own tables. The daemon
//! hands it events in batches, inside a transaction ([`Tx`]), and commits the
//! projector's writes together with its checkpoint: a batch is applied entirely or
//! not at all, so after any crash the projection is exactly the fold of the events
//! up to its checkpoint. A projector therefore never needs its own deduplication.
//!
//! A projector says how it folds with [`Projector::fold`], which hands the daemon
//! the fold itself, so the way a batch arrives and the code that takes it cannot
//! disagree:
//! - [`Fold::Events`]: decoded [`Event`]s, each stream's events in `sequence`
//!   order, to an [`EventFold`]. Right for folds written in Rust, event by event.
//! - [`Fold::Set`]: a [`SetBatch`], to fold in SQL inside the database
//!   ([`SetFold`]), with no round trip per event. The events arrive as a set, so
//!   this is only for folds that do not depend on order (sums, counts), where it
//!   makes a rebuild run at the speed of a single `INSERT … SELECT`.
//! - [`Fold::StreamSet`]: a [`SetBatch`] too, with the guarantee that folding each
//!   stream's events of the batch in `sequence` order follows the stream's order:
//!   every earlier event of a stream is already applied or in the batch. Right for
//!   per-stream state folded in SQL (`ORDER BY stream_id, sequence`).
//!
//! # Failing on an event
//! A fold that cannot apply an event returns [`ProjectorError::Event`] naming it;
//! SQL names it with `pgfold.bad_event(event_id, message)`, a function that raises
//! an error carrying the event's id and can stand wherever an expression can
//! (`coalesce(x, pgfold.bad_event(e.id, 'x is missing')::text)`). Any other error
//! of the batch's SQL is treated the same way once the batch has been narrowed to
//! one event. The daemon rolls the batch back, applies the events before the
//! failing one on their own, retries it with backoff up to `max_attempts`, then
//! parks the projector or dead-letters the event as `on_error` says.

mod registry;
mod set_batch;
mod tx;
mod upcast;

pub(crate) use registry::valid_name;
pub use registry::Registry;
pub(crate) use set_batch::with_first;
pub use set_batch::SetBatch;
pub use tx::Tx;

pub use crate::feed::{Event, EventFilter};

use async_trait::async_trait;

/// A read model kept current by the daemon. Register it in a [`Registry`] by name.
///
/// Every method runs inside a transaction the daemon owns and commits; a projector
/// must not commit, roll back or change the transaction's settings.
#[async_trait]
pub trait Projector: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the name used on the command line.
    /// Lowercase letters, digits and `_`.
    fn name(&self) -> &str;

    /// The events it consumes. Filtering happens in the daemon's query: a
    /// projector sees, and is woken by, only these.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// The version of its definition. Bump it when the fold or the tables change
    /// meaning: pgfold then rebuilds the projection from the first event.
    fn version(&self) -> u32 {
        1
    }

    /// What its tables were built from: when it differs from the fingerprint
    /// recorded with the checkpoint, pgfold rebuilds the projection. By default
    /// the [`Projector::version`]; a SQL projection hashes its file.
    fn fingerprint(&self) -> String {
        format!("v{}", self.version())
    }

    /// How it folds a batch; see the module documentation. Typically
    /// `Fold::Set(self)` for a type that implements [`SetFold`].
    fn fold(&self) -> Fold<'_>;

    /// Whether the projector's statements read `events` themselves, beyond the
    /// events handed to them (a join back to a stream's first event, say). While
    /// a replay reads the archive, such a read sees only what is still in the
    /// table; the daemon warns at start when this runs beside archiving.
    fn reads_events(&self) -> bool {
        false
    }

    /// Creates its tables if they do not exist (idempotent). Run by `pgfold
    /// migrate` and at start. Create tables by unqualified name: the daemon picks
    /// the schema through `search_path`.
    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError>;

    /// Empties its tables, ahead of a replay from the first event.
    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError>;

    /// Checks, before anything runs, that its statements fit the database: the
    /// daemon calls it after [`Projector::setup`] in a transaction it rolls back,
    /// and refuses to start on an error. A projector whose SQL comes from outside
    /// the binary (a SQL projection's file) parses and plans it here.
    async fn validate(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        let _ = tx;
        Ok(())
    }

    /// Why it cannot work now although the database can (a sink whose broker
    /// is unreachable), for `/readyz`; `None` when nothing outside the
    /// database is missing.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Whether it keeps tables that a rebuild can build beside the live ones
    /// (`--rebuild`). A sink publishes instead, and has none: it is never
    /// rebuilt, only replayed.
    fn has_tables(&self) -> bool {
        true
    }
}

/// How a projector folds its batches: the variant names the way the batch arrives,
/// and carries the code that takes it.
#[derive(Clone, Copy)]
pub enum Fold<'a> {
    /// Decoded events, each stream's in `sequence` order.
    Events(&'a dyn EventFold),
    /// A set of events, in no order.
    Set(&'a dyn SetFold),
    /// A set of events in which each stream's, taken in `sequence` order, follow
    /// everything already applied for that stream.
    StreamSet(&'a dyn SetFold),
}

impl Fold<'_> {
    /// Whether batches must respect each stream's order (the daemon then repairs
    /// transaction-id inversions before handing them on).
    pub fn in_stream_order(&self) -> bool {
        !matches!(self, Fold::Set(_))
    }
}

/// A fold that takes decoded events ([`Fold::Events`]).
#[async_trait]
pub trait EventFold: Send + Sync {
    /// Folds `events` into the projection. Each stream's events come in
    /// `sequence` order, after every earlier event of that stream.
    async fn apply(&self, tx: &Tx<'_>, events: &[Event]) -> Result<(), ProjectorError>;
}

/// A fold written in SQL over a batch of events ([`Fold::Set`],
/// [`Fold::StreamSet`]).
#[async_trait]
pub trait SetFold: Send + Sync {
    /// Folds the batch into the projection, with statements that read it as the
    /// relation `batch` ([`SetBatch::execute`], [`SetBatch::query`]).
    async fn apply(&self, tx: &Tx<'_>, batch: &SetBatch<'_>) -> Result<(), ProjectorError>;

    /// Whether the daemon may run this fold's statements with generic plans
    /// (`plan_cache_mode = force_generic_plan`, JIT off) on small batches, the
    /// live ones, instead of planning them on every batch. Opt in once the generic
    /// plan is known to be good for a batch of a few thousand events: `PREPARE`
    /// the statement ([`SetBatch::statement`]), `SET plan_cache_mode =
    /// force_generic_plan`, and check that `EXPLAIN EXECUTE` reads the range
    /// through the position index (`pgfold_events_position`) rather than
    /// scanning the log. Large batches (catch-up, replay) are always planned for
    /// their values, and so is every batch with `database.prepared_statements =
    /// false` (an unnamed statement is planned anew each time anyway) and every
    /// batch while `events` is smaller than [`feed::GENERIC_PLANS_FROM_BYTES`]
    /// (a generic plan made on a near-empty log would scan it as it grows).
    ///
    /// [`feed::GENERIC_PLANS_FROM_BYTES`]: crate::feed::GENERIC_PLANS_FROM_BYTES
    fn generic_plans(&self) -> bool {
        false
    }
}

/// Why a projector could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// This event cannot be folded (a malformed payload, an impossible order of
    /// events). Retried, then parked or dead-lettered per `on_error`.
    #[error("event {event_id}: {message}")]
    Event {
        /// The event's `events.id`.
        event_id: i64,
        /// What is wrong with it, in one line.
        message: String,
    },
    /// A database error. Data errors are treated like a bad event once the batch has
    /// been narrowed to one; connection errors are retried without limit.
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    /// Anything else, treated like a bad event once the batch has been narrowed.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
    /// Something outside the database that the batch needs is unreachable (a
    /// sink's broker): not the events' fault. The batch is rolled back and
    /// retried with backoff, without limit and without counting attempts.
    #[error("{0}")]
    Unavailable(String),
}

impl ProjectorError {
    /// [`ProjectorError::Event`] for `event`.
    pub fn event(event: &Event, message: impl Into<String>) -> ProjectorError {
        ProjectorError::Event {
            event_id: event.id,
            message: message.into(),
        }
    }
}
