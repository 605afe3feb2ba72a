//! One archive pass: choose what may leave the table, write it as segments, read
//! each back, then record it and delete its rows in one transaction.
//!
//! Crash-safe at every step. Until the recording transaction commits, the rows are
//! in the table and the segment, if uploaded, is an unrecorded object that nothing
//! reads; the next pass finds it under the same key and reuses it if its bytes are
//! the ones it would write, or writes beside it. Once it commits, the segment is
//! recorded, verified, and its rows are gone, all at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::types::ToSql;

use super::holders::{class_filter, describe, holders};
use super::segment::{self, ArchivedEvent, Summary};
use super::store::{Created, Store};
use crate::bookkeeping::{claim_segment, oldest_checkpoint};
use crate::config::{ArchivePolicy, ArchiveSettings};
use crate::db::{Client, Db};
use crate::feed::Position;
use crate::ops::progress::{Progress, Words};

/// A segment closes at this many events…
const SEGMENT_EVENTS: i64 = 100_000;
/// …or once its events' JSON text reaches this: what a pass holds in memory.
const SEGMENT_BYTES: i64 = 16 << 20;
/// Rows deleted per statement in the recording transaction.
const DELETE_BATCH: usize = 5_000;
/// How long a recording transaction waits for any lock before giving up (and
/// trying again): the application's writers never queue behind it for longer.
const LOCK_TIMEOUT: &str = "200ms";
const RECORD_ATTEMPTS: u32 = 5;

/// The session-level advisory lock that keeps two passes apart.
const PASS_LOCK: &str = "SELECT pg_advisory_lock(hashtext('pgfold.archive_pass'))";

/// What one policy would move (`--dry-run`) or moved.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Moved {
    /// Streams with events moved.
    pub streams: i64,
    /// How many events.
    pub events: i64,
    /// Bytes.
    pub bytes: i64,
}

/// The outcome of a pass.
#[derive(Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// Per policy, in the configuration's order.
    pub policies: Vec<Moved>,
    /// How many segments.
    pub segments: i64,
    /// How many events.
    pub events: i64,
    /// The segments' size in the archive.
    pub bytes: i64,
    /// The projectors whose checkpoints keep events in the table that would
    /// otherwise leave (`None`: nothing does).
    pub held_back_by: Option<String>,
}

/// How a pass shows in `progress`: a bar on a terminal, log lines otherwise.
pub const PROGRESS_LABEL: &str = "archive pass";

/// Runs a pass over `client` (a dedicated connection: the pass keeps a temporary
/// table and a session lock on it). With `dry_run`, only chooses and counts.
/// With `progress`, the pass shows how far it has come through the events it
/// chose, segment by segment, as [`PROGRESS_LABEL`].
pub async fn run(
    client: &mut Client,
    settings: &ArchiveSettings,
    store: &Store,
    dry_run: bool,
    progress: Option<&Progress>,
) -> anyhow::Result<Outcome> {
    // A pass killed a moment ago holds the lock until the server notices: wait a
    // little for it.
    client.batch_execute("SET lock_timeout = '5s'").await?;
    let locked = client.query_one(PASS_LOCK, &[]).await;
    client.batch_execute("RESET lock_timeout").await?;
    if let Err(e) = locked {
        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            anyhow::bail!("another archive pass is running");
        }
        return Err(e.into());
    }
    let outcome = pass(client, settings, store, dry_run, progress).await;
    if let Some(progress) = progress {
        progress.finish(PROGRESS_LABEL);
    }
    client
        .batch_execute(
            "SELECT pg_advisory_unlock(hashtext('pgfold.archive_pass'));
             DROP TABLE IF EXISTS pg_temp.pgfold_archive_chosen",
        )
        .await?;
    outcome
}

