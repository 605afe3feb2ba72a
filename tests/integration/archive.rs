//! Retention (issue 28): archive passes to a local directory and to a real
//! S3-protocol server, and replays that stay complete.
//!
//! The S3 server is moto's (`moto_server` from PyPI, which enforces
//! `If-None-Match: *` as S3 does), which `.ci/run` installs and starts on
//! `PGFOLD_TEST_S3_ENDPOINT` (default `http://127.0.0.1:5599`).
//!
//! Test-only hook: with `PGFOLD_TEST_ARCHIVE_PAUSE=<step>`, a pass prints
//! `pgfold: test pause at <step>` and waits there forever, so that a test can
//! SIGKILL the real binary at that step. Steps: `uploaded` (the object written,
//! not yet read back), `verified` (read back, nothing recorded), `deleted` (inside
//! the recording transaction, rows deleted, not committed), `recorded` (committed).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfold::store::{self, AppendError, NewEvent};
use pgfold::testkit::process::Daemon;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::helpers::{free_port, wait_for, TestDb, PGFOLD};

/// Orders in the log: about 2.5 events each, their times spread over 2025; a
/// fifth of them are moved a year later, so that a policy of 300 days moves most
/// streams and keeps the others, written in the same transactions.
const ORDERS: i64 = 1_500;

struct Setup {
    db: TestDb,
    client: Client,
    dir: PathBuf,
    config: PathBuf,
    /// The binary run: pgfold's, or one with more projectors.
    bin: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn archive_dir(&self) -> PathBuf {
        self.dir.join("archive")
    }

    /// The real binary with this setup's configuration.
    fn pgfold(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut all = vec!["--config", self.config()];
        all.extend_from_slice(args);
        pgfold::testkit::process::run(&self.bin, &all, env)
    }

    fn pgfold_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.pgfold(args, env);
        assert!(
            out.status.success(),
            "pgfold {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A database with [`ORDERS`] orders and a few log streams, projected by the
/// built-ins and two SQL projections, and a configuration archiving to `url`
/// (a local directory when `None`).
async fn setup(url: Option<&str>) -> Setup {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, ORDERS)
        .await
        .unwrap();
    client
        .execute(
            "UPDATE events SET occurred_at = occurred_at + interval '1 year'
              WHERE stream_type = 'order' AND stream_id ~ '[05]$'",
            &[],
        )
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("{}_archive", db.name));
    let projections = dir.join("projections");
    std::fs::create_dir_all(&projections).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/projections");
    for file in [
        "daily_revenue_sql.toml",
        "order_snapshots_sql.toml",
        "order_status.toml",
    ] {
        std::fs::copy(examples.join(file), projections.join(file)).unwrap();
    }
    let local = format!("file://{}", dir.join("archive").display());
    let config = dir.join("pgfold.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[database]
url = "{url_db}"

[daemon]
poll_interval_ms = 100
projections_dir = "{projections}"

[archive]
url = "{archive}"

[[archive.policy]]
stream_types = ["order"]
after = "300 days"

[[archive.policy]]
stream_types = ["log"]
after = "365 days"
whole_streams = false
"#,
            url_db = db.url,
            projections = projections.display(),
            archive = url.unwrap_or(&local),
        ),
    )
    .unwrap();
    let s = Setup {
        db,
        client,
        dir,
        config,
        bin: PGFOLD.into(),
    };
    s.pgfold_ok(&["migrate"], &[]);
    // A log-like stream: its first three events are old.
    let mut writer = s.db.client().await;
    for n in 1..=5 {
        let e = NewEvent::new("log-1", "log", "Noted", json!({ "n": n }));
        store::append_next(&mut writer, &e).await.unwrap();
    }
    s.client
        .execute(
            "UPDATE events SET occurred_at = now() - interval '2 years'
              WHERE stream_id = 'log-1' AND sequence <= 3",
            &[],
        )
        .await
        .unwrap();
    s.pgfold_ok(&["run", "--once"], &[]);
    s
}

