//! Retention without forgetting: old events leave `events` for Parquet segments in
//! object storage, and every replay still reads them (see the README's
//! "Retention").
//!
//! - `store`: the object store behind `archive.url`; conditional creates only.
//! - `segment`: a segment's bytes (Parquet, the article's columns, sorted by id).
//! - `choice`: what a pass moves, chosen into its temporary table.
//! - `pass`: one pass: choose, write, read back, record and delete.
//! - `yielding`, `priority`: how a pass gives way to the application's writes.
//! - this file: what the commands and `status` read: the recorded segments,
//!   `archive verify`, `archive show`.
//!
//! Replays read the segments through `worker::archived`, which sits above this.

mod choice;
mod holders;
mod pass;
mod priority;
pub mod segment;
mod store;
mod yielding;

use bytes::Bytes;
use serde::Serialize;

use crate::db::Db;

pub use pass::{check_policies, run as run_pass, Moved, Outcome, PROGRESS_LABEL};
pub(crate) use pass::{test_pause, test_pause_async};
pub use priority::{on_own_threads, Process};
pub use store::{Created, FetchError, Store};

/// A recorded segment.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    /// Its number: the order segments left the table in.
    pub segment: i64,
    /// The smallest event id it holds.
    pub first_id: i64,
    /// The largest event id it holds.
    pub last_id: i64,
    /// How many events.
    pub events: i64,
    /// Bytes.
    pub bytes: i64,
    /// SHA-256 of the object, hex.
    pub checksum: String,
    /// The object, under `archive.url`.
    pub object_key: String,
}

impl Segment {
    /// The segment as messages name it.
    pub fn label(&self, store: &Store) -> String {
        format!(
            "segment {} ({})",
            self.segment,
            store.describe(&self.object_key)
        )
    }
}

/// The recorded segments after `after`, in the order they left the table.
pub async fn segments<C: Db>(
    client: &C,
    after: i64,
) -> Result<Vec<Segment>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT segment, first_id, last_id, events, bytes, checksum, object_key
               FROM pgfold.archive_segments WHERE segment > $1 ORDER BY segment",
            &[&after],
        )
        .await?
        .iter()
        .map(|r| Segment {
            segment: r.get(0),
            first_id: r.get(1),
            last_id: r.get(2),
            events: r.get(3),
            bytes: r.get(4),
            checksum: r.get(5),
            object_key: r.get(6),
        })
        .collect())
}

/// How far [`fetch_verified`] reads a segment to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Its size, its checksum, its footer's row count and its `id` column: the
    /// bytes are then those the pass wrote, checked the same way and recorded.
    /// What a replay needs, at a fraction of a full read.
    Footer,
    /// Every row decoded as well (`archive verify`).
    Full,
}

/// Fetches `segment` and checks it against its record (`depth`): its row count,
/// id range, size and checksum. The error is one line naming the segment.
pub async fn fetch_verified(
    store: &Store,
    segment: &Segment,
    depth: Check,
) -> Result<Bytes, FetchError> {
    let bytes = store.get(&segment.object_key).await.map_err(|e| match e {
        FetchError::Unavailable(e) => {
            FetchError::Unavailable(format!("segment {}: {e}", segment.segment))
        }
        FetchError::Bad(e) => FetchError::Bad(format!("segment {}: {e}", segment.segment)),
    })?;
    let label = segment.label(store);
    let corrupt = |e: anyhow::Error| {
        FetchError::Bad(format!(
            "{label} is corrupt: {}",
            crate::util::one_line(&e.to_string())
        ))
    };
    let want = segment::Summary {
        events: segment.events,
        first_id: segment.first_id,
        last_id: segment.last_id,
        checksum: segment.checksum.clone(),
        bytes: segment.bytes,
    };
    let mismatch = |got: segment::Summary| {
        FetchError::Bad(format!(
            "{label} does not match its record: {} events, ids {}..{}, {} bytes, checksum {} (recorded: {} events, ids {}..{}, {} bytes, checksum {})",
            got.events, got.first_id, got.last_id, got.bytes, got.checksum,
            want.events, want.first_id, want.last_id, want.bytes, want.checksum
        ))
    };
    // Size and checksum first: a truncated or altered object is named as not
    // matching its record, whatever its bytes would decode to.
    if bytes.len() as i64 != want.bytes {
        return Err(mismatch(segment::Summary {
            events: 0,
            first_id: 0,
            last_id: 0,
            checksum: segment::checksum(&bytes),
            bytes: bytes.len() as i64,
        }));
    }
    let checked = bytes.clone();
    let got = tokio::task::spawn_blocking(move || match depth {
        Check::Footer => segment::check(checked),
        Check::Full => segment::summarize(checked),
    })
    .await
    .map_err(|e| FetchError::Bad(format!("{label}: the check failed: {e}")))?
    .map_err(corrupt)?;
    if got != want {
        return Err(mismatch(got));
    }
    Ok(bytes)
}

