//! Issue 16, read your own writes: `pgfold.applied`, `pgfold.wait_for` and
//! `GET /wait` tell an application when a projector has applied its event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfold::daemon::RunOptions;
use pgfold::store::{self, Appended};
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::helpers::*;

/// Long enough for a small shared CI machine; a wait that runs out fails the test.
const WAIT: Duration = Duration::from_secs(20);

/// The documented grant (README, "Read your own writes").
const GRANT: &str = "GRANT EXECUTE ON FUNCTION pgfold.applied(text, text, bigint),
  pgfold.wait_for(text, text, bigint, interval) TO";

fn live_daemon(db: &TestDb, extra: &[(&str, &str)]) -> Daemon {
    let mut env = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "200"),
    ];
    env.extend_from_slice(extra);
    Daemon::spawn(PGFOLD, &["run"], &env)
}

async fn applied(client: &Client, projector: &str, event: &Appended) -> bool {
    client
        .query_one(
            "SELECT pgfold.applied($1, $2, $3)",
            &[&projector, &event.stream_id, &event.sequence],
        )
        .await
        .unwrap()
        .get(0)
}

async fn waited(client: &Client, projector: &str, event: &Appended) -> bool {
    store::wait_for(client, projector, &event.stream_id, event.sequence, WAIT)
        .await
        .unwrap()
}

/// A database with order-1 created, not yet projected.
async fn one_order() -> (TestDb, Client, Appended) {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let event = store::append_next(&mut client, &created("order-1", "books", json!("1.00"), 1))
        .await
        .unwrap();
    (db, client, event)
}

