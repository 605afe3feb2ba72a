use pgfold::store::{self, AppendError};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_lost_race_for_a_sequence_is_a_typed_conflict() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let event = created("order-1", "books", json!("10.00"), 1);
    store::append(&client, &event, 1)
        .await
        .expect("first append");

    let err = store::append(&client, &event, 1).await.unwrap_err();

    assert!(
        matches!(&err, AppendError::Conflict { stream_id, sequence: 1 } if stream_id == "order-1"),
        "{err:?}"
    );
}

#[tokio::test]
async fn append_next_rereads_the_stream_after_a_conflict() {
    let db = TestDb::new().await;
    let mut a = db.client().await;
    let b = db.client().await;
    // Another writer took sequence 1 while `a` was deciding.
    store::append(&b, &created("order-1", "books", json!("1.00"), 1), 1)
        .await
        .unwrap();

    let appended = store::append_next(&mut a, &paid("order-1", "books", json!("1.00"), 1))
        .await
        .unwrap();

    assert_eq!(
        (appended.stream_id.as_str(), appended.sequence),
        ("order-1", 2)
    );
    assert_eq!(
        scalar_i64(
            &a,
            "SELECT max(sequence) FROM events WHERE stream_id = 'order-1'"
        )
        .await,
        2
    );
}
