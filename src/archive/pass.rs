//! One archive pass: choose what may leave the table, write it as segments, read
//! each back, then record it and delete its rows in one transaction.
//!
//! Crash-safe at every step. Until the recording transaction commits, the rows are
//! in the table and the segment, if uploaded, is an unrecorded object that nothing
//! reads; the next pass finds it under the same key and reuses it if its bytes are
//! the ones it would write, or writes beside it. Once it commits, the segment is
//! recorded, verified, and its rows are gone, all at once.
//!
//! Segments are recorded on a second connection, one transaction each, in id
//! order ([`Recorder`]; while the application is quiet, each while the next is
//! read: [`Recording`]): a crash finds at most one segment's transaction open
//! (rolled back), which is the case above.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};

use super::choice;
use super::holders::{describe, holders};
use super::priority::Process;
use super::segment::{self, ArchivedEvent, Summary};
use super::store::{Created, Store};
use super::yielding::{Writes, Yield};
use crate::bookkeeping::{claim_segment, oldest_checkpoint};
use crate::config::{ArchivePolicy, ArchiveSettings};
use crate::db::{Client, Db, PgConfig};
use crate::feed::Position;
use crate::ops::progress::{Progress, Words};

/// A segment closes at this many events…
const SEGMENT_EVENTS: i64 = 100_000;
/// …or once its events' JSON text reaches this: what a pass holds in memory.
const SEGMENT_BYTES: i64 = 16 << 20;
/// A pass's first segment closes at this many events at most: recording, the
/// slower half of a pass on a quiet database, starts a tenth as late, while
/// the next segment is read. Lone passes on a copy of the benchmark's log, 8
/// alternating rounds: median 5.36 s with a first segment of 62,000 events,
/// 5.18 s with one of 10,000.
const FIRST_SEGMENT_EVENTS: i64 = 10_000;
/// A pass's last segment closes at this many events at most: it is recorded
/// with nothing left to read meanwhile, so the pass's tail is as short as it
/// is small.
const LAST_SEGMENT_EVENTS: i64 = 10_000;
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
    /// How long the pass rested while the application was writing (see
    /// `yielding`).
    pub rested: Duration,
}

/// How a pass shows in `progress`: a bar on a terminal, log lines otherwise.
pub const PROGRESS_LABEL: &str = "archive pass";

