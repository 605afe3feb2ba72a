//! The built-in projectors against independent folds of the same log.

use pgfold::daemon::RunOptions;
use pgfold::store::NewEvent;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_few_hundred_thousand_orders_events_fold_exactly() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let events = pgfold::testkit::workload::load_orders(&client, 1, 120_000)
        .await
        .unwrap();
    assert!(events > 300_000, "{events}");

    let outcome = run_once(&db.settings(), RunOptions::default()).await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    assert_projections_exact(&client).await;
    assert!(scalar_i64(&client, "SELECT count(*) FROM daily_revenue").await > 7000);
}

#[tokio::test]
async fn prices_are_summed_exactly_as_written() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // Ten 0.10s are 1.00 exactly; in binary floating point they are not.
    let mut events = Vec::new();
    for n in 0..10 {
        let order = format!("order-{n}");
        let price = if n % 2 == 0 {
            json!(0.1)
        } else {
            json!("0.10")
        };
        events.push(created(&order, "books", price.clone(), 1));
        events.push(paid(&order, "books", price, 1));
    }
    // A price with more digits than a double holds.
    events.push(created(
        "order-big",
        "art",
        json!("12345678901234567.89"),
        1,
    ));
    let exact: serde_json::Value = serde_json::from_str("12345678901234567.89").unwrap();
    events.push(paid("order-big", "art", exact, 3));
    append_all(&mut client, &events).await;

    run_once(&db.settings(), RunOptions::default()).await;

    let rows = client
        .query(
            "SELECT category, total::text FROM daily_revenue ORDER BY category",
            &[],
        )
        .await
        .unwrap();
    let totals: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        totals,
        vec![
            ("art".to_string(), "37037036703703703.67".to_string()),
            ("books".to_string(), "1.00".to_string()),
        ]
    );
    assert_projections_exact(&client).await;
}

#[tokio::test]
async fn order_snapshots_follow_the_articles_fold() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    append_all(
        &mut client,
        &[
            created("order-1", "books", json!("5.00"), 1),
            paid("order-1", "books", json!("5.00"), 1),
            shipped("order-1", "7 Quay Road"),
            NewEvent::new(
                "order-1",
                "order",
                "OrderNoteAdded",
                json!({"note": "fragile"}),
            ),
            created("order-2", "toys", json!(2), 1),
            NewEvent::new("order-2", "order", "OrderCancelled", json!({})),
            // Not an order stream: ignored.
            NewEvent::new("user-1", "user", "OrderPaid", json!({"items": []})),
        ],
    )
    .await;

    run_once(&db.settings(), RunOptions::default()).await;

    let row = client
        .query_one(
            "SELECT sequence, state FROM order_snapshots WHERE stream_id = 'order-1'",
            &[],
        )
        .await
        .unwrap();
    let state: serde_json::Value = row.get(1);
    assert_eq!(
        row.get::<_, i64>(0),
        3,
        "the note is not applied, so the last applied sequence is 3"
    );
    assert_eq!(state["status"], "shipped");
    assert_eq!(state["shippingAddress"], "7 Quay Road");
    assert_eq!(state["orderId"], "order-1");
    assert!(state["paidAt"].as_str().unwrap().ends_with('Z'));
    let cancelled: serde_json::Value = client
        .query_one(
            "SELECT state FROM order_snapshots WHERE stream_id = 'order-2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        scalar_i64(&client, "SELECT count(*) FROM order_snapshots").await,
        2
    );
    assert_projections_exact(&client).await;
}
