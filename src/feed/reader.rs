//! The queries that read the log, all in position order over the
//! `pgfold_events_position` index.
//!
//! That index must be the one that reads a range of the log whatever the table's
//! statistics, or the cost of every live batch grows with the log. So every range
//! is read in a subquery fenced with `OFFSET 0`: the filters around it (a
//! projector's event types, the application's stream types) stay above the scan and
//! cannot pull another of the application's indexes into it. Without the fence, a
//! BitmapAnd with `idx_events_event_type` read every `OrderPaid` of the log to find
//! the two of a live batch (`tests/integration/plan_robustness.rs`).
//!
//! Per-stream probes go through the application's `(stream_id, sequence)` index,
//! by key: they fence the stream's key alone and test positions above the fence, so
//! that no estimate of a range can turn a probe into a range scan per event.

use tokio_postgres::Row;

use crate::db::Db;

use super::{Event, EventFilter, Upcasters};
use super::{Horizon, Position, POSITION_TX};
use tokio_postgres::types::ToSql;

/// The columns of an event, in [`read_row`]'s order.
const COLUMNS: &str =
    "x.id, COALESCE(x.tx_id, '0'::xid8)::text, x.stream_id, x.stream_type, x.event_type, \
     x.event_version, x.payload, x.metadata, x.occurred_at, x.sequence";

/// What the byte budget counts for event `e`: the size of its payload and metadata
/// as the daemon receives them. For a value stored compressed, the length of its
/// JSON text, exactly what crosses the wire (jsonb's binary format is that text
/// behind a version byte); `pg_column_size` would give the compressed size, which
/// can be a hundredth of that. For the others, stored as they are (every small
/// event), `pg_column_size`, the size of the stored jsonb: within a few percent of
/// the text's for a document of any size, and it costs no rendering.
const BYTES: &str = "(CASE WHEN pg_column_compression(e.payload) IS NULL
                           THEN pg_column_size(e.payload) ELSE octet_length(e.payload::text) END::bigint
                    + CASE WHEN pg_column_compression(e.metadata) IS NULL
                           THEN pg_column_size(e.metadata) ELSE octet_length(e.metadata::text) END)";

/// An event read in position order, and whether its stream's previous event (by
/// `sequence`) has a *later* position: the case where transaction ids disagree with
/// the order the stream was written in (see `feed::order`).
#[derive(Debug, Clone)]
pub struct ReadRow {
    /// The event, whole.
    pub event: Event,
    /// The previous event of its stream that the projector consumes has a later
    /// position, so it must be delivered first (`feed::order` repairs this).
    pub predecessor_later: bool,
    /// The size of the payload and metadata as received: what the batch budget
    /// counts (see `BYTES`).
    pub bytes: i64,
}

/// Rows read for a batch: in position order, within the count and byte limits.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// The rows that fit, in position order; empty when no event after the
    /// checkpoint is below the horizon.
    pub rows: Vec<ReadRow>,
    /// The byte budget ended the batch before the count did: more events are waiting.
    pub cut_by_bytes: bool,
}

/// `read` (rows of `id`, `tx`, `sequence`, `bytes` ([`BYTES`]) and
/// `predecessor_later`, in the order `order`, written over `r.`) cut at a byte
/// budget bound at `$budget`: a row fits while the running total of `bytes` up to
/// and including it stays within the budget; with `first_always`, the first row
/// fits whatever it weighs (an event larger than the budget makes a batch of its
/// own). Only a row that fits is fetched whole; from the first that does not on,
/// the events' columns come back NULL, so no payload beyond the budget crosses the
/// wire. The reader stops at that row.
///
/// The window sees no payload on purpose: its tuplestore would spill large values
/// to disk, and a spilled window reads its whole input before returning a row,
/// which would render every payload up to the count limit on every batch.
///
/// The rows that fit are fetched through `upcasters` (see `feed::upcast`).
fn within_budget(
    read: &str,
    order: &str,
    budget: u8,
    first_always: bool,
    upcasters: &Upcasters,
) -> String {
    let first = if first_always {
        "OR row_number() OVER w = 1"
    } else {
        ""
    };
    let fetch = upcasters.layer("(SELECT * FROM events x WHERE r.fits AND x.id = r.id LIMIT 1)");
    format!(
        "SELECT {COLUMNS}, r.predecessor_later, r.bytes, r.fits
           FROM (
             SELECT r.*, sum(r.bytes) OVER w <= ${budget}::bigint {first} AS fits
               FROM ({read}) r
             WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
           ) r
           LEFT JOIN LATERAL {fetch} x ON true
          ORDER BY {order}"
    )
}

