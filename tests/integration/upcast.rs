//! Issue 27: upcasters declared once (`[[upcasters]]`), applied on every path.
//! A log holding versions 1, 2 and 3 of `OrderPaid` (and 1 and 2 of
//! `OrderShipped`), mixed, reads through the upcasters exactly as the same log
//! upcast by hand: the built-ins, a Rust projector (examples/custom_projector)
//! and SQL projections (`batch` and `event`) all equal the independent folds of
//! the hand-upcast copy. A bad expression and a gap in a chain stop pgfold at
//! start in one line, with the database unchanged. Adding an upcaster rebuilds
//! only the projectors that consume its type, beside the live ones, and readers
//! never see a partial projection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgfold::config::Upcaster;
use pgfold::daemon::RunOptions;
use pgfold::feed::Upcasters;
use pgfold::testkit::db::column;
use pgfold::testkit::workload;
use tokio_postgres::Client;

use crate::helpers::*;

fn upcaster(event_type: &str, from: i32, payload: &str) -> Upcaster {
    Upcaster::new(event_type, from, from + 1, payload)
}

/// The chains of this file: `OrderPaid` 1 (items under `lines`, no currency), 2
/// (a currency), 3 (`items`); `OrderShipped` 1 (the address under `addr`), 2.
fn chains() -> Vec<Upcaster> {
    vec![
        upcaster(
            "OrderPaid",
            2,
            "(payload - 'lines') || jsonb_build_object('items', payload->'lines')",
        ),
        upcaster(
            "OrderPaid",
            1,
            "payload || jsonb_build_object('currency', 'EUR')",
        ),
        upcaster(
            "OrderShipped",
            1,
            "(payload - 'addr') || jsonb_build_object('address', payload->'addr')",
        ),
    ]
}

/// Upcasters of every type the built-ins consume, for the plan checks
/// (`plan_robustness.rs`).
pub(crate) fn upcasters_of_every_kind() -> Upcasters {
    let mut all = chains();
    all.push(upcaster(
        "OrderCreated",
        1,
        "payload || jsonb_build_object('channel', 'web')",
    ));
    all.push(upcaster("OrderCancelled", 1, "payload"));
    Upcasters::new(&all).unwrap()
}

/// The `[[upcasters]]` of a configuration file.
fn toml(upcasters: &[Upcaster]) -> String {
    upcasters
        .iter()
        .map(|u| {
            format!(
                "[[upcasters]]\nevent_type = {:?}\nfrom_version = {}\nto_version = {}\npayload = {:?}\n\n",
                u.event_type, u.from_version, u.to_version, u.payload
            )
        })
        .collect()
}

/// Keeps the log as the application writes it today in `hand.events` (the
/// upcast-by-hand copy: `OrderPaid` with its currency, at version 3; `OrderShipped`
/// at version 2), and rewrites the stored events into their older shapes, mixed.
/// Positions and ids stay.
async fn write_old_versions(client: &Client) {
    client
        .batch_execute(
            "UPDATE events SET payload = payload || jsonb_build_object('currency',
                                CASE WHEN id % 3 = 0 THEN 'USD' ELSE 'EUR' END)
              WHERE event_type = 'OrderPaid';
             CREATE SCHEMA hand;
             CREATE TABLE hand.events AS SELECT * FROM events;
             UPDATE hand.events SET event_version = 3 WHERE event_type = 'OrderPaid';
             UPDATE hand.events SET event_version = 2 WHERE event_type = 'OrderShipped';
             UPDATE events SET event_version = 3 WHERE event_type = 'OrderPaid' AND id % 3 = 0;
             UPDATE events SET event_version = 2,
                               payload = (payload - 'items') || jsonb_build_object('lines', payload->'items')
              WHERE event_type = 'OrderPaid' AND id % 3 = 1;
             UPDATE events SET event_version = 1,
                               payload = (payload - 'items' - 'currency')
                                         || jsonb_build_object('lines', payload->'items')
              WHERE event_type = 'OrderPaid' AND id % 3 = 2;
             UPDATE events SET payload = (payload - 'address') || jsonb_build_object('addr', payload->'address')
              WHERE event_type = 'OrderShipped' AND id % 2 = 0;
             UPDATE events SET event_version = 2
              WHERE event_type = 'OrderShipped' AND id % 2 = 1;",
        )
        .await
        .unwrap();
    let versions: Vec<i32> = column(
        client,
        "SELECT DISTINCT event_version FROM events WHERE event_type = 'OrderPaid' ORDER BY 1",
    )
    .await
    .unwrap();
    assert_eq!(versions, [1, 2, 3], "the log holds every version, mixed");
}

