//! pgfold keeps read models of a PostgreSQL event store current.
//!
//! # Layout
//! - [`store`]: the application side: appending events with optimistic concurrency,
//!   and waiting until a projector has applied them (`pgfold.wait_for`).
//! - [`feed`]: reading the log gap-free, in an order that respects each stream.
//! - [`projector`]: the contract a projector implements ([`Projector`], [`Fold`]),
//!   and the registry of projectors by name. What an author needs is re-exported
//!   here at the root.
//! - [`projectors`]: the built-in projectors, `daily_revenue` and `order_snapshots`.
//! - [`sql_projections`]: projections defined in files of SQL (`daemon.projections_dir`).
//! - [`daemon`]: the long-running worker, built and run as a `Daemon`: preparing
//!   the database (`prepare`), one projector's loop (`driver`), one batch
//!   (`worker`), every statement on `pgfold.projectors` (`checkpoint`), wake-ups
//!   (`wakeup`), retries and shutdown.
//! - [`status`]: what `pgfold status` reports, read through `daemon::checkpoint`.
//! - [`rebuild`]: `run --rebuild`: a projection rebuilt beside the live one and
//!   swapped in atomically; rebuilds when a projector's definition changes.
//! - [`ops`]: metrics, the HTTP endpoints (health, metrics, `/wait`), systemd
//!   notifications.
//! - [`db`]: connections, migrations, and which database errors are transient.
//! - [`config`], [`cli`], [`telemetry`]: settings, the command line, logging.
//! - `util`: small shared utilities (retry backoff, one-line error text).
//! - [`demo`]: `pgfold demo`, a live first look on a throwaway database.
//! - `testkit` (feature `testkit`, off by default; not part of the API): what the
//!   tests, the torture test and the benchmark share: databases, the daemon as a
//!   child process, the "orders" workload and its independent SQL folds.

#![warn(missing_docs)]

pub use feed::{Event, EventFilter, EventRange, Position};
pub use projector::{EventFold, Fold, Projector, ProjectorError, Registry, SetBatch, SetFold, Tx};

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
