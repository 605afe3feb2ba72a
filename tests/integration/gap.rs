//! Commit order versus id order: the case that loses events under `id > checkpoint`.

use std::time::Duration;

use pgfold::daemon::RunOptions;
use pgfold::store;
use serde_json::json;

use crate::helpers::*;

async fn projected(db: &TestDb, stream: &str) -> bool {
    snapshot_exists(&db.client().await, stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_a_lower_id_committed_after_a_processed_higher_one_is_still_projected() {
    let db = with_scratch().await;
    let daemon = RunningDaemon::start(db.settings(), RunOptions::default());

    // B takes its transaction id first (it writes elsewhere before appending)...
    let mut b = db.client().await;
    let tb = b.transaction().await.unwrap();
    tb.execute("INSERT INTO scratch VALUES (1)", &[])
        .await
        .unwrap();
    // ...A appends first, so its event gets the lower id, and stays open...
    let mut a = db.client().await;
    let ta = a.transaction().await.unwrap();
    let id_a = store::append(&ta, &created("order-a", "books", json!("5.00"), 1), 1)
        .await
        .unwrap();
    // ...B appends (higher id) and commits.
    let id_b = store::append(&tb, &created("order-b", "books", json!("7.00"), 1), 1)
        .await
        .unwrap();
    tb.commit().await.unwrap();
    assert!(id_a < id_b);

    // The daemon processes the higher id while the lower one is still uncommitted.
    wait_for("order-b to be projected", Duration::from_secs(10), || {
        projected(&db, "order-b")
    })
    .await;
    assert!(!projected(&db, "order-a").await);

    ta.commit().await.unwrap();

    wait_for("order-a to be projected", Duration::from_secs(10), || {
        projected(&db, "order-a")
    })
    .await;
    daemon.stop().await;
    assert_projections_exact(&db.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_older_transaction_holds_newer_events_back_and_status_names_it() {
    let db = TestDb::new().await;
    let daemon = RunningDaemon::start(db.settings(), RunOptions::default());

    let mut a = db.client().await;
    let ta = a.transaction().await.unwrap();
    store::append(&ta, &created("order-a", "books", json!("5.00"), 1), 1)
        .await
        .unwrap();
    let a_pid: i32 = ta
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let mut b = db.client().await;
    append_all(&mut b, &[created("order-b", "toys", json!(3), 2)]).await;

    // The horizon sits at A's transaction, and status says who holds it.
    let registry = pgfold::projectors::builtin();
    wait_for(
        "status to name A's backend",
        Duration::from_secs(10),
        || async {
            let status = pgfold::status::collect(&b, &registry, Duration::ZERO, None)
                .await
                .unwrap();
            status
                .horizon_blocked_by
                .is_some_and(|blocker| blocker.pid == a_pid)
        },
    )
    .await;
    assert!(
        !projected(&db, "order-b").await,
        "read past an open transaction"
    );

    ta.commit().await.unwrap();
    wait_for(
        "both orders to be projected",
        Duration::from_secs(10),
        || async { projected(&db, "order-a").await && projected(&db, "order-b").await },
    )
    .await;
    daemon.stop().await;
    assert_projections_exact(&db.client().await).await;
}
