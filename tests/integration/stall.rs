//! Issue 3, a transaction that holds the horizon back: the daemon names the
//! blocking backend in its log and in `status`, and never skips past it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const BLOCKER_QUERY: &str = "INSERT INTO scratch VALUES (4242)";

/// Whether a JSON log line is the stall warning naming `pid`: its pid, its state
/// "idle in transaction", its age and the start of its query.
fn names_the_blocker(line: &str, pid: i32) -> bool {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
        return false;
    };
    let values: Vec<&Value> = fields.values().collect();
    let has_pid = values.iter().any(|v| v.as_i64() == Some(i64::from(pid)));
    let has_state = values
        .iter()
        .any(|v| v.as_str() == Some("idle in transaction"));
    let has_query = values
        .iter()
        .any(|v| v.as_str().is_some_and(|s| s.contains(BLOCKER_QUERY)));
    let has_age = fields
        .iter()
        .any(|(k, v)| k.contains("age") && v.as_f64().is_some_and(|age| age >= 0.3));
    let is_warning = fields
        .get("level")
        .and_then(Value::as_str)
        .is_some_and(|l| l.eq_ignore_ascii_case("warn"));
    has_pid && has_state && has_query && has_age && is_warning
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_in_transaction_session_is_named_and_never_skipped() {
    let db = TestDb::new().await;
    let mut writer = db.client().await;
    writer
        .batch_execute("CREATE TABLE scratch (x int)")
        .await
        .unwrap();
    append_all(
        &mut writer,
        &[
            created("order-1", "books", json!("10.00"), 1),
            paid("order-1", "books", json!("10.00"), 1),
        ],
    )
    .await;
    let mut daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[
            ("DATABASE_URL", &db.url),
            ("RUST_LOG", "warn"),
            ("PGFOLD_LOG__FORMAT", "json"),
            ("PGFOLD_DAEMON__STALL_WARN_AFTER_MS", "300"),
            ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "200"),
        ],
    );
    let observer = db.client().await;
    wait_for(
        "the events before the blocker to be projected",
        Duration::from_secs(15),
        || async {
            snapshot_exists(&observer, "order-1").await
                && scalar_i64(&observer, "SELECT count(*) FROM daily_revenue").await == 1
        },
    )
    .await;

    // A session takes a transaction id (it writes elsewhere) and goes idle.
    let blocker = db.client().await;
    let pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker.execute(BLOCKER_QUERY, &[]).await.unwrap();
    let holds_xid: bool = observer
        .query_one(
            "SELECT backend_xid IS NOT NULL AND state = 'idle in transaction'
               FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(holds_xid, "the test's blocker holds no transaction id");

    // Events committed after the blocker took its id.
    append_all(
        &mut writer,
        &[
            created("order-2", "toys", json!("3.00"), 2),
            paid("order-2", "toys", json!("3.00"), 2),
            created("order-3", "games", json!(1), 1),
        ],
    )
    .await;
    let first_after = scalar_i64(
        &observer,
        "SELECT min(id) FROM events WHERE stream_id = 'order-2'",
    )
    .await;

    wait_for(
        "a warning naming the blocking backend's pid, state, age and query",
        Duration::from_secs(20),
        || {
            let found = daemon.lines().iter().any(|l| names_the_blocker(l, pid));
            async move { found }
        },
    )
    .await;

    let (code, status) = status_json(&db.url, &[("PGFOLD_DAEMON__STALL_WARN_AFTER_MS", "300")]);
    assert_eq!(code, Some(0), "{status}");
    let blocked_by = &status["horizon_blocked_by"];
    assert_eq!(blocked_by["pid"], pid, "{status}");
    assert_eq!(blocked_by["state"], "idle in transaction", "{status}");
    assert!(
        blocked_by["transaction_age_seconds"]
            .as_f64()
            .is_some_and(|age| age >= 0.3),
        "{status}"
    );
    assert!(
        blocked_by["query_start"]
            .as_str()
            .is_some_and(|q| q.contains(BLOCKER_QUERY)),
        "{status}"
    );

    // Nothing committed after the blocker's transaction id was read past it.
    assert!(
        !snapshot_exists(&observer, "order-2").await,
        "read past an open transaction"
    );
    assert!(
        !snapshot_exists(&observer, "order-3").await,
        "read past an open transaction"
    );
    assert_eq!(
        scalar_i64(&observer, "SELECT count(*) FROM daily_revenue").await,
        1,
        "order-2's payment was read past an open transaction"
    );
    assert_eq!(
        scalar_i64(
            &observer,
            &format!("SELECT count(*) FROM pgfold.projectors WHERE position_id >= {first_after}")
        )
        .await,
        0,
        "a checkpoint moved past an open transaction"
    );

    blocker.batch_execute("COMMIT").await.unwrap();

    // ...and then they are projected, not skipped.
    wait_for(
        "the held-back events to be projected once the blocker commits",
        Duration::from_secs(15),
        || async {
            snapshot_exists(&observer, "order-2").await
                && snapshot_exists(&observer, "order-3").await
                && scalar_i64(&observer, "SELECT count(*) FROM daily_revenue").await == 2
        },
    )
    .await;
    assert_projections_exact(&observer).await;
    assert_eq!(
        scalar_i64(
            &observer,
            "SELECT events_applied FROM pgfold.projectors WHERE name = 'daily_revenue'"
        )
        .await,
        2,
        "each payment applied once"
    );
    let (_, status) = status_json(&db.url, &[("PGFOLD_DAEMON__STALL_WARN_AFTER_MS", "300")]);
    assert!(
        status["horizon_blocked_by"].is_null(),
        "still blocked after the commit: {status}"
    );
    assert!(daemon.is_running(), "{:?}", daemon.lines());
    daemon.kill();
}
