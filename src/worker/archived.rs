//! A projector's history in the archive: before its first batch from the table, a
//! projector that has not consumed every archived segment (a new one, or one
//! replayed or rebuilt from the first event) applies them, in the order they left
//! the table, each segment in one transaction that records it as consumed
//! (`archive_applied`). Then it reads the table from its checkpoint, as always.
//!
//! Decoded-event folds get the segment's events decoded, one row group at a
//! time; set folds read them as `batch`, staged in a temporary table with the
//! columns of `events` ([`feed::STAGED_TABLE`]), through the same range
//! machinery as a batch of the table.

use super::apply::apply_set;
use super::{Transient, Worker};

use crate::archive::{self, segment, Check, FetchError, Segment, Store};
use crate::bookkeeping::{self as checkpoint, advance_archive, archive_applied};
use crate::config::History;
use crate::db::{self, Db};
use crate::feed::{self, Event, EventFilter, EventRange, Position};
use crate::projector::{Fold, ProjectorError, Tx};
use crate::util::one_line;

/// Why reading the archive stopped short.
#[derive(Debug)]
pub enum ArchiveError {
    /// The database or the archive's store is unreachable for now: retried with
    /// backoff, as a batch's error is. Safe: each segment is applied in one
    /// transaction that records it as consumed, so a retry starts again at the
    /// segment that failed, with nothing of it applied.
    Transient(Transient),
    /// A missing or corrupt segment, or a projector that fails on an archived
    /// event: no retry helps. One line, naming the segment.
    Fatal(anyhow::Error),
}

impl From<Transient> for ArchiveError {
    fn from(e: Transient) -> ArchiveError {
        ArchiveError::Transient(e)
    }
}

impl From<tokio_postgres::Error> for ArchiveError {
    fn from(e: tokio_postgres::Error) -> ArchiveError {
        if db::is_transient(&e) {
            ArchiveError::Transient(Transient::Database(e))
        } else {
            ArchiveError::Fatal(anyhow::anyhow!(one_line(&db::error_text(&e))))
        }
    }
}

impl From<deadpool_postgres::PoolError> for ArchiveError {
    fn from(e: deadpool_postgres::PoolError) -> ArchiveError {
        ArchiveError::Transient(Transient::Pool(e))
    }
}

impl From<FetchError> for ArchiveError {
    fn from(e: FetchError) -> ArchiveError {
        match e {
            FetchError::Unavailable(why) => ArchiveError::Transient(Transient::Archive(why)),
            FetchError::Bad(why) => ArchiveError::Fatal(anyhow::anyhow!(why)),
        }
    }
}

impl From<anyhow::Error> for ArchiveError {
    fn from(e: anyhow::Error) -> ArchiveError {
        ArchiveError::Fatal(e)
    }
}

impl Worker {
    /// Applies every archived segment this projector has not consumed yet; how
    /// many events that was. A missing or corrupt segment stops it with an error
    /// naming the segment, before the segment's transaction changes anything;
    /// an unreachable database or store is [`ArchiveError::Transient`], for the
    /// caller to retry.
    pub async fn read_archive(&mut self) -> Result<u64, ArchiveError> {
        let store = self.archive.clone();
        let store = store.as_ref();
        let mut applied_events = 0;
        let mut reading = None;
        loop {
            let client = self.pool.get().await?;
            let applied = archive_applied(&client, &self.key).await?;
            let pending = archive::segments(&client, applied).await?;
            drop(client);
            if pending.is_empty() {
                return Ok(applied_events);
            }
            reading.get_or_insert_with(Reading::start);
            if self.settings.history == History::Hot {
                let last = pending.last().map_or(applied, |s| s.segment);
                let client = self.pool.get().await?;
                advance_archive(&client, &self.key, applied, last, 0).await?;
                tracing::info!(
                    projector = self.name(),
                    segments = pending.len(),
                    "history = \"hot\": starting from the table, without the archive"
                );
                continue;
            }
            let Some(store) = store else {
                return Err(ArchiveError::Fatal(anyhow::anyhow!(
                    "projector {} must first read {} archived segment(s), and [archive] url is not set",
                    self.name(),
                    pending.len()
                )));
            };
            if let Some(events) = self.apply_in_two_lanes(store, &pending, applied).await? {
                applied_events += events;
                continue;
            }
            let group = self.group(&pending);
            let mut conn = self.pool.get().await?;
            let events = self
                .apply_segments(&mut conn, store, group, applied, Turn::Now)
                .await?
                .unwrap_or(0);
            applied_events += events;
            // The replay's progress (and the task's heartbeat): the archive read up
            // to this group's last id, its events applied for good.
            if let (Some(report), Some(last)) = (&self.on_segment, group.last()) {
                report(last.last_id, events);
            }
        }
    }

