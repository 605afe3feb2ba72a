//! Issue 3, connections: killed backends and a dropped LISTEN connection are
//! survived and caught up; an unreachable database fails `run --once` quickly and
//! clearly. (Restarting PostgreSQL itself is left out: the server is shared by the
//! tests running in parallel.)

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use crate::helpers::*;

async fn applied(client: &Client) -> i64 {
    scalar_i64(
        client,
        "SELECT coalesce(sum(events_applied), 0)::bigint FROM pgfold.projectors",
    )
    .await
}

async fn projections_exact(client: &Client) -> bool {
    pgfold::testkit::workload::projection_differences(client)
        .await
        .unwrap()
        == (0, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_every_daemon_backend_while_events_arrive_is_survived_exactly() {
    let db = TestDb::new().await;
    let observer = db.client().await;
    let mut daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFOLD_LOG__FORMAT", "json"),
            ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "200"),
            ("PGFOLD_DAEMON__BATCH_SIZE", "20"),
            ("PGFOLD_DAEMON__SET_BATCH_SIZE", "30"),
        ],
    );

    // A writer that keeps appending orders until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        let mut client = db.client().await;
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let order = format!("order-{n}");
                let mut events = vec![
                    created(&order, "books", json!(format!("{n}.25")), 1 + n % 3),
                    paid(&order, "books", json!(format!("{n}.25")), 1 + n % 3),
                ];
                if n % 3 == 0 {
                    events.push(shipped(&order, "2 Dock Lane"));
                }
                append_all(&mut client, &events).await;
                written.fetch_add(events.len() as i64, Ordering::Relaxed);
            }
        })
    };

    let mut terminated_total = 0;
    for round in 0..3 {
        let before = applied(&observer).await;
        wait_for(
            "the daemon to have backends and be applying events",
            Duration::from_secs(30),
            || async {
                !daemon_backends(&observer, &db.name).await.is_empty()
                    && applied(&observer).await > before + 10
            },
        )
        .await;
        let old = daemon_backends(&observer, &db.name).await;
        let terminated = terminate_daemon_backends(&observer, &db.name).await;
        assert!(terminated > 0, "round {round}: nothing terminated");
        terminated_total += terminated;
        let at_kill = applied(&observer).await;
        wait_for(
            "new backends, and progress after the termination",
            Duration::from_secs(30),
            || async {
                let now = daemon_backends(&observer, &db.name).await;
                now.iter().any(|pid| !old.contains(pid)) && applied(&observer).await > at_kill + 10
            },
        )
        .await;
        assert!(
            daemon.is_running(),
            "round {round}: pgfold run exited after its backends were terminated: {:?}",
            daemon.lines()
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!(
        "terminated {terminated_total} backends over 3 rounds; {} events written",
        written.load(Ordering::Relaxed)
    );

    wait_for(
        "the projections to equal the independent folds",
        Duration::from_secs(60),
        || projections_exact(&observer),
    )
    .await;
    assert!(daemon.is_running(), "{:?}", daemon.lines());
    // Nothing applied twice: each projector applied each event it consumes once.
    let paid_events = scalar_i64(
        &observer,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await;
    let order_events = scalar_i64(&observer, "SELECT count(*) FROM events").await;
    assert_eq!(
        scalar_i64(
            &observer,
            "SELECT events_applied FROM pgfold.projectors WHERE name = 'daily_revenue'"
        )
        .await,
        paid_events
    );
    assert_eq!(
        scalar_i64(
            &observer,
            "SELECT events_applied FROM pgfold.projectors WHERE name = 'order_snapshots'"
        )
        .await,
        order_events
    );
    // The operator can tell: the lost connections were logged.
    daemon.kill();
    let warnings = daemon
        .lines()
        .iter()
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
        .count();
    assert!(warnings > 0, "the terminations went unlogged");
}

async fn listen_backend(client: &Client, dbname: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'pgfold' AND query ILIKE 'LISTEN%'",
            &[&dbname],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn armed(client: &Client) -> bool {
    client
        .query_opt("SELECT armed FROM pgfold.wakeup WHERE id = 1", &[])
        .await
        .unwrap()
        .is_some_and(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listen_connection_still_delivers_new_events_promptly() {
    let db = TestDb::new().await;
    let observer = db.client().await;
    let mut writer = db.client().await;
    // Polling is a minute away: only notifications or a reconnect deliver promptly.
    let mut daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "60000"),
        ],
    );
    wait_for(
        "the daemon to LISTEN and arm the wake-up",
        Duration::from_secs(15),
        || async { listen_backend(&observer, &db.name).await.is_some() && armed(&observer).await },
    )
    .await;
    append_all(
        &mut writer,
        &[created("order-1", "books", json!("1.00"), 1)],
    )
    .await;
    wait_for(
        "order-1 to be projected through NOTIFY",
        Duration::from_secs(2),
        || snapshot_exists(&observer, "order-1"),
    )
    .await;

    let listener = listen_backend(&observer, &db.name).await.unwrap();
    let terminated: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&listener])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    // Appended right away, before the daemon can have noticed.
    append_all(
        &mut writer,
        &[created("order-2", "books", json!("2.00"), 1)],
    )
    .await;
    let started = Instant::now();
    wait_for(
        "order-2 to be projected after the LISTEN connection was terminated",
        Duration::from_secs(3),
        || snapshot_exists(&observer, "order-2"),
    )
    .await;
    eprintln!(
        "order-2 projected {:?} after the termination",
        started.elapsed()
    );

    wait_for(
        "a new LISTEN connection",
        Duration::from_secs(10),
        || async {
            listen_backend(&observer, &db.name)
                .await
                .is_some_and(|pid| pid != listener)
                && armed(&observer).await
        },
    )
    .await;
    append_all(
        &mut writer,
        &[created("order-3", "books", json!("3.00"), 1)],
    )
    .await;
    wait_for(
        "order-3 to be projected through the new LISTEN connection",
        Duration::from_secs(2),
        || snapshot_exists(&observer, "order-3"),
    )
    .await;
    assert!(daemon.is_running(), "{:?}", daemon.lines());
    daemon.kill();
    assert_projections_exact(&observer).await;
}

