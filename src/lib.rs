//! pgfold keeps read models of a PostgreSQL event store current.
//!
//! # Layout
//! - [`store`]: the application side: appending events with optimistic concurrency,
//!   and waiting until a projector has applied them (`pgfold.wait_for`).
//! - [`feed`]: reading the log gap-free, in an order that respects each stream.
//! - [`projector`]: the `Projector` trait and the registry of projectors by name.
//! - [`projectors`]: the built-in projectors, `daily_revenue` and `order_snapshots`.
//! - [`daemon`]: the long-running worker: batches, checkpoints, coordination,
//!   wake-ups, retries and shutdown.
//! - [`status`]: what `pgfold status` reports.
//! - [`ops`]: metrics, the HTTP endpoints (health, metrics, `/wait`), systemd
//!   notifications.
//! - [`db`]: connections, migrations, and which database errors are transient.
//! - [`config`], [`cli`], [`telemetry`]: settings, the command line, logging.
//! - [`demo`]: `pgfold demo`, a live first look on a throwaway database.
//! - `testkit` (feature `testkit`, off by default; not part of the API): what the
//!   tests, the torture test and the benchmark share: databases, the daemon as a
//!   child process, the "orders" workload and its independent SQL folds.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod feed;
pub mod ops;
pub mod projector;
pub mod projectors;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
