//! A projector's row in `pgfold.projectors`: its checkpoint, its health, and the
//! lock that keeps two instances from working it at once.
//!
//! Coordination is a transaction-scoped advisory lock taken at the start of every
//! batch transaction (`pg_try_advisory_xact_lock`). PostgreSQL releases it when the
//! transaction ends, however it ends: a commit, a rollback, a killed process or a
//! dropped connection. So there is no lease to expire and no manual step when an
//! instance dies, and since it lives only inside one transaction it works unchanged
//! behind a transaction-pooling proxy. Taking it assigns no transaction id, so a
//! batch reads the horizon without holding it back itself.

use std::collections::HashSet;

use crate::db::Db;

use crate::feed::Position;
use crate::projector::Projector;

/// A projector's state column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// Rebuilding from the first event after `--replay`.
    Replaying,
    /// Parked on an event it could not apply (`on_error = "stop"`).
    Failed,
}

impl State {
    fn parse(s: &str) -> State {
        match s {
            "replaying" => State::Replaying,
            "failed" => State::Failed,
            _ => State::Running,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Replaying => "replaying",
            State::Failed => "failed",
        }
    }
}

/// What a batch needs to know about its projector, read under the lock.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub position: Position,
    pub state: State,
    /// Events delivered ahead of their position (see `feed::order`).
    pub ahead: HashSet<i64>,
    pub failing_event_id: Option<i64>,
    pub attempts: i32,
}

const LOCK_KEY: &str = "hashtextextended('pgfold:projector:' || $1, 0)";

/// Tries to take the projector's lock for the rest of this transaction.
pub async fn try_lock<C: Db>(tx: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    let sql = format!("SELECT pg_try_advisory_xact_lock({LOCK_KEY})");
    Ok(tx.query_one(&sql, &[&name]).await?.get(0))
}

/// Waits for the projector's lock (for a replay, which must not be skipped).
pub async fn lock<C: Db>(tx: &C, name: &str) -> Result<(), tokio_postgres::Error> {
    let sql = format!("SELECT pg_advisory_xact_lock({LOCK_KEY})");
    tx.execute(&sql, &[&name]).await?;
    Ok(())
}

/// Creates the projector's row if it has none; reports whether it did.
pub async fn register<C: Db>(client: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "INSERT INTO pgfold.projectors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            &[&name],
        )
        .await?;
    Ok(n == 1)
}

/// Records which events the projector consumes and whether it applies each stream
/// in `sequence` order, for `pgfold.applied` (migration V6) to judge by.
pub async fn record_filter<C: Db>(
    client: &C,
    p: &dyn Projector,
) -> Result<(), tokio_postgres::Error> {
    let filter = p.filter();
    let in_stream_order = p.fold().in_stream_order();
    client
        .execute(
            "UPDATE pgfold.projectors
                SET event_types = $2, stream_types = $3, in_stream_order = $4
              WHERE name = $1
                AND (event_types, stream_types, in_stream_order)
                    IS DISTINCT FROM ($2::text[], $3::text[], $4::boolean)",
            &[
                &p.name(),
                &filter.event_types,
                &filter.stream_types,
                &in_stream_order,
            ],
        )
        .await?;
    Ok(())
}

pub async fn exists<C: Db>(client: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM pgfold.projectors WHERE name = $1", &[&name])
        .await?
        .is_some())
}

pub async fn load<C: Db>(tx: &C, name: &str) -> Result<Checkpoint, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "SELECT position_tx::text, position_id, state, failing_event_id, attempts,
                    ARRAY(SELECT event_id FROM pgfold.delivered_ahead WHERE projector = p.name)
               FROM pgfold.projectors p
              WHERE name = $1",
            &[&name],
        )
        .await?;
    let tx_text: String = row.get(0);
    let ahead: Vec<i64> = row.get(5);
    Ok(Checkpoint {
        position: Position::new(
            Position::parse_tx(&tx_text).expect("xid8 renders as a decimal integer"),
            row.get(1),
        ),
        state: State::parse(row.get(2)),
        failing_event_id: row.get(3),
        attempts: row.get(4),
        ahead: ahead.into_iter().collect(),
    })
}