/// Runs the binary, killing it if it has not exited by `deadline`.
fn pgfold_within(
    args: &[&str],
    env: &[(&str, &str)],
    deadline: Duration,
) -> (Option<std::process::Output>, Duration) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgfold"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgfold");
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (Some(out), started.elapsed());
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_fails_fast_with_one_line(url: &str, what: &str) {
    let (out, took) = pgfold_within(
        &["run", "--once"],
        &[
            ("DATABASE_URL", url),
            ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "500"),
        ],
        Duration::from_secs(20),
    );
    let out = out.unwrap_or_else(|| panic!("{what}: run --once still running after {took:?}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pgfold: "))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: one error line: {stderr}");
    assert!(
        errors[0].contains("cannot connect"),
        "{what}: {}",
        errors[0]
    );
    assert!(
        took < Duration::from_secs(5),
        "{what}: took {took:?} with connect_timeout_ms = 500"
    );
}

#[tokio::test]
async fn run_once_against_an_unreachable_database_fails_within_the_connect_timeout() {
    assert_fails_fast_with_one_line("postgres://app@127.0.0.1:1/shop", "connection refused");
    assert_fails_fast_with_one_line("postgres://app@no-such-host.invalid/shop", "unknown host");
}

#[tokio::test]
async fn run_once_against_a_server_that_never_answers_fails_within_the_connect_timeout() {
    // Accepts TCP connections and never says a word (a hung server or proxy).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    assert_fails_fast_with_one_line(
        &format!("postgres://app@127.0.0.1:{port}/shop"),
        "silent server",
    );
}
