//! Databases for the tests and the benchmark: where to create them (an admin URL
//! from the environment), a fresh one per test, and the daemon's backends in one.

use anyhow::Context;
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, NoTls};

use crate::config::Settings;

/// The server the tests and the benchmark use unless told otherwise: the local
/// one, as `postgres`, without a password (trust authentication).
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The variable that points the tests at another server (an admin URL, either
/// form); the databases they create are named in it in place of its database.
pub const TEST_ADMIN_URL: &str = "PGFOLD_TEST_ADMIN_URL";

/// The admin connection string in variable `var`, or [`DEFAULT_ADMIN_URL`] when
/// it is unset or blank.
pub fn admin_url(var: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// The admin connection string pointed at database `db` (URL or key=value form);
/// host, port, user and every other setting stay as they are.
pub fn with_dbname(admin: &str, db: &str) -> String {
    if let Some(scheme_end) = admin.find("://") {
        let (head, query) = match admin.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (admin, None),
        };
        let after = scheme_end + 3;
        let base = match head[after..].find('/') {
            Some(slash) => &head[..after + slash],
            None => head,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    } else {
        let mut parts: Vec<&str> = admin
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .collect();
        let dbname = format!("dbname={db}");
        parts.push(&dbname);
        parts.join(" ")
    }
}

/// The connection string `url` (URL or key=value form) as another role: `user`
/// and `password` in place of its own (a password it had is dropped).
pub fn with_role(url: &str, user: &str, password: Option<&str>) -> String {
    if let Some(scheme_end) = url.find("://") {
        let after = scheme_end + 3;
        let rest = &url[after..];
        let host_at = rest.find(['/', '?']).unwrap_or(rest.len());
        let host = match rest[..host_at].rfind('@') {
            Some(at) => &rest[at + 1..],
            None => rest,
        };
        let userinfo = match password {
            Some(p) => format!("{user}:{p}"),
            None => user.to_string(),
        };
        format!("{}{userinfo}@{host}", &url[..after])
    } else {
        let mut parts: Vec<String> = url
            .split_whitespace()
            .filter(|p| !p.starts_with("user=") && !p.starts_with("password="))
            .map(str::to_string)
            .collect();
        parts.push(format!("user={user}"));
        if let Some(p) = password {
            parts.push(format!("password={p}"));
        }
        parts.join(" ")
    }
}

/// A plain connection (no TLS), its connection task spawned.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The one value `sql` returns.
pub async fn scalar<T: for<'a> FromSql<'a>>(client: &Client, sql: &str) -> anyhow::Result<T> {
    client
        .query_one(sql, &[])
        .await
        .with_context(|| format!("query failed: {sql}"))?
        .try_get(0)
        .with_context(|| format!("query failed: {sql}"))
}

/// The one value `sql` returns, a `bigint`.
pub async fn scalar_i64(client: &Client, sql: &str) -> anyhow::Result<i64> {
    scalar(client, sql).await
}

/// The one value `sql` returns, a `text`.
pub async fn scalar_text(client: &Client, sql: &str) -> anyhow::Result<String> {
    scalar(client, sql).await
}

/// The first column of every row of `sql`, in order.
pub async fn column<T: for<'a> FromSql<'a>>(client: &Client, sql: &str) -> anyhow::Result<Vec<T>> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// `DROP DATABASE IF EXISTS name WITH (FORCE)`, then `CREATE DATABASE name`.
/// `name` is one of the caller's own (generated, or checked to be lowercase
/// letters, digits and `_`), never a user's input.
pub async fn recreate_database(admin: &Client, name: &str) -> anyhow::Result<()> {
    // Two calls: in one string both would run in one transaction, which DROP
    // DATABASE refuses.
    drop_database(admin, name).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("cannot create database {name}"))?;
    Ok(())
}

/// `DROP DATABASE IF EXISTS name WITH (FORCE)` (see [`recreate_database`]).
pub async fn drop_database(admin: &Client, name: &str) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("cannot drop database {name}"))
}

/// `pgfold migrate` with the built-in projectors, in-process.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let pg = crate::db::pg_config(Some(url))?;
    crate::daemon::migrate(&pg, &crate::projectors::builtin()).await
}

