//! pgfold keeps read models of a PostgreSQL event store current.
//!
//! # Layout
//! Data flows one way; each module uses only those drawn below it, and none
//! imports a module that imports it back (`import-cycles` checks the files):
//!
//! ```text
//!   cli ─┬─ daemon ─┬─ rebuild ─┬─ worker ─┬─ projector · projectors · sql_projections
//!        │          │           │          ├─ archive ─ bookkeeping
//!        │          │           │          └─ bookkeeping ─ feed ─ db ─ config
//!        │          └───────────┴─ ops ─ status ─ archive · bookkeeping
//!        └─ sinks ─ projector · archive · status · demo · store
//! ```
//!
//! - [`store`]: the application side: appending events with optimistic concurrency,
//!   and waiting until a projector has applied them (`pgfold.wait_for`).
//! - [`feed`]: reading the log gap-free, in an order that respects each stream,
//!   through the configured upcasters (`[[upcasters]]`, `feed::upcast`), and
//!   how a batch's statements are planned.
//! - [`archive`]: retention: old events moved to Parquet segments in object
//!   storage (a pass, `verify`, `show`); replays read them through `worker`.
//! - [`projector`]: the contract a projector implements ([`Projector`], [`Fold`]),
//!   and the registry of projectors by name. What an author needs is re-exported
//!   here at the root.
//! - [`projectors`]: the built-in projectors, `daily_revenue` and `order_snapshots`.
//! - [`sql_projections`]: projections defined in files of SQL (`daemon.projections_dir`).
//! - [`sinks`]: consumers that publish each event to NATS JetStream, RabbitMQ or
//!   a webhook (`[sinks.<name>]`), under the projector contract: their fold
//!   returns once the broker has acknowledged, and an unreachable broker is
//!   `ProjectorError::Unavailable`, retried without counting against an event.
//! - `bookkeeping`: every statement on `pgfold.projectors`: checkpoints, the
//!   advisory lock, failures and dead letters, fingerprints, rebuilds in progress.
//! - `worker`: one batch transaction of one projector against a target (its live
//!   tables, or a rebuild's beside them, handed in as a value): decoded events,
//!   set folds (in parts when long), isolation of a failing event and retries.
//! - [`rebuild`]: `run --rebuild`: drives a worker into a build schema beside the
//!   live tables and swaps it in atomically; rebuilds when a projector's
//!   definition changes. Called by the daemon, never calling it back.
//! - [`daemon`]: the supervisor: preparing the database (`prepare`), one
//!   projector's loop (`driver`), wake-ups (`wakeup`), the live cadence, rebuild
//!   tasks and shutdown.
//! - [`status`]: what `pgfold status` reports, read from `bookkeeping` and `feed`.
//! - [`ops`]: metrics, the HTTP endpoints (health, metrics, `/wait`), progress
//!   bars, systemd notifications: handed what they serve, importing no daemon.
//! - [`db`]: connections, TLS, migrations, the statement cache, and which
//!   database errors are transient.
//! - [`config`], [`cli`], [`telemetry`]: settings, the command line, logging.
//! - `util`: small shared utilities (retry backoff, one-line error text).
//! - [`demo`]: `pgfold demo`, a live first look on a throwaway database.
//! - `testkit` (feature `testkit`, off by default; not part of the API): what the
//!   tests, the torture test and the benchmark share: databases, the daemon as a
//!   child process, the "orders" workload and its independent SQL folds.

#![warn(missing_docs)]

pub use feed::{Event, EventFilter, EventRange, Position};
pub use projector::{EventFold, Fold, Projector, ProjectorError, Registry, SetBatch, SetFold, Tx};

pub mod archive;
pub(crate) mod bookkeeping;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod feed;
pub mod ops;
pub mod projector;
pub mod projectors;
pub mod rebuild;
pub mod sinks;
pub mod sql_projections;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub(crate) mod util;
pub(crate) mod worker;
