//! Issue 4: live set batches reuse generic plans, for the projectors that allow
//! it, and large batches are planned for their values (as every batch is without
//! prepared statements, issue 15).

use std::time::Duration;

use pgfold::daemon::RunOptions;
use pgfold::testkit::db::column;
use pgfold::{Fold, Projector, ProjectorError, Registry, SetBatch, SetFold, Tx};
use tokio_postgres::Client;

use crate::helpers::*;

/// A `Fold::Set` projector that records, per batch, the planner settings its
/// statement ran under and how many events the range held.
struct PlanProbe {
    generic_plans: bool,
    /// Folds as a `Fold::StreamSet`, whose catch-up is not paced (and so not
    /// planned for its values by the pacing).
    stream_set: bool,
}

#[async_trait::async_trait]
impl Projector for PlanProbe {
    fn name(&self) -> &str {
        "plan_probe"
    }

    fn fold(&self) -> Fold<'_> {
        match self.stream_set {
            true => Fold::StreamSet(self),
            false => Fold::Set(self),
        }
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS plan_probe (
               n BIGSERIAL PRIMARY KEY, events BIGINT NOT NULL,
               plan_cache_mode TEXT NOT NULL, jit TEXT NOT NULL,
               synchronous_commit TEXT NOT NULL)",
        )
        .await
        .map_err(Into::into)
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        Ok(tx.batch_execute("TRUNCATE plan_probe").await?)
    }
}

#[async_trait::async_trait]
impl SetFold for PlanProbe {
    fn generic_plans(&self) -> bool {
        self.generic_plans
    }

    async fn apply(&self, tx: &Tx<'_>, batch: &SetBatch<'_>) -> Result<(), ProjectorError> {
        batch
            .execute(
                tx,
                "INSERT INTO plan_probe (events, plan_cache_mode, jit, synchronous_commit)
                 SELECT count(*), current_setting('plan_cache_mode'), current_setting('jit'),
                        current_setting('synchronous_commit')
                   FROM batch",
                &[],
            )
            .await?;
        Ok(())
    }
}

/// Appends `n` events, each the first of a new stream, in one statement.
async fn append_many(client: &Client, n: i64) {
    client
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             SELECT gen_random_uuid()::text, 'probe', 'Probed', '{}', 1 FROM generate_series(1, $1::bigint) g",
            &[&n],
        )
        .await
        .unwrap();
}

/// Appends events until the log is past the size from which live batches may
/// plan generically (`feed::GENERIC_PLANS_FROM_BYTES`); returns how many.
async fn grow_past_generic_plans(client: &Client) -> i64 {
    let mut appended = 0;
    while scalar_i64(client, "SELECT pg_relation_size('events')").await
        < pgfold::feed::GENERIC_PLANS_FROM_BYTES
    {
        append_many(client, 2_000).await;
        appended += 2_000;
    }
    appended
}

