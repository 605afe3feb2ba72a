//! Issue 13: projections defined in files of SQL, with every guarantee of a
//! built-in: each `order` kind equals an independent fold of the same events
//! (live, in several batches, and replayed), poison events are parked or
//! dead-lettered, a bad file stops the command with one line and changes
//! nothing, and two instances share the projections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfold::config::{OnError, ProjectorSettings};
use pgfold::daemon::RunOptions;
use pgfold::Registry;
use serde_json::json;
use tokio_postgres::Client;

use pgfold::testkit::db::column;

use crate::helpers::*;

/// The examples shipped in `examples/projections/`.
pub(crate) fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/projections")
}

fn with_examples() -> Registry {
    pgfold::sql_projections::load(pgfold::projectors::builtin(), Some(&examples_dir()))
        .expect("the examples load")
}

/// Each example equals what it claims to equal.
async fn assert_examples_exact(client: &Client) {
    assert_eq!(
        examples_differences(client).await,
        (0, 0, 0),
        "rows differing from the independent folds (daily_revenue_sql, order_snapshots_sql, order_status)"
    );
}

/// Rows differing from the independent folds, per example.
async fn examples_differences(client: &Client) -> (i64, i64, i64) {
    pgfold::testkit::workload::example_differences(client)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_kind_of_sql_projection_equals_an_independent_fold_live_and_replayed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let registry = with_examples();
    let pg = pgfold::db::pg_config(Some(&db.url)).unwrap();
    pgfold::daemon::migrate(&pg, &registry).await.unwrap();
    let mut settings = db.settings();
    // Small batches: streams straddle them, so stream batches patch stored
    // states and set batches add to stored totals.
    settings.daemon.batch_size = 50;
    settings.daemon.set_batch_size = 97;
    let mut first = 1;
    for orders in [400, 7, 300] {
        pgfold::testkit::workload::load_orders(&client, first, orders)
            .await
            .unwrap();
        first += orders;
        let outcome = run_once_with(&settings, &registry, RunOptions::default()).await;
        assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
        assert_examples_exact(&client).await;
    }
    assert_projections_exact(&client).await;
    assert!(scalar_i64(&client, "SELECT count(*) FROM order_status").await > 0);

    // A replay empties the tables the file names and folds everything again.
    let replay = RunOptions {
        replay: vec![
            "daily_revenue_sql".into(),
            "order_snapshots_sql".into(),
            "order_status".into(),
        ],
        ..RunOptions::default()
    };
    client
        .batch_execute("UPDATE daily_revenue_sql SET total = total + 1000")
        .await
        .unwrap();
    let outcome = run_once_with(&db.settings(), &registry, replay).await;
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    assert_examples_exact(&client).await;
    // The daemon counted what the SQL consumed, as for a built-in.
    let counted = scalar_i64(
        &client,
        "SELECT events_applied FROM pgfold.projectors WHERE name = 'daily_revenue_sql'",
    )
    .await;
    let paid = scalar_i64(
        &client,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await;
    assert_eq!(counted, paid);
}

async fn pay_without_price(client: &mut Client) {
    let event = pgfold::store::NewEvent::new(
        "order-poison",
        "order",
        "OrderPaid",
        json!({"orderId": "order-poison", "items": [{"sku": "s", "category": "books", "qty": 1}]}),
    );
    append_all(client, &[event]).await;
}

#[tokio::test]
async fn a_poison_event_in_a_sql_projection_is_parked_or_dead_lettered() {
    for on_error in [OnError::Stop, OnError::Skip] {
        let db = TestDb::new().await;
        let mut client = db.client().await;
        let registry = with_examples();
        pgfold::testkit::workload::load_orders(&client, 1, 30)
            .await
            .unwrap();
        pay_without_price(&mut client).await;
        pgfold::testkit::workload::load_orders(&client, 31, 30)
            .await
            .unwrap();
        let mut settings = db.settings();
        settings.projectors.insert(
            "daily_revenue_sql".into(),
            ProjectorSettings {
                max_attempts: 2,
                on_error,
                enabled: true,
            },
        );
        let options = RunOptions {
            projectors: vec!["daily_revenue_sql".into()],
            ..RunOptions::default()
        };
        let outcome = run_once_with(&settings, &registry, options).await;
        let bad_id = scalar_i64(
            &client,
            "SELECT id FROM events WHERE stream_id = 'order-poison'",
        )
        .await;
        match on_error {
            OnError::Stop => {
                assert_eq!(outcome.parked.len(), 1, "{:?}", outcome.parked);
                let parked = &outcome.parked[0];
                assert_eq!(
                    (parked.projector.as_str(), parked.event_id),
                    ("daily_revenue_sql", bad_id)
                );
                assert!(parked.error.contains("no price"), "{}", parked.error);
                // The good events before it are applied.
                assert!(scalar_i64(&client, "SELECT count(*) FROM daily_revenue_sql").await > 0);
            }
            OnError::Skip => {
                assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
                let dead = scalar_i64(&client, "SELECT event_id FROM pgfold.dead_letters").await;
                assert_eq!(dead, bad_id);
                client
                    .batch_execute("DELETE FROM events WHERE stream_id = 'order-poison'")
                    .await
                    .unwrap();
                let revenue = pgfold::testkit::workload::differences(
                    &client,
                    "SELECT day, category, total FROM daily_revenue_sql",
                    pgfold::testkit::workload::EXPECTED_DAILY_REVENUE,
                )
                .await
                .unwrap();
                assert_eq!(revenue, 0);
            }
        }
    }
}

/// What a bad file may not change: the tables and the projectors' rows.
pub(crate) async fn footprint(client: &Client) -> (Vec<String>, Vec<String>) {
    let tables = "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1";
    let projectors = "SELECT name FROM pgfold.projectors ORDER BY 1";
    (
        column(client, tables).await.unwrap(),
        column(client, projectors).await.unwrap(),
    )
}

const GOOD_SETUP: &str = r#"setup = "CREATE TABLE IF NOT EXISTS t (k text PRIMARY KEY, n bigint NOT NULL)"
tables = ["t"]
"#;
const GOOD_APPLY: &str = r#"apply = """
INSERT INTO t AS x (k, n) SELECT event_type, count(*) FROM batch GROUP BY 1
ON CONFLICT (k) DO UPDATE SET n = x.n + EXCLUDED.n
""""#;

#[tokio::test]
async fn a_bad_projection_file_stops_with_one_line_naming_it_and_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let before = footprint(&client).await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad_toml", "order = set".into(), "bad_toml.toml"),
        ("unknown_key", format!("order = \"set\"\n{GOOD_SETUP}{GOOD_APPLY}\ncolour = \"red\""), "colour"),
        ("no_apply", format!("order = \"set\"\n{GOOD_SETUP}"), "needs apply"),
        (
            "parse_error",
            format!("order = \"set\"\n{GOOD_SETUP}apply = \"INSERT INTO t SELEC 1\""),
            "apply: syntax error",
        ),
        (
            "missing_column",
            format!("order = \"stream\"\n{GOOD_SETUP}apply = \"INSERT INTO t SELECT payloadx, 1 FROM batch\""),
            "column \"payloadx\" does not exist",
        ),
        (
            "handler_twice",
            format!("order = \"event\"\n{GOOD_SETUP}[handlers]\nA = \"SELECT 1 FROM event\"\nA = \"SELECT 2 FROM event\""),
            "duplicate key",
        ),
        (
            "commits",
            format!("order = \"set\"\n{GOOD_SETUP}{GOOD_APPLY}").replace(
                "n bigint NOT NULL)\"",
                "n bigint NOT NULL); COMMIT\"",
            ),
            "COMMIT is not allowed",
        ),
        (
            "two_statements",
            format!("order = \"set\"\n{GOOD_SETUP}apply = \"DELETE FROM t; DELETE FROM t\""),
            "one statement",
        ),
        ("daily_revenue", format!("order = \"set\"\n{GOOD_SETUP}{GOOD_APPLY}"), "taken"),
        (
            "missing_table",
            format!("order = \"set\"\nsetup = \"SELECT 1\"\ntables = [\"nowhere\"]\n{GOOD_APPLY}"),
            "nowhere does not exist",
        ),
    ];
    for (name, text, clue) in cases {
        let dir = tempfile::tempdir().unwrap();
        // A good file beside the bad one: it must not be set up either.
        write_projection(
            dir.path(),
            "good",
            &format!("order = \"set\"\n{GOOD_SETUP}{GOOD_APPLY}")
                .replace("EXISTS t ", "EXISTS good_t ")
                .replace("[\"t\"]", "[\"good_t\"]")
                .replace("INTO t AS", "INTO good_t AS"),
        );
        write_projection(dir.path(), name, &text);
        for command in ["migrate", "run"] {
            let mut args = vec![command];
            if command == "run" {
                args.push("--once");
            }
            let out = pgfold(
                &args,
                &[
                    ("DATABASE_URL", db.url.as_str()),
                    (
                        "PGFOLD_DAEMON__PROJECTIONS_DIR",
                        dir.path().to_str().unwrap(),
                    ),
                ],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            assert!(!out.status.success(), "{name} {command}: {stderr}");
            assert_eq!(lines.len(), 1, "{name} {command}: one line, got {stderr}");
            assert!(
                lines[0].contains(&format!("{name}.toml")) && lines[0].contains(clue),
                "{name} {command}: {stderr}"
            );
            assert_eq!(
                footprint(&client).await,
                before,
                "{name} {command} changed the database"
            );
        }
    }
}

#[tokio::test]
async fn two_instances_share_sql_projections() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = examples_dir();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__PROJECTIONS_DIR", dir.to_str().unwrap()),
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "100"),
    ];
    pgfold_ok(&["migrate"], &env);
    let mut a = Daemon::spawn(PGFOLD, &["run"], &env);
    let mut b = Daemon::spawn(PGFOLD, &["run"], &env);
    for chunk in 0..10 {
        pgfold::testkit::workload::load_orders(&client, 1 + chunk * 40, 40)
            .await
            .unwrap();
    }
    // Doubled or lost events would keep them from ever equalling the folds.
    wait_for(
        "both instances to agree with the folds",
        Duration::from_secs(120),
        || {
            let client = &client;
            async move { examples_differences(client).await == (0, 0, 0) }
        },
    )
    .await;
    // `status` shows them as it shows the built-ins, caught up.
    let (code, status) = status_json(&db.url, &env[1..]);
    assert_eq!(code, Some(0), "{status}");
    for name in ["daily_revenue_sql", "order_snapshots_sql", "order_status"] {
        let entry = projector_status(&status, name);
        assert_eq!(entry["state"], "running", "{entry}");
        assert_eq!(entry["lag_events"], 0, "{entry}");
    }
    assert!(a.is_running() && b.is_running());
    a.kill();
    b.kill();
    assert_examples_exact(&client).await;
}