async fn pass(
    client: &mut Client,
    settings: &ArchiveSettings,
    store: &Store,
    dry_run: bool,
    progress: Option<&Progress>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut steps = Steps::default();
    check_policies(&**client, &settings.policy).await?;
    let Some((_, oldest)) = oldest_checkpoint(&**client).await? else {
        outcome.policies = vec![Moved::default(); settings.policy.len()];
        outcome.held_back_by = Some("no projector has run yet".into());
        return Ok(outcome);
    };
    // The chosen events of a million-event log take some 40 MB of temporary
    // table: in the session's own buffers rather than spilled to files. Only
    // allowed before the session's first temporary table, hence best effort.
    let _ = client.batch_execute("SET temp_buffers = '64MB'").await;
    // The pass's statements are few and long: compiling them costs more than
    // it saves (half a second for the choice alone on a 1 M-event log).
    client
        .batch_execute(
            "SET jit = off;
             DROP TABLE IF EXISTS pg_temp.pgfold_archive_chosen;
             CREATE TEMPORARY TABLE pgfold_archive_chosen (
               id BIGINT NOT NULL, stream_id TEXT NOT NULL, whole BOOLEAN NOT NULL,
               stream_last BOOLEAN NOT NULL, bytes BIGINT NOT NULL, policy INT NOT NULL)",
        )
        .await?;
    let has_class = has_retention_class(&**client).await?;
    for (i, policy) in settings.policy.iter().enumerate() {
        let n = i as i32 + 1;
        let t = Instant::now();
        choose(&**client, policy, n, has_class, oldest).await?;
        if i == 0 {
            // Built once the first policy's rows are in (a bulk build, not one
            // insertion per row); the later policies' rows meet it as a conflict.
            client
                .batch_execute("CREATE UNIQUE INDEX ON pg_temp.pgfold_archive_chosen (id)")
                .await?;
        }
        steps.choose += t.elapsed();
        let row = client
            .query_one(
                "SELECT count(DISTINCT stream_id), count(*), coalesce(sum(bytes), 0)::bigint
                   FROM pg_temp.pgfold_archive_chosen WHERE policy = $1",
                &[&n],
            )
            .await?;
        outcome.policies.push(Moved {
            streams: row.get(0),
            events: row.get(1),
            bytes: row.get(2),
        });
    }
    // A temporary table has no statistics until it is analysed: the plans that
    // read it by id ranges should know its size.
    client
        .batch_execute("ANALYZE pg_temp.pgfold_archive_chosen")
        .await?;
    let t = Instant::now();
    outcome.held_back_by = describe(&holders(&**client, &settings.policy, has_class).await?);
    steps.holders += t.elapsed();
    if dry_run {
        return Ok(outcome);
    }
    let t = Instant::now();
    let segments = segment_bounds(&**client).await?;
    steps.plan += t.elapsed();
    if let (Some(&(first, _)), Some(&(_, last))) = (segments.first(), segments.last()) {
        install_guard(client).await?;
        if let Some(progress) = progress {
            progress.begin_as(PROGRESS_LABEL, first, last, Words::ARCHIVE);
        }
    }
    for (after, last) in segments {
        let t = Instant::now();
        let written = write_segment(&**client, after, last).await?;
        steps.write += t.elapsed();
        let summary = &written.summary;
        let t = Instant::now();
        let key = upload(store, written.bytes.clone(), summary).await?;
        steps.upload += t.elapsed();
        test_pause("uploaded");
        let t = Instant::now();
        let back = segment::check(store.get(&key).await?)
            .with_context(|| format!("segment {} does not read back", store.describe(&key)))?;
        if back != *summary {
            anyhow::bail!(
                "segment {} read back as {} events, ids {}..{}, checksum {} (written: {} events, ids {}..{}, checksum {}); nothing deleted",
                store.describe(&key), back.events, back.first_id, back.last_id, back.checksum,
                summary.events, summary.first_id, summary.last_id, summary.checksum
            );
        }
        steps.verify += t.elapsed();
        test_pause("verified");
        let t = Instant::now();
        record(client, &key, &written).await?;
        steps.record += t.elapsed();
        test_pause("recorded");
        if let Some(progress) = progress {
            progress.advance(PROGRESS_LABEL, last, summary.events as u64);
        }
        tracing::info!(
            segment = %store.describe(&key),
            events = summary.events,
            bytes = summary.bytes,
            "segment archived: recorded, and its events deleted from the table"
        );
        outcome.segments += 1;
        outcome.events += summary.events;
        outcome.bytes += summary.bytes;
    }
    client
        .execute(
            "INSERT INTO pgfold.archive_passes AS p (id, finished_at, segments, events, bytes, held_back_by)
             VALUES (1, now(), $1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET finished_at = now(), segments = $1, events = $2,
                 bytes = $3, held_back_by = $4",
            &[&outcome.segments, &outcome.events, &outcome.bytes, &outcome.held_back_by],
        )
        .await?;
    steps.log();
    Ok(outcome)
}

/// Where a pass spent its time, logged at debug level when it ends: what to
/// look at first when a pass is slow.
#[derive(Default)]
struct Steps {
    choose: Duration,
    holders: Duration,
    plan: Duration,
    write: Duration,
    upload: Duration,
    verify: Duration,
    record: Duration,
}

impl Steps {
    fn log(&self) {
        let s = |d: Duration| format!("{:.3}", d.as_secs_f64());
        tracing::debug!(
            choose = s(self.choose),
            holders = s(self.holders),
            plan = s(self.plan),
            write = s(self.write),
            upload = s(self.upload),
            verify = s(self.verify),
            record = s(self.record),
            "archive pass: seconds per step"
        );
    }
}

/// A test-only hook (documented in tests/integration/archive.rs): with
/// `PGFOLD_TEST_ARCHIVE_PAUSE` set to a step's name, the process says so on
/// stderr and waits there: forever, for a test to kill it at that step; or, with
/// `PGFOLD_TEST_ARCHIVE_RESUME` naming a file, until that file exists, for a
/// test to act while the step is held (a writer racing an open recording
/// transaction, a connection killed in a replay's segment) and then let it go
/// on. Once the file exists the step no longer pauses: a retry runs through.
/// Blocks its thread, as a process stopped there would.
pub(crate) fn test_pause(step: &str) {
    if std::env::var("PGFOLD_TEST_ARCHIVE_PAUSE").is_ok_and(|s| s == step) {
        let resume = std::env::var_os("PGFOLD_TEST_ARCHIVE_RESUME").map(std::path::PathBuf::from);
        if resume.as_ref().is_some_and(|f| f.exists()) {
            return;
        }
        eprintln!("pgfold: test pause at {step}");
        loop {
            match &resume {
                Some(f) if f.exists() => return,
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
                None => std::thread::sleep(Duration::from_secs(3600)),
            }
        }
    }
}

pub(super) async fn has_retention_class<C: Db>(client: &C) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute
                             WHERE attrelid = 'events'::regclass AND attname = 'retention_class'
                               AND attnum > 0 AND NOT attisdropped)",
            &[],
        )
        .await?
        .get(0))
}

