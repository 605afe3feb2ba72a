//! How far the log can be read without ever missing an event.
//!
//! Transaction ids are handed out before commit, and transactions commit in any
//! order, so an event with a lower position can become visible after one with a
//! higher position has been read. The horizon is the oldest transaction of *this
//! database* that is still running: every event of a transaction below it has
//! either committed or never will, so reading below it is final.
//!
//! Only this database's transactions matter (only they can write our `events`), so
//! unlike `pg_snapshot_xmin`, a long transaction in another database on the same
//! cluster does not hold the daemon back. The running transactions come from the
//! statement's snapshot (full 64-bit ids) matched against `pg_stat_activity` and
//! `pg_prepared_xacts` (32-bit ids, visible to every role). A transaction that
//! finishes between the snapshot and the `pg_stat_activity` read is dropped from
//! the set, which is safe: it finished before the next statement's snapshot, which
//! is the one that reads the events. One that starts after the snapshot is above
//! the snapshot's xmax, which bounds the horizon too.

use crate::db::{Db, Params};

use super::Position;

/// The horizon, and what holds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// Events of transactions with an id below this are final.
    pub tx: u64,
    /// The oldest running transaction of this database, if any: `tx` equals it.
    pub blocker: Option<u64>,
}

impl Horizon {
    /// Whether an event at `position` is final.
    pub fn covers(&self, position: Position) -> bool {
        position.tx < self.tx
    }
}

const HORIZON_SQL: &str = r#"
WITH snap AS (SELECT pg_current_snapshot() AS s),
local_xids AS (
  SELECT backend_xid::text::bigint AS xid
    FROM pg_stat_activity
   WHERE datname = current_database() AND backend_xid IS NOT NULL
  UNION ALL
  SELECT transaction::text::bigint
    FROM pg_prepared_xacts
   WHERE database = current_database()
)
SELECT
  (SELECT min(x)
     FROM pg_snapshot_xip((SELECT s FROM snap)) AS x
    WHERE (x::text::numeric % 4294967296)::bigint IN (SELECT xid FROM local_xids))::text,
  pg_snapshot_xmax((SELECT s FROM snap))::text
"#;

/// Computes the horizon. Must run in its own statement *before* the statement that
/// reads events, and in a transaction that has no transaction id of its own.
pub async fn horizon<C: Db>(client: &C) -> Result<Horizon, tokio_postgres::Error> {
    Ok(from_row(&client.query_one(HORIZON_SQL, &[]).await?))
}

/// The transaction-local setting in which [`kept_horizon`] leaves the horizon.
pub const HORIZON_SETTING: &str = "pgfold.horizon";

/// [`horizon`], also kept for the rest of the transaction in [`HORIZON_SETTING`],
/// where a statement sent right behind it (before its answer is back) reads it:
/// a batch's first round trip carries both (see `set_batch_end`).
pub async fn kept_horizon<C: Db>(client: &C) -> Result<Horizon, tokio_postgres::Error> {
    KEPT_HORIZON.run(client, &[]).await
}

static KEPT_HORIZON: std::sync::LazyLock<KeptHorizonWith> =
    std::sync::LazyLock::new(|| KeptHorizonWith::new(""));

/// The statement of [`kept_horizon`], evaluating more select-list expressions
/// of the caller's (its own `set_config`s, say) with it: one statement where
/// there would be two. Built once, for a statement sent on every batch.
pub struct KeptHorizonWith {
    sql: String,
}

impl KeptHorizonWith {
    /// `also`: expressions separated by commas, numbering their parameters
    /// from `$1`; empty for none.
    pub fn new(also: &str) -> KeptHorizonWith {
        let also = match also.trim() {
            "" => String::new(),
            more => format!(",\n{more}"),
        };
        KeptHorizonWith {
            sql: format!(
                "SELECT h.blocker, h.xmax,
                        set_config('{HORIZON_SETTING}', coalesce(h.blocker, h.xmax), true){also}
                   FROM ({HORIZON_SQL}) AS h(blocker, xmax)"
            ),
        }
    }

    /// Keeps the horizon, evaluates the rest, and returns the horizon.
    pub async fn run<C: Db>(
        &self,
        client: &C,
        params: Params<'_>,
    ) -> Result<Horizon, tokio_postgres::Error> {
        Ok(from_row(&client.query_one(&self.sql, params).await?))
    }

    /// Readies the statement to be sent in one round trip with others (see
    /// [`Db::ready`]).
    pub async fn ready<C: Db>(
        &self,
        client: &C,
        params: Params<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        client.ready(&self.sql, params).await
    }
}

fn from_row(row: &tokio_postgres::Row) -> Horizon {
    let blocker: Option<String> = row.get(0);
    let xmax: String = row.get(1);
    let parse = |s: &str| Position::parse_tx(s).expect("xid8 renders as a decimal integer");
    let blocker = blocker.as_deref().map(parse);
    Horizon {
        tx: blocker.unwrap_or_else(|| parse(&xmax)),
        blocker,
    }
}

/// The session whose transaction holds the horizon, for warnings and `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Blocker {
    /// The backend's process id: what `pg_terminate_backend` takes.
    pub pid: i32,
    /// `active`, `idle in transaction`, ...; `None` when this role may not see it
    /// (grant pg_read_all_stats to see other roles' sessions).
    pub state: Option<String>,
    /// Seconds since its transaction began; `None` when not visible to this role.
    pub transaction_age_seconds: Option<f64>,
    /// The first 120 characters of its current (or last) statement, whitespace
    /// collapsed; `None` when not visible to this role.
    pub query_start: Option<String>,
}

/// Who runs transaction `tx` in this database, if it is still running.
pub async fn blocker<C: Db>(client: &C, tx: u64) -> Result<Option<Blocker>, tokio_postgres::Error> {
    let low = (tx & 0xffff_ffff) as i64;
    let row = client
        .query_opt(
            r"SELECT pid, state,
                    extract(epoch FROM now() - xact_start)::float8,
                    left(regexp_replace(query, '\s+', ' ', 'g'), 120)
               FROM pg_stat_activity
              WHERE datname = current_database() AND backend_xid::text::bigint = $1
              LIMIT 1",
            &[&low],
        )
        .await?;
    Ok(row.map(|r| Blocker {
        pid: r.get(0),
        state: r.get(1),
        transaction_age_seconds: r.get(2),
        query_start: r.get(3),
    }))
}
