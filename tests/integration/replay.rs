use crate::helpers::*;

#[tokio::test]
async fn replay_rebuilds_a_damaged_projection_from_the_first_event() {
    let (db, client) = projected_orders(3_000).await;
    damage_projections(&client).await;
    let mut settings = db.settings();
    settings.daemon.batch_size = 500;
    settings.daemon.set_batch_size = 700;

    let outcome = replay_once(&settings, &["all"]).await;

    assert!(outcome.parked.is_empty());
    assert_projections_exact(&client).await;
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors WHERE state <> 'running'"
        )
        .await,
        0,
        "a finished replay is back to running"
    );
}

#[tokio::test]
async fn replaying_one_projector_leaves_the_other_alone() {
    let (db, client) = projected_orders(500).await;
    client
        .batch_execute("UPDATE order_snapshots SET sequence = 0")
        .await
        .unwrap();

    replay_once(&db.settings(), &["daily_revenue"]).await;

    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM order_snapshots WHERE sequence <> 0"
        )
        .await,
        0,
        "order_snapshots was not rebuilt"
    );
}