/// Runs a pass over `client` (a dedicated connection: the pass keeps a temporary
/// table and a session lock on it), recording its segments on a second
/// connection opened from `recorder` (see [`Recorder`]). With `dry_run`, only
/// chooses and counts. With `progress`, the pass shows how far it has come
/// through the events it chose, segment by segment, as [`PROGRESS_LABEL`].
/// `process` says whether the pass has its process to itself (see `priority`).
pub async fn run(
    client: &mut Client,
    recorder: &PgConfig,
    settings: &ArchiveSettings,
    store: &Store,
    dry_run: bool,
    process: Process,
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
    let outcome = pass(
        client, recorder, settings, store, dry_run, process, progress,
    )
    .await;
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
    recorder: &PgConfig,
    settings: &ArchiveSettings,
    store: &Store,
    dry_run: bool,
    process: Process,
    progress: Option<&Progress>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut steps = Steps::default();
    check_policies(&**client, &settings.policy).await?;
    let mut recorder = Recorder::new(recorder, process);
    if !dry_run {
        // The choice takes a second or more on a large log: by its end, whether
        // the application is writing is known, and the first segments are
        // recorded accordingly (see `read_and_record`).
        recorder.start().await?;
    }
    let Some((_, oldest)) = oldest_checkpoint(&**client).await? else {
        outcome.policies = vec![Moved::default(); settings.policy.len()];
        outcome.held_back_by = Some("no projector has run yet".into());
        return Ok(outcome);
    };
    // The chosen events of a million-event log take some 30 MB of temporary
    // table: in the session's own buffers rather than spilled to files. Only
    // allowed before the session's first temporary table, hence best effort.
    let _ = client.batch_execute("SET temp_buffers = '64MB'").await;
    // The pass's statements are few and long: compiling them costs more than
    // it saves (half a second for the choice alone on a 1 M-event log).
    client.batch_execute("SET jit = off").await?;
    choice::create_table(client).await?;
    // Whether the application writes decides whether the first policy's
    // choice takes the recorder's connection too (a dry run has none): read
    // off before and during the steps to it.
    let mut writes = match dry_run {
        true => None,
        false => Some(Writes::mark(&**client).await?),
    };
    let has_class = has_retention_class(&**client).await?;
    for (i, policy) in settings.policy.iter().enumerate() {
        let n = i as i32 + 1;
        let t = Instant::now();
        let helper = match writes.take() {
            Some(writes) => Some(choice::Helper {
                client: recorder.connection().await?,
                writes,
            }),
            None => None,
        };
        choice::choose(client, helper, policy, n, has_class, oldest).await?;
        if i == 0 {
            // Built once the first policy's rows are in (a bulk build, not one
            // insertion per row); the later policies' rows meet it as a conflict.
            client
                .batch_execute("CREATE UNIQUE INDEX ON pg_temp.pgfold_archive_chosen (id)")
                .await?;
        }
        steps.choose += t.elapsed();
        // A pass counts the bytes as it reads the events; a dry run, which
        // reads none, counts them here.
        let row = client
            .query_one(
                match (dry_run, policy.whole_streams) {
                    (true, _) => {
                        "SELECT count(DISTINCT c.stream_id), count(*),
                                coalesce(sum(octet_length(e.payload::text)::bigint
                                             + octet_length(e.metadata::text)), 0)::bigint
                           FROM pg_temp.pgfold_archive_chosen c JOIN events e ON e.id = c.id
                          WHERE c.policy = $1"
                    }
                    // A stream that leaves whole has one newest event: counting
                    // those takes 30 ms where `count(DISTINCT stream_id)` sorted
                    // half a million ids for 350 ms, 7 % of a pass.
                    (false, true) => {
                        "SELECT count(*) FILTER (WHERE stream_last), count(*), 0::bigint
                           FROM pg_temp.pgfold_archive_chosen WHERE policy = $1"
                    }
                    // A hash of the streams, not a sort of their ids: half the time.
                    (false, false) => {
                        "SELECT (SELECT count(*) FROM (SELECT DISTINCT stream_id
                                   FROM pg_temp.pgfold_archive_chosen WHERE policy = $1) s),
                                count(*), 0::bigint
                           FROM pg_temp.pgfold_archive_chosen WHERE policy = $1"
                    }
                },
                &[&n],
            )
            .await?;
        outcome.policies.push(Moved {
            streams: row.get(0),
            events: row.get(1),
            bytes: row.get(2),
        });
    }
    // Each policy marked its streams' first and last chosen events, and gave
    // each row what its stream's record says once the pass is done (a policy
    // that moves events one by one: every event its own first and last, see
    // `StreamRecord`). With several, a stream may have events chosen by two:
    // its first, its last, its bounds and whether it leaves whole are the
    // pass's, over all of them. A dry run records nothing.
    if settings.policy.len() > 1 && !dry_run {
        client
            .batch_execute(
                "UPDATE pg_temp.pgfold_archive_chosen c
                    SET pass_first = c.id = m.first, pass_last = c.id = m.last,
                        last_sequence = m.last_sequence, last_id = m.last, whole = m.whole
                   FROM (SELECT stream_id, min(id) AS first, max(id) AS last,
                                max(last_sequence) AS last_sequence, bool_and(whole) AS whole
                           FROM pg_temp.pgfold_archive_chosen GROUP BY stream_id) m
                  WHERE m.stream_id = c.stream_id",
            )
            .await?;
    }
    // A temporary table has no statistics until it is analysed: the plan that
    // reads it should know its size.
    client
        .batch_execute("ANALYZE pg_temp.pgfold_archive_chosen")
        .await?;
    let t = Instant::now();
    outcome.held_back_by = describe(&holders(&**client, &settings.policy, has_class).await?);
    steps.holders += t.elapsed();
    if dry_run {
        return Ok(outcome);
    }
    let range = client
        .query_one(
            "SELECT min(id), max(id) FROM pg_temp.pgfold_archive_chosen",
            &[],
        )
        .await?;
    if let (Some(first), Some(last)) = (range.get::<_, Option<i64>>(0), range.get(1)) {
        install_guard(client).await?;
        if let Some(progress) = progress {
            progress.begin_as(PROGRESS_LABEL, first - 1, last, Words::ARCHIVE);
        }
        let recorder =
            read_and_record(client, store, recorder, progress, &mut outcome, &mut steps).await?;
        outcome.rested = recorder.rested();
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

/// Reads the chosen events, in id order, in one query that the pass's own
/// connection streams, and cuts them into segments as they go by, each up to
/// [`SEGMENT_EVENTS`] events or [`SEGMENT_BYTES`] of JSON text (at least one
/// event). The text, not the stored size: TOAST compresses a repetitive 2 MB
/// payload to a few kB, and a segment cut by that held 400 MB of JSON. Counted
/// here, as the text arrives, rather than in the choice, which turned the JSON
/// of every event of the policy's stream types into text, chosen or not, only
/// for it to be turned into text again here.
///
/// Each segment is written, verified and recorded by `recorder` while the rows
/// after it wait in the connection (the server sends no more than its socket
/// takes meanwhile). While the application is known to be quiet, a segment is
/// recorded while the next is read instead: see [`Recording`].
async fn read_and_record(
    client: &Client,
    store: &Store,
    recorder: Recorder,
    progress: Option<&Progress>,
    outcome: &mut Outcome,
    steps: &mut Steps,
) -> anyhow::Result<Recorder> {
    let mut recording = Recording {
        idle: Some(recorder),
        busy: None,
        overlapped: false,
    };
    let read = read_segments(client, store, &mut recording, progress, outcome, steps).await;
    // A segment recorded while the read failed is counted all the same, and
    // the pass ends with no transaction of its own open.
    let idle = recording.idle(store, progress, outcome, steps).await;
    read?;
    idle?;
    recording
        .idle
        .context("recording a segment: its recorder was lost")
}

async fn read_segments(
    client: &Client,
    store: &Store,
    recording: &mut Recording,
    progress: Option<&Progress>,
    outcome: &mut Outcome,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    // Both sides in id order: a merge join, no sort (a sort of a segment's
    // rows by id spilled to disk).
    let sql = format!(
        "SELECT {}, COALESCE(e.tx_id, '0'::xid8)::text, c.whole, c.policy,
                c.pass_first, c.pass_last, c.last_sequence, c.last_id
           FROM pg_temp.pgfold_archive_chosen c JOIN events e ON e.id = c.id
          ORDER BY c.id",
        segment::COLUMNS
    );
    let most = segment_events();
    let mut t = Instant::now();
    let rows = client
        .query_typed_raw(&sql, std::iter::empty::<(&(dyn ToSql + Sync), Type)>())
        .await?;
    futures_util::pin_mut!(rows);
    let mut building = Building::new(outcome.policies.len())?;
    let mut n = 0;
    // The events chosen, and those read so far: the last segment is cut at
    // most LAST_SEGMENT_EVENTS from the end. Fewer may be read than chosen
    // (an event deleted meanwhile), hence "at most".
    let chosen: i64 = outcome.policies.iter().map(|p| p.events).sum();
    let (mut read, mut tail) = (0i64, false);
    let mut step = Instant::now();
    let mut in_step = 0;
    while let Some(row) = rows.try_next().await? {
        let event = ArchivedEvent::from_row(&row);
        let size = event.bytes() as i64;
        let most = match n {
            0 => most.min(FIRST_SEGMENT_EVENTS),
            _ => most,
        };
        let tail_starts = !tail && chosen - read <= LAST_SEGMENT_EVENTS;
        tail |= tail_starts;
        if building.events > 0
            && (tail_starts || building.events == most || building.bytes + size > SEGMENT_BYTES)
        {
            let full = std::mem::replace(&mut building, Building::new(outcome.policies.len())?);
            let written = full.finish()?;
            steps.write += t.elapsed();
            n += 1;
            ship(store, recording, written, n, progress, outcome, steps).await?;
            t = Instant::now();
            // Shipping rested on its own, step by step.
            step = Instant::now();
        }
        building.push(event, &row)?;
        read += 1;
        in_step += 1;
        // With a segment being recorded meanwhile, the application is quiet:
        // nothing to rest for.
        if let Some(recorder) = &mut recording.idle {
            if in_step >= recorder.yielding.step_rows() {
                recorder.rest_after(step).await?;
                step = Instant::now();
                in_step = 0;
            }
        }
    }
    if building.events > 0 {
        let written = building.finish()?;
        steps.write += t.elapsed();
        ship(store, recording, written, n + 1, progress, outcome, steps).await?;
    }
    Ok(())
}

/// The recorder, idle or recording a segment in a task of its own.
///
/// Recording a segment (its streams, its deletes) takes twice as long as
/// reading and writing it, on other cores: while the application is quiet, a
/// segment is recorded while the next is read (a lone pass: 5.6 s serial, see
/// the benchmark's archive phase). While it writes, never: two server
/// processes and the encoding at once took every core, and recording
/// transactions back to back doubled the WAL a pass writes per second; the
/// application's commits queued behind both (a writer's p99 during a pass
/// went from 1.8x to 2.9x its p99 without one). Segments are recorded one
/// after another either way, in id order: a crash finds at most one recording
/// transaction open.
struct Recording {
    /// The recorder, while it records nothing…
    idle: Option<Recorder>,
    /// …or the task that has it, recording a segment.
    busy: Option<tokio::task::JoinHandle<(Recorder, anyhow::Result<Recorded>)>>,
    /// Whether a segment has been recorded while the next was read yet: said
    /// once a pass.
    overlapped: bool,
}

impl Recording {
    /// Waits for the segment being recorded, if one is, counts it, and hands
    /// back the recorder.
    async fn idle(
        &mut self,
        store: &Store,
        progress: Option<&Progress>,
        outcome: &mut Outcome,
        steps: &mut Steps,
    ) -> anyhow::Result<&mut Recorder> {
        if let Some(task) = self.busy.take() {
            let (recorder, recorded) = task
                .await
                .map_err(|e| anyhow::anyhow!("recording a segment: {e}"))?;
            self.idle = Some(recorder);
            done(recorded?, store, progress, outcome, steps);
        }
        self.idle
            .as_mut()
            .context("recording a segment: its recorder was lost")
    }
}

/// Uploads segment `n`, reads it back, and records it: at once while the
/// application writes, in the background while it is quiet (see
/// [`Recording`]), in either case after the segment before it.
async fn ship(
    store: &Store,
    recording: &mut Recording,
    written: Written,
    n: usize,
    progress: Option<&Progress>,
    outcome: &mut Outcome,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    let summary = &written.summary;
    let t = Instant::now();
    let key = upload(store, written.bytes.clone(), summary).await?;
    steps.upload += t.elapsed();
    test_pause_at("uploaded", n).await;
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
    test_pause_at("verified", n).await;
    let recorder = recording.idle(store, progress, outcome, steps).await?;
    if !recorder.quiet() {
        let recorded = recorder.record(key, written, n).await?;
        done(recorded, store, progress, outcome, steps);
        return Ok(());
    }
    if !recording.overlapped {
        recording.overlapped = true;
        tracing::info!(
            "archive: the application is quiet; each segment is recorded while the next is read"
        );
    }
    if let Some(mut recorder) = recording.idle.take() {
        recording.busy = Some(tokio::spawn(async move {
            let recorded = recorder.record(key, written, n).await;
            (recorder, recorded)
        }));
    }
    Ok(())
}

/// Counts a recorded segment in the outcome and the progress.
fn done(
    r: Recorded,
    store: &Store,
    progress: Option<&Progress>,
    outcome: &mut Outcome,
    steps: &mut Steps,
) {
    steps.record += r.took;
    steps.streams += r.times.streams;
    steps.deletes += r.times.deletes;
    steps.claim += r.times.claim;
    steps.commit += r.times.commit;
    if let Some(progress) = progress {
        progress.advance(PROGRESS_LABEL, r.summary.last_id, r.summary.events as u64);
    }
    tracing::info!(
        segment = %store.describe(&r.key),
        events = r.summary.events,
        bytes = r.summary.bytes,
        "segment archived: recorded, and its events deleted from the table"
    );
    outcome.segments += 1;
    outcome.events += r.summary.events;
    outcome.bytes += r.summary.bytes;
    for (moved, bytes) in outcome.policies.iter_mut().zip(r.policy_bytes) {
        moved.bytes += bytes;
    }
}

/// Records segments on a connection of its own, one at a time: the pass's own
/// connection is in the middle of the streamed read of the chosen events, and
/// the recording transaction needs nothing of its session (its temporary
/// table), only the segment's ids, streams and positions, gathered as its rows
/// went by. See [`Recording`] for when a segment is recorded while the next is
/// read.
struct Recorder {
    config: PgConfig,
    /// Connected as the pass starts, and kept for all its segments.
    client: Option<Client>,
    /// Whether the application is writing, read on the recorder's connection:
    /// the pass's own is busy with the streamed read.
    yielding: Yield,
}

/// A segment recorded, its rows deleted.
struct Recorded {
    key: String,
    summary: Summary,
    /// Per policy, the JSON text of its events.
    policy_bytes: Vec<i64>,
    took: Duration,
    times: RecordTimes,
}

impl Recorder {
    fn new(config: &PgConfig, process: Process) -> Recorder {
        Recorder {
            config: config.clone(),
            client: None,
            yielding: Yield::new(process),
        }
    }

    /// The recorder's connection, opened on first use.
    async fn client<'c>(
        client: &'c mut Option<Client>,
        config: &PgConfig,
    ) -> anyhow::Result<&'c mut Client> {
        if client.is_none() {
            let connected = crate::db::connect(config).await?;
            // As on the pass's own connection: a few long statements.
            connected.batch_execute("SET jit = off").await?;
            compress_page_images(&connected).await?;
            *client = Some(connected);
        }
        Ok(client.as_mut().expect("connected above"))
    }

    /// Its connection, for work of the pass before the first segment (see
    /// `choice`).
    async fn connection(&mut self) -> anyhow::Result<&Client> {
        Ok(&*Recorder::client(&mut self.client, &self.config).await?)
    }

    /// Connects, and starts watching whether the application writes.
    async fn start(&mut self) -> anyhow::Result<()> {
        let client = Recorder::client(&mut self.client, &self.config).await?;
        Ok(self.yielding.start(&*client).await?)
    }

    /// After a step of reading that began at `began`: rests while the
    /// application is writing (see [`Yield`]).
    async fn rest_after(&mut self, began: Instant) -> anyhow::Result<()> {
        let client = Recorder::client(&mut self.client, &self.config).await?;
        Ok(self.yielding.after(&*client, began).await?)
    }

    /// Whether the application is known to be quiet (see [`Yield::quiet`]).
    fn quiet(&self) -> bool {
        self.yielding.quiet()
    }

    fn rested(&self) -> Duration {
        self.yielding.rested()
    }

    /// Records segment `n` in one transaction (see [`record`]).
    async fn record(
        &mut self,
        key: String,
        written: Written,
        n: usize,
    ) -> anyhow::Result<Recorded> {
        let client = Recorder::client(&mut self.client, &self.config).await?;
        let t = Instant::now();
        let mut times = RecordTimes::default();
        record(client, &key, &written, n, &mut times, &mut self.yielding).await?;
        Ok(Recorded {
            key,
            summary: written.summary,
            policy_bytes: written.policy_bytes,
            took: t.elapsed(),
            times,
        })
    }
}