/// Two SQL projections that record, per `OrderPaid`, the version and currency
/// they saw and whether its items were there: one over `batch`, one over
/// `event`.
fn write_recording_projections(dir: &std::path::Path) {
    let setup = |table: &str| {
        format!(
            "tables = [\"{table}\"]\nsetup = \"CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, version int, currency text, items boolean, tenant text)\"\n"
        )
    };
    let columns =
        "id, event_version, payload->>'currency', payload ? 'items' AND NOT payload ? 'lines', tenant";
    std::fs::write(
        dir.join("paid_in_batch.toml"),
        format!(
            "order = \"set\"\nevent_types = [\"OrderPaid\"]\n{}apply = \"INSERT INTO paid_in_batch SELECT {columns} FROM batch\"\n",
            setup("paid_in_batch")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("paid_by_event.toml"),
        format!(
            "order = \"event\"\n{}[handlers]\nOrderPaid = \"INSERT INTO paid_by_event SELECT {columns} FROM event\"\n",
            setup("paid_by_event")
        ),
    )
    .unwrap();
    for example in std::fs::read_dir(crate::sql_projections::examples_dir()).unwrap() {
        let path = example.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
}

/// A database of `orders` orders, whose `events` has a column of the
/// application's own (`tenant`), which `batch` and `event` carry too.
async fn orders_of_a_tenant(orders: i64) -> (TestDb, Client) {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("ALTER TABLE events ADD COLUMN tenant text DEFAULT 'acme'")
        .await
        .unwrap();
    workload::load_orders(&client, 1, orders).await.unwrap();
    (db, client)
}

/// `customer_spend` (examples/custom_projector.rs) computed from `events`.
const EXPECTED_CUSTOMER_SPEND: &str = "
SELECT c.payload->>'customerId', sum((i->>'price')::numeric * (i->>'qty')::numeric)
  FROM events p
  JOIN events c ON c.stream_id = p.stream_id AND c.event_type = 'OrderCreated'
 CROSS JOIN jsonb_array_elements(p.payload->'items') i
 WHERE p.event_type = 'OrderPaid'
 GROUP BY 1";

const EXPECTED_PAID: &str = "
SELECT id, event_version, payload->>'currency', payload ? 'items' AND NOT payload ? 'lines', tenant
  FROM events WHERE event_type = 'OrderPaid'";

#[tokio::test]
async fn every_path_reads_the_events_upcast_and_equals_a_fold_of_the_log_upcast_by_hand() {
    // Arrange: orders, then their OrderPaid and OrderShipped rewritten in older
    // shapes; the projections of examples/ and two that record what they saw.
    let (db, client) = orders_of_a_tenant(600).await;
    write_old_versions(&client).await;
    let dir = tempfile::tempdir().unwrap();
    write_recording_projections(dir.path());
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("pgfold.toml");
    std::fs::write(&config, toml(&chains())).unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        (
            "PGFOLD_DAEMON__PROJECTIONS_DIR",
            dir.path().to_str().unwrap(),
        ),
        // Small batches: OrderCreated and OrderPaid of a stream fall in
        // different batches, and every kind of batch comes more than once.
        ("PGFOLD_DAEMON__BATCH_SIZE", "97"),
        ("PGFOLD_DAEMON__SET_BATCH_SIZE", "211"),
    ];

    // Act: the full command line, with a Rust projector of its own. (The
    // built-ins were registered by the test database's migration, without
    // upcasters: they are rebuilt beside, the others folded live.)
    let mut run = Daemon::spawn(
        custom_projector_binary(),
        &["--config", config.to_str().unwrap(), "run", "--once"],
        &env,
    );
    wait_for("run --once to end", Duration::from_secs(120), || {
        let running = run.is_running();
        async move { !running }
    })
    .await;
    let status = run.wait().unwrap();

    // Assert: every projection equals the independent fold of the copy upcast
    // by hand.
    assert!(status.success(), "run --once: {}", run.output());
    client
        .batch_execute("SET search_path = hand, public")
        .await
        .unwrap();
    assert_projections_exact(&client).await;
    assert_eq!(
        workload::example_differences(&client).await.unwrap(),
        (0, 0, 0),
        "rows differing (daily_revenue_sql, order_snapshots_sql, order_status)"
    );
    for (actual, expected) in [
        (
            "SELECT customer_id, paid FROM customer_spend",
            EXPECTED_CUSTOMER_SPEND,
        ),
        ("SELECT * FROM paid_in_batch", EXPECTED_PAID),
        ("SELECT * FROM paid_by_event", EXPECTED_PAID),
    ] {
        assert_eq!(
            workload::differences(&client, actual, expected)
                .await
                .unwrap(),
            0,
            "{actual}"
        );
    }
    assert!(scalar_i64(&client, "SELECT count(*) FROM customer_spend").await > 100);
    // Stored rows are never rewritten.
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM public.events WHERE event_type = 'OrderPaid' AND event_version = 1"
        )
        .await,
        scalar_i64(
            &client,
            "SELECT count(*) FROM public.events WHERE event_type = 'OrderPaid' AND id % 3 = 2"
        )
        .await
    );
}

