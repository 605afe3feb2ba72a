//! A projector defined outside pgfold: counts events per stream type and event
//! type. Build a binary with the built-in projectors plus this one:
//!
//! ```sh
//! cargo run --example custom_projector -- run --once
//! ```

use std::process::ExitCode;

use async_trait::async_trait;
use pgfold::projector::{Event, EventFilter, Projector, ProjectorError};
use tokio_postgres::Transaction;

struct EventCounts;

#[async_trait]
impl Projector for EventCounts {
    fn name(&self) -> &str {
        "event_counts"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    async fn setup(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS event_counts (
               stream_type TEXT NOT NULL,
               event_type TEXT NOT NULL,
               events BIGINT NOT NULL,
               PRIMARY KEY (stream_type, event_type)
             )",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE event_counts").await?;
        Ok(())
    }

    async fn apply(&self, tx: &Transaction<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        let stream_types: Vec<&str> = events.iter().map(|e| e.stream_type.as_str()).collect();
        let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        tx.execute(
            "INSERT INTO event_counts AS c (stream_type, event_type, events)
             SELECT s, t, count(*) FROM unnest($1::text[], $2::text[]) AS u(s, t) GROUP BY s, t
             ON CONFLICT (stream_type, event_type) DO UPDATE SET events = c.events + EXCLUDED.events",
            &[&stream_types, &event_types],
        )
        .await?;
        Ok(())
    }
}

fn main() -> ExitCode {
    pgfold::cli::main(pgfold::projectors::builtin().register(EventCounts))
}