/// Index of the `fits` column of [`within_budget`]'s rows.
const FITS: usize = 12;

/// A `LATERAL` subquery giving `p`, the nearest earlier event of `e`'s stream that
/// passes the filter bound at `$f1` / `$f2`. Earlier events the projector does not
/// consume are stepped over: an inversion hidden behind one of them would otherwise
/// go unnoticed. The stream's earlier events are read, newest first, by key in a
/// fenced subquery, and filtered above it; `LIMIT 1` stops at the first that passes
/// and keeps the planner from flattening the probe into a join.
fn nearest_consumed_predecessor(f1: u8, f2: u8) -> String {
    format!(
        "LATERAL (
           SELECT p.id, p.tx FROM (
             SELECT p.id, COALESCE(p.tx_id, '0'::xid8) AS tx, p.sequence, p.event_type, p.stream_type
               FROM events p
              WHERE p.stream_id = e.stream_id AND p.sequence < e.sequence
              ORDER BY p.sequence DESC
             OFFSET 0) p
            WHERE {passes}
            ORDER BY p.sequence DESC
            LIMIT 1
         ) p",
        passes = passes_as("p", f1, f2),
    )
}

/// The condition that `e` passes the filter bound at `$f1` / `$f2`.
fn passes(f1: u8, f2: u8) -> String {
    passes_as("e", f1, f2)
}

fn passes_as(alias: &str, f1: u8, f2: u8) -> String {
    format!(
        "(${f1}::text[] IS NULL OR {alias}.event_type = ANY(${f1}))
         AND (${f2}::text[] IS NULL OR {alias}.stream_type = ANY(${f2}))"
    )
}

/// The condition that `alias` lies in `(after, upto]`, bound at `$1`–`$4`. The
/// BETWEEN repeats the row comparisons for the planner, which estimates a range on
/// one column far better than one on a row.
pub(crate) fn in_range(alias: &str) -> String {
    in_range_from(alias, 1)
}

/// [`in_range`] with its four placeholders numbered from `$first`.
pub(crate) fn in_range_from(alias: &str, first: usize) -> String {
    let tx = format!("COALESCE({alias}.tx_id, '0'::xid8)");
    let (after_tx, after_id, upto_tx, upto_id) = (first, first + 1, first + 2, first + 3);
    format!(
        "{tx} BETWEEN ${after_tx}::text::xid8 AND ${upto_tx}::text::xid8
         AND ({tx}, {alias}.id) > (${after_tx}::text::xid8, ${after_id})
         AND ({tx}, {alias}.id) <= (${upto_tx}::text::xid8, ${upto_id})"
    )
}

/// `events` in `(after, upto]` (bound at `$1`–`$4`, see [`in_range`]) as a fenced
/// subquery to alias: the table's columns plus `pos_tx`, the position's transaction.
/// See the module documentation for the fence.
pub(crate) fn fenced_range(alias: &str) -> String {
    format!(
        "(SELECT COALESCE({alias}.tx_id, '0'::xid8) AS pos_tx, {alias}.*
            FROM events {alias}
           WHERE {range}
          OFFSET 0)",
        range = in_range(alias)
    )
}

/// Up to `limit` events after `after` and below the horizon that pass `filter`,
/// holding at most `budget` bytes (see `within_budget`). Rows are decoded as they
/// arrive and dropped, so each payload is held once, as the decoded event.
pub async fn read_events<C: Db>(
    client: &C,
    after: Position,
    horizon: Horizon,
    filter: &EventFilter,
    limit: u32,
    budget: i64,
) -> Result<ReadBatch, tokio_postgres::Error> {
    // The range is read in position order inside the fence; `pos_tx` carries that
    // order out of it, so the LIMIT stops the index scan early instead of sorting
    // everything after the checkpoint.
    let read = format!(
        "SELECT e.id, e.pos_tx AS tx, e.sequence, {BYTES} AS bytes,
                p.id IS NOT NULL AND (p.tx, p.id) > (e.pos_tx, e.id) AS predecessor_later
           FROM (SELECT COALESCE(e.tx_id, '0'::xid8) AS pos_tx, e.*
                   FROM events e
                  WHERE ({POSITION_TX}, e.id) > ($1::text::xid8, $2)
                    AND {POSITION_TX} < $3::text::xid8
                  ORDER BY 1, e.id
                 OFFSET 0) e
           LEFT JOIN {probe} ON true
          WHERE {passes}
          ORDER BY e.pos_tx, e.id
          LIMIT $6",
        probe = nearest_consumed_predecessor(4, 5),
        passes = passes(4, 5),
    );
    let mut batch = ReadBatch::default();
    let rows = async {
        client
            .for_each_row(
                &within_budget(&read, "r.tx, r.id", 7, true, &filter.upcasters),
                &[
                    &after.tx_text(),
                    &after.id,
                    &horizon.tx.to_string(),
                    &filter.event_types,
                    &filter.stream_types,
                    &i64::from(limit),
                    &budget,
                ],
                &mut |row| {
                    if !row.get::<_, bool>(FITS) {
                        batch.cut_by_bytes = true;
                        return false;
                    }
                    batch.rows.push(read_row(&row));
                    true
                },
            )
            .await
    };
    // Each event's nearest consumed predecessor is probed by its stream's index,
    // read backwards from it (see `sorting_off`).
    sorting_off(client, rows).await?;
    Ok(batch)
}