/// Moves the checkpoint to `upto` after `applied` events, clears any failure, and
/// ends a replay that has reached its target. `had_ahead`: the checkpoint loaded
/// for this batch listed events delivered ahead, which may now be passed.
pub async fn advance<C: Db>(
    tx: &C,
    name: &str,
    upto: Position,
    applied: u64,
    had_ahead: bool,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors
            SET position_tx = $2::text::xid8, position_id = $3,
                events_applied = events_applied + $4,
                last_advanced_at = CASE WHEN $4 > 0 THEN now() ELSE last_advanced_at END,
                failing_event_id = NULL, failing_event_type = NULL, attempts = 0,
                state = CASE
                  WHEN state = 'replaying'
                   AND ($2::text::xid8, $3) >= (replay_target_tx, replay_target_id) THEN 'running'
                  ELSE state END,
                updated_at = now()
          WHERE name = $1",
        &[&name, &upto.tx_text(), &upto.id, &(applied as i64)],
    )
    .await?;
    if !had_ahead {
        // Any recorded by this batch lie beyond `upto`.
        return Ok(());
    }
    // Events delivered ahead that the checkpoint has now passed are done with.
    tx.execute(
        "DELETE FROM pgfold.delivered_ahead
          WHERE projector = $1 AND (position_tx, event_id) <= ($2::text::xid8, $3)",
        &[&name, &upto.tx_text(), &upto.id],
    )
    .await?;
    Ok(())
}

pub async fn record_ahead<C: Db>(
    tx: &C,
    name: &str,
    ahead: &[(i64, Position)],
) -> Result<(), tokio_postgres::Error> {
    if ahead.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = ahead.iter().map(|(id, _)| *id).collect();
    let txs: Vec<String> = ahead.iter().map(|(_, p)| p.tx_text()).collect();
    tx.execute(
        "INSERT INTO pgfold.delivered_ahead (projector, event_id, position_tx)
         SELECT $1, id, tx::xid8 FROM unnest($2::bigint[], $3::text[]) AS a(id, tx)",
        &[&name, &ids, &txs],
    )
    .await?;
    Ok(())
}

/// The event a projector failed on, without giving up on it yet.
#[derive(Debug, Clone)]
pub struct Failure {
    pub event_id: i64,
    pub event_type: String,
    pub error: String,
    pub attempts: i32,
}

pub async fn record_failure<C: Db>(
    tx: &C,
    name: &str,
    f: &Failure,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors
            SET failing_event_id = $2, failing_event_type = $3, last_error = $4,
                attempts = $5, last_error_at = now(), updated_at = now()
          WHERE name = $1",
        &[&name, &f.event_id, &f.event_type, &f.error, &f.attempts],
    )
    .await?;
    Ok(())
}

/// `on_error = "stop"`: parks the projector on the event.
pub async fn park<C: Db>(tx: &C, name: &str, f: &Failure) -> Result<(), tokio_postgres::Error> {
    record_failure(tx, name, f).await?;
    tx.execute(
        "UPDATE pgfold.projectors SET state = 'failed' WHERE name = $1",
        &[&name],
    )
    .await?;
    Ok(())
}

/// `on_error = "skip"`: records the dead letter; the caller advances past it.
pub async fn dead_letter<C: Db>(
    tx: &C,
    name: &str,
    f: &Failure,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO pgfold.dead_letters (projector, event_id, event_type, error, attempts)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (projector, event_id) DO UPDATE
            SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, recorded_at = now()",
        &[&name, &f.event_id, &f.event_type, &f.error, &f.attempts],
    )
    .await?;
    tx.execute(
        "UPDATE pgfold.projectors SET last_error = $2, last_error_at = now() WHERE name = $1",
        &[
            &name,
            &format!("event {} ({}): {}", f.event_id, f.event_type, f.error),
        ],
    )
    .await?;
    Ok(())
}

/// A parked projector is tried again when a daemon starts.
pub async fn unpark<C: Db>(client: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "UPDATE pgfold.projectors SET state = 'running', attempts = 0, updated_at = now()
              WHERE name = $1 AND state = 'failed'",
            &[&name],
        )
        .await?;
    Ok(n == 1)
}

/// Rewinds the projector to the first event, in the transaction that empties its
/// tables, and remembers the newest position as the replay's target.
pub async fn rewind<C: Db>(
    tx: &C,
    name: &str,
    target: Option<Position>,
) -> Result<(), tokio_postgres::Error> {
    let target = target.unwrap_or(Position::START);
    tx.execute(
        "DELETE FROM pgfold.delivered_ahead WHERE projector = $1",
        &[&name],
    )
    .await?;
    tx.execute(
        "DELETE FROM pgfold.dead_letters WHERE projector = $1",
        &[&name],
    )
    .await?;
    tx.execute(
        "UPDATE pgfold.projectors
            SET position_tx = '0', position_id = 0, events_applied = 0,
                state = CASE WHEN $2::text::xid8 = '0' AND $3::bigint = 0 THEN 'running' ELSE 'replaying' END,
                replay_target_tx = $2::text::xid8, replay_target_id = $3::bigint,
                failing_event_id = NULL, failing_event_type = NULL, attempts = 0,
                last_error = NULL, last_error_at = NULL, updated_at = now()
          WHERE name = $1",
        &[&name, &target.tx_text(), &target.id],
    )
    .await?;
    Ok(())
}
