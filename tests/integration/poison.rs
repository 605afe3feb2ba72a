//! Issue 3, poison events: an event a projector cannot fold is isolated from the
//! good events around it, retried `max_attempts` times, then parked
//! (`on_error = "stop"`) or dead-lettered (`on_error = "skip"`); the other
//! projector keeps going.

use std::time::Duration;

use pgfold::config::OnError;
use pgfold::store::NewEvent;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::helpers::*;

/// The malformed `OrderPaid` payloads of the issue.
#[derive(Debug, Clone, Copy)]
enum Bad {
    MissingItems,
    ItemsNotAnArray,
    PriceAbc,
    PayloadNull,
    MissingQty,
}

impl Bad {
    fn payload(self, order: &str) -> Value {
        match self {
            Bad::MissingItems => json!({"orderId": order}),
            Bad::ItemsNotAnArray => json!({"orderId": order, "items": "three books"}),
            Bad::PriceAbc => json!({"orderId": order, "items": [
                {"sku": "sku-1", "category": "books", "price": "abc", "qty": 1}]}),
            Bad::PayloadNull => Value::Null,
            Bad::MissingQty => json!({"orderId": order, "items": [
                {"sku": "sku-1", "category": "books", "price": "4.00"}]}),
        }
    }

    /// A word the stored error must contain, so the operator can tell what is wrong.
    fn clue(self) -> &'static str {
        match self {
            Bad::MissingItems | Bad::ItemsNotAnArray | Bad::PayloadNull => "items",
            Bad::PriceAbc => "abc",
            Bad::MissingQty => "qty",
        }
    }
}

/// `sql`, a fold over `events` read at its one `from`, over only the events
/// matching `filter` (read there as `alias`).
fn fold_where(sql: &str, from: &str, alias: &str, filter: &str) -> String {
    assert_eq!(
        sql.matches(from).count(),
        1,
        "the expected fold changed shape"
    );
    sql.replacen(
        from,
        &format!("FROM (SELECT * FROM events WHERE {filter} OFFSET 0) {alias}"),
        1,
    )
}

/// `EXPECTED_DAILY_REVENUE` over only the events matching `filter` (SQL on `events`).
fn expected_revenue_where(filter: &str) -> String {
    let sql = pgfold::testkit::workload::EXPECTED_DAILY_REVENUE;
    fold_where(sql, "FROM events e,", "e,", filter)
}

/// `EXPECTED_ORDER_SNAPSHOTS` over only the events matching `filter`.
fn expected_snapshots_where(filter: &str) -> String {
    let sql = pgfold::testkit::workload::EXPECTED_ORDER_SNAPSHOTS;
    fold_where(sql, "FROM events\n", "events\n", filter)
}

/// Rows of `table` (its `columns`) differing from `expected`; it must not be empty.
async fn differences(client: &Client, table: &str, columns: &str, expected: &str) -> i64 {
    assert!(
        scalar_i64(client, &format!("SELECT count(*) FROM {table}")).await > 0,
        "{table} is empty: nothing was applied"
    );
    let actual = format!("SELECT {columns} FROM {table}");
    pgfold::testkit::workload::differences(client, &actual, expected)
        .await
        .unwrap()
}

async fn revenue_differences(client: &Client, expected: &str) -> i64 {
    differences(client, "daily_revenue", "day, category, total", expected).await
}

async fn snapshot_differences(client: &Client, expected: &str) -> i64 {
    differences(
        client,
        "order_snapshots",
        "stream_id, sequence, state",
        expected,
    )
    .await
}

/// Two good orders, an order whose `OrderPaid` is `bad`, two more good orders:
/// poison for `daily_revenue`.
async fn bad_payment(bad: Bad, on_error: OnError, max_attempts: u32) -> Poisoned {
    let events = [
        created("order-1", "books", json!("10.00"), 2),
        paid("order-1", "books", json!("10.00"), 2),
        created("order-2", "toys", json!(3.5), 1),
        paid("order-2", "toys", json!(3.5), 1),
        created("order-3", "books", json!("4.00"), 1),
        NewEvent::new("order-3", "order", "OrderPaid", bad.payload("order-3")),
        created("order-4", "books", json!("100.00"), 1),
        paid("order-4", "books", json!("100.00"), 1),
        created("order-5", "games", json!("7.25"), 4),
        paid("order-5", "games", json!("7.25"), 4),
    ];
    let poison = "stream_id = 'order-3' AND event_type = 'OrderPaid'";
    let case = format!("{bad:?}");
    Poisoned::new(
        case,
        &events,
        poison,
        "daily_revenue",
        on_error,
        max_attempts,
    )
    .await
}