/// Checks each policy against the server: `after` is an interval PostgreSQL
/// reads, and `retention_class` needs the column.
pub async fn check_policies<C: Db>(client: &C, policies: &[ArchivePolicy]) -> anyhow::Result<()> {
    let has_class = has_retention_class(client).await?;
    for (i, p) in policies.iter().enumerate() {
        let n = i + 1;
        if let Err(e) = client
            .query_one("SELECT $1::text::interval", &[&p.after])
            .await
        {
            anyhow::bail!(
                "archive.policy {n}: after = {:?} is not a PostgreSQL interval ({})",
                p.after,
                crate::util::one_line(&crate::db::error_text(&e))
            );
        }
        if p.retention_class.is_some() && !has_class {
            anyhow::bail!(
                "archive.policy {n}: retention_class needs a retention_class column on events, which this table lacks"
            );
        }
    }
    Ok(())
}

/// Adds what `policy` lets leave the table to the chosen set: events that every
/// projector has consumed (at or before its checkpoint) or never will (its
/// recorded filter passes them not: a projector's checkpoint moves only with the
/// events it consumes), older than `after`, of its stream types and class, and
/// never `hot`. Whole streams: every event of the
/// stream qualifies. One by one: a stream's qualifying prefix, less its newest
/// event, which stays so that an append's `currentMax + 1` stays right.
///
/// `oldest` is the oldest checkpoint of all: an event at or before it is
/// consumed by every projector, which spares the per-projector test for all but
/// the log's tail. The cut-off time is computed once, not per row.
async fn choose<C: Db>(
    client: &C,
    policy: &ArchivePolicy,
    n: i32,
    has_class: bool,
    oldest: Position,
) -> Result<(), tokio_postgres::Error> {
    let class = class_filter("e", "$4", has_class, policy.retention_class.is_some());
    let qualifies = format!(
        "(e.occurred_at < $2 {class}
          AND ((COALESCE(e.tx_id, '0'::xid8), e.id) <= ($5::text::xid8, $6::bigint)
               OR NOT EXISTS (
                 SELECT 1 FROM pgfold.projectors p
                  WHERE (COALESCE(e.tx_id, '0'::xid8), e.id) > (p.position_tx, p.position_id)
                    AND (p.event_types IS NULL OR e.event_type = ANY(p.event_types))
                    AND (p.stream_types IS NULL OR e.stream_type = ANY(p.stream_types)))))"
    );
    // The text, not the stored size: TOAST compresses a repetitive 2 MB payload
    // to a few kB, and a segment cut by that held 400 MB of JSON.
    let bytes = "octet_length(e.payload::text)::bigint + octet_length(e.metadata::text)";
    // The first policy's rows go into the table before its index exists.
    let conflict = if n > 1 {
        "ON CONFLICT (id) DO NOTHING"
    } else {
        ""
    };
    // One read of the policy's stream types, in stream order (through the
    // unique index on (stream_id, sequence)): each stream's verdict is a window
    // over its own rows, where a GROUP BY and a join back would read it twice.
    let sql = if policy.whole_streams {
        format!(
            "INSERT INTO pg_temp.pgfold_archive_chosen (id, stream_id, whole, stream_last, bytes, policy)
             SELECT q.id, q.stream_id, true, q.id = q.newest, q.bytes, $3
               FROM (SELECT e.id, e.stream_id, {bytes} AS bytes,
                            bool_and({qualifies}) OVER s AS ok, max(e.id) OVER s AS newest
                       FROM events e WHERE e.stream_type = ANY($1)
                     WINDOW s AS (PARTITION BY e.stream_id)) q
              WHERE q.ok
             {conflict}"
        )
    } else {
        format!(
            "INSERT INTO pg_temp.pgfold_archive_chosen (id, stream_id, whole, stream_last, bytes, policy)
             SELECT q.id, q.stream_id, false, false, q.bytes, $3
               FROM (SELECT e.id, e.stream_id, e.sequence, {bytes} AS bytes,
                            coalesce(min(e.sequence) FILTER (WHERE NOT {qualifies})
                                       OVER (PARTITION BY e.stream_id),
                                     max(e.sequence) OVER (PARTITION BY e.stream_id)) AS keep_from
                       FROM events e WHERE e.stream_type = ANY($1)) q
              WHERE q.sequence < q.keep_from
             {conflict}"
        )
    };
    let cutoff: chrono::DateTime<chrono::Utc> = client
        .query_one("SELECT now() - $1::text::interval", &[&policy.after])
        .await?
        .get(0);
    let oldest_tx = oldest.tx_text();
    let params: [&(dyn ToSql + Sync); 6] = [
        &policy.stream_types,
        &cutoff,
        &n,
        &policy.retention_class,
        &oldest_tx,
        &oldest.id,
    ];
    client.execute(&sql, &params).await?;
    Ok(())
}