/// Runs `statement` with sorting off for it alone. The statements that probe each
/// event's stream for its nearest consumed predecessor (or the walk of the
/// stream index) need the stream index read in order, stopping at the first
/// row. Unless sorting is off, a table whose statistics say little (one that
/// grew from empty, never analysed) gets a bitmap scan and a sort of the whole
/// stream instead, for every event: a 120,000-event stream was still being
/// probed after 20 minutes. One after the other, not pipelined, so that the
/// setting holds for this statement only.
pub(crate) async fn sorting_off<C: Db, T>(
    client: &C,
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    client.batch_execute("SET LOCAL enable_sort = off").await?;
    let out = statement.await?;
    client.batch_execute("RESET enable_sort").await?;
    Ok(out)
}

/// For a [`crate::projector::Fold::StreamSet`] batch `(after, upto]`: the events
/// that must be delivered ahead with it, that is, earlier events (that pass
/// `filter`) of a stream with an event in the range whose position lies beyond
/// `upto`, less those in `skip` (delivered ahead already).
///
/// Two equivalent queries; the cheaper one probes the smaller side. A batch that
/// runs to the newest event below the horizon (`to_newest`: catching up, or
/// live) leaves a short tail beyond `upto`, only what was written since, so each
/// event of the tail looks for a later event of its stream in the range. A batch
/// cut at its size, short of a long tail, checks each of its events' nearest
/// consumed predecessor instead: any earlier event beyond `upto` is that
/// predecessor or, by the same check one step back, an earlier one's.
pub async fn ahead_of_range<C: Db>(
    client: &C,
    after: Position,
    upto: Position,
    to_newest: bool,
    skip: &[i64],
    filter: &EventFilter,
) -> Result<Vec<(i64, Position)>, tokio_postgres::Error> {
    let passes = passes(5, 6);
    let sql = if to_newest {
        // The upper bound changes no result (every visible event's transaction is
        // below the snapshot's xmax) but gives the planner a closed range: with
        // only a lower bound, a generic plan (see `worker`) takes the tail
        // for a third of the log and scans all of it. Each event of the tail looks
        // for a later event of its stream in the range by key, in a fenced
        // subquery, which also keeps the probe a per-row look-up.
        format!(
            "SELECT e.id, e.pos_tx::text
               FROM (SELECT COALESCE(e.tx_id, '0'::xid8) AS pos_tx, e.*
                       FROM events e
                      WHERE ({POSITION_TX}, e.id) > ($3::text::xid8, $4)
                        AND {POSITION_TX} BETWEEN $3::text::xid8 AND pg_snapshot_xmax(pg_current_snapshot())
                     OFFSET 0) e
              WHERE {passes} AND e.id <> ALL($7::bigint[])
                AND EXISTS (
                  SELECT 1 FROM (
                    SELECT s.* FROM events s
                     WHERE s.stream_id = e.stream_id AND s.sequence > e.sequence
                    OFFSET 0) s
                   WHERE {range_s} AND {passes_s})",
            range_s = in_range("s"),
            passes_s = passes_as("s", 5, 6),
        )
    } else {
        format!(
            "WITH flagged AS (
               SELECT e.stream_id, e.sequence
                 FROM {range} e
                 JOIN {probe} ON (p.tx, p.id) > ($3::text::xid8, $4)
                WHERE {passes}
             )
             SELECT DISTINCT e.id, e.pos_tx::text
               FROM flagged f
               JOIN LATERAL (
                 SELECT COALESCE(e.tx_id, '0'::xid8) AS pos_tx, e.*
                   FROM events e
                  WHERE e.stream_id = f.stream_id AND e.sequence < f.sequence
                 OFFSET 0) e ON true
              WHERE (e.pos_tx, e.id) > ($3::text::xid8, $4)
                AND {passes} AND e.id <> ALL($7::bigint[])",
            range = fenced_range("e"),
            probe = nearest_consumed_predecessor(5, 6),
        )
    };
    let params: [&(dyn ToSql + Sync); 7] = [
        &after.tx_text(),
        &after.id,
        &upto.tx_text(),
        &upto.id,
        &filter.event_types,
        &filter.stream_types,
        &skip,
    ];
    let rows = match to_newest {
        true => client.query(&sql, &params).await?,
        // Each event's nearest consumed predecessor, probed by its stream's index.
        false => sorting_off(client, client.query(&sql, &params)).await?,
    };
    Ok(rows.iter().map(|r| (r.get(0), position(r, 1, 0))).collect())
}

