//! Logging: readable on a terminal, one JSON object per line for journald and
//! container logs. `RUST_LOG` overrides the configured level. On a terminal, log
//! lines are printed above the progress bars (see `ops::progress`).
//!
//! Text logs are coloured only on a terminal, and not even there when `NO_COLOR`
//! is set (no-color.org): journald, `docker logs` and `kubectl logs` would show the
//! escape codes as they are.

use std::io::IsTerminal;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::ops::progress;

/// Installs the process-wide log subscriber: `settings.format` (text or JSON),
/// `settings.level` unless `RUST_LOG` is set, an unparsable level falling back to
/// `info`. Only the first call in a process takes effect.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // async-nats writes its CONNECT message, a sink's password in it, at
        // trace, and lapin may write a frame of its login: never below debug,
        // whatever the filter asks (a directive for the same target replaces
        // the filter's own).
        .add_directive("async_nats::connection=debug".parse().expect("a directive"))
        .add_directive("lapin=debug".parse().expect("a directive"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let writer = if progress::bars_wanted(settings.format == LogFormat::Text) {
        BoxMakeWriter::new(progress::AboveBars)
    } else {
        BoxMakeWriter::new(std::io::stderr)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second call (tests, embedding) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && !no_color)
            .try_init(),
    };
}
