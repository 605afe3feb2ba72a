//! Integration tests against a real PostgreSQL, each in a database of its own.
//! One binary, so they share one build and run in parallel.

mod append;
mod cli;
mod crash;
mod gap;
mod helpers;
mod migration;
mod ops;
mod plans;
mod poison;
mod privilege;
mod progress;
mod projections;
mod reconnect;
mod replay;
mod stall;
mod stream_order;
mod tls;