/// Every projection's rows, as text, in a stable order.
async fn projections(client: &Client) -> Vec<String> {
    let mut all = Vec::new();
    for sql in [
        "SELECT day::text || ' ' || category || ' ' || total::text FROM daily_revenue ORDER BY 1",
        "SELECT stream_id || ' ' || sequence || ' ' || state::text FROM order_snapshots ORDER BY 1",
        "SELECT day::text || ' ' || category || ' ' || total::text FROM daily_revenue_sql ORDER BY 1",
        "SELECT stream_id || ' ' || sequence || ' ' || state::text FROM order_snapshots_sql ORDER BY 1",
        "SELECT stream_id || ' ' || status || ' ' || changed_at::text FROM order_status ORDER BY 1",
        "SELECT customer_id || ' ' || paid::text FROM customer_spend ORDER BY 1",
    ] {
        let table = sql.split(" FROM ").nth(1).unwrap().split(' ').next().unwrap();
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        if !exists {
            all.push(String::new());
            continue;
        }
        let rows = client.query(sql, &[]).await.unwrap();
        all.push(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    all
}

async fn count(client: &Client, sql: &str) -> i64 {
    super::helpers::scalar_i64(client, sql).await
}

/// Events in the table and in recorded segments: together, every event, once.
async fn accounted(client: &Client) -> (i64, i64) {
    (
        count(client, "SELECT count(*) FROM events").await,
        count(
            client,
            "SELECT coalesce(sum(events), 0)::bigint FROM pgfold.archive_segments",
        )
        .await,
    )
}

#[tokio::test]
async fn a_rebuild_and_a_replay_after_archiving_equal_the_projections_before() {
    let mut s = setup(None).await;
    // With a projector of decoded events folded in Rust, besides the built-in set
    // folds and the SQL projections (set, stream and event by event).
    s.bin = super::helpers::custom_projector_binary();
    s.pgfold_ok(&["run", "--once"], &[]);
    let before = projections(&s.client).await;
    assert!(
        before.iter().all(|p| !p.is_empty()),
        "every projection has rows"
    );
    let young = count(&s.client, "SELECT count(*) FROM events WHERE stream_type = 'order' AND occurred_at > now() - interval '300 days'").await;
    assert!(young > 0, "some orders stay in the table");
    let total = count(&s.client, "SELECT count(*) FROM events").await;

    let dry = s.pgfold_ok(&["archive", "--dry-run"], &[]);
    assert!(dry.contains("would move"), "{dry}");
    assert_eq!(
        accounted(&s.client).await,
        (total, 0),
        "a dry run changes nothing"
    );

    let out = s.pgfold_ok(&["archive"], &[]);
    let (table, archived) = accounted(&s.client).await;
    assert!(
        archived > 0 && table > 0,
        "{out}: {table} in the table, {archived} archived"
    );
    assert_eq!(table + archived, total);
    // Whole streams only for orders: no order stream is left in both places.
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams a JOIN events e USING (stream_id)
              WHERE e.stream_type = 'order'"
        )
        .await,
        0
    );
    let verified = s.pgfold_ok(&["archive", "verify"], &[]);
    assert!(verified.starts_with("ok segment 1"), "{verified}");

    s.pgfold_ok(&["run", "--once", "--rebuild", "all"], &[]);
    assert_eq!(
        projections(&s.client).await,
        before,
        "rebuilt after archiving"
    );
    s.pgfold_ok(&["run", "--once", "--replay", "all"], &[]);
    assert_eq!(
        projections(&s.client).await,
        before,
        "replayed after archiving"
    );
    // Nothing was archived twice, and a second pass finds nothing more to move.
    s.pgfold_ok(&["archive"], &[]);
    assert_eq!(accounted(&s.client).await, (table, archived));
}

