//! Every statement on `pgfold.projectors` and the tables beside it: each
//! consumer's checkpoint, its health, the lock that keeps two instances from
//! working it at once, its dead letters, the definition its tables were built
//! with and the rebuilds in progress (`builds`). The daemon, the worker, rebuilds
//! and `status` all keep their books through here, and this imports none of them.
//!
//! Coordination is a transaction-scoped advisory lock taken at the start of every
//! batch transaction (`pg_try_advisory_xact_lock`). PostgreSQL releases it when the
//! transaction ends, however it ends: a commit, a rollback, a killed process or a
//! dropped connection. So there is no lease to expire and no manual step when an
//! instance dies, and since it lives only inside one transaction it works unchanged
//! behind a transaction-pooling proxy. Taking it assigns no transaction id, so a
//! batch reads the horizon without holding it back itself.

mod archive;
mod builds;

use std::collections::HashSet;

use crate::db::Db;

use crate::feed::{Position, POSITION_TX};
use crate::projector::Projector;

pub use archive::{advance_archive, archive_applied, claim_segment, oldest_checkpoint};
pub use builds::{
    build_key, rebuild_progress, record_fingerprint, stored_fingerprint, RebuildProgress,
};

/// A projector's state column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Applying events as they come.
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

    /// The column's text, as `pgfold status` shows it.
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
    /// The last event consumed.
    pub position: Position,
    /// Running, replaying or parked.
    pub state: State,
    /// Events delivered ahead of their position (see `feed::order`).
    pub ahead: HashSet<i64>,
    /// The event being retried, if one is failing.
    pub failing_event_id: Option<i64>,
    /// How many times it has failed so far.
    pub attempts: i32,
    /// The definition its tables were built with (see `src/rebuild`); `None` on
    /// a row from before fingerprints, adopted as current.
    pub fingerprint: Option<String>,
}

impl Checkpoint {
    /// Whether the tables were built with `fingerprint` (or say nothing).
    pub fn built_with(&self, fingerprint: &str) -> bool {
        self.fingerprint.as_deref().is_none_or(|f| f == fingerprint)
    }
}

const LOCK_KEY: &str = "hashtextextended('pgfold:projector:' || $1, 0)";

/// Built once: every batch sends it.
static TRY_LOCK_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT pg_try_advisory_xact_lock({LOCK_KEY})"));

/// Tries to take the projector's lock for the rest of this transaction.
pub async fn try_lock<C: Db>(tx: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(tx.query_one(&TRY_LOCK_SQL, &[&name]).await?.get(0))
}

/// Readies [`try_lock`] and [`load`] to be sent in one round trip, in that order
/// (see [`Db::ready`]); a no-op once done on a connection.
pub async fn ready_lock_and_load<C: Db>(tx: &C, name: &str) -> Result<(), tokio_postgres::Error> {
    tx.ready(&TRY_LOCK_SQL, &[&name]).await?;
    tx.ready(LOAD_SQL, &[&name]).await
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

/// Whether the projector has its row (and so its tables).
pub async fn exists<C: Db>(client: &C, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM pgfold.projectors WHERE name = $1", &[&name])
        .await?
        .is_some())
}

/// The id of the last event the projector consumed (0: none yet).
pub async fn position_id<C: Db>(client: &C, name: &str) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT position_id FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await?
        .get(0))
}

const LOAD_SQL: &str = "SELECT position_tx::text, position_id, state, failing_event_id, attempts,
        ARRAY(SELECT event_id FROM pgfold.delivered_ahead WHERE projector = p.name),
        fingerprint
   FROM pgfold.projectors p
  WHERE name = $1";

/// Reads the checkpoint, with the events delivered ahead of it; call under the
/// projector's lock.
pub async fn load<C: Db>(tx: &C, name: &str) -> Result<Checkpoint, tokio_postgres::Error> {
    let row = tx.query_one(LOAD_SQL, &[&name]).await?;
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
        fingerprint: row.get(6),
    })
}

const ADVANCE_SQL: &str = "UPDATE pgfold.projectors
            SET position_tx = $2::text::xid8, position_id = $3,
                events_applied = events_applied + $4,
                last_advanced_at = CASE WHEN $4 > 0 THEN now() ELSE last_advanced_at END,
                failing_event_id = NULL, failing_event_type = NULL, attempts = 0,
                state = CASE
                  WHEN state = 'replaying'
                   AND ($2::text::xid8, $3) >= (replay_target_tx, replay_target_id) THEN 'running'
                  ELSE state END,
                updated_at = now()
          WHERE name = $1";

/// [`ADVANCE_SQL`], also forgetting the events delivered ahead that the
/// checkpoint has now passed: one statement, so that it can be sent ahead of
/// others (a COMMIT) like the plain move.
static ADVANCE_PAST_AHEAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH passed AS (
           DELETE FROM pgfold.delivered_ahead
            WHERE projector = $1 AND (position_tx, event_id) <= ($2::text::xid8, $3)
         )
         {ADVANCE_SQL}"
    )
});

