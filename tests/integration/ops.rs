//! The operator's surface over real HTTP: health, readiness, Prometheus metrics;
//! and the documented `status --json` shape.

use std::time::Duration;

use pgfold::daemon::RunOptions;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served_over_http() {
    let db = TestDb::new().await;
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = db.settings();
    settings.http.listen = Some(address.clone());
    let daemon = RunningDaemon::start(settings, RunOptions::default());
    let mut client = db.client().await;

    wait_for("/readyz to answer 200", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(&address).await.is_ok()
            && get(&address, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(get(&address, "/healthz").await, (200, "ok\n".to_string()));
    append_all(
        &mut client,
        &[
            created("order-1", "books", json!("4.00"), 1),
            paid("order-1", "books", json!("4.00"), 1),
        ],
    )
    .await;

    wait_for(
        "the metrics to count both events",
        Duration::from_secs(10),
        || async {
            let (status, body) = get(&address, "/metrics").await;
            status == 200
                && body.contains("pgfold_events_applied_total{projector=\"order_snapshots\"} 2")
                && body.contains("pgfold_events_applied_total{projector=\"daily_revenue\"} 1")
        },
    )
    .await;
    let (_, body) = get(&address, "/metrics").await;
    for expected in [
        "pgfold_events_applied_total{projector=\"daily_revenue\"} 1",
        "pgfold_lag_events{projector=\"order_snapshots\"} 0",
        "pgfold_lag_seconds{projector=\"daily_revenue\"} 0",
        "pgfold_projector_state{projector=\"order_snapshots\",state=\"running\"} 1",
        "pgfold_dead_letters{projector=\"daily_revenue\"} 0",
        "pgfold_errors_total{projector=\"daily_revenue\"} 0",
        "pgfold_batch_duration_seconds_bucket{",
        "pgfold_horizon_stall_seconds ",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
    assert_eq!(get(&address, "/nothing").await.0, 404);

    // Readiness follows the schema: a database that lacks a migration is not ready.
    let latest = pgfold::db::migrate::latest();
    let name: String = client
        .query_one(
            "DELETE FROM pgfold.schema_migrations WHERE version = $1 RETURNING name",
            &[&latest],
        )
        .await
        .unwrap()
        .get(0);
    let (status, body) = get(&address, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("not migrated"), "{body}");
    client
        .execute(
            "INSERT INTO pgfold.schema_migrations (version, name) VALUES ($1, $2)",
            &[&latest, &name],
        )
        .await
        .unwrap();
    assert_eq!(get(&address, "/readyz").await.0, 200);

    daemon.stop().await;
    assert!(
        tokio::net::TcpStream::connect(&address).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn status_json_has_the_documented_shape() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    append_all(
        &mut client,
        &[created("order-1", "books", json!("4.00"), 1)],
    )
    .await;
    run_once(&db.settings(), RunOptions::default()).await;
    append_all(&mut client, &[paid("order-1", "books", json!("4.00"), 1)]).await;

    let out = pgfold(&["status", "--json"], &[("DATABASE_URL", &db.url)]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&status),
        ["archive", "horizon_blocked_by", "projectors"]
    );
    assert_eq!(
        keys(&status["archive"]),
        [
            "bytes",
            "events",
            "held_back_by",
            "last_pass_age_seconds",
            "last_pass_at",
            "last_pass_events",
            "segments"
        ]
    );
    let revenue = &status["projectors"][0];
    assert_eq!(
        keys(revenue),
        [
            "dead_letters",
            "definition_changed",
            "events_applied",
            "failing_event",
            "fingerprint",
            "lag_events",
            "lag_seconds",
            "last_advanced_at",
            "last_error",
            "name",
            "position",
            "rebuild",
            "replay",
            "state"
        ]
    );
    assert_eq!(revenue["name"], "daily_revenue");
    assert_eq!(revenue["state"], "running");
    assert!(revenue["replay"].is_null(), "not replaying: {revenue}");
    assert!(revenue["rebuild"].is_null(), "not rebuilding: {revenue}");
    assert_eq!(revenue["fingerprint"], "v1");
    assert_eq!(revenue["definition_changed"], false);
    assert_eq!(
        revenue["lag_events"], 1,
        "the OrderPaid appended after the run"
    );
    assert_eq!(status["projectors"][1]["lag_events"], 1);
    assert!(revenue["lag_seconds"].as_f64().unwrap() >= 0.0);

    let table = pgfold(&["status"], &[("DATABASE_URL", &db.url)]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("PROJECTOR"), "{text}");
    assert!(text.contains("order_snapshots  running"), "{text}");
}

#[tokio::test]
async fn the_demo_appends_orders_and_shows_revenue_live() {
    // The demo creates its own database on the server; point it at a fresh name.
    let db = TestDb::empty().await;
    let demo = format!("{}_demo", db.name);
    let admin = db.client().await;

    let out = pgfold(
        &[
            "demo",
            "--database",
            &demo,
            "--rate",
            "40",
            "--seconds",
            "3",
        ],
        &[("DATABASE_URL", &db.url)],
    );

    // Drop the demo database before asserting, so a failure leaves nothing behind.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {demo} WITH (FORCE)"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("today's revenue by category"), "{stdout}");
    assert!(stdout.contains("order_snapshots  running"), "{stdout}");
    // The last screen shows revenue rows.
    let last = stdout.rsplit("today's revenue").next().unwrap();
    assert!(
        last.lines().any(|l| l.starts_with("  ") && l.contains('.')),
        "no revenue row: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping_and_sigterm_exits_0() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[
            ("DATABASE_URL", &db.url),
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // 400 ms: the daemon pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut received: Vec<String> = Vec::new();
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification within 15 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };

    received.push(next());
    assert_eq!(received[0].trim(), "READY=1", "first notification");
    for _ in 0..2 {
        received.push(next());
    }
    assert!(
        received[1..].iter().all(|m| m.trim() == "WATCHDOG=1"),
        "{received:?}"
    );

    let status = daemon
        .terminate(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; stderr: {:?}",
        daemon.lines()
    );
    let mut rest = Vec::new();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 512];
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}

#[tokio::test]
async fn a_replay_off_a_terminal_reports_its_progress_as_structured_logs() {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 2_000)
        .await
        .unwrap();

    let out = pgfold(
        &["run", "--once", "--replay", "all"],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFOLD_LOG__FORMAT", "json"),
            ("RUST_LOG", "info"),
            ("PGFOLD_DAEMON__BATCH_SIZE", "500"),
        ],
    );

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    for projector in ["daily_revenue", "order_snapshots"] {
        let done = lines
            .iter()
            .find(|l| l["message"] == "caught up" && l["projector"] == projector)
            .unwrap_or_else(|| panic!("no 'caught up' line for {projector}: {lines:?}"));
        assert!(done["events_applied"].as_u64().unwrap() > 0, "{done}");
        assert!(done["events_per_second"].is_u64(), "{done}");
    }
}

/// Every task the daemon starts ends with it: once `run --once` has returned,
/// nothing it spawned still holds the shutdown future it was given (it used to
/// live on in a detached forwarding task), and the HTTP port is free again.
#[tokio::test]
async fn a_finished_run_holds_on_to_nothing_it_started() {
    let db = TestDb::new().await;
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = db.settings();
    settings.http.listen = Some(address.clone());
    let (guard, released) = tokio::sync::oneshot::channel::<()>();
    // The sender lives in the shutdown future: it is dropped with the future.
    let shutdown = async move {
        let _guard = guard;
        std::future::pending::<()>().await
    };
    let options = RunOptions {
        once: true,
        ..RunOptions::default()
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(300),
        pgfold::daemon::run(
            &settings,
            &pgfold::projectors::builtin(),
            &options,
            shutdown,
        ),
    )
    .await
    .expect("run --once did not finish within 300 s")
    .expect("run --once failed");
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let mut released = released;
    assert_eq!(
        released.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed),
        "the shutdown future outlived the run that was given it"
    );
    tokio::net::TcpListener::bind(&address)
        .await
        .expect("the HTTP port is still taken after the run returned");
}
