//! What the archive asks of the projectors' books: which segments each has
//! consumed (`archive_applied`), and who holds archiving back.
//!
//! A pass records a segment only while every projector row (live, rebuilds in
//! progress, parked) has its checkpoint at or past the segment's newest event, and
//! in the same transaction raises every row's `archive_applied` to it: those rows
//! consumed the segment's events from the table. A row that is new or rewound
//! starts at 0 with its checkpoint at the first event, which holds every pass back
//! until it has read the segments and caught up.

use crate::db::Db;
use crate::feed::Position;

/// The highest segment `name` has consumed.
pub async fn archive_applied<C: Db>(client: &C, name: &str) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT archive_applied FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// Records that `name` has consumed segments up to `segment`, if it stood at
/// `from`, and applied `events` of them (counted in `events_applied`, which a
/// replay's progress in `status` goes by); whether it did (another instance may
/// have got there first).
pub async fn advance_archive<C: Db>(
    tx: &C,
    name: &str,
    from: i64,
    segment: i64,
    events: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "UPDATE pgfold.projectors
                SET archive_applied = $3, events_applied = events_applied + $4, updated_at = now()
              WHERE name = $1 AND archive_applied = $2",
            &[&name, &from, &segment, &events],
        )
        .await?;
    Ok(n == 1)
}

/// The projector row with the oldest checkpoint: what holds archiving back (the
/// newest event any pass may move), or `None` when there is no row.
pub async fn oldest_checkpoint<C: Db>(
    client: &C,
) -> Result<Option<(String, Position)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT name, position_tx::text, position_id FROM pgfold.projectors
              ORDER BY position_tx, position_id, name LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| {
        let tx: String = r.get(1);
        (
            r.get(0),
            Position::new(Position::parse_tx(&tx).unwrap_or(0), r.get(2)),
        )
    }))
}

/// In the transaction that records `segment`: blocks every change to the
/// projectors' rows until it ends (their writers take ROW EXCLUSIVE, which SHARE
/// excludes; the lock waits at most the transaction's `lock_timeout`), checks
/// that every row had consumed every earlier segment (`previous`) and is past the
/// segment's events it consumes (`newest`: per event type and stream type, the
/// newest position among them), and raises all of them to `segment`.
/// `Err(name)`: a row that is not (a replay or rebuild started during the pass);
/// the caller rolls back.
pub async fn claim_segment<C: Db>(
    tx: &C,
    segment: i64,
    previous: i64,
    newest: &[(String, String, Position)],
) -> Result<Result<(), String>, tokio_postgres::Error> {
    tx.batch_execute("LOCK TABLE pgfold.projectors IN SHARE MODE")
        .await?;
    let event_types: Vec<&str> = newest.iter().map(|(e, _, _)| e.as_str()).collect();
    let stream_types: Vec<&str> = newest.iter().map(|(_, s, _)| s.as_str()).collect();
    let txs: Vec<String> = newest.iter().map(|(_, _, p)| p.tx_text()).collect();
    let ids: Vec<i64> = newest.iter().map(|(_, _, p)| p.id).collect();
    let behind = tx
        .query_opt(
            "SELECT p.name FROM pgfold.projectors p
              WHERE p.archive_applied <> $1
                 OR EXISTS (
                      SELECT 1 FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[]) AS g(et, st, tx, id)
                       WHERE (p.event_types IS NULL OR g.et = ANY(p.event_types))
                         AND (p.stream_types IS NULL OR g.st = ANY(p.stream_types))
                         AND (g.tx::xid8, g.id) > (p.position_tx, p.position_id))
              ORDER BY p.name LIMIT 1",
            &[&previous, &event_types, &stream_types, &txs, &ids],
        )
        .await?;
    if let Some(row) = behind {
        return Ok(Err(row.get(0)));
    }
    tx.execute(
        "UPDATE pgfold.projectors SET archive_applied = $1",
        &[&segment],
    )
    .await?;
    Ok(Ok(()))
}