/// The chosen events cut into segments, in id order: `(after, last)`, each up
/// to [`SEGMENT_EVENTS`] events or [`SEGMENT_BYTES`] bytes (at least one event).
/// One ordered read of the chosen ids and sizes.
async fn segment_bounds<C: Db>(client: &C) -> Result<Vec<(i64, i64)>, tokio_postgres::Error> {
    let mut bounds = Vec::new();
    let (mut after, mut last, mut events, mut bytes) = (None::<i64>, 0i64, 0i64, 0i64);
    client
        .for_each_row(
            "SELECT id, bytes FROM pg_temp.pgfold_archive_chosen ORDER BY id",
            &[],
            &mut |row| {
                let (id, size): (i64, i64) = (row.get(0), row.get(1));
                let start = *after.get_or_insert(id - 1);
                if events > 0 && (events == SEGMENT_EVENTS || bytes + size > SEGMENT_BYTES) {
                    bounds.push((start, last));
                    after = Some(last);
                    (events, bytes) = (0, 0);
                }
                (last, events, bytes) = (id, events + 1, bytes + size);
                true
            },
        )
        .await?;
    if let (Some(start), true) = (after, events > 0) {
        bounds.push((start, last));
    }
    Ok(bounds)
}

/// One segment, written, with what its recording transaction needs to know of
/// its rows, gathered as they went by.
struct Written {
    bytes: bytes::Bytes,
    summary: Summary,
    /// Its events' ids, ascending: the rows to delete.
    ids: Vec<i64>,
    /// Per stream: its id, newest sequence here, and whether it leaves whole
    /// with this segment: all its events here were chosen whole, and the
    /// newest of them (its newest event when it was chosen) is here.
    streams: Vec<(String, i64, bool)>,
    /// Per kind of event (event type, stream type), the newest position here:
    /// what each projector must have consumed, unless its filter passes that
    /// kind not.
    newest: Vec<(String, String, Position)>,
}