/// What `status` shows of the archive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// How many segments.
    pub segments: i64,
    /// How many events.
    pub events: i64,
    /// Bytes.
    pub bytes: i64,
    /// When the last pass ended (UTC).
    pub last_pass_at: Option<String>,
    /// What the last pass moved.
    pub last_pass_events: Option<i64>,
    /// Seconds since the last pass ended.
    pub last_pass_age_seconds: Option<f64>,
    /// The projectors whose checkpoints keep in the table events that would
    /// otherwise leave; `None` when nothing does.
    pub held_back_by: Option<String>,
}

/// The archive's totals and last pass, and who holds it back: now, under
/// `policies`, or without them as the last pass found.
pub async fn report<C: Db>(
    client: &C,
    policies: Option<&[crate::config::ArchivePolicy]>,
) -> Result<Report, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(events), 0)::bigint, coalesce(sum(bytes), 0)::bigint,
                    (SELECT to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                       FROM pgfold.archive_passes WHERE id = 1),
                    (SELECT events FROM pgfold.archive_passes WHERE id = 1),
                    (SELECT extract(epoch FROM now() - finished_at)::float8
                       FROM pgfold.archive_passes WHERE id = 1),
                    (SELECT held_back_by FROM pgfold.archive_passes WHERE id = 1)
               FROM pgfold.archive_segments",
            &[],
        )
        .await?;
    let held_back_by = match policies {
        Some(policies) => {
            let has_class = pass::has_retention_class(client).await?;
            holders::describe(&holders::holders(client, policies, has_class).await?)
        }
        None => row.get(6),
    };
    Ok(Report {
        segments: row.get(0),
        events: row.get(1),
        bytes: row.get(2),
        last_pass_at: row.get(3),
        last_pass_events: row.get(4),
        last_pass_age_seconds: row.get(5),
        held_back_by,
    })
}

/// One line of `archive show`: an event, from the archive or the table.
#[derive(Debug, Serialize)]
struct Shown {
    id: i64,
    stream_id: String,
    stream_type: String,
    event_type: String,
    event_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    occurred_at: String,
    sequence: i64,
    archived: bool,
}

impl Shown {
    fn from(e: segment::ArchivedEvent, archived: bool) -> anyhow::Result<Shown> {
        Ok(Shown {
            payload: serde_json::from_str(&e.payload)?,
            metadata: serde_json::from_str(&e.metadata)?,
            occurred_at: e
                .occurred_at()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            id: e.id,
            stream_id: e.stream_id,
            stream_type: e.stream_type,
            event_type: e.event_type,
            event_version: e.event_version,
            sequence: e.sequence,
            archived,
        })
    }
}

/// `archive show`: the stream's whole history, archive and table together, in
/// `sequence` order, one JSON object per line, written to `out`.
pub async fn show<C: Db>(
    client: &C,
    store: Option<&Store>,
    stream_id: &str,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let mut events = Vec::new();
    let span = client
        .query_opt(
            "SELECT first_segment, segment, last_id FROM pgfold.archived_streams WHERE stream_id = $1",
            &[&stream_id],
        )
        .await?;
    if let Some(span) = span {
        let store = store.ok_or_else(|| {
            anyhow::anyhow!("stream {stream_id} has archived events, and [archive] url is not set")
        })?;
        // The segments from the first that holds the stream to the one that
        // holds its last archived event, or, where that is open, to any whose
        // ids start at or before its last archived id (migration V17).
        let (first, last, last_id): (i64, i64, Option<i64>) =
            (span.get(0), span.get(1), span.get(2));
        for seg in segments(client, first - 1).await? {
            if seg.segment > last {
                break;
            }
            if last_id.is_some_and(|id| seg.first_id > id) {
                continue;
            }
            let bytes = fetch_verified(store, &seg, Check::Footer).await?;
            segment::read(bytes, |rows| {
                events.extend(
                    rows.into_iter()
                        .filter(|e| e.stream_id == stream_id)
                        .map(|e| (e, true)),
                );
                Ok(())
            })?;
        }
    }
    let sql = format!(
        "SELECT {} FROM events e WHERE e.stream_id = $1 ORDER BY e.sequence",
        segment::COLUMNS
    );
    for r in client.query(&sql, &[&stream_id]).await? {
        events.push((segment::ArchivedEvent::from_row(&r), false));
    }
    events.sort_by_key(|(e, _)| e.sequence);
    for (e, archived) in events {
        serde_json::to_writer(&mut *out, &Shown::from(e, archived)?)?;
        writeln!(out)?;
    }
    Ok(())
}
