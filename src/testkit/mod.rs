//! Support shared by the integration tests, the torture test and the benchmark:
//! behind the cargo feature `testkit` (off by default), so none of it is part of
//! pgfold's API. Tests and benches get the feature through pgfold's
//! dev-dependency on itself (`Cargo.toml`).
//!
//! - [`db`]: admin URLs (`PGFOLD_TEST_ADMIN_URL`, `PGFOLD_BENCH_ADMIN_URL`), a
//!   fresh database per test ([`db::TestDb`]), the daemon's backends.
//! - [`process`]: a `pgfold` (or a binary built on its command line) as a child
//!   process: its output, peak RSS and CPU, SIGTERM and SIGKILL.
//! - [`workload`]: the "orders" workload and the independent SQL folds the
//!   projections are compared against.

pub mod db;
pub mod process;
pub mod workload;