/// Where a pass spent its time, logged at debug level when it ends: what to
/// look at first when a pass is slow.
#[derive(Default)]
struct Steps {
    choose: Duration,
    holders: Duration,
    write: Duration,
    upload: Duration,
    verify: Duration,
    /// Inside the recording transactions, beside the steps above…
    record: Duration,
    /// …of which archived_streams, the deletes, claim_segment, the commit.
    streams: Duration,
    deletes: Duration,
    claim: Duration,
    commit: Duration,
}

impl Steps {
    fn log(&self) {
        let s = |d: Duration| format!("{:.3}", d.as_secs_f64());
        tracing::debug!(
            choose = s(self.choose),
            holders = s(self.holders),
            write = s(self.write),
            upload = s(self.upload),
            verify = s(self.verify),
            record = s(self.record),
            streams = s(self.streams),
            deletes = s(self.deletes),
            claim = s(self.claim),
            commit = s(self.commit),
            "archive pass: seconds per step"
        );
    }
}

/// Compresses the full-page images in the recording session's WAL, where the
/// server allows it. A segment's deletes touch nearly every page of `events`
/// that holds its rows, each for the first time since the last checkpoint:
/// three quarters of a pass's WAL were page images, and every writer's commit
/// waited to flush its share of them. `wal_compression` is a superuser's
/// setting (or granted with `GRANT SET ON PARAMETER`), and lz4 needs a server
/// built with it: refused, the pass goes on uncompressed, as before.
async fn compress_page_images(client: &Client) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::error::SqlState;
    match client.batch_execute("SET wal_compression = lz4").await {
        Err(e)
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                || e.code() == Some(&SqlState::INVALID_PARAMETER_VALUE) =>
        {
            tracing::debug!(error = %crate::db::error_text(&e), "archive: WAL page images stay uncompressed");
            Ok(())
        }
        other => other,
    }
}