/// The events of `event`'s stream before it in `sequence` whose position is after
/// it, in `sequence` order, and whether they fit in `budget` bytes. When they do
/// not, the events are left out: the caller decides whether the row that needs
/// them waits for a batch of its own.
pub(super) async fn later_predecessors<C: Db>(
    client: &C,
    event: &Event,
    filter: &EventFilter,
    budget: i64,
) -> Result<(Vec<ReadRow>, bool), tokio_postgres::Error> {
    let read = format!(
        "SELECT e.id, e.pos_tx AS tx, e.sequence, {BYTES} AS bytes,
                false AS predecessor_later
           FROM (SELECT COALESCE(e.tx_id, '0'::xid8) AS pos_tx, e.*
                   FROM events e
                  WHERE e.stream_id = $1 AND e.sequence < $2
                 OFFSET 0) e
          WHERE (e.pos_tx, e.id) > ($3::text::xid8, $4) AND {passes}",
        passes = passes(5, 6),
    );
    let mut events = Vec::new();
    let mut fit = true;
    client
        .for_each_row(
            &within_budget(&read, "r.sequence", 7, false, &filter.upcasters),
            &[
                &event.stream_id,
                &event.sequence,
                &event.position.tx_text(),
                &event.position.id,
                &filter.event_types,
                &filter.stream_types,
                &budget,
            ],
            &mut |row| {
                // The budget is a running total: every row after one beyond it
                // is beyond it too.
                fit = row.get::<_, bool>(FITS);
                if fit {
                    events.push(read_row(&row));
                }
                fit
            },
        )
        .await?;
    if !fit {
        events.clear();
    }
    Ok((events, fit))
}

/// The end of a set-based batch of about `limit` events after `after`, below the
/// horizon: any position is a valid end (the range holds whatever lies between),
/// so instead of counting `limit` events through the index, take the event
/// `limit` ids further on, two index probes, and fall back to the newest event
/// below the horizon when that one is beyond it. Positions follow ids closely, so
/// batches come out close to `limit`.
///
/// With `exact`, the batch holds at most `limit` events, counted through the
/// index: what isolating a failing event needs.
///
/// Returns the end, and whether the size limit cut the batch short (more events
/// are waiting below the horizon).
///
/// `horizon`: `None` reads the one [`kept_horizon`](super::kept_horizon) left in
/// this transaction, so that this statement can be sent right behind it (without
/// one, no batch is found).
pub async fn set_batch_end<C: Db>(
    client: &C,
    after: Position,
    horizon: Option<Horizon>,
    limit: u32,
    exact: bool,
) -> Result<Option<(Position, bool)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            set_batch_end_sql(exact),
            &[
                &after.tx_text(),
                &after.id,
                &horizon.map(|h| h.tx.to_string()),
                &i64::from(limit),
            ],
        )
        .await?;
    Ok(row.map(|r| (position(&r, 0, 1), r.get(2))))
}

/// Readies [`set_batch_end`] to be sent in one round trip with others (see
/// [`Db::ready`]).
pub async fn ready_set_batch_end<C: Db>(
    client: &C,
    exact: bool,
) -> Result<(), tokio_postgres::Error> {
    let (none, zero): (Option<String>, i64) = (None, 0);
    client
        .ready(set_batch_end_sql(exact), &[&"0", &zero, &none, &zero])
        .await
}

/// Built once each: every set batch sends one.
fn set_batch_end_sql(exact: bool) -> &'static str {
    static SQL: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
        [
            build_set_batch_end_sql(false),
            build_set_batch_end_sql(true),
        ]
    });
    &SQL[usize::from(exact)]
}

