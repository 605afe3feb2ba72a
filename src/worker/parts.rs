//! A long stream-set catch-up (a replay, a rebuild, `run --once` far behind),
//! applied in parts of a few streams each, so that its progress shows.
//!
//! A [`Fold::StreamSet`](crate::projector::Fold::StreamSet) batch runs to the
//! horizon in one range, and one statement over it commits nothing, and so
//! shows nothing, until the very end. Cutting it by position, as set folds are
//! (`worker::pace`), was tried: 4.1x slower, because every range probes each of
//! its events for a later event of the same stream, and a stream that spans two
//! ranges has its state written by the first and patched by the second.
//!
//! So the range stays what it is, fixed once, and is cut by stream instead: each
//! part holds the range's events of the streams whose id lies in `[from,
//! before)` ([`EventRange::streams`]), events delivered ahead included. Every
//! stream of the range is folded whole in exactly one part, which is what the one
//! statement would have done for it: below the horizon the range already holds
//! each of its streams' earlier events that are not applied yet, so nothing needs
//! probing or patching. Each part's grouping is smaller too (the one statement
//! over 1 M events spent most of its time in a sort spilled to disk).
//!
//! All parts run in the batch's one transaction and the checkpoint moves once,
//! at its commit: a crash rolls the whole range back, as before, and an older
//! pgfold beside this one sees nothing new. A part that fails rolls the range
//! back as a failed batch would, and the worker narrows it (without parts) to
//! isolate the failing event.
//!
//! Part boundaries are measured, like `worker::pace`'s ranges: the first part
//! walks [`Pace`]'s first size of index entries of `(stream_id, sequence)`, and
//! each next one is sized from how long the last took, to take about
//! [`pace::TARGET`](super::pace::TARGET). The walk reads keys only (an
//! index-only scan): it costs a small fraction of folding the events it passes.
//!
//! After each part the batch's progress is reported in-process (the bar, the
//! `catching up` lines) and written, from another pooled connection and outside
//! the batch's transaction, to `pgfold.batch_progress`, where `pgfold status` and
//! every instance's metrics read it (see `migrations/V10__batch_progress.sql`).

use std::time::{Duration, Instant};

use super::apply::apply_set;
use super::pace::Pace;
use super::{Transaction, Transient};
use crate::bookkeeping as checkpoint;
use crate::db::Pool;
use crate::feed::{self, EventRange, Position};
use crate::projector::{ProjectorError, SetFold};

/// A stream-set batch spanning at least this many event ids is applied in parts:
/// a few of them at least, each of about a second.
pub(super) const PARTS_FROM: i64 = 100_000;

/// How long recording a part's progress may take, waiting for a connection
/// included: it is worth less than the batch's time, and a pool whose every
/// connection holds a batch has none to spare.
const RECORD_WITHIN: Duration = Duration::from_millis(100);

/// Applies `range` in parts of a few streams each, at most `max` index entries
/// apiece, for `projector` (named in the debug line each part logs); how many
/// events were consumed. After each part but the last,
/// `report(position, events)`: how far into the range the parts have come, as an
/// event id between its ends, and the events consumed so far; the same goes to
/// `pgfold.batch_progress` through `pool`.
pub(super) async fn apply_in_parts(
    projector: &str,
    pool: &Pool,
    tx: &Transaction<'_>,
    fold: &dyn SetFold,
    range: &EventRange,
    max: u32,
    report: &(dyn Fn(i64, u64) + Send + Sync),
) -> Result<u64, ProjectorError> {
    let (after, upto) = (range.after().id, range.upto().id);
    let span = upto - after;
    let mut pace = Pace::new(max);
    // The part's first stream (inclusive), and where the walk stands.
    let mut from: Option<String> = None;
    let mut cursor: Option<(String, i64)> = None;
    let mut walked: i64 = 0;
    let mut applied = 0;
    loop {
        let started = Instant::now();
        let entries = pace.limit();
        let next = feed::stream_key_after(tx, cursor.as_ref(), entries).await?;
        let before = next.as_ref().map(|(stream_id, _)| stream_id.clone());
        // A stream of more entries than the walk's step leaves an empty part
        // behind it: [from, from).
        if before.is_none() || before != from {
            let events = apply_set(tx, fold, &range.streams(from, before.clone())).await?;
            applied += events;
            tracing::debug!(
                projector,
                entries,
                events,
                ms = started.elapsed().as_millis() as u64,
                "part of a stream-set range applied"
            );
        }
        let Some(next) = next else {
            return Ok(applied);
        };
        walked += i64::from(entries);
        pace.measured(i64::from(entries), started.elapsed());
        from = before;
        cursor = Some(next);
        // The walk covers the whole log in key order, about `upto` entries (ids
        // are assigned one per event), so the share walked is the share of the
        // range's streams folded.
        let done = (span as f64 * (walked as f64 / upto.max(1) as f64).min(1.0)) as i64;
        let position = after + done.min(span - 1);
        report(position, applied);
        record_in_flight(pool, projector, range.after(), position, applied).await;
    }
}

/// Writes a part's progress to `pgfold.batch_progress`, best effort: a batch
/// never waits more than [`RECORD_WITHIN`] for it, nor fails for it.
pub(super) async fn record_in_flight(
    pool: &Pool,
    name: &str,
    from: Position,
    position: i64,
    events: u64,
) {
    let record = async {
        let client = pool.get().await?;
        checkpoint::record_in_flight(&client, name, from, position, events).await?;
        Ok::<(), Transient>(())
    };
    match tokio::time::timeout(RECORD_WITHIN, record).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(projector = name, error = %e, "could not record a part's progress")
        }
        Err(_) => tracing::debug!(projector = name, "recording a part's progress timed out"),
    }
}