/// What a refused start must leave as it was: the tables, the projectors' rows
/// and the log.
async fn footprint(client: &Client) -> (Vec<String>, Vec<String>, String) {
    let tables = "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1";
    let projectors = "SELECT name FROM pgfold.projectors ORDER BY 1";
    let log = "SELECT md5(string_agg(id || ':' || event_version || ':' || payload::text, ',' ORDER BY id)) FROM events";
    (
        column(client, tables).await.unwrap(),
        column(client, projectors).await.unwrap(),
        column::<String>(client, log).await.unwrap().remove(0),
    )
}

#[tokio::test]
async fn a_bad_expression_or_a_gap_in_a_chain_stops_pgfold_at_start_in_one_line() {
    let db = TestDb::new().await;
    let client = db.client().await;
    workload::load_orders(&client, 1, 50).await.unwrap();
    let before = footprint(&client).await;
    let cases = [
        (
            "bad expression",
            vec![upcaster(
                "OrderPaid",
                1,
                "payload || jsonb_build_objet('currency', 'EUR')",
            )],
            "[[upcasters]] OrderPaid 1->2: payload: function jsonb_build_objet",
        ),
        (
            "not jsonb",
            vec![upcaster("OrderPaid", 1, "payload->>'orderId'")],
            "[[upcasters]] OrderPaid 1->2: payload: CASE types",
        ),
        (
            "gap",
            vec![
                upcaster("OrderPaid", 1, "payload"),
                upcaster("OrderPaid", 3, "payload"),
            ],
            "[[upcasters]] OrderPaid 3->4: a gap in the chain of OrderPaid",
        ),
    ];
    for (name, upcasters, clue) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pgfold.toml");
        std::fs::write(&config, toml(&upcasters)).unwrap();
        for command in ["migrate", "run"] {
            let mut args = vec!["--config", config.to_str().unwrap(), command];
            if command == "run" {
                args.push("--once");
            }
            let out = pgfold(&args, &[("DATABASE_URL", db.url.as_str())]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            assert!(!out.status.success(), "{name} {command}: {stderr}");
            assert_eq!(lines.len(), 1, "{name} {command}: one line, got {stderr}");
            assert!(lines[0].contains(clue), "{name} {command}: {stderr}");
            assert_eq!(
                footprint(&client).await,
                before,
                "{name} {command} changed the database"
            );
        }
    }
}