fn build_set_batch_end_sql(exact: bool) -> String {
    // A stable expression either way: the position index reads up to it. The
    // planner may evaluate it while estimating, in a session where the setting is
    // missing (NULL) or left empty by an earlier transaction: neither may fail.
    let below = format!(
        "coalesce($3::text, nullif(current_setting('{}', true), ''))::xid8",
        super::horizon::HORIZON_SETTING
    );
    if exact {
        format!(
            "SELECT tx::text, id, count(*) OVER () = $4 FROM (
               SELECT {POSITION_TX} AS tx, e.id
                 FROM events e
                WHERE ({POSITION_TX}, e.id) > ($1::text::xid8, $2)
                  AND {POSITION_TX} < {below}
                ORDER BY 1, 2
                LIMIT $4
             ) batch
             ORDER BY tx DESC, id DESC
             LIMIT 1"
        )
    } else {
        format!(
            "WITH guess AS (
           SELECT {POSITION_TX} AS tx, e.id FROM events e
            WHERE e.id >= $2::bigint + $4::bigint
            ORDER BY e.id LIMIT 1
         ),
         newest AS (
           SELECT {POSITION_TX} AS tx, e.id FROM events e
            WHERE {POSITION_TX} < {below}
            ORDER BY {POSITION_TX} DESC, e.id DESC LIMIT 1
         )
         SELECT tx::text, id, true FROM guess
          WHERE tx < {below} AND (tx, id) > ($1::text::xid8, $2)
         UNION ALL
         SELECT tx::text, id, false FROM newest
          WHERE (tx, id) > ($1::text::xid8, $2)
         LIMIT 1"
        )
    }
}

/// Where a walk of the `(stream_id, sequence)` index in key order stands after
/// `entries` more entries from `cursor` (inclusive; `None`: the first entry): the
/// key of the entry it stops at, or `None` when fewer are left. An index-only
/// scan that reads keys only, over every event whatever its position or type: it
/// counts, in events, how much of the log a part of a stream-set range reaches
/// (see `worker::parts`). The walk from the start searches from the smallest key
/// there is (`''`, which sorts first in every collation), so that it is one
/// statement, and one that the planner sees searching the index.
///
/// Sorting is off for the walk alone: on a log whose
/// visibility map is not set (never vacuumed), an offset that the estimates put
/// near the end of the index is planned as a sort of every event after the
/// cursor (measured: 390,000 of 400,000 entries, unvacuumed), which would sort
/// the log once per part. In key order the index needs no sort.
pub async fn stream_key_after<C: Db>(
    client: &C,
    cursor: Option<&(String, i64)>,
    entries: u32,
) -> Result<Option<(String, i64)>, tokio_postgres::Error> {
    let start = (String::new(), i64::MIN);
    let (stream_id, sequence) = cursor.unwrap_or(&start);
    let entries = i64::from(entries);
    let params: [&(dyn ToSql + Sync); 3] = [stream_id, sequence, &entries];
    let row = client.query_opt(
        "SELECT e.stream_id, e.sequence FROM events e
          WHERE (e.stream_id, e.sequence) >= ($1::text, $2::bigint)
          ORDER BY e.stream_id, e.sequence
         OFFSET $3 LIMIT 1",
        &params,
    );
    let row = sorting_off(client, row).await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The position of the newest committed event, if any.
pub async fn newest<C: Db>(client: &C) -> Result<Option<Position>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {POSITION_TX}::text, e.id FROM events e ORDER BY {POSITION_TX} DESC, e.id DESC LIMIT 1"
    );
    Ok(client
        .query_opt(&sql, &[])
        .await?
        .map(|r| position(&r, 0, 1)))
}

fn position(row: &Row, tx: usize, id: usize) -> Position {
    let text: String = row.get(tx);
    Position::new(
        Position::parse_tx(&text).expect("xid8 renders as a decimal integer"),
        row.get(id),
    )
}

/// The event in the first ten columns of `row`, in [`COLUMNS`]' order (the
/// transaction as text): every reader of whole events decodes them here.
pub(crate) fn event_from_row(row: &Row) -> Event {
    Event {
        id: row.get(0),
        position: position(row, 1, 0),
        stream_id: row.get(2),
        stream_type: row.get(3),
        event_type: row.get(4),
        event_version: row.get(5),
        payload: row.get(6),
        metadata: row.get(7),
        occurred_at: row.get(8),
        sequence: row.get(9),
    }
}

/// A row of [`within_budget`] that fits.
fn read_row(row: &Row) -> ReadRow {
    ReadRow {
        event: event_from_row(row),
        predecessor_later: row.get(10),
        bytes: row.get(11),
    }
}
