//! Issue 11: what a live batch costs. A set batch that consumed nothing (events a
//! projector does not take) commits no checkpoint: that write would cost a WAL
//! flush for nothing, and is not needed, since reading those events again after a
//! restart applies nothing either.

use pgfold::daemon::RunOptions;
use serde_json::json;

use crate::helpers::*;

async fn position(client: &tokio_postgres::Client, projector: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT position_id, events_applied FROM pgfold.projectors WHERE name = $1",
            &[&projector],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_set_batch_that_consumes_nothing_records_nothing() {
    // Arrange: only OrderCreated, which daily_revenue does not consume.
    let db = TestDb::new().await;
    let mut client = db.client().await;
    append_all(
        &mut client,
        &[
            created("order-1", "books", json!("10.00"), 1),
            created("order-2", "books", json!("5.00"), 2),
        ],
    )
    .await;
    let only_revenue = || RunOptions {
        projectors: vec!["daily_revenue".into()],
        ..RunOptions::default()
    };

    // Act
    run_once(&db.settings(), only_revenue()).await;

    // Assert: read, and left unrecorded.
    assert_eq!(position(&client, "daily_revenue").await, (0, 0));

    // Act: events it consumes arrive; a new process reads from the checkpoint.
    append_all(
        &mut client,
        &[
            paid("order-1", "books", json!("10.00"), 1),
            paid("order-2", "books", json!("5.00"), 2),
        ],
    )
    .await;
    run_once(&db.settings(), only_revenue()).await;

    // Assert: applied once each, the checkpoint on the last one.
    let newest = scalar_i64(&client, "SELECT max(id) FROM events").await;
    assert_eq!(position(&client, "daily_revenue").await, (newest, 2));
    let total: String = client
        .query_one("SELECT total::text FROM daily_revenue", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, "20.00");
}