/// What a reader of `order_snapshots` sees: how many shipping addresses read as
/// the upcaster writes them (upper case), and how many do not.
async fn addresses(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state->>'shippingAddress' = upper(state->>'shippingAddress')),
                    count(*) FILTER (WHERE state->>'shippingAddress' <> upper(state->>'shippingAddress'))
               FROM order_snapshots",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_an_upcaster_rebuilds_only_its_consumers_beside_the_live_ones() {
    // Arrange: both built-ins live, no upcaster.
    let db = TestDb::new().await;
    let client = db.client().await;
    workload::load_orders(&client, 1, 20_000).await.unwrap();
    run_once(&db.settings(), RunOptions::default()).await;
    let (_, shipped) = addresses(&client).await;
    assert!(shipped > 1000);
    assert_eq!(addresses(&client).await, (0, shipped));
    let fingerprints =
        "SELECT string_agg(name || '=' || fingerprint, ' ' ORDER BY name) FROM pgfold.projectors";
    let before: Vec<String> = column(&client, fingerprints).await.unwrap();
    let revenue = "SELECT md5(string_agg(day || category || total, ',' ORDER BY day, category)) FROM daily_revenue";
    let revenue_before: Vec<String> = column(&client, revenue).await.unwrap();

    // Act: an upcaster of OrderShipped, which order_snapshots consumes and
    // daily_revenue does not; a reader meanwhile, watching the addresses and
    // which builds run, and why.
    let mut settings = db.settings();
    settings.upcasters = vec![upcaster(
        "OrderShipped",
        1,
        "payload || jsonb_build_object('address', upper(payload->>'address'))",
    )];
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let (mut seen, mut builds) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                seen.push(addresses(&client).await);
                let reasons: Vec<String> = column(
                    &client,
                    "SELECT name || ': ' || build_reason FROM pgfold.projectors WHERE build_reason IS NOT NULL",
                )
                .await
                .unwrap();
                builds.extend(reasons);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (seen, builds)
        })
    };
    let outcome = run_once(&settings, RunOptions::default()).await;
    stop.store(true, Ordering::Relaxed);
    let (seen, mut builds) = reader.await.unwrap();

    // Assert: order_snapshots alone rebuilt, swapped whole, and exact.
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let swapped: Vec<&str> = outcome.swaps.iter().map(|s| s.projector.as_str()).collect();
    assert_eq!(swapped, ["order_snapshots"]);
    assert!(seen.len() > 3, "the reader read {} times", seen.len());
    for s in &seen {
        assert!(
            *s == (0, shipped) || *s == (shipped, 0),
            "a reader saw {s:?}: a partial projection"
        );
    }
    assert_eq!(addresses(&client).await, (shipped, 0));
    builds.dedup();
    assert_eq!(
        builds,
        ["order_snapshots.build: definition changed: upcaster OrderShipped 1->2 added"],
        "the rebuild and its reason, as status shows it"
    );
    let after: Vec<String> = column(&client, fingerprints).await.unwrap();
    let daily = |f: &[String]| {
        f[0].split(' ')
            .find(|p| p.starts_with("daily_revenue="))
            .map(str::to_string)
    };
    assert_eq!(daily(&after), daily(&before), "daily_revenue is untouched");
    assert_ne!(after, before);
    assert_eq!(
        column::<String>(&client, revenue).await.unwrap(),
        revenue_before
    );
    client
        .batch_execute(
            "CREATE SCHEMA hand;
             CREATE TABLE hand.events AS SELECT * FROM events;
             UPDATE hand.events SET payload = payload || jsonb_build_object('address', upper(payload->>'address'))
              WHERE event_type = 'OrderShipped';
             SET search_path = hand, public",
        )
        .await
        .unwrap();
    assert_projections_exact(&client).await;

    // The same configuration again: nothing to rebuild.
    let outcome = run_once(&settings, RunOptions::default()).await;
    assert!(outcome.swaps.is_empty());
}

#[tokio::test]
async fn an_upcaster_that_fails_on_one_event_makes_it_a_poison_event_on_every_path() {
    // Arrange: one OrderPaid whose orderId the upcaster cannot cast; a
    // projection of decoded events (`event`) and a set one (`batch`).
    let (db, client) = orders_of_a_tenant(100).await;
    let poison = scalar_i64(
        &client,
        "UPDATE events SET payload = payload || '{\"bonus\": \"x\"}'
          WHERE event_type = 'OrderPaid' AND stream_id = 'order-50' RETURNING id",
    )
    .await;
    let (settings, registry, options, _dir) = recording_with_a_failing_upcaster(&db);
    // Act
    let outcome = run_once_with(&settings, &registry, options).await;

    // Assert: that event, and only that one, is a dead letter of each, named
    // with what failed; every other OrderPaid is folded.
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters[0].starts_with(&format!("paid_by_event {poison} upcasting OrderPaid from version 1: invalid input syntax for type integer")), "{letters:?}");
    assert!(
        letters[1].starts_with(&format!("paid_in_batch {poison} ")),
        "{letters:?}"
    );
    let paid = scalar_i64(
        &client,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await;
    for table in ["paid_in_batch", "paid_by_event"] {
        assert_eq!(
            scalar_i64(&client, &format!("SELECT count(*) FROM {table}")).await,
            paid - 1,
            "{table}"
        );
    }
}

