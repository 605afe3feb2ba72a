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
//! the recording transaction, rows deleted and streams recorded, not committed),
//! `recorded` (committed); each also as `<step>-N`, at segment N of the pass
//! only, and several steps separated by commas (a pass of a quiet database
//! records segment N while it writes segment N+1: `deleted-1,verified-2` holds
//! both); and in a projector reading the archive,
//! `replay-fetch` (before it fetches a segment; `replay-fetch-N`, before it
//! fetches segment N) and `replay-apply` (inside the
//! segment's transaction, its events applied, not committed; `replay-apply-N`,
//! in segment N's). With
//! `PGFOLD_TEST_ARCHIVE_RESUME=<file>` as well, it
//! waits only until that file exists, and then goes on (and no longer pauses),
//! so that a test can act while the step is held. With
//! `PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS=<n>`, a pass cuts segments of at most n
//! events, for passes of several segments over a small log.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgfold::store::{self, AppendError, NewEvent};
use pgfold::testkit::process::Daemon;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::helpers::{free_port, pairs, wait_for, TestDb, PGFOLD};

/// Orders in the log: about 2.5 events each, their times spread over 2025; a
/// fifth of them are moved a year later, so that a policy of 300 days moves most
/// streams and keeps the others, written in the same transactions.
const ORDERS: i64 = 1_500;

pub(super) struct Setup {
    db: TestDb,
    pub(super) client: Client,
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