/// The statement [`advance`] sends.
fn advance_sql(had_ahead: bool) -> &'static str {
    match had_ahead {
        true => &ADVANCE_PAST_AHEAD_SQL,
        // Any recorded by this batch lie beyond `upto`: nothing to forget.
        false => ADVANCE_SQL,
    }
}

const RECORD_AHEAD_SQL: &str =
    "INSERT INTO pgfold.delivered_ahead (projector, event_id, position_tx)
         SELECT $1, id, tx::xid8 FROM unnest($2::bigint[], $3::text[]) AS a(id, tx)";

/// Prepares the statements of [`record_ahead`] (for `ahead`) and [`advance`]
/// (for `had_ahead`), so that they leave at once when sent ahead of others.
pub async fn ready_advance<C: Db>(
    tx: &C,
    ahead: &[(i64, Position)],
    had_ahead: bool,
) -> Result<(), tokio_postgres::Error> {
    let (ids, txs): (Vec<i64>, Vec<String>) = (Vec::new(), Vec::new());
    if !ahead.is_empty() {
        tx.ready(RECORD_AHEAD_SQL, &[&"", &ids, &txs]).await?;
    }
    tx.ready(advance_sql(had_ahead), &[&"", &"0", &0i64, &0i64])
        .await
}

/// Moves the checkpoint to `upto` after `applied` events, clears any failure, and
/// ends a replay that has reached its target. `had_ahead`: the checkpoint loaded
/// for this batch listed events delivered ahead, which may now be passed. One
/// statement.
pub async fn advance<C: Db>(
    tx: &C,
    name: &str,
    upto: Position,
    applied: u64,
    had_ahead: bool,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        advance_sql(had_ahead),
        &[&name, &upto.tx_text(), &upto.id, &(applied as i64)],
    )
    .await?;
    Ok(())
}

/// Records the events this batch delivered ahead of their position, so that
/// later batches skip them (see `feed::order`).
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
    tx.execute(RECORD_AHEAD_SQL, &[&name, &ids, &txs]).await?;
    Ok(())
}

/// The event a projector failed on: while it is retried, once it is parked
/// (the daemon's `Outcome` lists those), and in each dead letter.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The projector's name.
    pub projector: String,
    /// The event's `events.id`.
    pub event_id: i64,
    /// The event's `event_type` (empty if it could not be read).
    pub event_type: String,
    /// One line, at most a couple of kilobytes.
    pub error: String,
    /// How many times the event has failed, this time included.
    pub attempts: i32,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "projector {} failed at event {} ({}): {}",
            self.projector, self.event_id, self.event_type, self.error
        )
    }
}

impl Failure {
    /// `$1`..`$5`: projector, event id, event type, error, attempts.
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 5] {
        [
            &self.projector,
            &self.event_id,
            &self.event_type,
            &self.error,
            &self.attempts,
        ]
    }
}

/// Records the failure on the projector's row, without giving up on the event.
pub async fn record_failure<C: Db>(tx: &C, f: &Failure) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors
            SET failing_event_id = $2, failing_event_type = $3, last_error = $4,
                attempts = $5, last_error_at = now(), updated_at = now()
          WHERE name = $1",
        &f.params(),
    )
    .await?;
    Ok(())
}

/// The event a parked projector failed on, as recorded when it was parked.
pub async fn failure<C: Db>(tx: &C, name: &str) -> Result<Failure, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "SELECT failing_event_id, coalesce(failing_event_type, ''), coalesce(last_error, ''),
                    attempts
               FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(Failure {
        projector: name.to_string(),
        event_id: row.get::<_, Option<i64>>(0).unwrap_or_default(),
        event_type: row.get(1),
        error: row.get(2),
        attempts: row.get(3),
    })
}

/// `on_error = "stop"`: parks the projector on the event.
pub async fn park<C: Db>(tx: &C, f: &Failure) -> Result<(), tokio_postgres::Error> {
    record_failure(tx, f).await?;
    tx.execute(
        "UPDATE pgfold.projectors SET state = 'failed' WHERE name = $1",
        &[&f.projector],
    )
    .await?;
    Ok(())
}

/// `on_error = "skip"`: records the dead letter; the caller advances past it.
pub async fn dead_letter<C: Db>(tx: &C, f: &Failure) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO pgfold.dead_letters (projector, event_id, event_type, error, attempts)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (projector, event_id) DO UPDATE
            SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, recorded_at = now()",
        &f.params(),
    )
    .await?;
    record_error(
        tx,
        &f.projector,
        &format!("event {} ({}): {}", f.event_id, f.event_type, f.error),
    )
    .await
}