    /// For a set fold with several segments to apply, and a second connection
    /// free: applies them all, one transaction each as always, on two
    /// connections taking turns, so that one stages segment k + 1 while the
    /// other folds segment k. Staging is most of a set fold's replay from the
    /// archive (the server parses each payload into `jsonb`, about as long as
    /// the fold takes), and one connection leaves a core idle meanwhile. The
    /// transactions still commit in segment order: each waits, once staged, for
    /// the one before it. How many events they applied, or `None` (nothing
    /// done) where one connection must do.
    async fn apply_in_two_lanes(
        &self,
        store: &Store,
        pending: &[Segment],
        applied: i64,
    ) -> Result<Option<u64>, ArchiveError> {
        if !matches!(self.projector.fold(), Fold::Set(_)) || pending.len() < 2 || !Reading::alone()
        {
            return Ok(None);
        }
        // Both connections are held for the whole run: a lane that waited for
        // one while holding a staged transaction could wait for ever on a pool
        // that other projectors' lanes have emptied. The second is only taken
        // if one is free at once, and never waited for while holding the first.
        let first = self.pool.get().await?;
        let Some(second) = self.pool.try_get().await else {
            return Ok(None);
        };
        let (committed, turns) = tokio::sync::watch::channel(applied);
        let events = std::sync::atomic::AtomicU64::new(0);
        // Each lane takes the next segment when it is free; the second stops
        // taking any once another projector reads the archive too.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let lane = |mut conn: Conn, second: bool| {
            let (committed, mut turns, events, next) = (&committed, turns.clone(), &events, &next);
            async move {
                loop {
                    if second && !Reading::alone() {
                        return Ok(());
                    }
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= pending.len() {
                        return Ok(());
                    }
                    let before = i.checked_sub(1).map_or(applied, |b| pending[b].segment);
                    let seg = &pending[i..=i];
                    let turn = Turn::After(&mut turns);
                    let Some(n) = self
                        .apply_segments(&mut conn, store, seg, before, turn)
                        .await?
                    else {
                        // Another instance applied it: the loop above looks again.
                        return Err(LaneStop::Moved);
                    };
                    events.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    // Reported before the other lane may commit the next one, so
                    // that progress only moves forward.
                    if let Some(report) = &self.on_segment {
                        report(seg[0].last_id, n);
                    }
                    committed.send_replace(seg[0].segment);
                }
            }
        };
        match tokio::try_join!(lane(first, false), lane(second, true)) {
            Ok(_) | Err(LaneStop::Moved) => Ok(Some(events.into_inner())),
            Err(LaneStop::Failed(e)) => Err(e),
        }
    }

    /// The pending segments the next transaction applies: for a stream set, as
    /// many as the projector's batch size holds (at least one), since a stream
    /// whose events fall into two batches has its state written by the first and
    /// rewritten by the second, and a segment cut by id holds a few events of
    /// each of many streams (see `Worker::new` for the same over the table:
    /// applying segment by segment took twice as long as one statement); for any
    /// other fold, one segment.
    fn group<'s>(&self, pending: &'s [Segment]) -> &'s [Segment] {
        let Fold::StreamSet(_) = self.projector.fold() else {
            return &pending[..pending.len().min(1)];
        };
        let budget = i64::from(self.full_limit);
        let mut events = 0;
        let fits = pending
            .iter()
            .take_while(|s| {
                events += s.events;
                events <= budget
            })
            .count();
        &pending[..fits.max(1)]
    }

    /// Applies `segments` (consecutive, the first the one after `applied`) in one
    /// transaction on `conn` that records them as consumed; how many events that
    /// was, or `None` if another instance applied them meanwhile. A set fold's
    /// segments are staged before the transaction takes its `turn` and the
    /// projector's lock.
    async fn apply_segments(
        &self,
        conn: &mut Conn,
        store: &Store,
        segments: &[Segment],
        applied: i64,
        turn: Turn<'_>,
    ) -> Result<Option<u64>, ArchiveError> {
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return Ok(Some(0));
        };
        let label = match segments.len() {
            1 => first.label(store),
            _ => format!(
                "segments {} to {} ({} to {})",
                first.segment,
                last.segment,
                store.describe(&first.object_key),
                store.describe(&last.object_key)
            ),
        };
        room_for_a_segment(&*conn).await?;
        let tx = conn.transaction().await?;
        self.target.enter(&tx).await?;
        let filter = self.projector.filter();
        let projector = self.projector.clone();
        // Only the events this projector consumes leave the segment's pages.
        let keep = segment::Keep {
            event_types: filter.event_types.clone(),
            stream_types: filter.stream_types.clone(),
        };
        let mut events = 0u64;
        // A connection lost or a broker down is not the events' fault.
        let failed = |e: ProjectorError| match e {
            ProjectorError::Database(pg) if db::is_transient(&pg) => {
                ArchiveError::Transient(Transient::Database(pg))
            }
            ProjectorError::Unavailable(why) => {
                ArchiveError::Transient(Transient::Unavailable(why))
            }
            e => ArchiveError::Fatal(anyhow::anyhow!(
                "projector {} failed on the archived events of {label}: {}",
                self.projector.name(),
                one_line(&e.to_string())
            )),
        };
        // No JIT: the staged table's true size and a set-returning function's
        // guessed 100 rows per event put a fold's estimates past the JIT
        // thresholds, and compiling cost a quarter of a second per segment, more
        // than it saved.
        tx.batch_execute(&format!(
            "SET LOCAL jit = off;
             CREATE TEMPORARY TABLE IF NOT EXISTS pgfold_archive_batch (LIKE events INCLUDING DEFAULTS) ON COMMIT DROP;
             TRUNCATE {}",
            feed::STAGED_TABLE
        ))
        .await?;
        let binary = staged_as_the_article(&tx).await?;
        if let Fold::Set(_) | Fold::StreamSet(_) = projector.fold() {
            // In turns, the segment's own commit shows it: a part staged ahead of
            // the segment before it would move the progress back.
            let parts = matches!(turn, Turn::Now);
            self.stage_segments(&tx, store, segments, &keep, binary, parts)
                .await?;
        }
        if let Turn::After(turns) = turn {
            let before = |c: &i64| *c >= applied;
            if turns.wait_for(before).await.is_err() {
                return Ok(None);
            }
        }
        // Waits for another instance's batch of this projector to end.
        checkpoint::lock(&tx, &self.key).await?;
        if archive_applied(&tx, &self.key).await? != applied {
            // Another instance applied it meanwhile.
            return Ok(None);
        }
        // Where the checkpoint stands while the archive is read: what `status`
        // takes this segment's progress to start from.
        let from = checkpoint::load(&tx, &self.key).await?.position;
        match projector.fold() {
            Fold::Set(fold) | Fold::StreamSet(fold) => {
                // A stream set groups by stream: statistics, from a small
                // sample, since without them the planner guessed two hundred
                // streams where a group of segments holds hundreds of thousands,
                // and planned the fold's grouping for so few. A set fold groups
                // by what it computes from payloads, which no column's
                // statistics describe: with them, `daily_revenue`'s planner took
                // each of a segment's events for a day of its own (`occurred_at`
                // is nearly unique) and sorted 190,000 rows on disk where a hash
                // table of 7,000 groups fitted in memory, a quarter slower.
                if let Fold::StreamSet(_) = projector.fold() {
                    tx.batch_execute(&format!(
                        "SET LOCAL default_statistics_target = 10;
                         ANALYZE {} (id, stream_id, stream_type, event_type, sequence, occurred_at);
                         RESET default_statistics_target",
                        feed::STAGED_TABLE
                    ))
                    .await?;
                }
                let range = EventRange::staged(&filter);
                events = apply_set(&tx, fold, &range).await.map_err(failed)?;
            }
            Fold::Events(fold) => {
                // A fold of decoded events may read an event back by id (a SQL
                // projection's `event`): by key, not by a scan per event.
                tx.batch_execute(&feed::key_staged()).await?;
                let reader = fetch(store, first, &label).await?;
                for group in 0..reader.row_groups() {
                    let Some(batch) = reader.batch(group, &keep)? else {
                        continue;
                    };
                    tx.batch_execute(&format!("TRUNCATE {}", feed::STAGED_TABLE))
                        .await?;
                    let rows = segment::from_batch(&batch)?;
                    match binary {
                        true => stage_copy(&tx, move |out| encode(&batch, out)).await?,
                        false => stage(&tx, &rows).await?,
                    }
                    // Through the projector's upcasters, as a read of the table
                    // would be: read back from the staging table.
                    let decoded: Box<dyn Iterator<Item = anyhow::Result<Event>> + Send> =
                        match filter.upcasters.is_empty() {
                            true => Box::new(rows.into_iter().map(decode)),
                            false => {
                                Box::new(staged_upcast(&tx, &filter).await?.into_iter().map(Ok))
                            }
                        };
                    // Decoded as many at a time as a batch from the table holds
                    // (`daemon.batch_size`), not a row group at once: its events
                    // as JSON values take several times its text, and a replay
                    // of every projector decodes a row group for each.
                    let mut decoded = decoded.peekable();
                    while decoded.peek().is_some() {
                        let some = decoded
                            .by_ref()
                            .take(self.full_limit.max(1) as usize)
                            .collect::<anyhow::Result<Vec<Event>>>()?;
                        events += some.len() as u64;
                        fold.apply(&Tx::staged(&tx), &some).await.map_err(failed)?;
                        // A segment of large events takes a while: its row
                        // groups show as parts of it.
                        if let (Some(report), Some(last)) = (&self.on_part, some.last()) {
                            report(last.id, events);
                        }
                    }
                }
            }
        }
        archive::test_pause_async("replay-apply").await;
        archive::test_pause_async(&format!("replay-apply-{}", last.segment)).await;
        if !advance_archive(&tx, &self.key, applied, last.segment, events as i64).await? {
            return Err(ArchiveError::Fatal(anyhow::anyhow!(
                "projector {}: its archive position moved during {label}",
                self.name()
            )));
        }
        tx.commit().await?;
        // For `status` and the metrics of every instance: the checkpoint moves
        // only with the table's first batch.
        super::parts::record_in_flight(&self.pool, &self.key, from, last.last_id, 0).await;
        tracing::info!(
            projector = self.name(),
            segments = format!("{}..={}", first.segment, last.segment),
            events,
            "applied archived segments"
        );
        Ok(Some(events))
    }
}

