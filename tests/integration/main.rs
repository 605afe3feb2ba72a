//! Integration tests against a real PostgreSQL, each in a database of its own.
//! One binary, so they share one build and run in parallel.

mod append;
mod archive;
mod archive_cloud;
mod cli;
mod crash;
mod deploy;
mod gap;
mod helpers;
mod memory;
mod migration;
mod ops;
mod plan_robustness;
mod plans;
mod poison;
mod pooler;
mod privilege;
mod progress;
mod projection_trust;
mod projections;
mod read_your_writes;
mod rebuild;
mod reconnect;
mod replay;
mod sinks;
mod sql_projections;
mod stall;
mod stream_order;
mod tls;
mod upcast;
