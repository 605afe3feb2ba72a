//! Connections: the pool the workers share, the dedicated connections that must
//! not be pooled (LISTEN, migrations), and how database errors are classified.
//! Both hand out [`Session`]s, which send statements as `database.prepared_statements`
//! says (see `src/db/sql.rs`).

pub mod connect;
pub mod migrate;
mod sql;
pub mod tls;

use std::time::Duration;

use crate::util::Backoff;
use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};

pub use connect::{configs, describe, pg_config, Configs, PgConfig};
pub use sql::{Db, EachRow, Params, Session, Statements};

/// A dedicated connection, in the statement mode of its configuration.
pub type Client = Session<tokio_postgres::Client>;

/// The shared pool; its connections come out as sessions in the statement mode
/// of the configuration it was built from.
#[derive(Clone)]
pub struct Pool {
    pool: deadpool_postgres::Pool,
    statements: Statements,
}

impl Pool {
    /// A connection from the pool, in the pool's statement mode.
    pub async fn get(
        &self,
    ) -> Result<Session<deadpool_postgres::Object>, deadpool_postgres::PoolError> {
        Ok(Session::new(self.pool.get().await?, self.statements))
    }

    /// A connection from the pool if one is free now (or may be opened), without
    /// waiting for one to be returned: for work that can do without it.
    pub async fn try_get(&self) -> Option<Session<deadpool_postgres::Object>> {
        let now = deadpool_postgres::Timeouts {
            wait: Some(Duration::ZERO),
            ..self.pool.timeouts()
        };
        let conn = self.pool.timeout_get(&now).await.ok()?;
        Some(Session::new(conn, self.statements))
    }

    /// Closes the pool: every later `get` fails, idle connections close now and
    /// the others when returned.
    pub fn close(&self) {
        self.pool.close();
    }
}

/// The shared pool. `Fast` recycling: a checked-out connection is only tested for
/// being closed; our transactions always end in COMMIT or ROLLBACK.
pub fn pool(config: &PgConfig, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        (**config).clone(),
        config.tls().connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Without these a checkout could wait forever on a server that accepts TCP
    // connections and never answers.
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(handshake_timeout(config)))
        .wait_timeout(Some(handshake_timeout(config) * 3))
        .build()
        .context("failed to build the connection pool")?;
    Ok(Pool {
        pool,
        statements: config.statements(),
    })
}

/// One connection outside the pool, driven by a task of its own. Errors name the
/// server and never the password.
pub async fn connect(config: &PgConfig) -> anyhow::Result<Client> {
    connect_within(config, handshake_timeout(config)).await
}

/// tokio-postgres's connect timeout covers only the TCP connect; a server that
/// accepts and then never answers would hang the TLS and startup exchange. So the
/// whole handshake is bounded by the same timeout.
pub fn handshake_timeout(config: &PgConfig) -> Duration {
    config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10))
}

async fn connect_within(config: &PgConfig, limit: Duration) -> anyhow::Result<Client> {
    let (client, connection) = match tokio::time::timeout(limit, config.connect()).await {
        Ok(result) => result.map_err(|e| unreachable_error(config, &e))?,
        Err(_) => anyhow::bail!(
            "cannot connect to PostgreSQL at {}: no answer within {} ms",
            describe(config),
            limit.as_millis()
        ),
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(Session::new(client, config.statements()))
}

/// Connects, retrying with backoff until `timeout` has passed (`None`: forever,
/// for a daemon that must outlive a database restart). A host name that does not
/// resolve is a configuration error and fails at once.
pub async fn connect_with_retry(
    config: &PgConfig,
    timeout: Option<Duration>,
) -> anyhow::Result<Client> {
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let limit = match timeout {
            Some(t) => t
                .saturating_sub(started.elapsed())
                .min(handshake_timeout(config)),
            None => handshake_timeout(config),
        };
        let error = match connect_within(config, limit.max(Duration::from_millis(1))).await {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        if let Some(host) = unresolvable_host(config).await {
            return Err(error.context(format!("host {host:?} does not resolve")));
        }
        let delay = backoff.next_delay();
        let out_of_time = timeout.is_some_and(|t| started.elapsed() + delay >= t);
        if out_of_time {
            return Err(error.context(format!(
                "gave up after {} ms (daemon.connect_timeout_ms)",
                started.elapsed().as_millis()
            )));
        }
        tracing::warn!(error = %format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "database not reachable, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// The first TCP host of `config` that DNS does not know, if any.
async fn unresolvable_host(config: &PgConfig) -> Option<String> {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    for host in config.get_hosts() {
        if let tokio_postgres::config::Host::Tcp(name) = host {
            if tokio::net::lookup_host((name.as_str(), port))
                .await
                .is_err()
            {
                return Some(name.clone());
            }
        }
    }
    None
}

/// The one-line error for a connection that failed: where, and why.
pub fn unreachable_error(
    config: &tokio_postgres::Config,
    e: &tokio_postgres::Error,
) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot connect to PostgreSQL at {}: {}",
        describe(config),
        crate::util::one_line(&error_text(e))
    )
}

/// The most useful line of a tokio-postgres error: the server's message when there
/// is one, else the error and its cause.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// Whether an error is about the connection or the server's state rather than the
/// data: such errors are retried forever, never counted against an event.
///
/// A missing privilege is the operator's to grant, not the event's fault: counted
/// against events, `on_error = "skip"` dead-lettered every event of a projection
/// whose role lacked a grant on its table, and they were gone from the read model.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: the socket closed, a timeout, a protocol error.
        return true;
    };
    if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE {
        return true;
    }
    let class = &code.code()[..2];
    matches!(
        class,
        "08" // connection exception
        | "40" // serialization failure, deadlock
        | "53" // insufficient resources
        | "55" // lock not available, object in use
        | "57" // admin shutdown, cancelled, cannot connect now
        | "58" // system error (I/O)
        | "XX" // internal error
    )
}