/// Reads the chosen events in `(after, last]` from the table, in id order, into
/// a segment. The join reads `events` only in that id range, whatever the plan.
async fn write_segment<C: Db>(client: &C, after: i64, last: i64) -> anyhow::Result<Written> {
    let mut writer = segment::Writer::new()?;
    let mut failed = None;
    let mut ids = Vec::new();
    let mut streams: HashMap<String, (i64, bool, bool)> = HashMap::new();
    let mut newest: HashMap<(String, String), Position> = HashMap::new();
    client
        .for_each_row(
            &format!(
                "SELECT {}, COALESCE(e.tx_id, '0'::xid8)::text, c.whole, c.stream_last
                   FROM pg_temp.pgfold_archive_chosen c JOIN events e ON e.id = c.id
                  WHERE c.id > $1 AND c.id <= $2 AND e.id > $1 AND e.id <= $2
                  ORDER BY e.id",
                segment::COLUMNS
            ),
            &[&after, &last],
            &mut |row| {
                let event = ArchivedEvent::from_row(&row);
                let tx: String = row.get(segment::COLUMN_COUNT);
                let whole: bool = row.get(segment::COLUMN_COUNT + 1);
                let stream_last: bool = row.get(segment::COLUMN_COUNT + 2);
                let position = match Position::parse_tx(&tx) {
                    Ok(tx) => Position::new(tx, event.id),
                    Err(e) => {
                        failed = Some(anyhow::anyhow!("event {}: tx_id {tx:?}: {e}", event.id));
                        return false;
                    }
                };
                ids.push(event.id);
                let stream = streams.entry(event.stream_id.clone()).or_insert((
                    event.sequence,
                    whole,
                    false,
                ));
                *stream = (
                    stream.0.max(event.sequence),
                    stream.1 && whole,
                    stream.2 || stream_last,
                );
                let kind = newest
                    .entry((event.event_type.clone(), event.stream_type.clone()))
                    .or_insert(position);
                *kind = (*kind).max(position);
                match writer.push(event) {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(e.into());
                        false
                    }
                }
            },
        )
        .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (bytes, summary) = writer
        .finish()?
        .context("the chosen events left the table during the pass")?;
    let mut streams: Vec<(String, i64, bool)> = streams
        .into_iter()
        .map(|(stream, (sequence, whole, last))| (stream, sequence, whole && last))
        .collect();
    // In key order, archived_streams' index takes them leaf after leaf rather
    // than all over.
    streams.sort_unstable();
    Ok(Written {
        bytes,
        summary,
        ids,
        streams,
        newest: newest
            .into_iter()
            .map(|((event_type, stream_type), position)| (event_type, stream_type, position))
            .collect(),
    })
}

