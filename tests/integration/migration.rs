//! Migrating a database whose application already has a populated `events` table.

use pgfold::daemon::RunOptions;

use crate::helpers::*;

/// The application's own schema, exactly as the article has it.
const ARTICLE_SCHEMA: &str = include_str!("../../migrations/V1__events.sql");

/// The article's INSERT, with exactly its columns.
const APP_INSERT: &str = "INSERT INTO events (stream_id, stream_type, event_type, event_version, payload, metadata, occurred_at, sequence)
  VALUES ($1, 'order', $2, 1, $3, '{}', NOW(), $4)";

/// Each row's physical location: a rewritten row moves.
async fn row_locations(client: &tokio_postgres::Client) -> Vec<(i64, String)> {
    client
        .query("SELECT id, ctid::text FROM events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn existing_events_are_kept_unrewritten_and_projected_first() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    client.batch_execute(ARTICLE_SCHEMA).await.unwrap();
    pgfold::testkit::workload::load_orders(&client, 1, 2_000)
        .await
        .unwrap();
    let before = row_locations(&client).await;

    let out = pgfold(&["migrate"], &[("DATABASE_URL", &db.url)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        before,
        row_locations(&client).await,
        "rows were rewritten (their ctid moved)"
    );
    // The application's own INSERT keeps working unchanged.
    let payload = serde_json::json!({"orderId": "late", "customerId": "c", "items": [{"sku": "s", "category": "x", "price": "1.50", "qty": 2}]});
    client
        .execute(APP_INSERT, &[&"late", &"OrderCreated", &payload, &1i64])
        .await
        .unwrap();
    client
        .execute(APP_INSERT, &[&"late", &"OrderPaid", &payload, &2i64])
        .await
        .unwrap();

    let outcome = run_once(&db.settings(), RunOptions::default()).await;

    assert!(outcome.parked.is_empty());
    assert_projections_exact(&client).await;
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let applied = "SELECT count(*) FROM pgfold.schema_migrations";
    let before = scalar_i64(&client, applied).await;

    let out = pgfold(&["migrate"], &[("DATABASE_URL", &db.url)]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Versions need not be consecutive (branches number theirs apart).
    assert_eq!(scalar_i64(&client, applied).await, before);
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT max(version)::bigint FROM pgfold.schema_migrations"
        )
        .await,
        i64::from(pgfold::db::migrate::latest())
    );
}

/// The next notification: (channel, payload).
async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) -> (String, String) {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no notification within 10 s"))
        .expect("the LISTEN connection closed")
}

/// The wake-up trigger (migration V9's `pgfold.notify_if_armed`) and the daemon's
/// LISTEN (`pgfold::daemon::CHANNEL`) name the channel each on its own side: an
/// event appended while the flag is armed must reach a listener on the Rust
/// constant, or the daemon would only ever wake by polling. And one appended while
/// it is not armed must not notify: writers would queue on the notify lock.
#[tokio::test]
async fn the_trigger_notifies_the_channel_the_daemon_listens_on_only_when_armed() {
    use futures_util::StreamExt;

    let db = TestDb::new().await;
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {}", pgfold::daemon::CHANNEL))
        .await
        .unwrap();

    // Not armed: no notification, so the marker sent after it arrives first.
    let mut client = db.client().await;
    append_all(
        &mut client,
        &[created("order-1", "books", serde_json::json!(10), 1)],
    )
    .await;
    client
        .batch_execute(&format!("NOTIFY {}, 'marker'", pgfold::daemon::CHANNEL))
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx).await,
        (pgfold::daemon::CHANNEL.to_string(), "marker".to_string()),
        "an append notified while the flag was not armed"
    );

    // Armed, as the daemon arms it: the next append notifies.
    client
        .execute("SELECT setval('pgfold.wakeup_armed', 1, true)", &[])
        .await
        .unwrap();
    append_all(
        &mut client,
        &[created("order-2", "books", serde_json::json!(10), 1)],
    )
    .await;
    assert_eq!(
        next_notification(&mut rx).await,
        (pgfold::daemon::CHANNEL.to_string(), String::new())
    );
    drop(listener);
    driver.abort();
}

/// A replay's start is stamped by the rewind that begins it; a checkpoint move,
/// a hundred a second per projector while live, does not call the stamping
/// function at all (migration V11's WHEN clause).
#[tokio::test]
async fn only_the_rewind_that_starts_a_replay_calls_the_replay_stamp() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let calls = "SELECT pg_stat_get_xact_function_calls('pgfold.stamp_replay_start'::regproc)";
    client
        .batch_execute(
            "BEGIN;
             SET LOCAL track_functions = 'pl';
             INSERT INTO pgfold.projectors (name, state, replay_target_tx, replay_target_id)
               VALUES ('p', 'replaying', '900', 900);",
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "UPDATE pgfold.projectors SET position_tx = '0', position_id = 0 WHERE name = 'p'",
        )
        .await
        .unwrap();
    let stamped = "SELECT count(*) FROM pgfold.projectors WHERE replay_started_at IS NOT NULL";
    assert_eq!(
        scalar_i64(&client, stamped).await,
        1,
        "a rewind into a replay is stamped"
    );
    let after_rewind = scalar_i64(&client, calls).await;
    assert_eq!(after_rewind, 1);

    for id in 1..=5i64 {
        client
            .execute(
                "UPDATE pgfold.projectors SET position_tx = '10', position_id = $1 WHERE name = 'p'",
                &[&id],
            )
            .await
            .unwrap();
    }

    assert_eq!(
        scalar_i64(&client, calls).await,
        after_rewind,
        "checkpoint moves called the replay stamp"
    );
    assert_eq!(scalar_i64(&client, stamped).await, 1);
    client.batch_execute("ROLLBACK").await.unwrap();
}
