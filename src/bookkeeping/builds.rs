//! The rows of rebuilds beside the live tables, and the definition each
//! projector's tables were built with (its fingerprint).

use serde::Serialize;

use crate::db::Db;
use crate::feed::POSITION_TX;
use crate::projector::Projector;

/// The checkpoint row (and advisory lock) of `name`'s rebuild beside its live
/// tables.
pub fn build_key(name: &str) -> String {
    format!("{name}.build")
}

/// How far a rebuild beside the live projection has come.
#[derive(Debug, Serialize)]
pub struct RebuildProgress {
    /// Why it runs: `--rebuild`, or the definition that changed.
    pub reason: Option<String>,
    /// The definition it builds.
    pub fingerprint: Option<String>,
    /// Id of the last event the build consumed.
    pub position: i64,
    /// Committed events it consumes that the build has not applied yet.
    pub lag_events: i64,
    /// Events the build has applied.
    pub events_applied: i64,
    /// Events applied per second since the build began; `null` until known.
    pub events_per_second: Option<f64>,
    /// Seconds until it has caught up at that rate; `null` until known.
    pub eta_seconds: Option<f64>,
}

/// Records the definition a projector's tables were just built with (a new
/// projector's first setup, a replay).
pub async fn record_fingerprint<C: Db>(
    tx: &C,
    p: &dyn Projector,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors SET fingerprint = $2 WHERE name = $1",
        &[&p.name(), &p.fingerprint()],
    )
    .await?;
    Ok(())
}

/// The fingerprint a projector's live tables were built with, if recorded.
pub async fn stored_fingerprint<C: Db>(
    client: &C,
    name: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT fingerprint FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// A rebuild of `p` in progress, for `status`: the build's checkpoint, its lag
/// (counted as a projector's is), and its rate since it began. A batch in flight
/// (applied in parts, see `pgfold.batch_progress`) counts for the position, the
/// events applied and the ETA, not for the lag, which is what is committed.
pub async fn rebuild_progress<C: Db>(
    client: &C,
    p: &dyn Projector,
) -> Result<Option<RebuildProgress>, tokio_postgres::Error> {
    let filter = p.filter();
    let row = client
        .query_opt(
            &format!(
                "SELECT greatest(b.position_id, f.position_id), lag.events,
                        b.events_applied + coalesce(f.events, 0),
                        extract(epoch FROM now() - b.build_started_at)::float8,
                        b.build_reason, b.fingerprint, coalesce(f.events, 0)
                   FROM pgfold.projectors b
                   LEFT JOIN pgfold.batch_progress f
                     ON f.name = b.name AND (f.from_tx, f.from_id) = (b.position_tx, b.position_id)
                   CROSS JOIN LATERAL (
                     SELECT count(*) AS events
                       FROM (SELECT e.event_type, e.stream_type FROM events e
                              WHERE ({POSITION_TX}, e.id) > (b.position_tx, b.position_id)
                             OFFSET 0) e
                      WHERE ($2::text[] IS NULL OR e.event_type = ANY($2))
                        AND ($3::text[] IS NULL OR e.stream_type = ANY($3))) lag
                  WHERE b.name = $1"
            ),
            &[
                &build_key(p.name()),
                &filter.event_types,
                &filter.stream_types,
            ],
        )
        .await?;
    Ok(row.map(|r| {
        let (lag_events, applied, in_flight): (i64, i64, i64) = (r.get(1), r.get(2), r.get(6));
        let rate = r
            .get::<_, Option<f64>>(3)
            .filter(|s| *s > 0.0 && applied > 0)
            .map(|s| applied as f64 / s);
        RebuildProgress {
            position: r.get(0),
            lag_events,
            events_applied: applied,
            events_per_second: rate.map(f64::round),
            eta_seconds: rate.map(|v| ((lag_events - in_flight).max(0) as f64 / v).ceil()),
            reason: r.get(4),
            fingerprint: r.get(5),
        }
    }))
}