#[tokio::test]
async fn an_append_to_a_stream_archived_whole_fails_with_55000_naming_it() {
    let s = setup(None).await;
    // Appends pay for the guard only once archiving has begun: a dry run (or a
    // deployment that never archives) leaves events without its trigger.
    let guards = "SELECT count(*) FROM pg_trigger
                   WHERE tgrelid = 'events'::regclass AND tgname = 'pgfold_archived_append'";
    s.pgfold_ok(&["archive", "--dry-run"], &[]);
    assert_eq!(
        count(&s.client, guards).await,
        0,
        "the guard came before any pass"
    );
    s.pgfold_ok(&["archive"], &[]);
    assert_eq!(count(&s.client, guards).await, 1);
    let row = s
        .client
        .query_one(
            "SELECT stream_id, last_sequence FROM pgfold.archived_streams
              WHERE whole ORDER BY stream_id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (stream, last): (String, i64) = (row.get(0), row.get(1));
    let mut writer = s.db.client().await;
    let e = NewEvent::new(&stream, "order", "OrderCancelled", json!({}));
    // The article's loop reads max(sequence) = 0 and appends 1: refused at once,
    // not retried as a conflict.
    let err = store::append_next(&mut writer, &e).await.unwrap_err();
    let AppendError::Archived { stream_id, message } = &err else {
        panic!("expected the stream to be archived, got {err}");
    };
    assert_eq!(stream_id, &stream);
    assert!(
        message.contains(&stream) && message.contains(&last.to_string()),
        "{message}"
    );
    // Any writer, through SQL: 55000.
    let raw = writer
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             VALUES ($1, 'order', 'OrderCancelled', '{}', $2)",
            &[&stream, &(last + 1)],
        )
        .await
        .unwrap_err();
    assert_eq!(raw.code().map(|c| c.code()), Some("55000"), "{raw}");
    let head: i64 = s
        .client
        .query_one("SELECT pgfold.stream_head($1)", &[&stream])
        .await
        .unwrap()
        .get(0);
    assert_eq!(head, last);
}