/// The order's snapshot: (sequence, status).
async fn snapshot(client: &Client, order: &str) -> Option<(i64, String)> {
    client
        .query_opt(
            "SELECT sequence, state->>'status' FROM order_snapshots WHERE stream_id = $1",
            &[&order],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

async fn revenue(client: &Client, category: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT total::text FROM daily_revenue WHERE category = $1",
            &[&category],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Appends orders to streams of their own until `stop`; returns how many.
async fn background_writer(url: String, writer: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut client = connect(&url).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let order = format!("background-{writer}-{n}");
        append_all(
            &mut client,
            &[
                created(&order, "books", json!("3.00"), 1),
                paid(&order, "books", json!("3.00"), 1),
            ],
        )
        .await;
        n += 1;
    }
    n
}

/// One application task: each round creates an order, waits for order_snapshots
/// and reads it, then pays it, waits for both projectors and reads them. Each
/// order pays into a category of its own, so its revenue row is its own write.
async fn application(url: String, task: usize, rounds: usize) {
    let mut client = connect(&url).await;
    for round in 0..rounds {
        let order = format!("app-{task}-{round}");
        let category = format!("category-{task}-{round}");
        let created =
            store::append_next(&mut client, &created(&order, &category, json!("2.50"), 2))
                .await
                .unwrap();
        // daily_revenue does not consume OrderCreated: applied at once, whatever
        // the daemon has read.
        assert!(applied(&client, "daily_revenue", &created).await, "{order}");
        assert!(
            waited(&client, "order_snapshots", &created).await,
            "{order}"
        );
        assert_eq!(
            snapshot(&client, &order).await,
            Some((1, "pending".to_string())),
            "{order} created"
        );

        let paid = store::append_next(&mut client, &paid(&order, &category, json!("2.50"), 2))
            .await
            .unwrap();
        assert!(waited(&client, "daily_revenue", &paid).await, "{order}");
        assert_eq!(
            revenue(&client, &category).await.as_deref(),
            Some("5.00"),
            "{order} paid"
        );
        assert!(waited(&client, "order_snapshots", &paid).await, "{order}");
        assert_eq!(
            snapshot(&client, &order).await,
            Some((2, "paid".to_string())),
            "{order} paid"
        );
    }
}

/// `tasks` application tasks of `rounds` rounds each, beside two writers of
/// other orders and `instances` live daemons (the real binary).
async fn every_own_write_is_seen(instances: usize, tasks: usize, rounds: usize) {
    let db = TestDb::new().await;
    let mut daemons: Vec<Daemon> = (0..instances).map(|_| live_daemon(&db, &[])).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(background_writer(db.url.clone(), w, stop.clone())))
        .collect();

    let apps: Vec<_> = (0..tasks)
        .map(|t| tokio::spawn(application(db.url.clone(), t, rounds)))
        .collect();
    let mut failure = None;
    for app in apps {
        if let Err(e) = app.await {
            failure.get_or_insert(e);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        assert!(
            writer.await.unwrap() > 0,
            "a background writer appended nothing"
        );
    }
    if let Some(e) = failure {
        std::panic::resume_unwind(e.into_panic());
    }
    for daemon in &mut daemons {
        assert!(daemon.is_running(), "{:?}", daemon.lines());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_application_always_reads_its_own_write_under_concurrent_writers() {
    every_own_write_is_seen(1, 4, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_application_reads_its_own_write_with_two_instances() {
    every_own_write_is_seen(2, 3, 40).await;
}

#[tokio::test]
async fn with_the_daemon_stopped_wait_for_gives_up_at_its_timeout() {
    let (db, client, event) = one_order().await;

    let started = Instant::now();
    let row = client
        .query_one(
            "SELECT pgfold.wait_for('order_snapshots', $1, $2, '300 ms')",
            &[&event.stream_id, &event.sequence],
        )
        .await
        .unwrap();
    let took = started.elapsed();

    assert!(!row.get::<_, bool>(0));
    assert!(
        took >= Duration::from_millis(300),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "returned after {took:?}");

    // The same call answers true at once once the daemon has caught up.
    run_once(&db.settings(), RunOptions::default()).await;
    let started = Instant::now();
    assert!(waited(&client, "order_snapshots", &event).await);
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn bad_calls_are_errors_naming_the_problem_and_nulls_give_null() {
    let (_db, mut client, event) = one_order().await;

    for sql in [
        "SELECT pgfold.applied('no_such_projector', 'order-1', 1)",
        "SELECT pgfold.wait_for('no_such_projector', 'order-1', 1)",
    ] {
        let e = client.query_one(sql, &[]).await.unwrap_err();
        let e = e.as_db_error().expect("a database error");
        assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE, "{sql}");
        assert!(e.message().contains("no_such_projector"), "{}", e.message());
    }

    let nulls = client
        .query_one(
            "SELECT pgfold.applied(NULL, 'order-1', 1) IS NULL,
                    pgfold.applied('order_snapshots', NULL, 1) IS NULL,
                    pgfold.wait_for('order_snapshots', 'order-1', NULL) IS NULL,
                    pgfold.wait_for('order_snapshots', 'order-1', 1, NULL) IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert!((0..4).all(|i| nulls.get::<_, bool>(i)));

    // A snapshot that never moves would never see the projection advance.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    assert_refused(&tx, 1, "READ COMMITTED").await;
    tx.rollback().await.unwrap();

    // Waiting for an event the waiting transaction itself has not committed.
    let tx = client.transaction().await.unwrap();
    store::append(&tx, &paid("order-1", "books", json!("1.00"), 1), 2)
        .await
        .unwrap();
    assert_refused(&tx, 2, "after COMMIT").await;
    tx.rollback().await.unwrap();

    // A sequence that does not exist is not applied.
    assert!(
        !applied(
            &client,
            "order_snapshots",
            &Appended {
                sequence: 7,
                ..event
            }
        )
        .await
    );
}

/// `wait_for` refuses to wait for order-1's `sequence` in `tx`: SQLSTATE 25000,
/// with a message saying `why`.
async fn assert_refused(tx: &tokio_postgres::Transaction<'_>, sequence: i64, why: &str) {
    let e = store::wait_for(tx, "order_snapshots", "order-1", sequence, WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INVALID_TRANSACTION_STATE));
    let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(message.contains(why), "{e:?}");
}

/// A LOGIN role with no rights of its own, dropped when the test ends.
struct BareRole {
    name: String,
    admin_db_url: String,
}

impl Drop for BareRole {
    fn drop(&mut self) {
        pgfold::testkit::db::drop_role_detached(&self.admin_db_url, &self.name);
    }
}

#[tokio::test]
async fn a_role_with_only_the_documented_grant_can_wait() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = BareRole {
        name: format!("pgfold_reader_{}", &db.name["pgfold_test_".len()..]),
        admin_db_url: db.url.clone(),
    };
    admin
        .batch_execute(&format!("CREATE ROLE {} LOGIN", role.name))
        .await
        .unwrap();
    let mut writer = db.client().await;
    let event = store::append_next(&mut writer, &created("order-1", "books", json!("1.00"), 1))
        .await
        .unwrap();
    run_once(&db.settings(), RunOptions::default()).await;
    let app = connect(&db.url_as(&role.name, None)).await;

    // Not callable by PUBLIC...
    let e = app
        .query_one(
            "SELECT pgfold.applied('order_snapshots', 'order-1', 1)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");

    // ...and with the one grant, both answer, while pgfold's tables stay closed.
    admin
        .batch_execute(&format!("{GRANT} {}", role.name))
        .await
        .unwrap();
    assert!(applied(&app, "order_snapshots", &event).await);
    assert!(waited(&app, "order_snapshots", &event).await);
    for table in ["pgfold.projectors", "pgfold.delivered_ahead", "events"] {
        let e = app
            .query(&format!("SELECT * FROM {table}"), &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_ahead_is_applied_once_its_effect_is_visible() {
    let db = with_scratch().await;
    // order-1's OrderPaid (sequence 2) gets an older transaction id than its
    // OrderCreated (sequence 1), and a transaction between them stays open: the
    // daemon reads sequence 2 below the horizon and delivers sequence 1 ahead of
    // its position, which stays beyond the checkpoint.
    //
    // order-2 is paid twice, the second payment (sequence 3) by the same early
    // transaction: daily_revenue folds unordered sets and delivers nothing ahead, so
    // having passed sequence 3 does not mean it has applied sequence 2.
    let late = early_writer(&db).await;
    let blocker = early_writer(&db).await;
    let mut first = db.client().await;
    let ahead = store::append_next(&mut first, &created("order-1", "books", json!("4.00"), 1))
        .await
        .unwrap();
    append_all(
        &mut first,
        &[
            created("order-2", "games", json!("1.00"), 1),
            paid("order-2", "games", json!("1.00"), 1),
        ],
    )
    .await;
    store::append(&late, &paid("order-1", "books", json!("4.00"), 1), 2)
        .await
        .unwrap();
    let second_payment = store::append(&late, &paid("order-2", "games", json!("1.00"), 1), 3)
        .await
        .unwrap();
    late.batch_execute("COMMIT").await.unwrap();

    let client = db.client().await;
    let _daemon = live_daemon(&db, &[]);
    // Each look reads the answers and the projection in one statement, so one
    // snapshot: applied must never run ahead of what a reader can see.
    wait_for("both events to be applied", WAIT, || {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT pgfold.applied('order_snapshots', 'order-1', 1),
                            pgfold.applied('order_snapshots', 'order-1', 2),
                            (SELECT sequence FROM order_snapshots WHERE stream_id = 'order-1')",
                    &[],
                )
                .await
                .unwrap();
            let (one, two, seen): (bool, bool, Option<i64>) = (row.get(0), row.get(1), row.get(2));
            assert!(!one || seen.is_some(), "sequence 1 applied, not visible");
            assert!(
                !two || seen == Some(2),
                "sequence 2 applied, visible {seen:?}"
            );
            one && two
        }
    })
    .await;

    // It was answered through delivered_ahead: the checkpoint is still short of
    // sequence 1.
    let beyond = client
        .query_one(
            "SELECT (SELECT (tx_id, id) FROM events WHERE id = $1)
                      > (SELECT (position_tx, position_id) FROM pgfold.projectors
                          WHERE name = 'order_snapshots'),
                    EXISTS (SELECT 1 FROM pgfold.delivered_ahead
                             WHERE projector = 'order_snapshots' AND event_id = $1)",
            &[&ahead.id],
        )
        .await
        .unwrap();
    assert!(beyond.get::<_, bool>(0) && beyond.get::<_, bool>(1));
    assert!(waited(&client, "order_snapshots", &ahead).await);

    wait_for(
        "daily_revenue to pass order-2's second payment",
        WAIT,
        || {
            let client = &client;
            async move {
                client
                    .query_one(
                        "SELECT (SELECT (tx_id, id) FROM events WHERE id = $1)
                              <= (SELECT (position_tx, position_id) FROM pgfold.projectors
                                   WHERE name = 'daily_revenue')",
                        &[&second_payment],
                    )
                    .await
                    .unwrap()
                    .get(0)
            }
        },
    )
    .await;
    let paid_twice = Appended {
        id: second_payment,
        stream_id: "order-2".into(),
        sequence: 3,
    };
    assert!(!applied(&client, "daily_revenue", &paid_twice).await);
    assert_eq!(revenue(&client, "games").await.as_deref(), Some("1.00"));

    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert!(waited(&client, "daily_revenue", &paid_twice).await);
    assert_eq!(revenue(&client, "games").await.as_deref(), Some("2.00"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_is_served_over_http() {
    let db = TestDb::new().await;
    let address = format!("127.0.0.1:{}", free_port());
    let _daemon = live_daemon(&db, &[("PGFOLD_HTTP__LISTEN", &address)]);
    wait_for("/readyz to answer 200", WAIT, || async {
        tokio::net::TcpStream::connect(&address).await.is_ok()
            && get(&address, "/readyz").await.0 == 200
    })
    .await;
    let mut client = db.client().await;
    store::append_next(&mut client, &created("order 1", "books", json!("1.00"), 1))
        .await
        .unwrap();

    let ok = get(
        &address,
        "/wait?projector=order_snapshots&stream_id=order%201&sequence=1&timeout_ms=20000",
    )
    .await;
    assert_eq!(ok, (200, "{\"applied\": true}\n".to_string()));
    assert!(snapshot_exists(&client, "order 1").await);

    let started = Instant::now();
    let timed_out = get(
        &address,
        "/wait?projector=order_snapshots&stream_id=order%201&sequence=2&timeout_ms=300",
    )
    .await;
    assert_eq!(timed_out, (408, "{\"applied\": false}\n".to_string()));
    assert!(started.elapsed() >= Duration::from_millis(300));

    for (query, status, body) in [
        (
            "projector=order_snapshots&stream_id=s",
            400,
            "missing parameter sequence\n",
        ),
        (
            "projector=order_snapshots&stream_id=s&sequence=one",
            400,
            "sequence must be an integer, not \"one\"\n",
        ),
        (
            "projector=order_snapshots&stream_id=s&sequence=1&timeout_ms=3600000",
            400,
            "timeout_ms must be an integer from 0 to 60000, not \"3600000\"\n",
        ),
        (
            "projector=nope&stream_id=s&sequence=1",
            404,
            "unknown projector \"nope\"\n",
        ),
    ] {
        assert_eq!(
            get(&address, &format!("/wait?{query}")).await,
            (status, body.to_string()),
            "{query}"
        );
    }
}

#[tokio::test]
async fn a_row_an_older_pgfold_wrote_is_read_conservatively_until_a_run_refreshes_it() {
    let (db, client, event) = one_order().await;
    // An older pgfold registers its projectors without their filters.
    client
        .batch_execute(
            "UPDATE pgfold.projectors
                SET event_types = NULL, stream_types = NULL, in_stream_order = NULL",
        )
        .await
        .unwrap();
    // As far as this row tells, daily_revenue consumes OrderCreated too.
    assert!(!applied(&client, "daily_revenue", &event).await);

    run_once(&db.settings(), RunOptions::default()).await;

    assert!(applied(&client, "daily_revenue", &event).await);
    let rows: Vec<(String, Option<Vec<String>>, Option<bool>)> = client
        .query(
            "SELECT name, event_types, in_stream_order FROM pgfold.projectors ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "daily_revenue".to_string(),
                Some(vec!["OrderPaid".to_string()]),
                Some(false)
            ),
            (
                "order_snapshots".to_string(),
                Some(
                    [
                        "OrderCreated",
                        "OrderPaid",
                        "OrderShipped",
                        "OrderCancelled"
                    ]
                    .map(String::from)
                    .to_vec()
                ),
                Some(true)
            ),
        ]
    );
}