impl Worker {
    /// Stages the filtered events of `segments`, one after another, in the
    /// transaction's staging table; with `parts`, each staged segment is
    /// reported as a part.
    async fn stage_segments(
        &self,
        tx: &super::Transaction<'_>,
        store: &Store,
        segments: &[Segment],
        keep: &segment::Keep,
        binary: bool,
        parts: bool,
    ) -> Result<(), ArchiveError> {
        let mut staged = 0u64;
        for seg in segments {
            let reader = fetch(store, seg, &seg.label(store)).await?;
            staged += match binary {
                // Decoded on a thread of its own while the server takes in what
                // came before: the two overlap.
                true => {
                    let keep = keep.clone();
                    stage_copy(tx, move |send| {
                        let mut rows = 0;
                        for group in 0..reader.row_groups() {
                            reader.each_batch(group, &keep, |batch| {
                                rows += batch.num_rows() as u64;
                                encode(&batch, send)
                            })?;
                        }
                        Ok(rows)
                    })
                    .await?
                }
                false => {
                    let mut rows = 0;
                    for group in 0..reader.row_groups() {
                        if let Some(batch) = reader.batch(group, keep)? {
                            rows += batch.num_rows() as u64;
                            stage(tx, &segment::from_batch(&batch)?).await?;
                        }
                    }
                    rows
                }
            };
            // Staging many segments takes a while: each shows as a part.
            if let (true, Some(report)) = (parts, &self.on_part) {
                report(seg.last_id, staged);
            }
        }
        Ok(())
    }
}