#[tokio::test]
async fn archive_show_prints_a_stream_from_the_archive_and_the_table_in_order() {
    let s = setup(None).await;
    s.pgfold_ok(&["archive"], &[]);
    // The log stream left event by event: its three old events, never its newest.
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM events WHERE stream_id = 'log-1'"
        )
        .await,
        2
    );
    let out = s.pgfold_ok(&["archive", "show", "log-1"], &[]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(i64, bool, i64)> = lines
        .iter()
        .map(|v| {
            (
                v["sequence"].as_i64().unwrap(),
                v["archived"].as_bool().unwrap(),
                v["payload"]["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, true, 1),
            (2, true, 2),
            (3, true, 3),
            (4, false, 4),
            (5, false, 5)
        ]
    );
    // A stale writer that appends into the archived part conflicts, as the unique
    // index would have said; the article's loop then appends after the newest.
    let mut writer = s.db.client().await;
    let e = NewEvent::new("log-1", "log", "Noted", json!({ "n": 6 }));
    assert!(matches!(
        store::append(&writer, &e, 2).await,
        Err(AppendError::Conflict { sequence: 2, .. })
    ));
    assert_eq!(
        store::append_next(&mut writer, &e).await.unwrap().sequence,
        6
    );
}

#[tokio::test]
async fn a_missing_segment_stops_a_replay_in_one_line_before_anything_is_emptied() {
    let s = setup(None).await;
    s.pgfold_ok(&["archive"], &[]);
    let before = projections(&s.client).await;
    let key: String = s
        .client
        .query_one(
            "SELECT object_key FROM pgfold.archive_segments ORDER BY segment LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    std::fs::remove_file(s.archive_dir().join(&key)).unwrap();

    for args in [
        ["run", "--once", "--replay", "daily_revenue"],
        ["run", "--once", "--rebuild", "order_snapshots"],
    ] {
        let out = s.pgfold(&args, &[("RUST_LOG", "off")]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("segment 1") && stderr.contains(&key) && stderr.contains("missing"),
            "{stderr}"
        );
        assert_eq!(
            projections(&s.client).await,
            before,
            "nothing emptied or swapped"
        );
    }
    let out = s.pgfold(&["archive", "verify"], &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&key));
}

#[tokio::test]
async fn a_sigkill_at_each_step_of_a_pass_loses_nothing_and_counts_nothing_twice() {
    for step in ["uploaded", "verified", "deleted", "recorded"] {
        let s = setup(None).await;
        let before = projections(&s.client).await;
        let total = count(&s.client, "SELECT count(*) FROM events").await;
        let config = s.config().to_string();
        let mut pass = Daemon::spawn(
            PGFOLD,
            &["--config", &config, "archive"],
            &[("PGFOLD_TEST_ARCHIVE_PAUSE", step)],
        );
        let pause = format!("test pause at {step}");
        wait_for(&pause, Duration::from_secs(60), || {
            let seen = pass.lines().iter().any(|l| l.contains(&pause));
            async move { seen }
        })
        .await;
        pass.kill();
        let (table, archived) = accounted(&s.client).await;
        assert_eq!(table + archived, total, "after a SIGKILL at {step}");
        assert_eq!(
            archived > 0,
            step == "recorded",
            "after a SIGKILL at {step}"
        );

        // The next pass completes (reusing the uploaded object, never overwriting it).
        s.pgfold_ok(&["archive"], &[]);
        let (table, archived) = accounted(&s.client).await;
        assert_eq!(
            table + archived,
            total,
            "after the pass that followed {step}"
        );
        assert!(archived > 0);
        s.pgfold_ok(&["archive", "verify"], &[]);
        s.pgfold_ok(&["run", "--once", "--rebuild", "all"], &[]);
        assert_eq!(projections(&s.client).await, before, "rebuilt after {step}");
    }
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

#[tokio::test]
async fn with_the_s3_server_down_a_pass_fails_in_one_line_and_deletes_nothing() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let s = setup(Some("s3://pgfold-down/archive")).await;
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    let env = s3_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = s.pgfold(&["archive"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot write segment"), "{stderr}");
    assert_eq!(accounted(&s.client).await, (total, 0));
}

/// Creates `bucket` on the S3 server (moto accepts an unsigned PUT).
fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(host).unwrap_or_else(|e| {
        panic!("the S3 server at {endpoint} is not running (.ci/run starts it): {e}")
    });
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_pass_to_an_s3_server_and_a_rebuild_from_it() {
    let endpoint = std::env::var("PGFOLD_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5599".to_string());
    let bucket = format!("b{}", &uuid_like());
    create_bucket(&endpoint, &bucket);
    let s = setup(Some(&format!("s3://{bucket}/events"))).await;
    let env = s3_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let before = projections(&s.client).await;
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    s.pgfold_ok(&["archive"], &env);
    let (table, archived) = accounted(&s.client).await;
    assert!(archived > 0);
    assert_eq!(table + archived, total);
    s.pgfold_ok(&["archive", "verify"], &env);
    let shown = s.pgfold_ok(&["archive", "show", "log-1"], &env);
    assert_eq!(shown.lines().count(), 5);
    s.pgfold_ok(&["run", "--once", "--rebuild", "all"], &env);
    assert_eq!(projections(&s.client).await, before);
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn run_archives_every_interval_and_status_and_metrics_show_it() {
    let s = setup(None).await;
    let port = free_port();
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace("[archive]\n", "[archive]\ninterval = \"1s\"\n")
        + &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n");
    std::fs::write(&s.config, text).unwrap();
    let mut daemon = Daemon::spawn(&s.bin, &["--config", s.config(), "run"], &[]);
    wait_for("a pass of pgfold run", Duration::from_secs(60), || async {
        count(&s.client, "SELECT count(*) FROM pgfold.archive_segments").await > 0
    })
    .await;
    let address = format!("127.0.0.1:{port}");
    wait_for(
        "the pass in the metrics",
        Duration::from_secs(30),
        || async {
            let (_, body) = super::helpers::get(&address, "/metrics").await;
            body.contains("pgfold_archive_segments 1")
                && body.contains("pgfold_archive_passes_total 1")
        },
    )
    .await;
    daemon.stop(Duration::from_secs(10)).unwrap();

    let out = s.pgfold(&["status", "--json"], &[]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let archive = &status["archive"];
    assert_eq!(archive["segments"], 1, "{status}");
    assert!(archive["events"].as_i64().unwrap() > 0, "{status}");
    assert!(archive["bytes"].as_i64().unwrap() > 0, "{status}");
    assert!(archive["last_pass_at"].is_string(), "{status}");
    assert!(archive["held_back_by"].is_string(), "{status}");
    let text = String::from_utf8(s.pgfold(&["status"], &[]).stdout).unwrap();
    assert!(
        text.contains("archive: 1 segments") && text.contains("archiving is held back by"),
        "{text}"
    );
}

#[tokio::test]
async fn archive_settings_are_checked_in_one_line_and_change_nothing() {
    let s = setup(None).await;
    let good = std::fs::read_to_string(&s.config).unwrap();
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    for (from, to, expected) in [
        (
            "url = \"file://",
            "url = \"archive/../file://",
            "a relative path is refused",
        ),
        (
            "after = \"300 days\"",
            "after = \"two years\"",
            "not a PostgreSQL interval",
        ),
        (
            "after = \"300 days\"",
            "after = \"300 days\"\nretention_class = \"warm\"",
            "retention_class column",
        ),
        (
            "after = \"300 days\"",
            "after = \"300 days\"\nretention_class = \"hot\"",
            "never archived",
        ),
        (
            "[archive]\n",
            "[archive]\ninterval = \"soon\"\n",
            "archive.interval",
        ),
    ] {
        assert!(good.contains(from));
        std::fs::write(&s.config, good.replacen(from, to, 1)).unwrap();
        for args in [&["archive"][..], &["run", "--once"][..]] {
            let out = s.pgfold(args, &[("RUST_LOG", "off")]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} with {to}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains(expected), "{args:?} with {to}: {stderr}");
        }
    }
    assert_eq!(accounted(&s.client).await, (total, 0));
}

#[tokio::test]
async fn history_hot_replays_and_rebuilds_from_the_table_only() {
    let s = setup(None).await;
    s.pgfold_ok(&["archive"], &[]);
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text + "\n[projectors.daily_revenue]\nhistory = \"hot\"\n",
    )
    .unwrap();
    // Without the archive at all: a hot projector needs none of it.
    std::fs::remove_dir_all(s.archive_dir()).unwrap();
    let from_table = pgfold::testkit::workload::EXPECTED_DAILY_REVENUE;
    let live = "SELECT day, category, total FROM daily_revenue";
    for args in [
        ["run", "--once", "--rebuild", "daily_revenue"],
        ["run", "--once", "--replay", "daily_revenue"],
    ] {
        s.pgfold_ok(&args, &[]);
        assert_eq!(
            pgfold::testkit::workload::differences(&s.client, live, from_table)
                .await
                .unwrap(),
            0,
            "{args:?}: the revenue of the events still in the table"
        );
        assert!(count(&s.client, "SELECT count(*) FROM daily_revenue").await > 0);
    }
}

#[tokio::test]
async fn a_projector_behind_holds_archiving_back_and_is_named() {
    let s = setup(None).await;
    // order_status (every order event) as if parked on its first event.
    s.client
        .execute(
            "UPDATE pgfold.projectors SET position_tx = '0', position_id = 0, state = 'failed'
              WHERE name = 'order_status'",
            &[],
        )
        .await
        .unwrap();
    let dry = s.pgfold_ok(&["archive", "--dry-run"], &[]);
    assert!(
        dry.contains("held back by: order_status (at event 0)"),
        "{dry}"
    );
    assert!(
        dry.contains("policy 1 (order, after 300 days, whole streams): 0 streams, 0 events"),
        "{dry}"
    );
    s.pgfold_ok(&["archive"], &[]);
    // Only the log stream's old events, which order_status never consumes.
    assert_eq!(
        count(
            &s.client,
            "SELECT coalesce(sum(events), 0)::bigint FROM pgfold.archive_segments"
        )
        .await,
        3
    );
    let status: Value =
        serde_json::from_slice(&s.pgfold(&["status", "--json"], &[]).stdout).unwrap();
    assert_eq!(
        status["archive"]["held_back_by"],
        "order_status (at event 0)"
    );
}

#[tokio::test]
async fn with_a_retention_class_column_hot_never_leaves_and_a_class_policy_takes_its_class() {
    let s = setup(None).await;
    // The article's column: orders ending in 1 are hot, ending in 2 warm.
    s.client
        .batch_execute(
            "ALTER TABLE events ADD COLUMN retention_class TEXT;
             UPDATE events SET retention_class = 'hot' WHERE stream_id ~ '1$';
             UPDATE events SET retention_class = 'warm' WHERE stream_id ~ '2$';",
        )
        .await
        .unwrap();
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    let hot = count(
        &s.client,
        "SELECT count(*) FROM events WHERE retention_class = 'hot'",
    )
    .await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replacen(
            "after = \"300 days\"",
            "after = \"300 days\"\nretention_class = \"warm\"",
            1,
        ),
    )
    .unwrap();
    s.pgfold_ok(&["archive"], &[]);
    let (table, archived) = accounted(&s.client).await;
    assert_eq!(table + archived, total);
    // Of the orders, only warm streams left; the log stream (no class) left too.
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams WHERE stream_id LIKE 'order-%' AND stream_id !~ '2$'"
        )
        .await,
        0
    );
    assert!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams WHERE stream_id ~ '2$'"
        )
        .await
            > 0
    );
    // A policy without a class takes every class but hot.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replacen("retention_class = \"warm\"\n", "", 1),
    )
    .unwrap();
    s.pgfold_ok(&["archive"], &[]);
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM events WHERE retention_class = 'hot'"
        )
        .await,
        hot
    );
    assert!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams WHERE stream_id LIKE 'order-%' AND stream_id !~ '[12]$'"
        )
        .await
            > 0
    );
}