/// A test-only hook (documented in tests/integration/archive.rs): with
/// `PGFOLD_TEST_ARCHIVE_PAUSE` set to a step's name (or to several, separated
/// by commas), the process says so on stderr and waits there: forever, for a
/// test to kill it at that step; or, with `PGFOLD_TEST_ARCHIVE_RESUME` naming a
/// file, until that file exists, for a test to act while the step is held (a
/// writer racing an open recording transaction, a connection killed in a
/// replay's segment) and then let it go on. Once the file exists the step no
/// longer pauses: a retry runs through.
/// Blocks its thread, as a process stopped there would.
pub(crate) fn test_pause(step: &str) {
    if let Some(resume) = pausing_at(step) {
        loop {
            match &resume {
                Some(f) if f.exists() => return,
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
                None => std::thread::sleep(Duration::from_secs(3600)),
            }
        }
    }
}

/// [`test_pause`] at a step of a pass's segment `n`: named `step` (any
/// segment) or `step-n`.
async fn test_pause_at(step: &str, n: usize) {
    if std::env::var_os("PGFOLD_TEST_ARCHIVE_PAUSE").is_none() {
        return;
    }
    for step in [step.to_string(), format!("{step}-{n}")] {
        test_pause_async(&step).await;
    }
}

/// [`test_pause`], waiting without blocking its thread: the process's
/// connections go on answering the server meanwhile, and other work of the
/// same task (the other lane of a replay) goes on.
pub(crate) async fn test_pause_async(step: &str) {
    if let Some(resume) = pausing_at(step) {
        loop {
            match &resume {
                Some(f) if f.exists() => break,
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                None => tokio::time::sleep(Duration::from_secs(3600)).await,
            }
        }
    }
}