    pub(super) fn pgfold_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
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
pub(super) async fn setup(url: Option<&str>) -> Setup {
    setup_in(url, &[]).await
}

/// [`setup`], running pgfold with `env` (the store's credentials).
pub(super) async fn setup_in(url: Option<&str>, env: &[(&str, &str)]) -> Setup {
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
    s.pgfold_ok(&["migrate"], env);
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
    s.pgfold_ok(&["run", "--once"], env);
    s
}

/// Every projection's rows, as text, in a stable order.
pub(super) async fn projections(client: &Client) -> Vec<String> {
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

pub(super) async fn count(client: &Client, sql: &str) -> i64 {
    super::helpers::scalar_i64(client, sql).await
}

/// Events in the table and in recorded segments: together, every event, once.
pub(super) async fn accounted(client: &Client) -> (i64, i64) {
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

/// Runs `pgfold archive` (with `env`) until it pauses at `step`, and SIGKILLs it
/// there.
async fn pass_killed_at(s: &Setup, step: &str, env: &[(&str, &str)]) {
    let config = s.config().to_string();
    let mut env = env.to_vec();
    env.push(("PGFOLD_TEST_ARCHIVE_PAUSE", step));
    let mut pass = Daemon::spawn(PGFOLD, &["--config", &config, "archive"], &env);
    let pause = format!("test pause at {step}");
    wait_for(&pause, Duration::from_secs(60), || {
        let seen = pass.lines().iter().any(|l| l.contains(&pause));
        async move { seen }
    })
    .await;
    pass.kill();
}

#[tokio::test]
async fn a_sigkill_at_each_step_of_a_pass_loses_nothing_and_counts_nothing_twice() {
    for step in ["uploaded", "verified", "deleted", "recorded"] {
        let s = setup(None).await;
        let before = projections(&s.client).await;
        let total = count(&s.client, "SELECT count(*) FROM events").await;
        pass_killed_at(&s, step, &[]).await;
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

pub(super) fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
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
pub(super) fn create_bucket(endpoint: &str, bucket: &str) {
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

/// A pass to `url` (pgfold run with `env`), `archive verify`, `archive show`
/// and `--rebuild all`: every event in the table or the archive once, and the
/// projections rebuilt as they were.
pub(super) async fn round_trip(url: &str, env: &[(&str, &str)]) {
    let s = setup_in(Some(url), env).await;
    let before = projections(&s.client).await;
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    s.pgfold_ok(&["archive"], env);
    let (table, archived) = accounted(&s.client).await;
    assert!(archived > 0);
    assert_eq!(table + archived, total);
    s.pgfold_ok(&["archive", "verify"], env);
    let shown = s.pgfold_ok(&["archive", "show", "log-1"], env);
    assert_eq!(shown.lines().count(), 5);
    s.pgfold_ok(&["run", "--once", "--rebuild", "all"], env);
    assert_eq!(projections(&s.client).await, before);
}

#[tokio::test]
async fn a_pass_to_an_s3_server_and_a_rebuild_from_it() {
    let bucket = format!("b{}", &uuid_like());
    create_bucket(&s3_endpoint(), &bucket);
    let env = s3_env(&s3_endpoint());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    round_trip(&format!("s3://{bucket}/events"), &env).await;
}

/// The S3 server's address: `PGFOLD_TEST_S3_ENDPOINT`, or moto's default.
pub(super) fn s3_endpoint() -> String {
    std::env::var("PGFOLD_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5599".to_string())
}

pub(super) fn uuid_like() -> String {
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
    // Every projector had consumed every old event: nothing holds archiving back
    // (held_back_by_names_the_rows_whose_checkpoints_keep_old_events_and_nothing_else
    // shows the other cases).
    assert!(archive["held_back_by"].is_null(), "{status}");
    let text = String::from_utf8(s.pgfold(&["status"], &[]).stdout).unwrap();
    assert!(
        text.contains("archive: 1 segments") && !text.contains("held back"),
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
        dry.contains("held back by: order_status (parked at event 0)"),
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
        "order_status (parked at event 0)"
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

/// `pgfold ARGS` (the real binary, with the setup's configuration and `env`),
/// held at `step` (see the test-only hook above) until the file returned exists.
/// A pass held at `deleted` holds its recording transaction open with the
/// segment's rows deleted and its streams recorded.
async fn held(s: &Setup, args: &[&str], step: &str, env: &[(&str, &str)]) -> (Daemon, PathBuf) {
    let resume = s.dir.join(format!("resume-{step}-{}", args.join("_")));
    let config = s.config().to_string();
    let mut all = vec!["--config", config.as_str()];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("PGFOLD_TEST_ARCHIVE_PAUSE", step));
    env.push(("PGFOLD_TEST_ARCHIVE_RESUME", resume.to_str().unwrap()));
    let mut held = Daemon::spawn(&s.bin, &all, &env);
    for step in step.split(',') {
        still_running_after(&mut held, &format!("test pause at {step}")).await;
    }
    (held, resume)
}

/// Waits for `daemon` to write a line with `text`; fails if it exits first.
async fn still_running_after(daemon: &mut Daemon, text: &str) {
    wait_for(text, Duration::from_secs(60), || {
        let seen = daemon.lines().iter().any(|l| l.contains(text));
        let running = daemon.is_running();
        async move { seen || !running }
    })
    .await;
    assert!(
        daemon.is_running(),
        "exited before {text:?}: {}",
        daemon.output()
    );
}

/// Lets a held pass go on, and waits for it to succeed.
fn resume(mut pass: Daemon, file: &Path) {
    std::fs::write(file, "").unwrap();
    let status = pass.wait().unwrap();
    assert!(status.success(), "the pass: {}", pass.output());
}

/// An order stream whose every event a pass of the setup's policies moves (so
/// that it is archived whole), and its last sequence.
async fn a_stream_to_archive_whole(client: &Client) -> (String, i64) {
    let row = client
        .query_one(
            "SELECT stream_id, max(sequence) FROM events WHERE stream_type = 'order'
              GROUP BY stream_id HAVING max(occurred_at) < now() - interval '300 days'
              ORDER BY stream_id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// An append at `sequence`, on a connection of its own, left running.
async fn spawn_append(
    db: &TestDb,
    stream: &str,
    stream_type: &str,
    sequence: i64,
) -> tokio::task::JoinHandle<Result<i64, AppendError>> {
    let writer = db.client().await;
    let e = NewEvent::new(stream, stream_type, "Noted", json!({}));
    tokio::spawn(async move { store::append(&writer, &e, sequence).await })
}

/// Backends of this database waiting for a lock while appending.
async fn appends_waiting(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE 'INSERT INTO events%'",
    )
    .await
}

#[tokio::test]
async fn a_stale_append_racing_a_pass_that_deletes_its_key_is_refused_never_stored_twice() {
    let s = setup(None).await;
    let total = count(&s.client, "SELECT count(*) FROM events").await;
    let (stream, last) = a_stream_to_archive_whole(&s.client).await;
    let (pass, file) = held(&s, &["archive"], "deleted", &[]).await;
    // Stale writers: each read its stream before the pass and appends at a
    // sequence the table still holds, whose row the open recording transaction
    // has deleted. One stream leaves whole, the log stream in part.
    let whole = spawn_append(&s.db, &stream, "order", 1).await;
    let in_part = spawn_append(&s.db, "log-1", "log", 2).await;
    wait_for(
        "both appends to wait for the recording transaction",
        Duration::from_secs(30),
        || async { appends_waiting(&s.client).await == 2 },
    )
    .await;
    resume(pass, &file);

    // Archived whole: refused as archived (55000), naming the stream and its last
    // archived sequence; never a conflict the article's loop would retry forever.
    match whole.await.unwrap() {
        Err(AppendError::Archived { stream_id, message }) => {
            assert_eq!(stream_id, stream);
            assert!(
                message.contains(&stream) && message.contains(&last.to_string()),
                "{message}"
            );
        }
        other => panic!("the stale append to {stream} (archived whole): {other:?}"),
    }
    // Archived in part: the conflict it would have met had the row stayed.
    match in_part.await.unwrap() {
        Err(AppendError::Conflict { sequence: 2, .. }) => {}
        other => panic!("the stale append to log-1 (archived in part): {other:?}"),
    }
    assert_eq!(
        count(
            &s.client,
            &format!("SELECT count(*) FROM events WHERE stream_id = '{stream}'")
        )
        .await,
        0
    );
    let (table, archived) = accounted(&s.client).await;
    assert!(archived > 0);
    assert_eq!(table + archived, total, "an event is in both places");
}

#[tokio::test]
async fn an_append_after_the_newest_event_racing_a_pass_keeps_the_history_consistent() {
    let s = setup(None).await;
    let (stream, last) = a_stream_to_archive_whole(&s.client).await;
    let (pass, file) = held(&s, &["archive"], "deleted", &[]).await;
    // A writer that read the stream before the pass deleted it appends after its
    // newest event: no row of the pass's stands in its way, so it commits while
    // the pass, which cannot see it, records the stream as having left whole.
    let mut writer = s.db.client().await;
    let e = NewEvent::new(&stream, "order", "OrderCancelled", json!({}));
    store::append(&writer, &e, last + 1).await.unwrap();
    resume(pass, &file);

    // One history, the archive's and then the table's: the head counts it, `archive
    // show` prints it, and the stream goes on after it.
    let head: i64 = s
        .client
        .query_one("SELECT pgfold.stream_head($1)", &[&stream])
        .await
        .unwrap()
        .get(0);
    assert_eq!(head, last + 1);
    let shown: Vec<(i64, bool)> = s
        .pgfold_ok(&["archive", "show", &stream], &[])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["sequence"].as_i64().unwrap(),
                v["archived"].as_bool().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(i64, bool)> = (1..=last + 1).map(|q| (q, q <= last)).collect();
    assert_eq!(shown, expected);
    let next = store::append_next(&mut writer, &e).await;
    assert_eq!(next.unwrap().sequence, last + 2);
    // A stale append into its archived part conflicts, and is retried from the
    // table's newest event, as for a stream archived in part.
    assert!(matches!(
        store::append(&writer, &e, last).await,
        Err(AppendError::Conflict { .. })
    ));
}

/// Waits, without blocking the runtime (a proxy may run on it), for `daemon` to
/// exit; its output if it failed.
async fn exited_ok(daemon: &mut Daemon, within: Duration) -> Result<(), String> {
    wait_for("pgfold to exit", within, || {
        let running = daemon.is_running();
        async move { !running }
    })
    .await;
    match daemon.wait().unwrap().success() {
        true => Ok(()),
        false => Err(daemon.output()),
    }
}

#[tokio::test]
async fn a_replay_or_rebuild_whose_connection_is_killed_inside_an_archived_segment_retries_it() {
    let s = setup(None).await;
    s.pgfold_ok(&["archive"], &[]);
    let before = projections(&s.client).await;
    for how in ["--replay", "--rebuild"] {
        // Held inside a segment's transaction, some of the segment applied.
        let (mut run, resume) = held(&s, &["run", "--once", how, "all"], "replay-apply", &[]).await;
        let killed = super::helpers::terminate_daemon_backends(&s.client, &s.db.name).await;
        assert!(killed > 0);
        std::fs::write(&resume, "").unwrap();
        exited_ok(&mut run, Duration::from_secs(120))
            .await
            .unwrap_or_else(|out| panic!("{how} failed:\n{out}"));
        let out = run.output();
        assert!(out.contains("database error; retrying"), "{how}: {out}");
        assert_eq!(projections(&s.client).await, before, "{how}");
    }
}

/// A `--replay all` from an archive on the S3 server, held at `step` while the
/// server goes away (a proxy in front of it is cut), then let go: it must say
/// `retrying` (`said`) and wait, and once the server is back with its objects,
/// complete with the projections as before.
async fn replay_through_an_s3_outage_at(step: &str, said: &str) {
    let mut proxy = super::helpers::Proxy::start(s3_endpoint().trim_start_matches("http://")).await;
    let bucket = format!("b{}", &uuid_like());
    create_bucket(&s3_endpoint(), &bucket);
    let s = setup(Some(&format!("s3://{bucket}/events"))).await;
    let env = s3_env(&format!("http://127.0.0.1:{}", proxy.port));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    s.pgfold_ok(&["archive"], &env);
    assert!(accounted(&s.client).await.1 > 0);
    let before = projections(&s.client).await;
    let (mut replay, resume) = held(&s, &["run", "--once", "--replay", "all"], step, &env).await;
    proxy.cut().await;
    std::fs::write(&resume, "").unwrap();
    still_running_after(&mut replay, said).await;
    proxy.restore().await;
    exited_ok(&mut replay, Duration::from_secs(120))
        .await
        .unwrap_or_else(|out| panic!("the replay failed:\n{out}"));
    assert_eq!(projections(&s.client).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_finds_the_s3_server_down_for_a_moment_retries_and_completes() {
    // Past the check of every segment at start: about to fetch one to apply it.
    replay_through_an_s3_outage_at("replay-fetch", "archive error; retrying").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_before_a_replay_retries_an_s3_server_down_for_a_moment() {
    // About to check the segments, before anything is emptied.
    replay_through_an_s3_outage_at("replay-check", "archive check: archive error; retrying").await;
}

#[tokio::test]
async fn a_segment_missing_when_a_new_projector_reads_the_archive_stops_it_at_once_in_one_line() {
    let s = setup(None).await;
    s.pgfold_ok(&["archive"], &[]);
    let key: String = s
        .client
        .query_one("SELECT object_key FROM pgfold.archive_segments", &[])
        .await
        .unwrap()
        .get(0);
    std::fs::remove_file(s.archive_dir().join(&key)).unwrap();
    // Not a replay, so nothing checks the segments at start: daily_revenue, new
    // again, meets the missing one when it reads the archive. No retry brings it
    // back: the run stops at once, naming it.
    s.client
        .execute(
            "DELETE FROM pgfold.projectors WHERE name = 'daily_revenue'",
            &[],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let out = s.pgfold(
        &["run", "--once", "--projector", "daily_revenue"],
        &[
            ("RUST_LOG", "off"),
            ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "30000"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "retried for {:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("segment 1") && stderr.contains(&key) && stderr.contains("missing"),
        "{stderr}"
    );
}

/// What `status --json` says holds archiving back.
fn held_back_by(s: &Setup) -> Value {
    let status: Value =
        serde_json::from_slice(&s.pgfold(&["status", "--json"], &[]).stdout).unwrap();
    status["archive"]["held_back_by"].clone()
}

/// The `held back by:` line of a dry run, if any.
fn dry_run_holders(s: &Setup) -> Option<String> {
    let dry = s.pgfold_ok(&["archive", "--dry-run"], &[]);
    dry.lines()
        .find_map(|l| l.strip_prefix("held back by: "))
        .map(str::to_string)
}

#[tokio::test]
async fn held_back_by_names_the_rows_whose_checkpoints_keep_old_events_and_nothing_else() {
    let s = setup(None).await;
    // Every projector has consumed every old event. Checkpoints still differ:
    // daily_revenue's stands at the last payment, behind the events of other
    // kinds it never consumes; that holds nothing back.
    let checkpoints = count(
        &s.client,
        "SELECT count(DISTINCT position_id) FROM pgfold.projectors",
    )
    .await;
    assert!(checkpoints > 1);
    assert_eq!(dry_run_holders(&s), None);
    assert_eq!(held_back_by(&s), Value::Null);

    // Parked on its first event: it alone holds back, and says why.
    s.client
        .execute(
            "UPDATE pgfold.projectors SET position_tx = '0', position_id = 0, state = 'failed'
              WHERE name = 'order_status'",
            &[],
        )
        .await
        .unwrap();
    let parked = "order_status (parked at event 0)";
    assert_eq!(dry_run_holders(&s).as_deref(), Some(parked));
    assert_eq!(held_back_by(&s), parked);
    // The log stream's old events leave (order_status never consumes them): a
    // segment for the rebuild below to read.
    s.pgfold_ok(&["archive"], &[]);
    assert_eq!(held_back_by(&s), parked);
    s.pgfold_ok(&["run", "--once"], &[]);
    assert_eq!(dry_run_holders(&s), None);

    // A rebuild beside daily_revenue, held before it reads the archive: its row
    // stands at the first event. It holds back the old orders with a payment,
    // the only events it consumes; the old orders without one may leave.
    let args = ["run", "--once", "--rebuild", "daily_revenue"];
    let (mut rebuild, resume) = held(&s, &args, "replay-fetch", &[]).await;
    let building = "daily_revenue (rebuild) (at event 0)";
    assert_eq!(held_back_by(&s), building);
    let unpaid = count(
        &s.client,
        "SELECT count(*) FROM (SELECT stream_id FROM events WHERE stream_type = 'order'
                                GROUP BY stream_id
                               HAVING max(occurred_at) < now() - interval '300 days'
                                  AND NOT bool_or(event_type = 'OrderPaid')) s",
    )
    .await;
    assert!(unpaid > 0);
    let dry = s.pgfold_ok(&["archive", "--dry-run"], &[]);
    assert!(
        dry.contains(&format!("held back by: {building}\n")),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("whole streams): {unpaid} streams,")),
        "{dry}"
    );
    std::fs::write(&resume, "").unwrap();
    let status = rebuild.wait().unwrap();
    assert!(status.success(), "{}", rebuild.output());
    assert_eq!(dry_run_holders(&s), None);
}

/// The orders left in the table grow a year older, for another pass to move.
async fn age_the_orders_left(client: &Client) {
    client
        .execute(
            "UPDATE events SET occurred_at = occurred_at - interval '1 year'
              WHERE stream_type = 'order'",
            &[],
        )
        .await
        .unwrap();
}

/// The payments in the table: what daily_revenue consumes.
const PAID: &str = "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'";

/// A replay of daily_revenue alone.
const REPLAY_DAILY_REVENUE: [&str; 6] = [
    "run",
    "--once",
    "--replay",
    "daily_revenue",
    "--projector",
    "daily_revenue",
];

/// How many archived segments `projector` has consumed.
async fn archive_applied(client: &Client, projector: &str) -> i64 {
    super::helpers::projector_counter(client, projector, "archive_applied").await
}

/// The JSON log lines of `pgfold ARGS` run with JSON logs at info.
fn json_log(s: &Setup, args: &[&str]) -> Vec<Value> {
    let out = s.pgfold(
        args,
        &[("PGFOLD_LOG__FORMAT", "json"), ("RUST_LOG", "info")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn a_pass_shows_its_progress_as_a_bar_on_a_terminal_and_in_the_logs_otherwise() {
    let s = setup(None).await;
    // Without a terminal: the summary line of the work, with what it moved.
    let lines = json_log(&s, &["archive"]);
    let (archived, last_id) = {
        let row = s
            .client
            .query_one(
                "SELECT sum(events)::bigint, max(last_id) FROM pgfold.archive_segments",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let done = lines
        .iter()
        .find(|l| l["projector"] == "archive pass" && l["message"] == "archived")
        .unwrap_or_else(|| panic!("no summary of the pass in {lines:?}"));
    assert_eq!(done["events_applied"].as_i64(), Some(archived), "{done}");
    assert_eq!(done["position"].as_i64(), Some(last_id), "{done}");

    // On a terminal: a bar, left at 100 % with the summary. Old events again,
    // for a second pass to move.
    age_the_orders_left(&s.client).await;
    let config = s.config().to_string();
    let (code, chunks) = tokio::task::spawn_blocking(move || {
        super::progress::run_on_a_terminal(&["--config", &config, "archive"], &[])
    })
    .await
    .unwrap();
    let screen = super::progress::last_screen(&chunks);
    assert_eq!(code, 0, "{screen}");
    assert!(
        screen.lines().any(|l| l.contains("archive pass [")
            && l.contains("100%")
            && l.contains("archived: ")),
        "{screen}"
    );
}

#[tokio::test]
async fn a_replay_counts_the_archived_events_it_applies_in_its_progress_and_status() {
    let s = setup(None).await;
    let paid = count(&s.client, PAID).await;
    s.pgfold_ok(&["archive"], &[]);
    let in_table = count(&s.client, PAID).await;
    assert!(in_table < paid, "some payments were archived");

    let lines = json_log(&s, &["run", "--once", "--replay", "daily_revenue"]);
    // Every segment fetched and checked before anything is emptied: a piece of
    // work of its own, counted in events.
    let checked = lines
        .iter()
        .find(|l| l["projector"] == "archive check" && l["message"] == "archive checked")
        .unwrap_or_else(|| panic!("no summary of the check in {lines:?}"));
    assert_eq!(
        checked["events_applied"].as_i64(),
        Some(accounted(&s.client).await.1),
        "{checked}"
    );
    let done = lines
        .iter()
        .find(|l| l["projector"] == "daily_revenue" && l["message"] == "caught up")
        .unwrap_or_else(|| panic!("no summary of the replay in {lines:?}"));
    assert_eq!(done["events_applied"].as_i64(), Some(paid), "{done}");
    assert_eq!(
        super::helpers::projector_counter(&s.client, "daily_revenue", "events_applied").await,
        paid
    );
}

#[tokio::test]
async fn status_shows_a_replay_moving_through_the_archive_before_its_checkpoint_moves() {
    let s = setup(None).await;
    let before = count(&s.client, PAID).await;
    s.pgfold_ok(&["archive"], &[]);
    let in_first = before - count(&s.client, PAID).await;
    assert!(in_first > 0);
    // The orders left in the table grow old: a second segment.
    age_the_orders_left(&s.client).await;
    s.pgfold_ok(&["archive"], &[]);
    let first_last_id = count(
        &s.client,
        "SELECT last_id FROM pgfold.archive_segments WHERE segment = 1",
    )
    .await;
    assert_eq!(
        count(&s.client, "SELECT count(*) FROM pgfold.archive_segments").await,
        2
    );

    // Held after the first segment, before the second commits.
    let (mut replay, resume) = held(&s, &REPLAY_DAILY_REVENUE, "replay-apply-2", &[]).await;
    let status: Value =
        serde_json::from_slice(&s.pgfold(&["status", "--json"], &[]).stdout).unwrap();
    let p = status["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "daily_revenue")
        .unwrap();
    assert_eq!(p["state"], "replaying", "{p}");
    assert_eq!(p["replay"]["position"], first_last_id, "{p}");
    assert_eq!(p["events_applied"], in_first, "{p}");
    std::fs::write(&resume, "").unwrap();
    assert!(replay.wait().unwrap().success(), "{}", replay.output());
    assert_eq!(
        super::helpers::projector_counter(&s.client, "daily_revenue", "events_applied").await,
        before
    );
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
    let left: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM events WHERE stream_id = $1",
            &[&order],
        )
        .await
        .unwrap()
        .get(0);
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

#[tokio::test]
async fn a_stream_set_replay_applies_consecutive_segments_in_one_transaction() {
    // Two segments of orders archived whole, then the rest of the log.
    let s = setup(None).await;
    let args = [
        "run",
        "--once",
        "--replay",
        "order_snapshots",
        "--projector",
        "order_snapshots",
    ];
    s.pgfold_ok(&["archive"], &[]);
    age_the_orders_left(&s.client).await;
    // The snapshots from one segment and the table, as the aged log has them.
    s.pgfold_ok(&args, &[]);
    let before = projections(&s.client).await;
    s.pgfold_ok(&["archive"], &[]);
    assert_eq!(
        count(&s.client, "SELECT count(*) FROM pgfold.archive_segments").await,
        2
    );
    s.pgfold_ok(&args, &[]);
    assert!(
        projections(&s.client).await == before,
        "the snapshots from two segments differ from those from one and the table"
    );
    // A segment cut by id holds a few events of each of many streams: applied
    // one by one, a stream's snapshot would be written by one segment's
    // transaction and rewritten by the next. Both segments' snapshots come from
    // one transaction.
    assert_eq!(
        count(
            &s.client,
            "SELECT count(DISTINCT o.xmin::text) FROM order_snapshots o
               JOIN pgfold.archived_streams a USING (stream_id)"
        )
        .await,
        1
    );
    assert_eq!(archive_applied(&s.client, "order_snapshots").await, 2);
}

/// A pass records a stream that leaves whole over several of its segments
/// once, at its first segment, as it will be once the pass is done: its last
/// sequence, whole, and the id of its last event, with `segment` open
/// (src/archive/pass.rs, `StreamRecord`). Killed with segments 1 to 7 recorded
/// and the rest not (an order's three events lie some 1,400 ids apart:
/// segments of 300 put them in three segments), every order caught in the
/// middle is recorded so, still shows its whole history, archive and table, and
/// takes an append after its newest event; after the next pass the histories
/// are the same, all archived.
#[tokio::test]
async fn a_pass_killed_between_a_streams_segments_leaves_its_history_whole() {
    let s = setup(None).await;
    let small = ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300");
    pass_killed_at(&s, "recorded-7", &[small]).await;
    // One recorded with events still in the table is one the pass was in the
    // middle of.
    let caught: Vec<(String, i64)> = pairs(
        &s.client,
        "SELECT a.stream_id, a.first_segment FROM pgfold.archived_streams a
          WHERE a.stream_id LIKE 'order-%'
            AND EXISTS (SELECT 1 FROM events e WHERE e.stream_id = a.stream_id)
          ORDER BY a.first_segment, a.stream_id LIMIT 10",
    )
    .await;
    assert!(!caught.is_empty(), "a stream caught between its segments");
    let mut histories = Vec::new();
    for (stream, _) in &caught {
        let shown = shown_events(&s, stream);
        let sequences: Vec<i64> = shown.iter().map(|e| e.1).collect();
        assert_eq!(
            sequences,
            (1..=shown.len() as i64).collect::<Vec<_>>(),
            "{stream}: {shown:?}"
        );
        assert!(
            shown.iter().any(|e| e.2) && shown.iter().any(|e| !e.2),
            "{stream}: in the archive and in the table: {shown:?}"
        );
        // Recorded once, final: its newest event, still in the table, is its
        // last sequence and bounds it.
        let newest = shown.last().expect("shown above");
        let recorded: Vec<(i64, i64)> = s
            .client
            .query(
                "SELECT last_sequence, last_id FROM pgfold.archived_streams
                  WHERE stream_id = $1 AND whole AND segment = $2",
                &[stream, &i64::MAX],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(recorded, vec![(newest.1, newest.0)], "{stream}");
        histories.push(shown);
    }
    // Whole, with events in the table: the stream takes an append after its
    // newest event (the append guard, V14), and shows it.
    let (stream, _) = &caught[0];
    let next = histories[0].len() as i64 + 1;
    s.client
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, sequence, payload)
             VALUES ($1, 'order', 'OrderNoted', $2, '{}')",
            &[stream, &next],
        )
        .await
        .expect("an append after the newest event of a stream caught mid-pass");
    assert_eq!(shown_events(&s, stream).len() as i64, next);
    s.client
        .execute(
            "DELETE FROM events WHERE stream_id = $1 AND sequence = $2",
            &[stream, &next],
        )
        .await
        .unwrap();
    s.pgfold_ok(&["archive"], &[small]);
    // The same events, now all in the archive.
    let ids = |h: Vec<(i64, i64, bool)>| h.into_iter().map(|e| (e.0, e.1)).collect::<Vec<_>>();
    for ((stream, _), before) in caught.iter().zip(histories) {
        let after = shown_events(&s, stream);
        assert!(
            after.iter().all(|e| e.2),
            "{stream}: all archived: {after:?}"
        );
        assert_eq!(ids(after), ids(before), "{stream}");
    }
}

/// A pass chooses in two halves on two connections while the application is
/// quiet (src/archive/choice.rs), and moves exactly what the dry run, which
/// chooses in one statement, said it would: every order whole, none twice.
/// The second half's rows are held 100 at a time here, so that most of them
/// are copied as the server sends them.
#[tokio::test]
async fn a_choice_in_two_halves_moves_what_one_statement_chooses() {
    let s = setup(None).await;
    // Per policy, the streams and events of its line.
    let moved = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("policy "))
            .map(|l| {
                let counts = l.split(": ").nth(1).unwrap_or_default();
                counts.split(", ").take(2).collect::<Vec<_>>().join(", ")
            })
            .collect()
    };
    let dry = moved(&s.pgfold_ok(&["archive", "--dry-run"], &[]));
    assert!(
        !dry.is_empty() && !dry[0].starts_with("0 streams"),
        "{dry:?}"
    );
    let out = s.pgfold(
        &["archive"],
        &[
            ("PGFOLD_TEST_ARCHIVE_SPLIT", "100"),
            ("RUST_LOG", "pgfold=debug"),
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let copied: usize = stderr
        .lines()
        .find(|l| l.contains("chose in two halves"))
        .and_then(|l| l.split("copied=").nth(1))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no choice in two halves: {stderr}"));
    assert!(copied > 100, "past the rows held: {copied}");
    assert_eq!(moved(&stdout), dry, "{stdout}");
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams a JOIN events e USING (stream_id)
              WHERE e.stream_type = 'order'"
        )
        .await,
        0,
        "no order both archived and in the table"
    );
}

/// A pass writes each stream to `archived_streams` once: a stream its segments
/// cut in several is written by its first segment's transaction, not again by
/// its last's.
#[tokio::test]
async fn a_pass_writes_each_stream_it_moves_once() {
    let s = setup(None).await;
    let small = ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300");
    s.pgfold_ok(&["archive"], &[small]);
    let segments = count(&s.client, "SELECT count(*) FROM pgfold.archive_segments").await;
    assert!(segments > 3, "segments: {segments}");
    let straddling = count(
        &s.client,
        &format!(
            "SELECT count(*) FROM pgfold.archived_streams WHERE segment = {}",
            i64::MAX
        ),
    )
    .await;
    assert!(straddling > 0, "streams over several segments");
    // Each row was last written by the transaction that recorded the segment
    // of its first event (an update at its last segment would be a later one).
    assert_eq!(
        count(
            &s.client,
            "SELECT count(*) FROM pgfold.archived_streams a
               JOIN pgfold.archive_segments g ON g.segment = a.first_segment
              WHERE a.xmin::text <> g.xmin::text"
        )
        .await,
        0
    );
}

/// An older pgfold's pass, beside this one after migration V17, updates a
/// stream's `segment` and `last_sequence` and knows nothing of `last_id`: the
/// bound it leaves stale is forgotten, and `archive show` reads by `segment`.
#[tokio::test]
async fn an_older_pass_updating_a_stream_forgets_its_id_bound() {
    let s = setup(None).await;
    let small = ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300");
    s.pgfold_ok(&["archive"], &[small]);
    let (stream, _): (String, i64) = pairs(
        &s.client,
        &format!(
            "SELECT stream_id, last_id FROM pgfold.archived_streams
              WHERE segment = {} AND last_id IS NOT NULL LIMIT 1",
            i64::MAX
        ),
    )
    .await
    .remove(0);
    let before = shown_events(&s, &stream);
    // What an older pass writes when a later segment holds more of a stream.
    s.client
        .execute(
            "UPDATE pgfold.archived_streams
                SET segment = (SELECT max(segment) FROM pgfold.archive_segments),
                    last_sequence = last_sequence + 1
              WHERE stream_id = $1",
            &[&stream],
        )
        .await
        .unwrap();
    let last_id: Option<i64> = s
        .client
        .query_one(
            "SELECT last_id FROM pgfold.archived_streams WHERE stream_id = $1",
            &[&stream],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last_id, None);
    assert_eq!(shown_events(&s, &stream), before);
}

/// `archive show STREAM`: each event's id, sequence, and whether it is
/// archived.
fn shown_events(s: &Setup, stream: &str) -> Vec<(i64, i64, bool)> {
    s.pgfold_ok(&["archive", "show", stream], &[])
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            let archived = e["archived"].as_bool().unwrap();
            (
                e["id"].as_i64().unwrap(),
                e["sequence"].as_i64().unwrap(),
                archived,
            )
        })
        .collect()
}

/// A set fold's replay of several segments stages the next segment on a second
/// connection while it folds one (src/worker/archived.rs, `apply_in_two_lanes`),
/// and still commits them in order: held with segment 1 applied and not
/// committed, it has reached segment 2's fetch; resumed, the projection equals
/// the one before, and the segments were consumed one after another.
#[tokio::test]
async fn a_set_fold_replay_stages_the_next_segment_while_it_folds_one() {
    let s = setup(None).await;
    s.pgfold_ok(
        &["archive"],
        &[("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300")],
    );
    let segments = count(&s.client, "SELECT count(*) FROM pgfold.archive_segments").await;
    assert!(segments >= 3, "{segments} segments");
    s.pgfold_ok(&REPLAY_DAILY_REVENUE, &[]);
    let before = projections(&s.client).await;

    // One connection would fetch segment 2 only once segment 1 is committed.
    let (replay, resume_file) = held(
        &s,
        &REPLAY_DAILY_REVENUE,
        "replay-apply-1,replay-fetch-2",
        &[],
    )
    .await;
    assert_eq!(
        archive_applied(&s.client, "daily_revenue").await,
        0,
        "nothing committed while segment 1 is held"
    );
    resume(replay, &resume_file);
    assert!(
        projections(&s.client).await == before,
        "replayed in two lanes"
    );
    assert_eq!(archive_applied(&s.client, "daily_revenue").await, segments);
}

/// A pass of several segments records each on a connection of its own, one
/// transaction at a time. A SIGKILL with segment 2's recording transaction open
/// (segment 1 recorded), or once segment 1 is recorded, loses nothing and counts
/// nothing twice; the next pass moves the rest, and a rebuild from the archive
/// equals the projections before.
#[tokio::test]
async fn a_sigkill_between_the_segments_of_one_pass_loses_nothing() {
    let small = ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "500");
    for step in ["deleted-2", "recorded-1"] {
        let s = setup(None).await;
        let before = projections(&s.client).await;
        let total = count(&s.client, "SELECT count(*) FROM events").await;
        pass_killed_at(&s, step, &[small]).await;
        let (table, archived) = accounted(&s.client).await;
        assert_eq!(table + archived, total, "after a SIGKILL at {step}");
        let segments = "SELECT count(*) FROM pgfold.archive_segments";
        assert_eq!(
            count(&s.client, segments).await,
            1,
            "after a SIGKILL at {step}"
        );

        s.pgfold_ok(&["archive"], &[small]);
        let (table, archived) = accounted(&s.client).await;
        assert_eq!(
            table + archived,
            total,
            "after the pass that followed {step}"
        );
        let recorded = count(&s.client, segments).await;
        assert!(recorded > 2, "{recorded} segments");
        s.pgfold_ok(&["archive", "verify"], &[]);
        s.pgfold_ok(&["run", "--once", "--rebuild", "all"], &[]);
        assert_eq!(projections(&s.client).await, before, "rebuilt after {step}");
    }
}

/// Commits in the test's database as `pg_stat_database` has them now.
async fn commits_so_far(client: &Client) -> i64 {
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    count(
        client,
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
          WHERE datname = current_database()",
    )
    .await
}

/// A pass held between its first and second segments for a little over a
/// second (the rate of commits is taken over a second,
/// src/archive/yielding.rs), with an application committing small transactions
/// meanwhile or not: the pass's log.
/// The application writing: one connection committing inserts into a table
/// of its own as fast as it can.
struct ApplicationWrites {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: tokio::task::JoinHandle<()>,
}

impl ApplicationWrites {
    /// Starts writing, and returns once the writes show in the statistics a
    /// pass reads.
    async fn start(s: &Setup) -> ApplicationWrites {
        s.client
            .batch_execute("CREATE TABLE app_writes (n int)")
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, db) = (stop.clone(), s.db.url.clone());
            tokio::spawn(async move {
                let client = super::helpers::connect(&db).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    client
                        .execute("INSERT INTO app_writes VALUES (1)", &[])
                        .await
                        .unwrap();
                }
            })
        };
        let before = commits_so_far(&s.client).await;
        wait_for(
            "the writes in pg_stat_database",
            Duration::from_secs(30),
            || {
                let client = &s.client;
                async move { commits_so_far(client).await > before + 500 }
            },
        )
        .await;
        ApplicationWrites { stop, writer }
    }

    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.writer.await.unwrap();
    }
}

async fn pass_held_while(application_writes: bool) -> String {
    let s = setup(None).await;
    let (mut pass, resume_file) = held(
        &s,
        &["archive"],
        "uploaded-2",
        &[
            ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300"),
            ("RUST_LOG", "pgfold=info,pgfold::archive::priority=debug"),
        ],
    )
    .await;
    let held_at = std::time::Instant::now();
    let writer = match application_writes {
        true => Some(ApplicationWrites::start(&s).await),
        false => None,
    };
    // The pass takes the rate of commits over a second at least: held for
    // less, it could not tell a quiet database from a busy one.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(held_at.elapsed())).await;
    let (table, archived) = accounted(&s.client).await;
    let total = table + archived;
    std::fs::write(&resume_file, "").unwrap();
    // Awaited, not waited for: the writer shares this test's thread, and
    // stopped while it blocked, the pass saw the application go quiet.
    wait_for("the pass to end", Duration::from_secs(60), || {
        let running = pass.is_running();
        async move { !running }
    })
    .await;
    let status = pass.wait().unwrap();
    if let Some(writer) = writer {
        writer.stop().await;
    }
    assert!(status.success(), "the pass: {}", pass.output());
    let (table, archived) = accounted(&s.client).await;
    assert_eq!(table + archived, total);
    assert!(archived > 300, "more than one segment archived");
    pass.output()
}

/// The niceness of each thread of process `pid`: (thread name, niceness).
fn thread_niceness(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // ended meanwhile
        };
        // "tid (name) state ppid ...": niceness is the 19th field, the 17th
        // after the name.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        threads.push((name, nice));
    }
    threads
}

#[tokio::test]
async fn an_interval_pass_under_writes_lowers_its_own_threads_and_not_the_projectors() {
    let s = setup(None).await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[archive]\n", "[archive]\ninterval = \"1s\"\n"),
    )
    .unwrap();
    let writer = ApplicationWrites::start(&s).await;
    let (mut daemon, resume_file) = held(
        &s,
        &["run"],
        "uploaded-2",
        &[
            ("PGFOLD_TEST_ARCHIVE_SEGMENT_EVENTS", "300"),
            ("RUST_LOG", "pgfold=info,pgfold::archive::priority=debug"),
        ],
    )
    .await;
    let ours = thread_niceness(std::process::id())[0].1;
    // The pass takes the rate of commits over a second at least.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    std::fs::write(&resume_file, "").unwrap();
    still_running_after(&mut daemon, "archive pass done").await;
    writer.stop().await;
    let log = daemon.output();
    assert!(log.contains("the pass's threads reniced nice=15"), "{log}");
    // The rest of the daemon (projectors, its runtime) kept its priority; the
    // threads of a later pass, if one runs now, are the pass's own.
    let threads = thread_niceness(daemon.pid());
    assert!(
        threads
            .iter()
            .all(|(name, nice)| name == "pgfold-archive" || *nice == ours),
        "{threads:?} (this test runs at {ours})"
    );
    daemon.stop(Duration::from_secs(10)).unwrap();
}

#[tokio::test]
async fn a_pass_rests_while_the_application_writes_and_runs_flat_out_otherwise() {
    let writing = "the application is writing";
    let overlapping = "each segment is recorded while the next is read";
    // `pgfold archive` has its process to itself: its threads give the
    // writers' server processes the cores first while they write.
    let reniced = "the pass's threads reniced nice=15";
    let log = pass_held_while(true).await;
    assert!(log.contains(writing), "{log}");
    assert!(!log.contains(overlapping), "{log}");
    assert!(log.contains(reniced), "{log}");
    let log = pass_held_while(false).await;
    assert!(!log.contains(writing), "{log}");
    assert!(log.contains(overlapping), "{log}");
    assert!(!log.contains(reniced), "{log}");
}
