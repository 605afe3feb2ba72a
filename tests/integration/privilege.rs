//! Issue 3, least privilege: `pgfold migrate` needs DDL rights, `pgfold run` does
//! not; and a password in the connection string never shows up in any output.
//! Issue 26: the grants the daemon's role needs are the README's, read from it.

use std::time::{Duration, Instant};

use pgfold::store::NewEvent;
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::helpers::*;

/// The README section whose ```sql block holds the daemon role's grants.
const GRANTS_HEADING: &str = "## A least-privilege role for the daemon";

/// The statements of the README's grants block, for role `pgfold_daemon` on the
/// database `shop`, one per line.
fn readme_grants() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split_once(&format!("\n{GRANTS_HEADING}\n"))
        .unwrap_or_else(|| panic!("README: no section {GRANTS_HEADING:?}"))
        .1;
    let block = section
        .split_once("```sql\n")
        .and_then(|(before, rest)| (!before.contains("\n## ")).then_some(rest))
        .and_then(|rest| rest.split_once("```"))
        .unwrap_or_else(|| panic!("README: no ```sql block under {GRANTS_HEADING:?}"))
        .0;
    let statements: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    assert!(
        statements.iter().all(|s| s.ends_with(';')),
        "README: one statement per line: {statements:?}"
    );
    statements
}

/// A LOGIN role given `statements` (the README's, its names replaced) in `db`,
/// where `PUBLIC` has no rights (a hardened database). Dropped, with its
/// privileges, when the test ends, before the database is.
struct AppRole {
    name: String,
    /// Admin connection string to the test database.
    admin_db_url: String,
}

impl AppRole {
    async fn create(db: &TestDb, statements: &[String]) -> Result<AppRole, String> {
        let role = AppRole {
            name: format!("pgfold_run_{}", &db.name["pgfold_test_".len()..]),
            admin_db_url: db.url.clone(),
        };
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {db} FROM PUBLIC;
                 REVOKE ALL ON SCHEMA public FROM PUBLIC;",
                db = db.name
            ))
            .await
            .expect("harden the database");
        for statement in statements {
            let sql = statement
                .replace("pgfold_daemon", &role.name)
                .replace("DATABASE shop ", &format!("DATABASE {} ", db.name));
            admin.batch_execute(&sql).await.map_err(|e| {
                let why = e
                    .as_db_error()
                    .map_or(e.to_string(), |d| d.message().into());
                format!("{sql}: {why}")
            })?;
        }
        Ok(role)
    }

    fn url(&self, db: &TestDb) -> String {
        db.url_as(&self.name, None)
    }
}

impl Drop for AppRole {
    fn drop(&mut self) {
        pgfold::testkit::db::drop_role_detached(&self.admin_db_url, &self.name);
    }
}

/// `pgfold ARGS` as the role; its stderr when it fails.
fn pgfold_as(url: &str, args: &[&str]) -> Result<(), String> {
    let out = pgfold(args, &role_env(url));
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{args:?} as the role failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Poison events are dead-lettered at once, and a missing right fails fast.
fn role_env(url: &str) -> Vec<(&str, &str)> {
    vec![
        ("DATABASE_URL", url),
        ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "2000"),
        ("PGFOLD_PROJECTORS__DAILY_REVENUE__ON_ERROR", "skip"),
        ("PGFOLD_PROJECTORS__DAILY_REVENUE__MAX_ATTEMPTS", "1"),
        ("PGFOLD_PROJECTORS__ORDER_SNAPSHOTS__ON_ERROR", "skip"),
        ("PGFOLD_PROJECTORS__ORDER_SNAPSHOTS__MAX_ATTEMPTS", "1"),
    ]
}

/// Both built-in projections equal their independent folds, else what differs.
async fn exact(admin: &Client, after: &str) -> Result<(), String> {
    let differences = pgfold::testkit::workload::projection_differences(admin)
        .await
        .unwrap();
    match differences {
        (0, 0) => Ok(()),
        _ => Err(format!(
            "after {after}, rows differing from the folds (daily_revenue, order_snapshots): {differences:?}"
        )),
    }
}