/// Runs `sql` on a connection of its own to `url`, on a thread with a runtime of
/// its own, and waits for it; errors are ignored. For `Drop` impls, which run
/// outside any runtime a test may use.
pub fn execute_detached(url: &str, sql: &str) {
    let (url, sql) = (url.to_string(), sql.to_string());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        rt.block_on(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                tokio::spawn(conn);
                let _ = client.batch_execute(&sql).await;
            }
        });
    })
    .join();
}

/// Drops role `name` (a test's own, generated), what it owns in the database of
/// `url`, and its sessions, as [`execute_detached`] does.
pub fn drop_role_detached(url: &str, name: &str) {
    execute_detached(
        url,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
             DROP OWNED BY {name}; DROP ROLE IF EXISTS {name};"
        ),
    );
}

/// A database of its own for one test, on the server of [`TEST_ADMIN_URL`];
/// dropped when the test ends.
pub struct TestDb {
    /// Its name, `pgfold_test_<32 random hex digits>`.
    pub name: String,
    /// The admin URL pointed at it.
    pub url: String,
    admin: String,
}

impl TestDb {
    /// A database of its own, migrated with the built-in projectors.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        migrate(&db.url).await.expect("migrate");
        db
    }

    /// A database of its own with nothing in it.
    pub async fn empty() -> TestDb {
        init_logging();
        let name = format!("pgfold_test_{}", random_suffix());
        let admin = admin_url(TEST_ADMIN_URL);
        connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: with_dbname(&admin, &name),
            name,
            admin,
        }
    }

    /// Its URL as another role (see [`with_role`]).
    pub fn url_as(&self, user: &str, password: Option<&str>) -> String {
        with_role(&self.url, user, password)
    }

    /// The admin role's name (`user` of the admin URL; `postgres` by default).
    pub fn admin_user(&self) -> String {
        self.url
            .parse::<tokio_postgres::Config>()
            .ok()
            .and_then(|c| c.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".to_string())
    }

    /// A new connection to it.
    pub async fn client(&self) -> Client {
        connect(&self.url).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Default settings pointed at this database, with a short poll interval.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::load(None).expect("default settings");
        settings.database.url = Some(self.url.clone());
        settings.daemon.poll_interval_ms = 200;
        settings
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        execute_detached(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// 32 random hex digits (as a v4 UUID's), for names that must not collide between
/// tests running at once.
fn random_suffix() -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Logs to the test's output when `TEST_LOG` is set (filtered by `RUST_LOG`).
fn init_logging() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The backends the daemon has open in database `dbname` (it connects with
/// application_name = 'pgfold'), not counting the caller's own.
pub async fn daemon_backends(client: &Client, dbname: &str) -> anyhow::Result<Vec<i32>> {
    Ok(client
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'pgfold' AND pid <> pg_backend_pid()
              ORDER BY pid",
            &[&dbname],
        )
        .await
        .context("list the daemon's backends")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// `pg_terminate_backend` of every backend the daemon has in `dbname`; returns how
/// many were terminated.
pub async fn terminate_daemon_backends(client: &Client, dbname: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FILTER (WHERE t) FROM (
               SELECT pg_terminate_backend(pid) AS t FROM pg_stat_activity
                WHERE datname = $1 AND application_name = 'pgfold' AND pid <> pg_backend_pid()
             ) x",
            &[&dbname],
        )
        .await
        .context("terminate the daemon's backends")?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_dbname_swaps_only_the_database() {
        assert_eq!(
            with_dbname("postgres://u@h:5433/postgres?sslmode=disable", "t1"),
            "postgres://u@h:5433/t1?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://u@h", "t1"), "postgres://u@h/t1");
        assert_eq!(
            with_dbname("host=h port=5433 user=u dbname=postgres", "t1"),
            "host=h port=5433 user=u dbname=t1"
        );
    }

    #[test]
    fn with_role_swaps_only_the_role() {
        assert_eq!(
            with_role("postgres://postgres@h:5433/t1?sslmode=disable", "app", None),
            "postgres://app@h:5433/t1?sslmode=disable"
        );
        assert_eq!(
            with_role("postgres://a:b@h/t1", "app", Some("pw")),
            "postgres://app:pw@h/t1"
        );
        assert_eq!(
            with_role("postgres://h/t1", "app", None),
            "postgres://app@h/t1"
        );
        assert_eq!(
            with_role(
                "host=h user=postgres password=x dbname=t1",
                "app",
                Some("pw")
            ),
            "host=h dbname=t1 user=app password=pw"
        );
    }
}
