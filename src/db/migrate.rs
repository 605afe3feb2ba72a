//! Applies `migrations/` in order, once each, recorded in `pgfold.schema_migrations`.
//!
//! Written here rather than with a migration crate because the event store is the
//! application's and is live while we migrate it: DDL on `events` runs with a short
//! `lock_timeout` and is retried, so that we never queue in front of the
//! application's writes behind a long transaction, and the index on it is built
//! `CONCURRENTLY`, outside any transaction (a migration that starts with the line
//! `-- pgfold:no-transaction`). Concurrent migrators (several instances starting at
//! once) are serialised by an advisory lock.

use std::time::Duration;

use anyhow::Context;

use super::Client;
use crate::util::Backoff;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

impl Migration {
    fn transactional(&self) -> bool {
        !self.sql.starts_with("-- pgfold:no-transaction")
    }
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../../migrations/V1__events.sql"),
    },
    Migration {
        version: 2,
        name: "events_writer_transaction",
        sql: include_str!("../../migrations/V2__events_writer_transaction.sql"),
    },
    Migration {
        version: 3,
        name: "events_position_index",
        sql: include_str!("../../migrations/V3__events_position_index.sql"),
    },
    Migration {
        version: 4,
        name: "bookkeeping",
        sql: include_str!("../../migrations/V4__bookkeeping.sql"),
    },
    Migration {
        version: 5,
        name: "bad_event_stable",
        sql: include_str!("../../migrations/V5__bad_event_stable.sql"),
    },
    Migration {
        version: 6,
        name: "read_your_writes",
        sql: include_str!("../../migrations/V6__read_your_writes.sql"),
    },
    Migration {
        version: 7,
        name: "replay_progress",
        sql: include_str!("../../migrations/V7__replay_progress.sql"),
    },
    Migration {
        version: 8,
        name: "rebuild",
        sql: include_str!("../../migrations/V8__rebuild.sql"),
    },
    Migration {
        version: 9,
        name: "wakeup_sequence",
        sql: include_str!("../../migrations/V9__wakeup_sequence.sql"),
    },
    Migration {
        version: 10,
        name: "batch_progress",
        sql: include_str!("../../migrations/V10__batch_progress.sql"),
    },
    Migration {
        version: 11,
        name: "replay_stamp_when",
        sql: include_str!("../../migrations/V11__replay_stamp_when.sql"),
    },
    Migration {
        version: 12,
        name: "applied_target_custom_plans",
        sql: include_str!("../../migrations/V12__applied_target_custom_plans.sql"),
    },
    Migration {
        version: 13,
        name: "archive",
        sql: include_str!("../../migrations/V13__archive.sql"),
    },
    Migration {
        version: 14,
        name: "archive_guard_race",
        sql: include_str!("../../migrations/V14__archive_guard_race.sql"),
    },
    Migration {
        version: 15,
        name: "archived_streams_no_foreign_keys",
        sql: include_str!("../../migrations/V15__archived_streams_no_foreign_keys.sql"),
    },
    Migration {
        version: 16,
        name: "archived_streams_fillfactor",
        sql: include_str!("../../migrations/V16__archived_streams_fillfactor.sql"),
    },
    Migration {
        version: 17,
        name: "archived_streams_last_id",
        sql: include_str!("../../migrations/V17__archived_streams_last_id.sql"),
    },
];

/// Each DDL attempt waits at most this long for a lock before backing off.
const LOCK_TIMEOUT: &str = "3s";
const LOCK_ATTEMPTS: u32 = 20;

/// Outcome of [`run`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The versions this call applied, in order; empty when the schema was
    /// already current.
    pub applied: Vec<i32>,
}

/// Whether every migration has been applied. Needs no DDL rights, so `pgfold run`
/// under a least-privilege role can check before deciding to migrate.
pub async fn is_current<C: crate::db::Db>(client: &C) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT to_regclass('pgfold.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(false);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgfold.schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get::<_, i32>(0) >= latest())
}

/// The newest migration's version (the `N` of `migrations/V<N>__*.sql`): the
/// schema is current once `pgfold.schema_migrations` reaches it.
pub fn latest() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// Applies every pending migration. `client` must be a dedicated connection: the
/// advisory lock is held by the session.
pub async fn run(client: &Client) -> anyhow::Result<Report> {
    client
        .batch_execute("SELECT pg_advisory_lock(hashtextextended('pgfold:migrate', 0))")
        .await
        .context("failed to take the migration lock")?;
    let result = apply_pending(client).await;
    let unlock = client
        .batch_execute("SELECT pg_advisory_unlock(hashtextextended('pgfold:migrate', 0))")
        .await;
    let report = result?;
    unlock.context("failed to release the migration lock")?;
    Ok(report)
}

async fn apply_pending(client: &Client) -> anyhow::Result<Report> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgfold;
             CREATE TABLE IF NOT EXISTS pgfold.schema_migrations (
               version INT PRIMARY KEY,
               name TEXT NOT NULL,
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );",
        )
        .await
        .context(
            "failed to create the pgfold schema (does this role have CREATE on the database?)",
        )?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM pgfold.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut report = Report::default();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        apply_one(client, m)
            .await
            .with_context(|| format!("migration V{}__{} failed", m.version, m.name))?;
        tracing::info!(version = m.version, name = m.name, "migration applied");
        report.applied.push(m.version);
    }
    Ok(report)
}

async fn apply_one(client: &Client, m: &Migration) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempt = 1;
    loop {
        let result = if m.transactional() {
            apply_in_transaction(client, m).await
        } else {
            apply_outside_transaction(client, m).await
        };
        match result {
            Err(e) if is_lock_timeout(&e) && attempt < LOCK_ATTEMPTS => {
                tracing::warn!(
                    version = m.version,
                    attempt,
                    "a lock on events is held by another transaction; retrying the migration"
                );
                attempt += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(anyhow::anyhow!(super::error_text(&e))),
            Ok(()) => return Ok(()),
        }
    }
}

async fn apply_in_transaction(client: &Client, m: &Migration) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client
            .batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            .await?;
        client.batch_execute(m.sql).await?;
        client
            .execute(
                "INSERT INTO pgfold.schema_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        // The connection may be gone; the error that matters is the first one.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn apply_outside_transaction(
    client: &Client,
    m: &Migration,
) -> Result<(), tokio_postgres::Error> {
    // A concurrent index build that failed leaves an INVALID index behind, which
    // IF NOT EXISTS would then accept: drop it and build again.
    let invalid = client
        .query(
            "SELECT c.oid::regclass::text
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE c.relname LIKE 'pgfold\\_%' AND NOT i.indisvalid
                AND pg_table_is_visible(c.oid)",
            &[],
        )
        .await?;
    for row in invalid {
        let name: String = row.get(0);
        tracing::warn!(index = %name, "dropping an invalid index left by an interrupted build");
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .await?;
    }
    client
        .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let result = client.batch_execute(m.sql).await;
    client.batch_execute("RESET lock_timeout").await?;
    result?;
    client
        .execute(
            "INSERT INTO pgfold.schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
    Ok(())
}

fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}