/// Creates the segment's object, never overwriting one: an object already there
/// with these very bytes (a pass that crashed before recording it) is reused;
/// one with other bytes is left alone and the segment goes beside it.
async fn upload(store: &Store, bytes: bytes::Bytes, summary: &Summary) -> anyhow::Result<String> {
    for attempt in 0..10 {
        let key = Store::key(summary.first_id, summary.last_id, attempt);
        match store.create(&key, bytes.clone()).await? {
            Created::Written => return Ok(key),
            Created::Exists => {
                let there = store.get(&key).await?;
                if segment::checksum(&there) == summary.checksum {
                    tracing::info!(segment = %store.describe(&key), "reusing a segment uploaded by an earlier pass that did not record it");
                    return Ok(key);
                }
            }
        }
    }
    anyhow::bail!(
        "segment {}: ten objects with other contents hold its names; nothing deleted",
        store.describe(&Store::key(summary.first_id, summary.last_id, 0))
    )
}

/// Creates the append guard's trigger on `events` (migration V13's function, as
/// V14 made it safe against a writer racing a recording transaction)
/// unless it is there: before the first rows leave, so that no append can start
/// an archived stream again, and only then, so that a deployment that never
/// archives pays nothing on its appends. `CREATE TRIGGER` waits for the writers
/// in flight and queues those behind it while it waits, so it asks for its lock
/// with a short `lock_timeout`, again and again, rather than once for long.
async fn install_guard(client: &mut Client) -> anyhow::Result<()> {
    let exists = "SELECT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = 'events'::regclass AND tgname = 'pgfold_archived_append')";
    let mut backoff = crate::util::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    for attempt in 1..=GUARD_ATTEMPTS {
        if client.query_one(exists, &[]).await?.get::<_, bool>(0) {
            return Ok(());
        }
        let tx = client.transaction().await?;
        let created = tx
            .batch_execute(
                "SET LOCAL lock_timeout = '50ms';
                 CREATE OR REPLACE TRIGGER pgfold_archived_append
                   BEFORE INSERT ON events
                   FOR EACH ROW EXECUTE FUNCTION pgfold.guard_archived_append()",
            )
            .await;
        match created {
            Ok(()) => {
                tx.commit().await?;
                tracing::info!("archive: the append guard on events is in place");
                return Ok(());
            }
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                    && attempt < GUARD_ATTEMPTS =>
            {
                drop(tx);
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => anyhow::bail!(
                "cannot create the append guard on events ({}); nothing archived",
                crate::util::one_line(&crate::db::error_text(&e))
            ),
        }
    }
    unreachable!("the last attempt returns")
}

/// How often [`install_guard`] asks for its lock before the pass gives up.
const GUARD_ATTEMPTS: u32 = 40;

/// One transaction: records the segment and its streams, deletes its rows in
/// batches, and raises every projector to it, or changes nothing. Retried when a
/// lock is not granted within [`LOCK_TIMEOUT`].
async fn record(client: &mut Client, key: &str, written: &Written) -> anyhow::Result<()> {
    let mut backoff = crate::util::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    for attempt in 1..=RECORD_ATTEMPTS {
        match record_once(client, key, written).await {
            Ok(()) => return Ok(()),
            Err(Retry::Lock(e)) if attempt < RECORD_ATTEMPTS => {
                tracing::warn!(segment = key, error = %e, "archive: a lock was not granted in time; trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(Retry::Lock(e)) => {
                anyhow::bail!("segment {key}: locks not granted within {LOCK_TIMEOUT} after {RECORD_ATTEMPTS} attempts ({e}); nothing deleted")
            }
            Err(Retry::Fatal(e)) => return Err(e),
        }
    }
    unreachable!("the last attempt returns")
}

enum Retry {
    Lock(String),
    Fatal(anyhow::Error),
}

impl From<tokio_postgres::Error> for Retry {
    fn from(e: tokio_postgres::Error) -> Retry {
        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            Retry::Lock(crate::util::one_line(&crate::db::error_text(&e)))
        } else {
            Retry::Fatal(anyhow::anyhow!(crate::util::one_line(
                &crate::db::error_text(&e)
            )))
        }
    }
}

async fn record_once(client: &mut Client, key: &str, written: &Written) -> Result<(), Retry> {
    let summary = &written.summary;
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let previous: i64 = tx
        .query_one(
            "SELECT coalesce(max(segment), 0) FROM pgfold.archive_segments",
            &[],
        )
        .await?
        .get(0);
    let segment: i64 = tx
        .query_one(
            "INSERT INTO pgfold.archive_segments (first_id, last_id, events, bytes, checksum, object_key)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING segment",
            &[&summary.first_id, &summary.last_id, &summary.events, &summary.bytes, &summary.checksum, &key],
        )
        .await?
        .get(0);
    // Whether a stream left whole is known from the chosen rows (see
    // `Written::streams`), with no look at `events`: a probe per stream found
    // its just-deleted rows scattered over the heap, seconds per pass. An
    // append that raced the choice may have put an event of such a stream back
    // in the table; the append guard (V14) counts a stream as archived whole
    // only while the table holds none of its events, so the flag errs safely,
    // exactly as for an append racing this transaction.
    let stream_ids: Vec<&str> = written.streams.iter().map(|s| s.0.as_str()).collect();
    let sequences: Vec<i64> = written.streams.iter().map(|s| s.1).collect();
    let whole: Vec<bool> = written.streams.iter().map(|s| s.2).collect();
    tx.execute(
        "INSERT INTO pgfold.archived_streams AS a (stream_id, last_sequence, segment, first_segment, whole)
         SELECT s.stream_id, s.last_sequence, $1, $1, s.whole
           FROM unnest($2::text[], $3::bigint[], $4::boolean[]) AS s(stream_id, last_sequence, whole)
         ON CONFLICT (stream_id) DO UPDATE
            SET segment = CASE WHEN EXCLUDED.last_sequence > a.last_sequence THEN EXCLUDED.segment ELSE a.segment END,
                last_sequence = greatest(a.last_sequence, EXCLUDED.last_sequence),
                whole = EXCLUDED.whole",
        &[&segment, &stream_ids, &sequences, &whole],
    )
    .await?;
    let mut deleted = 0u64;
    for ids in written.ids.chunks(DELETE_BATCH) {
        deleted += tx
            .execute("DELETE FROM events WHERE id = ANY($1)", &[&ids])
            .await?;
    }
    if deleted != summary.events as u64 {
        return Err(Retry::Fatal(anyhow::anyhow!(
            "segment {key}: {deleted} of its {} events were still in the table; nothing deleted",
            summary.events
        )));
    }
    test_pause("deleted");
    if let Err(projector) = claim_segment(&tx, segment, previous, &written.newest).await? {
        return Err(Retry::Fatal(anyhow::anyhow!(
            "segment {key}: projector {projector} went back before the segment's events during the pass (a replay or rebuild); nothing deleted"
        )));
    }
    tx.commit().await?;
    Ok(())
}