/// How many projectors of this process are applying archived segments now.
static READING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A projector applying archived segments, counted in [`READING`] while it
/// lives. A replay of several projectors from the archive (`--replay all`, a
/// first start) keeps every core busy with their own connections: a second
/// connection for one of them only took cores from the others (`--replay
/// all` took 1.31-1.32x the replay from the table with it, 1.28x without).
struct Reading;

impl Reading {
    fn start() -> Reading {
        READING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reading
    }

    /// Whether no other projector of this process is applying archived
    /// segments.
    fn alone() -> bool {
        READING.load(std::sync::atomic::Ordering::Relaxed) <= 1
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pooled connection that applies segments.
type Conn = db::Session<deadpool_postgres::Object>;

/// When a transaction that applies segments may take the projector's lock.
enum Turn<'a> {
    /// At once.
    Now,
    /// Once the segment it follows is committed, as the other lane says here
    /// (see `Worker::apply_in_two_lanes`).
    After(&'a mut tokio::sync::watch::Receiver<i64>),
}

/// Why a lane stopped before its last segment.
enum LaneStop {
    /// Another instance applied a segment first.
    Moved,
    Failed(ArchiveError),
}

impl From<ArchiveError> for LaneStop {
    fn from(e: ArchiveError) -> LaneStop {
        LaneStop::Failed(e)
    }
}

/// Fetches `seg`, checked by its footer, and opens it; `label` names it in the
/// error if it is corrupt.
async fn fetch(store: &Store, seg: &Segment, label: &str) -> Result<segment::Reader, ArchiveError> {
    archive::test_pause_async("replay-fetch").await;
    archive::test_pause_async(&format!("replay-fetch-{}", seg.segment)).await;
    let bytes = archive::fetch_verified(store, seg, Check::Footer).await?;
    segment::Reader::new(bytes)
        .map_err(|e| anyhow::anyhow!("{label} is corrupt: {}", one_line(&e.to_string())).into())
}

fn decode(e: segment::ArchivedEvent) -> anyhow::Result<Event> {
    let bad = |what: &str, err: serde_json::Error| {
        anyhow::anyhow!("archived event {}: its {what} is not JSON ({err})", e.id)
    };
    Ok(Event {
        id: e.id,
        position: Position::new(e.tx_id.unwrap_or(0) as u64, e.id),
        payload: serde_json::from_str(&e.payload).map_err(|err| bad("payload", err))?,
        metadata: serde_json::from_str(&e.metadata).map_err(|err| bad("metadata", err))?,
        occurred_at: e.occurred_at(),
        stream_id: e.stream_id,
        stream_type: e.stream_type,
        event_type: e.event_type,
        event_version: e.event_version,
        sequence: e.sequence,
    })
}

/// The staged events read through `filter`'s upcasters, in id order.
async fn staged_upcast<C: Db>(
    tx: &C,
    filter: &EventFilter,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let source = filter
        .upcasters
        .layer(&format!("(SELECT * FROM {})", feed::STAGED_TABLE));
    let rows = tx
        .query(
            &format!(
                "SELECT e.id, COALESCE(e.tx_id, '0'::xid8)::text, e.stream_id, e.stream_type,
                        e.event_type, e.event_version, e.payload, e.metadata, e.occurred_at, e.sequence
                   FROM {source} e ORDER BY e.id"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(feed::event_from_row).collect())
}

/// Copies `rows` into the staging table, as arrays unnested server-side.
async fn stage<C: Db>(
    tx: &C,
    rows: &[segment::ArchivedEvent],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|e| e.id).collect();
    let txs: Vec<Option<String>> = rows
        .iter()
        .map(|e| e.tx_id.map(|t| t.to_string()))
        .collect();
    let stream_ids: Vec<&str> = rows.iter().map(|e| e.stream_id.as_str()).collect();
    let stream_types: Vec<&str> = rows.iter().map(|e| e.stream_type.as_str()).collect();
    let event_types: Vec<&str> = rows.iter().map(|e| e.event_type.as_str()).collect();
    let versions: Vec<i32> = rows.iter().map(|e| e.event_version).collect();
    let payloads: Vec<&str> = rows.iter().map(|e| e.payload.as_str()).collect();
    let metadata: Vec<&str> = rows.iter().map(|e| e.metadata.as_str()).collect();
    let occurred: Vec<chrono::DateTime<chrono::Utc>> =
        rows.iter().map(|e| e.occurred_at()).collect();
    let sequences: Vec<i64> = rows.iter().map(|e| e.sequence).collect();
    tx.execute(
        &format!(
            "INSERT INTO {} (id, tx_id, stream_id, stream_type, event_type, event_version,
                             payload, metadata, occurred_at, sequence)
             SELECT id, tx::xid8, sid, st, et, v, p::jsonb, m::jsonb, o, s
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                           $7::text[], $8::text[], $9::timestamptz[], $10::bigint[])
                    AS u(id, tx, sid, st, et, v, p, m, o, s)",
            feed::STAGED_TABLE
        ),
        &[
            &ids,
            &txs,
            &stream_ids,
            &stream_types,
            &event_types,
            &versions,
            &payloads,
            &metadata,
            &occurred,
            &sequences,
        ],
    )
    .await?;
    Ok(())
}

/// Whether the staging table has the article's column types, which the binary
/// `COPY` of [`encode`] writes; an `events` table of other types is staged
/// through [`stage`], its values cast by the server.
async fn staged_as_the_article<C: Db>(tx: &C) -> Result<bool, tokio_postgres::Error> {
    let row = tx
        .query_one(
            &format!(
                "SELECT count(*) = 10 FROM pg_attribute a
                  WHERE a.attrelid = '{}'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                    AND (a.attname::text, format_type(a.atttypid, NULL)) IN
                        (('id', 'bigint'), ('tx_id', 'xid8'), ('stream_id', 'text'),
                         ('stream_type', 'text'), ('event_type', 'text'),
                         ('event_version', 'integer'), ('payload', 'jsonb'),
                         ('metadata', 'jsonb'), ('occurred_at', 'timestamp with time zone'),
                         ('sequence', 'bigint'))",
                feed::STAGED_TABLE
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A chunk of `COPY` data is handed over once it holds this much.
const COPY_CHUNK: usize = 1 << 20;

/// Chunks of binary `COPY` data on their way from the decoding thread.
type Chunks = tokio::sync::mpsc::Sender<anyhow::Result<bytes::Bytes>>;

/// Where [`encode`] writes: the chunk in progress, and where full ones go.
struct CopyOut<'a> {
    buf: bytes::BytesMut,
    send: &'a Chunks,
}

impl CopyOut<'_> {
    fn flush(&mut self, at_least: usize) -> anyhow::Result<()> {
        if self.buf.len() >= at_least && !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.send
                .blocking_send(Ok(chunk))
                .map_err(|_| anyhow::anyhow!("the staging COPY ended early"))?;
        }
        Ok(())
    }
}

/// Stages what `produce` encodes (on a blocking thread, with [`encode`]) through
/// one binary `COPY` into the staging table, while the server takes in the
/// chunks already sent. At most a few chunks wait between the two.
async fn stage_copy<T: Send + 'static>(
    tx: &super::Transaction<'_>,
    produce: impl FnOnce(&mut CopyOut<'_>) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ArchiveError> {
    use futures_util::SinkExt;
    let (send, mut recv) = tokio::sync::mpsc::channel(2);
    let producer = tokio::task::spawn_blocking(move || {
        let mut out = CopyOut {
            buf: bytes::BytesMut::with_capacity(COPY_CHUNK + (64 << 10)),
            send: &send,
        };
        // The binary COPY header: signature, flags, no extension.
        out.buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        out.buf.extend_from_slice(&0i32.to_be_bytes());
        out.buf.extend_from_slice(&0i32.to_be_bytes());
        let done = produce(&mut out).and_then(|produced| {
            out.buf.extend_from_slice(&(-1i16).to_be_bytes());
            out.flush(0).map(|()| produced)
        });
        match done {
            Ok(produced) => Some(produced),
            Err(e) => {
                let _ = send.blocking_send(Err(e));
                None
            }
        }
    });
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {} (id, tx_id, stream_id, stream_type, event_type, event_version,
                      payload, metadata, occurred_at, sequence) FROM STDIN (FORMAT binary)",
            feed::STAGED_TABLE
        ))
        .await?;
    futures_util::pin_mut!(sink);
    while let Some(chunk) = recv.recv().await {
        sink.send(chunk?).await?;
    }
    let produced = producer
        .await
        .map_err(|e| anyhow::anyhow!("staging an archived segment: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("staging an archived segment: the encoder stopped"))?;
    sink.finish().await?;
    Ok(produced)
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Appends `batch`'s rows to `out` as binary `COPY` tuples of the staging
/// table's columns, in [`stage_copy`]'s order, straight from the decoded
/// columns: no value is copied but into the chunk.
fn encode(batch: &arrow_array::RecordBatch, out: &mut CopyOut<'_>) -> anyhow::Result<()> {
    let c = segment::Columns::of(batch)?;
    for i in 0..c.len() {
        let buf = &mut out.buf;
        buf.extend_from_slice(&10i16.to_be_bytes());
        let int8 = |buf: &mut bytes::BytesMut, v: i64| {
            buf.extend_from_slice(&8i32.to_be_bytes());
            buf.extend_from_slice(&v.to_be_bytes());
        };
        let text = |buf: &mut bytes::BytesMut, v: &str| {
            buf.extend_from_slice(&(v.len() as i32).to_be_bytes());
            buf.extend_from_slice(v.as_bytes());
        };
        // jsonb's binary form: a version byte, then the text.
        let jsonb = |buf: &mut bytes::BytesMut, v: &str| {
            buf.extend_from_slice(&(v.len() as i32 + 1).to_be_bytes());
            buf.extend_from_slice(&[1]);
            buf.extend_from_slice(v.as_bytes());
        };
        int8(buf, c.id.value(i));
        match c.tx_id(i) {
            Some(t) => int8(buf, t),
            None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        text(buf, c.stream_id.value(i));
        text(buf, c.stream_type.value(i));
        text(buf, c.event_type.value(i));
        buf.extend_from_slice(&4i32.to_be_bytes());
        buf.extend_from_slice(&c.event_version.value(i).to_be_bytes());
        jsonb(buf, c.payload.value(i));
        jsonb(buf, c.metadata.value(i));
        int8(buf, c.occurred_at.value(i) - PG_EPOCH_MICROS);
        int8(buf, c.sequence.value(i));
        out.flush(COPY_CHUNK)?;
    }
    Ok(())
}

/// Local buffers for a staged segment (16 MiB of JSON text at most, as jsonb,
/// with its keys): with the default 8 MB, staging, indexing and folding it
/// wrote it out and read it back. Taken once per session, before its first
/// temporary table: a session that already had one keeps what it has.
const TEMP_BUFFERS: &str = "SET temp_buffers = '64MB'";

async fn room_for_a_segment<C: Db>(conn: &C) -> Result<(), tokio_postgres::Error> {
    match conn.batch_execute(TEMP_BUFFERS).await {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) => {
            Ok(())
        }
        other => other,
    }
}