/// Every dead letter, as "projector event_id error", in that order.
async fn dead_letters(client: &Client) -> Vec<String> {
    column(
        client,
        "SELECT projector || ' ' || event_id || ' ' || error FROM pgfold.dead_letters ORDER BY 1",
    )
    .await
    .unwrap()
}

/// Settings for [`write_recording_projections`]' two projections, run alone,
/// each dead-lettering an event at its first failure, through an upcaster of
/// `OrderPaid` that fails where `bonus` is not an integer. The directory holds
/// the projection files.
fn recording_with_a_failing_upcaster(
    db: &TestDb,
) -> (
    pgfold::config::Settings,
    pgfold::projector::Registry,
    RunOptions,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    write_recording_projections(dir.path());
    let registry =
        pgfold::sql_projections::load(pgfold::projectors::builtin(), Some(dir.path())).unwrap();
    let mut settings = db.settings();
    settings.upcasters = vec![upcaster(
        "OrderPaid",
        1,
        "payload || jsonb_build_object('bonus', coalesce((payload->>'bonus')::int, 0))",
    )];
    for name in ["paid_in_batch", "paid_by_event"] {
        settings.projectors.insert(
            name.into(),
            pgfold::config::ProjectorSettings {
                max_attempts: 1,
                on_error: pgfold::config::OnError::Skip,
                enabled: true,
                ..Default::default()
            },
        );
    }
    let options = RunOptions {
        projectors: vec!["paid_in_batch".into(), "paid_by_event".into()],
        ..RunOptions::default()
    };
    (settings, registry, options, dir)
}

#[tokio::test]
async fn an_upcaster_that_fails_on_an_earlier_event_delivered_ahead_isolates_that_event() {
    // Arrange: order-1's second OrderPaid took its transaction id before its
    // first, which the upcaster cannot cast, committed: read in position order,
    // sequence 2 comes first and brings sequence 1 ahead of it. order-2 follows.
    let db = with_scratch().await;
    let mut client = db.client().await;
    client
        .batch_execute("ALTER TABLE events ADD COLUMN tenant text DEFAULT 'acme'")
        .await
        .unwrap();
    let late = early_writer(&db).await;
    let mut bad = paid("order-1", "books", serde_json::json!("1.00"), 1);
    bad.payload["bonus"] = "x".into();
    append_all(&mut client, &[bad]).await;
    let second = paid("order-1", "books", serde_json::json!("2.00"), 1);
    pgfold::store::append(&late, &second, 2).await.unwrap();
    late.batch_execute("COMMIT").await.unwrap();
    append_all(
        &mut client,
        &[paid("order-2", "books", serde_json::json!("3.00"), 1)],
    )
    .await;
    let ids: Vec<i64> = column(
        &client,
        "SELECT id FROM events ORDER BY stream_id, sequence",
    )
    .await
    .unwrap();
    let inverted = scalar_i64(
        &client,
        "SELECT count(*) FROM events a JOIN events b ON b.stream_id = a.stream_id
          AND b.sequence = a.sequence + 1 WHERE b.tx_id < a.tx_id",
    )
    .await;
    assert_eq!(
        inverted, 1,
        "the test did not build the inversion it means to"
    );
    let (settings, registry, options, _dir) = recording_with_a_failing_upcaster(&db);

    // Act: the read fails on an event no row read is, until it is found.
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        run_once_with(&settings, &registry, options),
    )
    .await
    .expect("the run retried the failing read for ever instead of isolating the event");

    // Assert: the event the upcaster fails on is the dead letter, and the
    // stream's later event delivered with it is recorded as skipped with it (the
    // set fold, which keeps no order, folds it); order-2 is folded by both.
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    let by_event = format!(
        "paid_by_event {} upcasting OrderPaid from version 1: ",
        ids[0]
    );
    assert!(letters[0].starts_with(&by_event), "{letters:?}");
    let with = format!("paid_by_event {} skipped with event {}", ids[1], ids[0]);
    assert!(letters[1].starts_with(&with), "{letters:?}");
    assert!(
        letters[2].starts_with(&format!("paid_in_batch {} ", ids[0])),
        "{letters:?}"
    );
    let folded = |table: &str| format!("SELECT array_agg(id ORDER BY id) FROM {table}");
    let by_event: Vec<i64> = client
        .query_one(&folded("paid_by_event"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_event, [ids[2]]);
    let in_batch: Vec<i64> = client
        .query_one(&folded("paid_in_batch"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_batch, [ids[1], ids[2]]);
}