/// Sets the projector's last error, which `status` shows.
pub async fn record_error<C: Db>(
    tx: &C,
    name: &str,
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors SET last_error = $2, last_error_at = now() WHERE name = $1",
        &[&name, &error],
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
            SET position_tx = '0', position_id = 0, events_applied = 0, archive_applied = 0,
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

/// Records, outside the batch's transaction, that the batch of `name` that
/// started from `from` has come to event id `position_id`, having consumed
/// `events` so far (a batch applied in parts; see `pgfold.batch_progress`).
pub async fn record_in_flight<C: Db>(
    client: &C,
    name: &str,
    from: Position,
    position_id: i64,
    events: u64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgfold.batch_progress AS b (name, from_tx, from_id, position_id, events, updated_at)
             VALUES ($1, $2::text::xid8, $3, $4, $5, now())
             ON CONFLICT (name) DO UPDATE
                SET from_tx = EXCLUDED.from_tx, from_id = EXCLUDED.from_id,
                    position_id = EXCLUDED.position_id, events = EXCLUDED.events,
                    updated_at = EXCLUDED.updated_at",
            &[&name, &from.tx_text(), &from.id, &position_id, &(events as i64)],
        )
        .await?;
    Ok(())
}

/// A projector's row as `pgfold status` shows it, with its lag.
#[derive(Debug, Clone)]
pub struct Report {
    /// Running, replaying or parked.
    pub state: State,
    /// Id of the last event consumed (0: none yet).
    pub position_id: i64,
    /// Events applied since the projector began (or last replayed).
    pub events_applied: i64,
    /// In UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
    pub last_advanced_at: Option<String>,
    /// The event being retried or parked on, if any.
    pub failing_event_id: Option<i64>,
    /// Its type, if known.
    pub failing_event_type: Option<String>,
    /// How many times it has failed.
    pub attempts: i32,
    /// The last error recorded (a failing event's, or a dead letter's).
    pub last_error: Option<String>,
    /// How many events `on_error = "skip"` gave up on.
    pub dead_letters: i64,
    /// Committed events it consumes that it has not applied yet.
    pub lag_events: i64,
    /// Age, by `occurred_at`, of the oldest of those events; 0 when caught up.
    pub lag_seconds: f64,
    /// Id of the newest event when the last replay began (0: none).
    pub replay_target_id: i64,
    /// Seconds since the last replay began, if one was recorded.
    pub replay_seconds: Option<f64>,
    /// A batch in flight, applied in parts and not committed yet: how far it has
    /// come (an event id) and the events it has consumed so far.
    pub in_flight: Option<(i64, i64)>,
}

/// The projector's row and its lag; `None` if it has never run.
///
/// The lag is counted through the position index (a fenced read, see
/// `src/feed/reader.rs`), so that a scrape costs what the lag holds, not what the
/// log holds.
pub async fn report<C: Db>(
    client: &C,
    p: &dyn Projector,
) -> Result<Option<Report>, tokio_postgres::Error> {
    let filter = p.filter();
    let row = client
        .query_opt(
            &format!(
                "SELECT p.state, p.position_id, p.events_applied,
                        to_char(p.last_advanced_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        p.failing_event_id, p.failing_event_type, p.attempts, p.last_error,
                        (SELECT count(*) FROM pgfold.dead_letters d WHERE d.projector = p.name),
                        lag.events,
                        coalesce(extract(epoch FROM now() - lag.oldest)::float8, 0),
                        coalesce(p.replay_target_id, 0),
                        extract(epoch FROM now() - p.replay_started_at)::float8,
                        f.position_id, f.events
                   FROM pgfold.projectors p
                   LEFT JOIN pgfold.batch_progress f
                     ON f.name = p.name AND (f.from_tx, f.from_id) = (p.position_tx, p.position_id)
                   CROSS JOIN LATERAL (
                     SELECT count(*) AS events, min(e.occurred_at) AS oldest
                       FROM (SELECT e.occurred_at, e.event_type, e.stream_type FROM events e
                              WHERE ({POSITION_TX}, e.id) > (p.position_tx, p.position_id)
                             OFFSET 0) e
                      WHERE ($2::text[] IS NULL OR e.event_type = ANY($2))
                        AND ($3::text[] IS NULL OR e.stream_type = ANY($3))) lag
                  WHERE p.name = $1"
            ),
            &[&p.name(), &filter.event_types, &filter.stream_types],
        )
        .await?;
    Ok(row.map(|r| Report {
        state: State::parse(r.get(0)),
        position_id: r.get(1),
        events_applied: r.get(2),
        last_advanced_at: r.get(3),
        failing_event_id: r.get(4),
        failing_event_type: r.get(5),
        attempts: r.get(6),
        last_error: r.get(7),
        dead_letters: r.get(8),
        lag_events: r.get(9),
        lag_seconds: r.get::<_, f64>(10).max(0.0),
        replay_target_id: r.get(11),
        replay_seconds: r.get(12),
        in_flight: r.get::<_, Option<i64>>(13).zip(r.get::<_, Option<i64>>(14)),
    }))
}