/// Runs the probe once to the newest event; returns its batches since `after`
/// (by row number): events, plan_cache_mode, jit.
/// `prepared`: `database.prepared_statements`.
async fn run_probe(
    db: &TestDb,
    generic_plans: bool,
    prepared: bool,
    after: i64,
) -> Vec<(i64, String, String)> {
    let mut settings = db.settings();
    settings.projectors.clear();
    settings.database.prepared_statements = prepared;
    let registry = Registry::new().register(PlanProbe {
        generic_plans,
        stream_set: false,
    });
    let outcome = run_once_with(&settings, &registry, RunOptions::default()).await;
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    db.client()
        .await
        .query(
            "SELECT events, plan_cache_mode, jit FROM plan_probe WHERE n > $1 ORDER BY n",
            &[&after],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The server's own `plan_cache_mode`, what a batch runs under unless forced.
async fn plan_cache_mode(client: &Client) -> String {
    client
        .query_one("SELECT current_setting('plan_cache_mode')", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn small_batches_reuse_generic_plans_and_large_ones_are_planned() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let server_default = plan_cache_mode(&client).await;
    assert_ne!(
        server_default, "force_generic_plan",
        "the test needs a server that plans per value"
    );

    // A live-sized batch on a log of a few pages (a new deployment): planned for
    // its values, so that no generic plan is made from a near-empty log.
    append_many(&client, 3).await;
    let batches = run_probe(&db, true, true, 0).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(
        (batches[0].0, batches[0].1.as_str()),
        (3, "force_custom_plan"),
        "a batch on a small log must be planned for its values"
    );

    // A large batch: well over the live size, planned for its values.
    let grown = grow_past_generic_plans(&client).await;
    let batches = run_probe(&db, true, true, 1).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(
        batches[0],
        (grown, "force_custom_plan".to_string(), "off".to_string()),
        "a large batch must be planned for its values"
    );

    // A live-sized batch: generic plan, no JIT.
    append_many(&client, 3).await;
    let batches = run_probe(&db, true, true, 2).await;
    assert_eq!(
        batches,
        vec![(3, "force_generic_plan".to_string(), "off".to_string())]
    );
}

/// A live batch of 3 events, on a log large enough for generic plans, is
/// planned for its values.
async fn assert_live_batch_planned_for_its_values(generic_plans: bool, prepared: bool) {
    let db = TestDb::new().await;
    let client = db.client().await;
    grow_past_generic_plans(&client).await;
    run_probe(&db, generic_plans, prepared, 0).await;
    append_many(&client, 3).await;
    let batches = run_probe(&db, generic_plans, prepared, 1).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(
        (batches[0].0, batches[0].1.as_str()),
        (3, "force_custom_plan")
    );
}

#[tokio::test]
async fn a_projector_that_does_not_allow_generic_plans_is_always_planned() {
    assert_live_batch_planned_for_its_values(false, true).await;
}

/// Unnamed statements are planned again on every batch: a generic plan would
/// save nothing, so live batches are planned for their values.
#[tokio::test]
async fn without_prepared_statements_live_batches_are_planned_for_their_values() {
    assert_live_batch_planned_for_its_values(true, false).await;
}

/// The `synchronous_commit` each batch ran under, with `daemon.synchronous_commit`
/// set to `synchronous`.
async fn commit_modes(db: &TestDb, synchronous: bool) -> Vec<String> {
    let mut settings = db.settings();
    settings.projectors.clear();
    settings.daemon.synchronous_commit = synchronous;
    let registry = Registry::new().register(PlanProbe {
        generic_plans: true,
        stream_set: false,
    });
    let outcome = run_once_with(&settings, &registry, RunOptions::default()).await;
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    column(
        &db.client().await,
        "SELECT synchronous_commit FROM plan_probe ORDER BY n",
    )
    .await
    .unwrap()
}

/// A batch is derived from events already durable and commits with its
/// checkpoint, so by default it does not wait for its WAL flush; an operator can
/// ask that it does.
#[tokio::test]
async fn batches_commit_without_waiting_for_the_wal_flush_unless_told_to() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let server: String = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        server, "on",
        "the test needs a server that waits for flushes"
    );

    append_many(&client, 3).await;
    assert_eq!(commit_modes(&db, false).await, vec!["off".to_string()]);
    append_many(&client, 3).await;
    assert_eq!(
        commit_modes(&db, true).await,
        vec!["off".to_string(), "on".to_string()]
    );
}

/// A batch's writes and its checkpoint's move are one transaction, also now that
/// the COMMIT travels in the same round trip as the move: here on a new
/// connection, where the move's statement is prepared (or its parameter types
/// learned, without prepared statements) first, and a COMMIT not held back for
/// it would have run before it, leaving the move to commit on its own.
#[tokio::test]
async fn a_batch_and_its_checkpoint_move_commit_as_one_transaction() {
    for prepared_statements in [true, false] {
        let db = TestDb::new().await;
        let client = db.client().await;
        append_many(&client, 3).await;
        let mut settings = db.settings();
        settings.projectors.clear();
        settings.database.prepared_statements = prepared_statements;
        let registry = Registry::new().register(PlanProbe {
            generic_plans: true,
            stream_set: false,
        });

        let outcome = run_once_with(&settings, &registry, RunOptions::default()).await;

        assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
        let writers: Vec<String> = column(
            &client,
            "SELECT xmin::text FROM plan_probe
             UNION ALL
             SELECT xmin::text FROM pgfold.projectors WHERE name = 'plan_probe'",
        )
        .await
        .unwrap();
        assert_eq!(
            writers.len(),
            2,
            "one batch and its checkpoint: {writers:?}"
        );
        assert_eq!(
            writers[0], writers[1],
            "the batch and its checkpoint move were written by different transactions \
             (prepared_statements = {prepared_statements})"
        );
    }
}

/// A batch's first statement already asks for generic plans when the batch
/// before it was live; a large batch after live ones must still be planned for
/// its values, and a live one after it generically again.
#[tokio::test]
async fn a_large_batch_after_live_ones_is_not_planned_generically() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut appended = grow_past_generic_plans(&client).await;
    let mut settings = db.settings();
    settings.projectors.clear();
    let registry = Registry::new().register(PlanProbe {
        generic_plans: true,
        stream_set: true,
    });
    let daemon = pgfold::daemon::Daemon::build(settings, registry, RunOptions::default())
        .unwrap()
        .spawn();

    wait_for("the probe's table", Duration::from_secs(60), || async {
        scalar_i64(
            &client,
            "SELECT count(*) FROM pg_class WHERE relname = 'plan_probe'",
        )
        .await
            == 1
    })
    .await;
    // The log as it was at the start (0 appended first), then one batch each.
    for n in [0, 3, 3, 6_000, 3] {
        append_many(&client, n).await;
        appended += n;
        wait_for(
            "the probe to fold every event",
            Duration::from_secs(60),
            || async {
                scalar_i64(
                    &client,
                    "SELECT coalesce(sum(events), 0)::bigint FROM plan_probe",
                )
                .await
                    == appended
            },
        )
        .await;
    }
    daemon.stop().await.unwrap();

    let generic = "force_generic_plan".to_string();
    let batches: Vec<(i64, String)> = pairs(
        &client,
        "SELECT events, plan_cache_mode FROM plan_probe ORDER BY n",
    )
    .await;
    // After the catch-up of the log as it was when the daemon started.
    assert_eq!(
        batches[1..],
        vec![
            (3, generic.clone()),
            (3, generic.clone()),
            (6_000, "force_custom_plan".to_string()),
            (3, generic)
        ]
    );
}