/// Whether `step` pauses (announcing it if so), and the file that resumes it.
fn pausing_at(step: &str) -> Option<Option<std::path::PathBuf>> {
    let steps = std::env::var("PGFOLD_TEST_ARCHIVE_PAUSE").ok()?;
    if !steps.split(',').any(|s| s == step) {
        return None;
    }
    let resume = std::env::var_os("PGFOLD_TEST_ARCHIVE_RESUME").map(std::path::PathBuf::from);
    if resume.as_ref().is_some_and(|f| f.exists()) {
        return None;
    }
    eprintln!("pgfold: test pause at {step}");
    Some(resume)
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

/// [`SEGMENT_EVENTS`], unless a test asks for smaller segments (a pass of
/// several on a small log) with `PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS`.
fn segment_events() -> i64 {
    std::env::var("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &i64| *n > 0)
        .unwrap_or(SEGMENT_EVENTS)
}

/// One segment, written, with what its recording transaction needs to know of
/// its rows, gathered as they went by.
struct Written {
    bytes: bytes::Bytes,
    summary: Summary,
    /// Its events' ids, ascending: the rows to delete.
    ids: Vec<i64>,
    /// The streams to record (see [`StreamRecord`]), in key order.
    streams: Vec<StreamRecord>,
    /// Per kind of event (event type, stream type), the newest position here:
    /// what each projector must have consumed, unless its filter passes that
    /// kind not.
    newest: Vec<(String, String, Position)>,
    /// Per policy (in the configuration's order), the JSON text of its events
    /// here.
    policy_bytes: Vec<i64>,
}

/// What a segment's recording transaction writes of a stream to
/// `archived_streams`.
///
/// A stream is written once a pass, by the segment that holds its first chosen
/// event, and written as it will be once the pass is done: its last chosen
/// sequence, the id of its last chosen event (`last_id`, which bounds the
/// segments `archive show` reads) and whether it leaves whole. When a later
/// segment holds more of it, `segment` is left open ([`OPEN_SEGMENT`]: the
/// bound an older pgfold reads). Writing it again at its last segment, as
/// before migration V17, was 145,000 of a pass's 342,000 stream writes on the
/// benchmark's log, and the slower half of them (an update each).
///
/// After a crash between the two segments, the rest of its chosen events are
/// still in the table, and the record is right all the same: the append guard
/// counts a stream as whole only while the table holds none of its events, an
/// append at or below `last_sequence` meets those very rows in the unique
/// index (23505, as the guard's own answer), `stream_head` is the greater of
/// the two, and `archive show` reads the archive up to `last_id` and the table.
/// The next pass that moves the rest updates the record.
///
/// A policy that moves events one by one marks every event first and last, and
/// gives each its own sequence and id: its streams are written in every
/// segment, exactly, unless the pass has several policies (see `pass`).
struct StreamRecord {
    stream_id: String,
    /// Its last chosen sequence.
    sequence: i64,
    /// The id of its last chosen event.
    last_id: i64,
    /// Whether it leaves the table whole with this pass: every event of it
    /// was chosen by a policy that moves streams whole.
    whole: bool,
    /// Whether a later segment of the pass holds more of it.
    open: bool,
}

/// `archived_streams.segment` of a stream that a later segment of the pass
/// holds more of (see [`StreamRecord`]).
const OPEN_SEGMENT: i64 = i64::MAX;

/// A stream's rows in a segment being read: what its record says (last
/// sequence, last id, whether it leaves whole) and whether they hold its first,
/// and its last, chosen event of the pass.
type StreamRows = (i64, i64, bool, bool, bool);

/// A segment being read: the rows of [`read_and_record`]'s query, pushed in
/// id order.
struct Building {
    writer: segment::Writer,
    events: i64,
    /// The JSON text of its events so far.
    bytes: i64,
    ids: Vec<i64>,
    streams: HashMap<String, StreamRows>,
    /// Per event type, per stream type: the newest position.
    newest: HashMap<String, HashMap<String, Position>>,
    policy_bytes: Vec<i64>,
}

impl Building {
    fn new(policies: usize) -> anyhow::Result<Building> {
        Ok(Building {
            writer: segment::Writer::new()?,
            events: 0,
            bytes: 0,
            ids: Vec::new(),
            streams: HashMap::new(),
            newest: HashMap::new(),
            policy_bytes: vec![0; policies],
        })
    }

    /// Adds `event`, read from `row` (whose columns after the event's are the
    /// writing transaction, `whole`, the policy, `pass_first`, `pass_last`,
    /// `last_sequence` and `last_id`).
    fn push(&mut self, event: ArchivedEvent, row: &tokio_postgres::Row) -> anyhow::Result<()> {
        let tx: String = row.get(segment::COLUMN_COUNT);
        let whole: bool = row.get(segment::COLUMN_COUNT + 1);
        let policy: i32 = row.get(segment::COLUMN_COUNT + 2);
        let pass_first: bool = row.get(segment::COLUMN_COUNT + 3);
        let pass_last: bool = row.get(segment::COLUMN_COUNT + 4);
        let last_sequence: i64 = row.get(segment::COLUMN_COUNT + 5);
        let last_id: i64 = row.get(segment::COLUMN_COUNT + 6);
        let position = match Position::parse_tx(&tx) {
            Ok(tx) => Position::new(tx, event.id),
            Err(e) => anyhow::bail!("event {}: tx_id {tx:?}: {e}", event.id),
        };
        let size = event.bytes() as i64;
        self.events += 1;
        self.bytes += size;
        if let Some(b) = usize::try_from(policy - 1)
            .ok()
            .and_then(|p| self.policy_bytes.get_mut(p))
        {
            *b += size;
        }
        self.ids.push(event.id);
        // Looked up by the event's own strings, copied only for a stream or a
        // kind met for the first time in the segment.
        let rows = (last_sequence, last_id, whole, pass_first, pass_last);
        match self.streams.get_mut(event.stream_id.as_str()) {
            Some(s) => {
                *s = (
                    s.0.max(rows.0),
                    s.1.max(rows.1),
                    s.2 && whole,
                    s.3 || pass_first,
                    s.4 || pass_last,
                )
            }
            None => {
                self.streams.insert(event.stream_id.clone(), rows);
            }
        }
        let kinds = match self.newest.get_mut(event.event_type.as_str()) {
            Some(kinds) => kinds,
            None => self.newest.entry(event.event_type.clone()).or_default(),
        };
        match kinds.get_mut(event.stream_type.as_str()) {
            Some(p) => *p = (*p).max(position),
            None => {
                kinds.insert(event.stream_type.clone(), position);
            }
        }
        self.writer.push(event)?;
        Ok(())
    }

    fn finish(self) -> anyhow::Result<Written> {
        let (bytes, summary) = self.writer.finish()?.context("a segment of no event")?;
        let mut streams: Vec<StreamRecord> = self
            .streams
            .into_iter()
            .filter(|(_, (_, _, _, first, _))| *first)
            .map(
                |(stream_id, (sequence, last_id, whole, _, last))| StreamRecord {
                    stream_id,
                    sequence,
                    last_id,
                    whole,
                    open: !last,
                },
            )
            .collect();
        // In key order, archived_streams' index takes them leaf after leaf rather
        // than all over.
        streams.sort_unstable_by(|a, b| a.stream_id.cmp(&b.stream_id));
        Ok(Written {
            bytes,
            summary,
            ids: self.ids,
            streams,
            newest: self
                .newest
                .into_iter()
                .flat_map(|(event_type, kinds)| {
                    kinds.into_iter().map(move |(stream_type, position)| {
                        (event_type.clone(), stream_type, position)
                    })
                })
                .collect(),
            policy_bytes: self.policy_bytes,
        })
    }
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
async fn record(
    client: &mut Client,
    key: &str,
    written: &Written,
    n: usize,
    times: &mut RecordTimes,
    yielding: &mut Yield,
) -> anyhow::Result<()> {
    let mut backoff = crate::util::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    for attempt in 1..=RECORD_ATTEMPTS {
        match record_once(client, key, written, n, times, yielding).await {
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

/// Where recording transactions spend their time (attempts that were retried
/// included): the parts of [`Steps::record`].
#[derive(Default, Clone, Copy)]
struct RecordTimes {
    streams: Duration,
    deletes: Duration,
    claim: Duration,
    commit: Duration,
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

async fn record_once(
    client: &mut Client,
    key: &str,
    written: &Written,
    n: usize,
    times: &mut RecordTimes,
    yielding: &mut Yield,
) -> Result<(), Retry> {
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
    let t = Instant::now();
    let mut left = &written.streams[..];
    while !left.is_empty() {
        let (streams, after) = left.split_at(yielding.step_rows().min(left.len()));
        left = after;
        let step = Instant::now();
        let stream_ids: Vec<&str> = streams.iter().map(|s| s.stream_id.as_str()).collect();
        let sequences: Vec<i64> = streams.iter().map(|s| s.sequence).collect();
        let whole: Vec<bool> = streams.iter().map(|s| s.whole).collect();
        let last_ids: Vec<i64> = streams.iter().map(|s| s.last_id).collect();
        let segments: Vec<i64> = streams
            .iter()
            .map(|s| if s.open { OPEN_SEGMENT } else { segment })
            .collect();
        tx.execute(
            "INSERT INTO pgfold.archived_streams AS a
                    (stream_id, last_sequence, segment, first_segment, whole, last_id)
             SELECT s.stream_id, s.last_sequence, s.segment, $1, s.whole, s.last_id
               FROM unnest($2::text[], $3::bigint[], $4::boolean[], $5::bigint[], $6::bigint[])
                    AS s(stream_id, last_sequence, whole, segment, last_id)
             ON CONFLICT (stream_id) DO UPDATE
                SET segment = CASE WHEN EXCLUDED.last_sequence > a.last_sequence THEN EXCLUDED.segment ELSE a.segment END,
                    last_sequence = greatest(a.last_sequence, EXCLUDED.last_sequence),
                    whole = EXCLUDED.whole,
                    -- A row an older pgfold wrote is bounded by `segment` alone.
                    last_id = CASE WHEN a.last_id IS NOT NULL THEN greatest(a.last_id, EXCLUDED.last_id) END",
            &[&segment, &stream_ids, &sequences, &whole, &segments, &last_ids],
        )
        .await?;
        yielding.after(&tx, step).await?;
    }
    times.streams += t.elapsed();
    let t = Instant::now();
    let mut deleted = 0u64;
    let mut left = &written.ids[..];
    while !left.is_empty() {
        let (ids, after) = left.split_at(yielding.step_rows().min(left.len()));
        left = after;
        let step = Instant::now();
        deleted += tx
            .execute("DELETE FROM events WHERE id = ANY($1)", &[&ids])
            .await?;
        yielding.after(&tx, step).await?;
    }
    times.deletes += t.elapsed();
    if deleted != summary.events as u64 {
        return Err(Retry::Fatal(anyhow::anyhow!(
            "segment {key}: {deleted} of its {} events were still in the table; nothing deleted",
            summary.events
        )));
    }
    test_pause_at("deleted", n).await;
    let t = Instant::now();
    if let Err(projector) = claim_segment(&tx, segment, previous, &written.newest).await? {
        return Err(Retry::Fatal(anyhow::anyhow!(
            "segment {key}: projector {projector} went back before the segment's events during the pass (a replay or rebuild); nothing deleted"
        )));
    }
    times.claim += t.elapsed();
    let t = Instant::now();
    tx.commit().await?;
    times.commit += t.elapsed();
    test_pause_at("recorded", n).await;
    Ok(())
}