/// What the README says the role can do, after `pgfold migrate` as the owner:
/// `run --once` through a poison event, a `--replay` that repairs a damaged
/// projection, `status`, and a long-running `run` that arms its wake-up flag
/// and applies what is appended after. The first thing that fails, if any.
async fn daemon_role_runs(db: &TestDb, statements: &[String]) -> Result<AppRole, String> {
    let admin = db.client().await;
    pgfold_ok(&["migrate"], &[("DATABASE_URL", db.url.as_str())]);
    append_orders(&admin, 1, 300).await;
    let mut writer = db.client().await;
    append_all(
        &mut writer,
        &[NewEvent::new(
            "order-poison",
            "order",
            "OrderPaid",
            json!({"orderId": "order-poison"}),
        )],
    )
    .await;
    let role = AppRole::create(db, statements).await?;
    let url = role.url(db);

    pgfold_as(&url, &["run", "--once"])?;
    let dead = scalar_i64(&admin, "SELECT count(*) FROM pgfold.dead_letters").await;
    if dead != 2 {
        return Err(format!("{dead} dead letters, not the poison event's 2"));
    }
    admin
        .batch_execute("DELETE FROM events WHERE stream_id = 'order-poison'")
        .await
        .unwrap();
    exact(&admin, "run --once").await?;

    // More events, then a damaged projection that only a replay repairs.
    append_all(
        &mut writer,
        &[
            created("order-x", "books", json!("5.55"), 3),
            paid("order-x", "books", json!("5.55"), 3),
        ],
    )
    .await;
    damage_projections(&admin).await;
    pgfold_as(&url, &["run", "--once", "--replay", "all"])?;
    exact(&admin, "--replay all").await?;
    let stopped = "SELECT count(*) FROM pgfold.projectors WHERE state <> 'running'";
    if scalar_i64(&admin, stopped).await != 0 {
        return Err("a projector is not running after --replay all".into());
    }
    pgfold_as(&url, &["status", "--json"])?;

    // Long-running: idle, it arms the flag the trigger on `events` reads (the
    // poll interval is too long to stand in for it), then catches up.
    let mut env = role_env(&url);
    env.extend([
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "60000"),
        ("RUST_LOG", "info,pgfold::daemon::wakeup=debug"),
    ]);
    let mut daemon = Daemon::spawn(PGFOLD, &["run"], &env);
    let armed = "SELECT count(*) FROM pgfold.wakeup WHERE armed";
    let mut appended = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        let lines = daemon.lines();
        if let Some(line) = lines
            .iter()
            .find(|l| l.contains("permission denied") || l.contains("could not arm"))
        {
            break Err(format!("run as the role: {line}"));
        }
        if !daemon.is_running() {
            break Err(format!("run as the role exited: {lines:?}"));
        }
        if !appended && scalar_i64(&admin, armed).await == 1 {
            append_orders(&admin, 1_000, 5).await;
            appended = true;
        } else if appended && exact(&admin, "").await.is_ok() {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!(
                "run as the role: not armed and caught up in 30 s (appended: {appended})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    daemon.kill();
    outcome.map(|()| role)
}

#[tokio::test]
async fn a_role_with_the_readme_grants_runs_replays_and_waits_but_cannot_write_the_log() {
    let db = TestDb::empty().await;
    let role = daemon_role_runs(&db, &readme_grants())
        .await
        .unwrap_or_else(|e| panic!("with the README's grants: {e}"));

    // The role really is that narrow: it cannot write the log or create anything.
    let as_role = connect(&role.url(&db)).await;
    let insert = as_role
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             VALUES ('order-y', 'order', 'OrderCreated', '{}', 1)",
            &[],
        )
        .await
        .expect_err("the role could INSERT into events");
    assert_eq!(
        insert.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{insert}"
    );
    let delete = as_role
        .execute("DELETE FROM events", &[])
        .await
        .expect_err("the role could DELETE from events");
    assert_eq!(
        delete.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{delete}"
    );
    for ddl in [
        "CREATE TABLE public.pgfold_probe (x int)",
        "CREATE TABLE pgfold.pgfold_probe (x int)",
    ] {
        let e = as_role
            .batch_execute(ddl)
            .await
            .expect_err("the role could create a table");
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{ddl}: {e}"
        );
    }
    drop(as_role);
    drop(role);
}

