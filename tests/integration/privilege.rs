//! Issue 3, least privilege: `pgfold migrate` needs DDL rights, `pgfold run` does
//! not; and a password in the connection string never shows up in any output.

use serde_json::json;
use tokio_postgres::error::SqlState;

use crate::helpers::*;

/// A LOGIN role with only what `pgfold run` needs on `db`. Dropped (with its
/// privileges) when the test ends, before the database is.
struct AppRole {
    name: String,
    /// Admin connection string to the test database.
    admin_db_url: String,
}

impl AppRole {
    async fn create(db: &TestDb) -> AppRole {
        let name = format!("pgfold_run_{}", &db.name["pgfold_test_".len()..]);
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN;
                 REVOKE ALL ON DATABASE {db} FROM PUBLIC;
                 REVOKE CREATE ON SCHEMA public FROM PUBLIC;
                 GRANT CONNECT ON DATABASE {db} TO {name};
                 GRANT USAGE ON SCHEMA public, pgfold TO {name};
                 GRANT SELECT ON events TO {name};
                 GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON daily_revenue, order_snapshots TO {name};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgfold TO {name};",
                db = db.name
            ))
            .await
            .expect("create the least-privilege role");
        AppRole {
            name,
            admin_db_url: db.url.clone(),
        }
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

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn run_and_replay_work_under_a_role_that_can_only_read_events_and_write_its_own_tables() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    pgfold::testkit::workload::load_orders(&admin, 1, 2_000)
        .await
        .unwrap();
    let role = AppRole::create(&db).await;
    let url = role.url(&db);

    let out = pgfold(&["run", "--once"], &[("DATABASE_URL", &url)]);
    assert_ok(&out, "run --once as the least-privilege role");
    assert_projections_exact(&admin).await;

    // More events, then a damaged projection that only a replay repairs.
    let mut writer = db.client().await;
    append_all(
        &mut writer,
        &[
            created("order-x", "books", json!("5.55"), 3),
            paid("order-x", "books", json!("5.55"), 3),
        ],
    )
    .await;
    admin
        .batch_execute(
            "UPDATE daily_revenue SET total = total + 1;
             DELETE FROM order_snapshots WHERE stream_id LIKE 'order-1%';",
        )
        .await
        .unwrap();
    let out = pgfold(
        &["run", "--once", "--replay", "all"],
        &[("DATABASE_URL", &url)],
    );
    assert_ok(&out, "run --once --replay all as the least-privilege role");
    assert_projections_exact(&admin).await;
    assert_eq!(
        scalar_i64(
            &admin,
            "SELECT count(*) FROM pgfold.projectors WHERE state <> 'running'"
        )
        .await,
        0
    );

    let out = pgfold(&["status", "--json"], &[("DATABASE_URL", &url)]);
    assert_ok(&out, "status as the least-privilege role");

    // The role really is that narrow: it cannot write the log or create anything.
    let as_role = connect(&url).await;
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
    pgfold::testkit::workload::load_orders(&admin, 1, 50)
        .await
        .unwrap();
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
