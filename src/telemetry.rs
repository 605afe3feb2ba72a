//! Logging: readable on a terminal, one JSON object per line for journald and
//! container logs. `RUST_LOG` overrides the configured level. On a terminal, log
//! lines are printed above the progress bars (see `ops::progress`).

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::ops::progress;

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
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
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
