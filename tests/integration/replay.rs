use pgfold::daemon::RunOptions;

use crate::helpers::*;

#[tokio::test]
async fn replay_rebuilds_a_damaged_projection_from_the_first_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 3_000)
        .await
        .unwrap();
    run_once(&db.settings(), RunOptions::default()).await;
    client
        .batch_execute(
            "UPDATE daily_revenue SET total = total + 1;
             DELETE FROM order_snapshots WHERE stream_id LIKE 'order-1%';",
        )
        .await
        .unwrap();
    let mut settings = db.settings();
    settings.daemon.batch_size = 500;
    settings.daemon.set_batch_size = 700;

    let outcome = run_once(
        &settings,
        RunOptions {
            replay: vec!["all".into()],
            ..RunOptions::default()
        },
    )
    .await;

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
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 500)
        .await
        .unwrap();
    run_once(&db.settings(), RunOptions::default()).await;
    client
        .batch_execute("UPDATE order_snapshots SET sequence = 0")
        .await
        .unwrap();

    run_once(
        &db.settings(),
        RunOptions {
            replay: vec!["daily_revenue".into()],
            ..RunOptions::default()
        },
    )
    .await;

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
