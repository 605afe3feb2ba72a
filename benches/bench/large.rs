//! Phase 6, large payloads (numbered 5 in the report, after live cost): peak RSS
//! of a decoded-events replay (issue 17).

use std::fmt::Write as _;

use anyhow::{bail, Result};
use pgfold::testkit::db::{connect, drop_database, scalar_i64};
use pgfold::testkit::process::Daemon;

use crate::common::{log, median, mib, once_of};
use crate::write::bare_database;
use crate::Env;

/// Set in the environment of this benchmark's own binary run as a pgfold whose only
/// projector is [`NotesLength`]: the built-in projectors are set-based and never
/// decode a payload.
pub const AS_PGFOLD: &str = "PGFOLD_BENCH_AS_PGFOLD";
const LARGE_EVENTS: i32 = 200;
const LARGE_NOTES_BYTES: i32 = 2_000_000;

/// A decoded-events projector that reads every payload: the length of each order's
/// `notes`.
pub struct NotesLength;

#[async_trait::async_trait]
impl pgfold::Projector for NotesLength {
    fn name(&self) -> &str {
        "notes_length"
    }

    fn filter(&self) -> pgfold::EventFilter {
        pgfold::EventFilter::event_types(&["OrderNoted"])
    }

    fn fold(&self) -> pgfold::Fold<'_> {
        pgfold::Fold::Events(self)
    }

    async fn setup(&self, tx: &pgfold::Tx<'_>) -> Result<(), pgfold::ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS notes_length (stream_id TEXT PRIMARY KEY, chars BIGINT NOT NULL)",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &pgfold::Tx<'_>) -> Result<(), pgfold::ProjectorError> {
        tx.batch_execute("TRUNCATE notes_length").await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl pgfold::EventFold for NotesLength {
    async fn apply(
        &self,
        tx: &pgfold::Tx<'_>,
        events: &[pgfold::Event],
    ) -> Result<(), pgfold::ProjectorError> {
        for e in events {
            let chars = e.payload["notes"].as_str().map_or(0, |n| n.chars().count()) as i64;
            tx.execute(
                "INSERT INTO notes_length VALUES ($1, $2)
                 ON CONFLICT (stream_id) DO UPDATE SET chars = EXCLUDED.chars",
                &[&e.stream_id, &chars],
            )
            .await?;
        }
        Ok(())
    }
}

/// Appends [`LARGE_EVENTS`] `OrderNoted` events, one per stream, each with a
/// `notes` string of about [`LARGE_NOTES_BYTES`].
pub async fn load_large(client: &tokio_postgres::Client) -> Result<()> {
    log(format!(
        "appending {LARGE_EVENTS} events of {} MB",
        LARGE_NOTES_BYTES / 1_000_000
    ));
    client
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             SELECT 'order-' || i, 'order', 'OrderNoted',
                    jsonb_build_object('notes', repeat(md5(i::text), $2 / 32)), 1
               FROM generate_series(1, $1) i",
            &[&LARGE_EVENTS, &LARGE_NOTES_BYTES],
        )
        .await?;
    Ok(())
}

/// The events [`load_large`] appends, and the bytes of each one's `notes`.
pub const LARGE: (i32, i32) = (LARGE_EVENTS, LARGE_NOTES_BYTES);

/// `pgfold run --once --replay` of [`NotesLength`] over events of 2 MB each, in a
/// database of their own (NAME_large), at the default `daemon.batch_bytes`.
pub async fn large_payloads(env: &mut Env) -> Result<()> {
    let db = format!("{}_large", env.args.db);
    let (admin, url) = bare_database(&env.admin, &db).await?;
    let client = connect(&url).await?;
    load_large(&client).await?;
    const REPLAY: &[&str] = &["run", "--once", "--replay", "notes_length"];
    let this = std::env::current_exe()?;
    let mut runs = Vec::new();
    for run in 1..=env.args.runs {
        let program = Daemon::command(&this).env(AS_PGFOLD, "1");
        let r = once_of(program, &url, REPLAY).await?;
        log(format!(
            "large run {run}/{}: {:.2} s, peak RSS {}",
            env.args.runs,
            r.0,
            mib(r.1)
        ));
        runs.push(r);
    }
    let wrong = scalar_i64(
        &client,
        &format!(
            "SELECT count(*) FROM events e LEFT JOIN notes_length n USING (stream_id)
              WHERE n.chars IS DISTINCT FROM {LARGE_NOTES_BYTES} / 32 * 32"
        ),
    )
    .await?;
    drop(client);
    drop_database(&admin, &db).await?;
    if wrong != 0 {
        bail!("notes_length is wrong for {wrong} events");
    }
    let times: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let r = &mut env.report;
    writeln!(
        r,
        "\n5. Large payloads: `run --once --replay` of a decoded-events projector over {LARGE_EVENTS} \
         events of {} MB ({} MB of JSON)\n   at the default daemon.batch_bytes; {} runs",
        LARGE_NOTES_BYTES / 1_000_000,
        i64::from(LARGE_EVENTS) * i64::from(LARGE_NOTES_BYTES) / 1_000_000,
        env.args.runs
    )?;
    writeln!(
        r,
        "   median {:.2} s, peak RSS {} (max VmHWM, polled every 10 ms)",
        median(&times),
        mib(runs.iter().map(|x| x.1).max().unwrap_or(0))
    )?;
    Ok(())
}
