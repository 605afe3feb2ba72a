//! The queries that read the log, all in position order over the
//! `pgfold_events_position` index.

use tokio_postgres::Row;

use crate::db::Db;

use super::{Horizon, Position, POSITION_TX};
use crate::projector::{Event, EventFilter};

const COLUMNS: &str =
    "e.id, COALESCE(e.tx_id, '0'::xid8)::text, e.stream_id, e.stream_type, e.event_type, \
     e.event_version, e.payload, e.metadata, e.occurred_at, e.sequence";

/// An event read in position order, and whether its stream's previous event (by
/// `sequence`) has a *later* position: the case where transaction ids disagree with
/// the order the stream was written in (see [`super::order`]).
#[derive(Debug, Clone)]
pub struct ReadRow {
    pub event: Event,
    pub predecessor_later: bool,
}

/// Up to `limit` events after `after` and below the horizon that pass `filter`.
pub async fn read_events<C: Db>(
    client: &C,
    after: Position,
    horizon: Horizon,
    filter: &EventFilter,
    limit: u32,
) -> Result<Vec<ReadRow>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS},
                p.id IS NOT NULL
                  AND (COALESCE(p.tx_id, '0'::xid8), p.id) > ({POSITION_TX}, e.id)
           FROM events e
           -- A stream's first event has no predecessor: skip the probe for it.
           LEFT JOIN LATERAL (
             SELECT p.id, p.tx_id FROM events p
              WHERE e.sequence > 1 AND p.stream_id = e.stream_id AND p.sequence = e.sequence - 1
           ) p ON true
          WHERE ({POSITION_TX}, e.id) > ($1::text::xid8, $2)
            AND {POSITION_TX} < $3::text::xid8
            AND ($4::text[] IS NULL OR e.event_type = ANY($4))
            AND ($5::text[] IS NULL OR e.stream_type = ANY($5))
          ORDER BY {POSITION_TX}, e.id
          LIMIT $6"
    );
    let rows = client
        .query(
            &sql,
            &[
                &after.tx_text(),
                &after.id,
                &horizon.tx.to_string(),
                &filter.event_types,
                &filter.stream_types,
                &i64::from(limit),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReadRow {
            event: decode(r),
            predecessor_later: r.get(10),
        })
        .collect())
}

/// The events of `event`'s stream before it in `sequence` whose position is after
/// it, in `sequence` order.
pub(super) async fn later_predecessors<C: Db>(
    client: &C,
    event: &Event,
    filter: &EventFilter,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS}
           FROM events e
          WHERE e.stream_id = $1 AND e.sequence < $2
            AND ({POSITION_TX}, e.id) > ($3::text::xid8, $4)
            AND ($5::text[] IS NULL OR e.event_type = ANY($5))
            AND ($6::text[] IS NULL OR e.stream_type = ANY($6))
          ORDER BY e.sequence"
    );
    let rows = client
        .query(
            &sql,
            &[
                &event.stream_id,
                &event.sequence,
                &event.position.tx_text(),
                &event.position.id,
                &filter.event_types,
                &filter.stream_types,
            ],
        )
        .await?;
    Ok(rows.iter().map(decode).collect())
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
pub async fn set_batch_end<C: Db>(
    client: &C,
    after: Position,
    horizon: Horizon,
    limit: u32,
    exact: bool,
) -> Result<Option<Position>, tokio_postgres::Error> {
    let sql = if exact {
        format!(
            "SELECT tx::text, id FROM (
               SELECT {POSITION_TX} AS tx, e.id
                 FROM events e
                WHERE ({POSITION_TX}, e.id) > ($1::text::xid8, $2)
                  AND {POSITION_TX} < $3::text::xid8
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
            WHERE {POSITION_TX} < $3::text::xid8
            ORDER BY {POSITION_TX} DESC, e.id DESC LIMIT 1
         )
         SELECT tx::text, id FROM guess
          WHERE tx < $3::text::xid8 AND (tx, id) > ($1::text::xid8, $2)
         UNION ALL
         SELECT tx::text, id FROM newest
          WHERE (tx, id) > ($1::text::xid8, $2)
         LIMIT 1"
        )
    };
    let row = client
        .query_opt(
            &sql,
            &[
                &after.tx_text(),
                &after.id,
                &horizon.tx.to_string(),
                &i64::from(limit),
            ],
        )
        .await?;
    Ok(row.map(|r| position(&r, 0, 1)))
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

fn decode(row: &Row) -> Event {
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