/// A grant missing on a projection's table is the operator's to fix, not the
/// events' fault: under `on_error = "skip"` with one attempt, no event may be
/// dead-lettered for it; `run --once` fails naming the missing right, and once
/// it is granted the projection catches up whole.
#[tokio::test]
async fn a_missing_grant_on_a_projection_dead_letters_nothing() {
    // Arrange: the README's role, less its right to write daily_revenue.
    let db = TestDb::empty().await;
    let admin = db.client().await;
    pgfold_ok(&["migrate"], &[("DATABASE_URL", db.url.as_str())]);
    append_orders(&admin, 1, 20).await;
    let role = AppRole::create(&db, &readme_grants()).await.unwrap();
    let revoke = format!("REVOKE INSERT, UPDATE ON daily_revenue FROM {}", role.name);
    admin.batch_execute(&revoke).await.unwrap();
    let url = role.url(&db);

    // Act
    let refused = pgfold_as(&url, &["run", "--once"]);
    let dead = scalar_i64(&admin, "SELECT count(*) FROM pgfold.dead_letters").await;
    let grant = format!("GRANT INSERT, UPDATE ON daily_revenue TO {}", role.name);
    admin.batch_execute(&grant).await.unwrap();
    let after_grant = pgfold_as(&url, &["run", "--once"]);

    // Assert
    let why = refused.expect_err("run --once succeeded without the grant");
    assert!(why.contains("permission denied"), "{why}");
    assert_eq!(dead, 0, "events were dead-lettered for a missing grant");
    after_grant.unwrap();
    exact(&admin, "the grant").await.unwrap();
    assert_eq!(
        scalar_i64(&admin, "SELECT count(*) FROM pgfold.dead_letters").await,
        0
    );
}

/// The README's grants are the least: without any one of them, something the
/// daemon's role must do fails.
#[tokio::test]
async fn every_readme_grant_is_needed() {
    let statements = readme_grants();
    for left_out in 0..statements.len() {
        let mut fewer = statements.clone();
        fewer.remove(left_out);
        let db = TestDb::empty().await;
        let outcome = daemon_role_runs(&db, &fewer).await;
        assert!(
            outcome.is_err(),
            "the role did everything without {:?}",
            statements[left_out]
        );
    }
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SECRET: &str = "Sup3rS3cretPw";

fn assert_secret_absent(out: &std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{what}: the password leaked:\nstdout {stdout}\nstderr {stderr}"
    );
}

#[tokio::test]
async fn a_password_in_the_url_never_appears_when_the_connection_fails() {
    let urls = [
        format!("postgres://app:{SECRET}@127.0.0.1:1/shop"),
        format!("postgres://app:{SECRET}@no-such-host.invalid/shop"),
        format!("host=127.0.0.1 port=1 user=app password={SECRET} dbname=shop"),
    ];
    let commands: [&[&str]; 4] = [
        &["run", "--once"],
        &["status"],
        &["status", "--json"],
        &["migrate"],
    ];
    for url in &urls {
        for args in commands {
            let out = pgfold(
                args,
                &[
                    ("DATABASE_URL", url),
                    ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "300"),
                    ("RUST_LOG", "debug"),
                ],
            );
            let what = format!("{args:?} with {}", url.replace(SECRET, "***"));
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("pgfold: "),
                "{what}: no error line"
            );
            assert_secret_absent(&out, &what);
        }
        // `pgfold run` may keep retrying (or give up after the connect timeout):
        // either way, what it logs meanwhile must not show the password.
        let mut daemon = Daemon::spawn(
            PGFOLD,
            &["run"],
            &[
                ("DATABASE_URL", url),
                ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "300"),
                ("RUST_LOG", "debug"),
            ],
        );
        wait_for(
            "pgfold run to report the unreachable database",
            std::time::Duration::from_secs(20),
            || {
                let reported = daemon.lines().iter().any(|l| l.contains("connect"));
                let running = daemon.is_running();
                async move { reported || !running }
            },
        )
        .await;
        daemon.kill();
        let lines = daemon.lines();
        assert!(!lines.is_empty(), "run printed nothing");
        assert!(
            !lines.iter().any(|l| l.contains(SECRET)),
            "run with {}: the password leaked: {lines:?}",
            url.replace(SECRET, "***")
        );
    }
}

#[tokio::test]
async fn a_password_in_the_url_never_appears_when_the_connection_succeeds() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    append_orders(&admin, 1, 50).await;
    // Trust authentication here accepts any password: the point is what is printed.
    let url = db.url_as(&db.admin_user(), Some(SECRET));
    for args in [
        &["migrate"][..],
        &["run", "--once"],
        &["run", "--once", "--replay", "all"],
        &["status"],
        &["status", "--json"],
    ] {
        let out = pgfold(args, &[("DATABASE_URL", &url), ("RUST_LOG", "debug")]);
        assert_ok(&out, &format!("{args:?}"));
        assert_secret_absent(&out, &format!("{args:?}"));
    }
    // A failure after connecting (an unknown projector in the replay) neither.
    let out = pgfold(
        &["run", "--once", "--replay", "nope"],
        &[("DATABASE_URL", &url), ("RUST_LOG", "debug")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_secret_absent(&out, "run --replay nope");
    assert_projections_exact(&admin).await;
}