/// Good orders around an `OrderPaid` on a stream that has no `OrderCreated`: a
/// poison for `order_snapshots` only (its items are fine for `daily_revenue`).
async fn orphan_payment(on_error: OnError, max_attempts: u32) -> Poisoned {
    let events = [
        created("order-1", "books", json!("10.00"), 2),
        paid("order-1", "books", json!("10.00"), 2),
        paid("order-orphan", "toys", json!("2.50"), 2),
        created("order-2", "games", json!("7.25"), 1),
        paid("order-2", "games", json!("7.25"), 1),
        shipped("order-2", "1 Harbour Street"),
        created("order-3", "toys", json!(1), 3),
    ];
    let poison = "stream_id = 'order-orphan'";
    let case = "orphan payment".to_string();
    Poisoned::new(
        case,
        &events,
        poison,
        "order_snapshots",
        on_error,
        max_attempts,
    )
    .await
}

/// `SELECT sum(total)::text FROM daily_revenue`.
async fn revenue_total(client: &Client) -> String {
    client
        .query_one("SELECT sum(total)::text FROM daily_revenue", &[])
        .await
        .unwrap()
        .get(0)
}

/// One test per malformed payload, each in a database of its own.
macro_rules! for_each_bad_payment {
    ($scenario:ident: $($test:ident => $bad:ident,)+) => {
        $(
            #[tokio::test]
            async fn $test() {
                $scenario(Bad::$bad).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------
// on_error = "stop", daily_revenue

async fn daily_revenue_stops_on(bad: Bad) {
    let p = bad_payment(bad, OnError::Stop, 2).await;
    let (client, bad_id) = (&p.client, p.bad_id);

    let outcome = p.run_once().await;

    // Parked, naming projector, event and error.
    p.assert_parked(&outcome, bad.clue());
    // The good events before the bad one are applied, the bad one and those after
    // it are not.
    assert_eq!(
        revenue_differences(client, &expected_revenue_where(&format!("id < {bad_id}"))).await,
        0,
        "{bad:?}: daily_revenue is not the fold of the events before the bad one"
    );
    let total = revenue_total(client).await;
    assert_eq!(total, "23.50", "{bad:?}: 2 × 10.00 + 3.5 only");
    // Retried max_attempts times, then parked.
    let error = p.assert_failed(2).await;
    assert!(error.unwrap_or_default().contains(bad.clue()));
    // The other projector is unaffected and caught up.
    assert_eq!(
        snapshot_differences(client, pgfold::testkit::workload::EXPECTED_ORDER_SNAPSHOTS).await,
        0,
        "{bad:?}: order_snapshots is not the full fold"
    );
    assert_eq!(projector_row(client, "order_snapshots").await.0, "running");

    // `pgfold status --json` shows it, and exits 3.
    let status = p.assert_status_failed(bad.clue());
    let revenue = projector_status(&status, "daily_revenue");
    assert_eq!(revenue["failing_event"]["attempts"], 2, "{status}");
    let snapshots = projector_status(&status, "order_snapshots");
    assert_eq!(snapshots["state"], "running", "{status}");
    assert_eq!(snapshots["lag_events"], 0, "{status}");

    // The binary: a restart retries the parked projector, which fails again, and
    // `run --once` exits non-zero naming projector and event.
    let error_at_before = p.last_error_at().await;
    let line = p.run_once_binary_fails();
    assert!(line.contains("OrderPaid"), "{line}");
    let retried: bool = client
        .query_one(
            "SELECT last_error_at > $1::text::timestamptz FROM pgfold.projectors WHERE name = 'daily_revenue'",
            &[&error_at_before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        retried,
        "{bad:?}: the restart did not retry the parked event"
    );
    p.assert_failed(2).await;
    assert_eq!(
        revenue_differences(client, &expected_revenue_where(&format!("id < {bad_id}"))).await,
        0,
        "{bad:?}: the retries half-applied something"
    );
}

for_each_bad_payment! { daily_revenue_stops_on:
    stop_parks_daily_revenue_on_a_payment_without_items => MissingItems,
    stop_parks_daily_revenue_on_items_that_are_not_an_array => ItemsNotAnArray,
    stop_parks_daily_revenue_on_a_price_of_abc => PriceAbc,
    stop_parks_daily_revenue_on_a_null_payload => PayloadNull,
    stop_parks_daily_revenue_on_an_item_without_qty => MissingQty,
}

// ---------------------------------------------------------------------------
// on_error = "skip", daily_revenue

async fn daily_revenue_skips(bad: Bad) {
    let p = bad_payment(bad, OnError::Skip, 3).await;
    let (client, bad_id) = (&p.client, p.bad_id);

    let outcome = p.run_once().await;

    assert!(outcome.parked.is_empty(), "{bad:?}: {:?}", outcome.parked);
    // Exactly one dead letter, with every attempt counted.
    let rows = client
        .query(
            "SELECT projector, event_id, event_type, error, attempts, recorded_at IS NOT NULL
               FROM pgfold.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{bad:?}: dead letters");
    let r = &rows[0];
    assert_eq!(r.get::<_, String>(0), "daily_revenue");
    assert_eq!(r.get::<_, i64>(1), bad_id);
    assert_eq!(r.get::<_, String>(2), "OrderPaid");
    let error: String = r.get(3);
    assert!(error.contains(bad.clue()), "{bad:?}: {error:?}");
    assert_eq!(
        r.get::<_, i32>(4),
        3,
        "{bad:?}: attempts recorded must equal max_attempts (the retries happened)"
    );
    assert!(r.get::<_, bool>(5), "no time recorded");
    // The projection is the fold of every event except exactly that one.
    assert_eq!(
        revenue_differences(client, &expected_revenue_where(&format!("id <> {bad_id}"))).await,
        0,
        "{bad:?}: daily_revenue is not the fold without the bad event"
    );
    let total = revenue_total(client).await;
    assert_eq!(total, "152.50", "{bad:?}: 20.00 + 3.5 + 100.00 + 29.00");
    assert_eq!(
        projector_counter(client, "daily_revenue", "events_applied").await,
        4,
        "{bad:?}: the four good payments, once each"
    );
    let (state, failing, _, _) = projector_row(client, "daily_revenue").await;
    assert_eq!((state.as_str(), failing), ("running", None));
    assert_eq!(
        snapshot_differences(client, pgfold::testkit::workload::EXPECTED_ORDER_SNAPSHOTS).await,
        0
    );

    let (code, status) = status_json(&p.db.url, &[]);
    assert_eq!(code, Some(0), "{status}");
    let revenue = projector_status(&status, "daily_revenue");
    assert_eq!(revenue["dead_letters"], 1, "{status}");
    assert_eq!(revenue["state"], "running", "{status}");
    assert_eq!(revenue["lag_events"], 0, "{status}");
    assert_eq!(
        projector_status(&status, "order_snapshots")["dead_letters"],
        0,
        "{status}"
    );

    // Another run neither retries the dead letter nor applies anything twice.
    let outcome = p.run_once().await;
    assert!(outcome.parked.is_empty());
    assert_eq!(
        scalar_i64(client, "SELECT count(*) FROM pgfold.dead_letters").await,
        1
    );
    assert_eq!(
        revenue_differences(client, &expected_revenue_where(&format!("id <> {bad_id}"))).await,
        0
    );
}

for_each_bad_payment! { daily_revenue_skips:
    skip_dead_letters_a_payment_without_items => MissingItems,
    skip_dead_letters_items_that_are_not_an_array => ItemsNotAnArray,
    skip_dead_letters_a_price_of_abc => PriceAbc,
    skip_dead_letters_a_null_payload => PayloadNull,
    skip_dead_letters_an_item_without_qty => MissingQty,
}

// ---------------------------------------------------------------------------
// order_snapshots: an OrderPaid on a stream that has no OrderCreated

#[tokio::test]
async fn stop_parks_order_snapshots_on_a_payment_before_its_order_exists() {
    let p = orphan_payment(OnError::Stop, 2).await;
    let (client, orphan) = (&p.client, p.bad_id);

    let outcome = p.run_once().await;

    // The error names the stream.
    p.assert_parked(&outcome, "order-orphan");
    // The events before the orphan are applied, the rest are not.
    assert_eq!(
        snapshot_differences(client, &expected_snapshots_where(&format!("id < {orphan}"))).await,
        0,
        "order_snapshots is not the fold of the events before the orphan"
    );
    p.assert_failed(2).await;
    // daily_revenue folds the orphan's (valid) payment and everything else.
    assert_eq!(
        revenue_differences(client, pgfold::testkit::workload::EXPECTED_DAILY_REVENUE).await,
        0,
        "daily_revenue was held back by the other projector's poison"
    );
    assert_eq!(projector_row(client, "daily_revenue").await.0, "running");

    let status = p.assert_status_failed("order-orphan");
    assert_eq!(
        projector_status(&status, "daily_revenue")["state"],
        "running",
        "{status}"
    );

    p.run_once_binary_fails();
    p.assert_failed(2).await;
    assert_eq!(
        snapshot_differences(client, &expected_snapshots_where(&format!("id < {orphan}"))).await,
        0
    );
}

#[tokio::test]
async fn skip_dead_letters_a_payment_before_its_order_exists() {
    let p = orphan_payment(OnError::Skip, 3).await;
    let (client, orphan) = (&p.client, p.bad_id);

    let outcome = p.run_once().await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let row = client
        .query_one(
            "SELECT projector, event_id, event_type, attempts, error FROM pgfold.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "order_snapshots");
    assert_eq!(row.get::<_, i64>(1), orphan);
    assert_eq!(row.get::<_, String>(2), "OrderPaid");
    assert_eq!(row.get::<_, i32>(3), 3, "attempts recorded = max_attempts");
    assert!(row.get::<_, String>(4).contains("order-orphan"));
    assert_eq!(
        scalar_i64(client, "SELECT count(*) FROM pgfold.dead_letters").await,
        1
    );
    // Everything else is applied: the expected fold leaves a stream without an
    // OrderCreated out.
    assert_projections_exact(client).await;
    assert_eq!(
        scalar_i64(
            client,
            "SELECT count(*) FROM order_snapshots WHERE stream_id = 'order-orphan'"
        )
        .await,
        0
    );
    assert_eq!(
        projector_counter(client, "order_snapshots", "events_applied").await,
        6,
        "the six good events, once each"
    );

    let (code, status) = status_json(&p.db.url, &[]);
    assert_eq!(code, Some(0), "{status}");
    assert_eq!(
        projector_status(&status, "order_snapshots")["dead_letters"],
        1,
        "{status}"
    );
    assert_eq!(
        projector_status(&status, "daily_revenue")["dead_letters"],
        0,
        "{status}"
    );
}

// ---------------------------------------------------------------------------
// A restart retries a parked projector: state goes back to running, then failed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_retries_the_parked_projector_and_it_fails_again() {
    let mut p = bad_payment(Bad::MissingItems, OnError::Stop, 2).await;
    let (db, bad_id) = (&p.db, p.bad_id);
    let outcome = p.run_once().await;
    assert_eq!(outcome.parked.len(), 1);
    assert_eq!(projector_row(&p.client, "daily_revenue").await.0, "failed");
    let error_at_before = p.last_error_at().await;

    // Hold the projector's table so that the retried batch waits: the state the
    // restart sets can then be observed before the retry fails again.
    let hold = p.client.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE daily_revenue IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFOLD_PROJECTORS__DAILY_REVENUE__MAX_ATTEMPTS", "2"),
            ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "100"),
        ],
    );
    let observer = db.client().await;
    wait_for(
        "the restarted daemon to put daily_revenue back to running",
        Duration::from_secs(15),
        || async {
            let row = observer
                .query_one(
                    "SELECT state, attempts FROM pgfold.projectors WHERE name = 'daily_revenue'",
                    &[],
                )
                .await
                .unwrap();
            row.get::<_, String>(0) == "running" && row.get::<_, i32>(1) == 0
        },
    )
    .await;
    let (code, status) = status_json(&db.url, &[]);
    assert_eq!(
        code,
        Some(0),
        "nothing is failed while it is retried: {status}"
    );
    assert_eq!(
        projector_status(&status, "daily_revenue")["state"],
        "running"
    );
    hold.rollback().await.unwrap();

    wait_for(
        "daily_revenue to be parked again after max_attempts",
        Duration::from_secs(15),
        || async {
            let row = observer
                .query_one(
                    "SELECT state, attempts, failing_event_id, last_error_at > $1::text::timestamptz
                       FROM pgfold.projectors WHERE name = 'daily_revenue'",
                    &[&error_at_before],
                )
                .await
                .unwrap();
            row.get::<_, String>(0) == "failed"
                && row.get::<_, i32>(1) == 2
                && row.get::<_, Option<i64>>(2) == Some(bad_id)
                && row.get::<_, bool>(3)
        },
    )
    .await;
    assert!(
        daemon.is_running(),
        "pgfold run exited when one projector parked: {:?}",
        daemon.lines()
    );
    // The other projector keeps going meanwhile.
    append_all(
        &mut p.client,
        &[created("order-9", "books", json!("1.00"), 1)],
    )
    .await;
    wait_for(
        "order_snapshots to keep going",
        Duration::from_secs(15),
        || async {
            scalar_i64(
                &observer,
                "SELECT count(*) FROM order_snapshots WHERE stream_id = 'order-9'",
            )
            .await
                == 1
        },
    )
    .await;
    daemon.kill();
    assert_eq!(
        revenue_differences(
            &p.client,
            &expected_revenue_where(&format!("id < {bad_id}"))
        )
        .await,
        0
    );
}