#[tokio::test]
async fn archived_events_are_read_through_the_upcasters_on_every_path() {
    let mut s = setup(None).await;
    s.bin = super::helpers::custom_projector_binary();
    // Every OrderPaid reads with its first item's quantity 7: revenue, spend and
    // the SQL projections all show it.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text + r#"
[[upcasters]]
event_type = "OrderPaid"
from_version = 1
to_version = 2
payload = "jsonb_set(payload, '{items,0,qty}', '7'::jsonb)"
"#,
    )
    .unwrap();
    s.pgfold_ok(&["run", "--once"], &[]);
    let before = projections(&s.client).await;
    s.pgfold_ok(&["archive"], &[]);
    assert!(accounted(&s.client).await.1 > 0);
    for args in [
        ["run", "--once", "--rebuild", "all"],
        ["run", "--once", "--replay", "all"],
    ] {
        s.pgfold_ok(&args, &[]);
        let after = projections(&s.client).await;
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let first = a.lines().zip(b.lines()).find(|(x, y)| x != y);
            assert!(a == b, "{args:?}: projection {i} differs, first {first:?}");
        }
    }
}

#[tokio::test]
async fn a_stream_created_and_shipped_twice_rebuilds_from_the_archive_as_from_the_table() {
    // Arrange: an old order, archived whole, created again and shipped twice
    // more, so that one segment holds two OrderCreated and several addresses of
    // it: order_snapshots then looks the last payload and address up by id,
    // which during an archive replay are no longer in `events`.
    let s = setup(None).await;
    let order: String = s
        .client
        .query_one(
            "SELECT stream_id FROM events WHERE stream_type = 'order' AND stream_id !~ '[05]$'
              ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut writer = s.db.client().await;
    let again = NewEvent::new(
        order.as_str(),
        "order",
        "OrderCreated",
        json!({"orderId": order, "customerId": "c-again", "items": []}),
    );
    for e in [
        again,
        super::helpers::shipped(&order, "1 First Street"),
        super::helpers::shipped(&order, "2 Second Street"),
    ] {
        store::append_next(&mut writer, &e).await.unwrap();
    }
    s.client
        .execute(
            "UPDATE events SET occurred_at = (SELECT min(occurred_at) FROM events WHERE stream_id = $1)
              WHERE stream_id = $1",
            &[&order],
        )
        .await
        .unwrap();
    s.pgfold_ok(&["run", "--once"], &[]);
    let snapshot = "SELECT state::text FROM order_snapshots WHERE stream_id = $1";
    let before: String = s
        .client
        .query_one(snapshot, &[&order])
        .await
        .unwrap()
        .get(0);
    assert!(
        before.contains("2 Second Street") && before.contains("c-again"),
        "{before}"
    );

    // Act
    s.pgfold_ok(&["archive"], &[]);
    let left = count(
        &s.client,
        &format!("SELECT count(*) FROM events WHERE stream_id = '{order}'"),
    )
    .await;
    assert_eq!(left, 0, "the order was archived whole");
    s.pgfold_ok(
        &[
            "run",
            "--once",
            "--rebuild",
            "order_snapshots",
            "--projector",
            "order_snapshots",
        ],
        &[],
    );

    // Assert
    let after: String = s
        .client
        .query_one(snapshot, &[&order])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before);
}
