//! Issue 3, "never lose, never double": concurrent optimistic writers (with
//! rollbacks and early transaction ids), three `pgfold run` instances SIGKILLed and
//! restarted every few hundred milliseconds, and their backends terminated from
//! outside; at the end both projections must equal the independent folds, and no
//! event may be missing or applied twice.
//!
//! Bounded to about two minutes; `PGFOLD_TORTURE_SECONDS` sets how long the writers
//! run (default 60).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgfold::store::{self, AppendError, NewEvent};
use pgfold::testkit::db::{connect, scalar_i64, terminate_daemon_backends, TestDb};
use pgfold::testkit::process::{self, Daemon, Sink};
use pgfold::testkit::workload;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The binary cargo built for this test.
const PGFOLD: &str = env!("CARGO_BIN_EXE_pgfold");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/projections");

const WRITERS: usize = 8;
const INSTANCES: usize = 3;
/// Orders open for more events at once: few, so writers contend on streams.
const OPEN_ORDERS: usize = 12;

/// An order and the events it will get, decided when it is created.
struct Order {
    stream_id: String,
    plan: Vec<&'static str>,
    items: Value,
    created_at: DateTime<Utc>,
}

#[derive(Default)]
struct Figures {
    committed: AtomicU64,
    rollbacks: AtomicU64,
    conflicts: AtomicU64,
    early_xid: AtomicU64,
    early_xid_committed: AtomicU64,
}

struct Shared {
    open: Mutex<Vec<Arc<Order>>>,
    next_order: AtomicU64,
    figures: Figures,
}

fn price(rng: &mut StdRng) -> Value {
    let cents: u64 = rng.random_range(100..100_000);
    let text = format!("{}.{:02}", cents / 100, cents % 100);
    if rng.random_bool(0.5) {
        Value::String(text)
    } else {
        // An exact JSON number (serde_json's arbitrary_precision keeps the digits).
        serde_json::from_str(&text).unwrap()
    }
}

fn new_order(shared: &Shared, rng: &mut StdRng) -> Arc<Order> {
    let n = shared.next_order.fetch_add(1, Ordering::Relaxed);
    let items: Vec<Value> = (0..rng.random_range(1..=3))
        .map(|k| {
            json!({"sku": format!("sku-{}", rng.random_range(0..500)),
                   "category": format!("category-{}", rng.random_range(0..8)),
                   "price": price(rng), "qty": rng.random_range(1..=5), "k": k})
        })
        .collect();
    let mut plan = vec!["OrderCreated"];
    if rng.random_bool(0.9) {
        plan.push("OrderPaid");
        if rng.random_bool(0.7) {
            plan.push("OrderShipped");
        } else if rng.random_bool(0.1) {
            plan.push("OrderCancelled");
        }
    } else if rng.random_bool(0.5) {
        plan.push("OrderCancelled");
    }
    let day = rng.random_range(0..40i64);
    let created_at = DateTime::from_timestamp(
        1_735_689_600 + day * 86_400 + rng.random_range(0..86_400),
        0,
    )
    .unwrap();
    Arc::new(Order {
        stream_id: format!("order-{n}"),
        plan,
        items: Value::Array(items),
        created_at,
    })
}

fn event(order: &Order, event_type: &str, rng: &mut StdRng) -> NewEvent {
    let payload = match event_type {
        "OrderCreated" => json!({"orderId": order.stream_id,
                                 "customerId": format!("customer-{}", rng.random_range(0..100)),
                                 "items": order.items}),
        "OrderPaid" => json!({"orderId": order.stream_id, "items": order.items}),
        "OrderShipped" => {
            json!({"address": format!("{} Harbour Street", rng.random_range(1..999))})
        }
        _ => json!({"reason": "customer request"}),
    };
    let at = order.created_at + chrono::Duration::seconds(rng.random_range(0..200_000));
    NewEvent::new(order.stream_id.clone(), "order", event_type, payload).occurred_at(at)
}

/// One writer: transactions that append the next event of a new or open order
/// through the optimistic-concurrency path.
async fn writer(db_url: String, shared: Arc<Shared>, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = connect(&db_url).await.unwrap();
    while Instant::now() < until {
        let (order, is_new) = {
            let open = shared.open.lock().unwrap();
            if open.len() < OPEN_ORDERS || rng.random_bool(0.15) {
                (None, true)
            } else {
                (Some(open[rng.random_range(0..open.len())].clone()), false)
            }
        };
        let order = order.unwrap_or_else(|| new_order(&shared, &mut rng));
        // Retried on a lost race, re-reading the stream each time.
        loop {
            let tx = client.transaction().await.expect("begin");
            let early = rng.random_bool(0.2);
            if early {
                // Takes the transaction id before appending (issue 6's inversion).
                tx.execute(
                    "INSERT INTO scratch (note) VALUES ($1)",
                    &[&order.stream_id],
                )
                .await
                .expect("scratch insert");
                shared.figures.early_xid.fetch_add(1, Ordering::Relaxed);
                // The application's other work: another writer may append to this
                // stream and commit meanwhile, so this transaction appends after it
                // with an older transaction id.
                tokio::time::sleep(Duration::from_micros(rng.random_range(1_000..=15_000))).await;
            }
            let last = store::last_sequence(&tx, &order.stream_id)
                .await
                .expect("last sequence");
            let Some(event_type) = order.plan.get(last as usize) else {
                // The order is complete: nothing to append.
                tx.rollback().await.expect("rollback");
                shared
                    .open
                    .lock()
                    .unwrap()
                    .retain(|o| o.stream_id != order.stream_id);
                break;
            };
            let ev = event(&order, event_type, &mut rng);
            match store::append(&tx, &ev, last + 1).await {
                Ok(_) => {}
                Err(AppendError::Conflict { .. }) => {
                    shared.figures.conflicts.fetch_add(1, Ordering::Relaxed);
                    tx.rollback().await.expect("rollback");
                    continue;
                }
                Err(e) => panic!("append failed: {e}"),
            }
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..=5_000))).await;
            if rng.random_bool(0.1) {
                tx.rollback().await.expect("rollback");
                shared.figures.rollbacks.fetch_add(1, Ordering::Relaxed);
            } else {
                tx.commit().await.expect("commit");
                shared.figures.committed.fetch_add(1, Ordering::Relaxed);
                if early {
                    shared
                        .figures
                        .early_xid_committed
                        .fetch_add(1, Ordering::Relaxed);
                }
                if is_new {
                    shared.open.lock().unwrap().push(order.clone());
                }
            }
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_many_writers_killed_instances_terminated_backends_end_exact() {
    let seconds: u64 = std::env::var("PGFOLD_TORTURE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("PGFOLD_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let started = Instant::now();
    let db = TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE scratch (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();

    let log_path = std::env::temp_dir().join(format!("{}.log", db.name));
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db.url.as_str()),
        ("RUST_LOG", "warn"),
        ("PGFOLD_DAEMON__BATCH_SIZE", "50"),
        ("PGFOLD_DAEMON__SET_BATCH_SIZE", "100"),
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "200"),
        ("PGFOLD_DATABASE__POOL_SIZE", "4"),
        // The SQL projections run under the same chaos as the built-ins.
        ("PGFOLD_DAEMON__PROJECTIONS_DIR", EXAMPLES),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // Every instance's stderr goes to one file; each is SIGKILLed when dropped.
    let instance = Daemon::command(PGFOLD)
        .args(["run"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Sink::File(File::create(&log_path).unwrap()));
    let mut instances: Vec<Daemon> = (0..INSTANCES).map(|_| instance.spawn().unwrap()).collect();
    let mut spawned = INSTANCES as u64;

    let shared = Arc::new(Shared {
        open: Mutex::new(Vec::new()),
        next_order: AtomicU64::new(1),
        figures: Figures::default(),
    });
    let until = Instant::now() + Duration::from_secs(seconds);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                db.url.clone(),
                shared.clone(),
                seed.wrapping_add(w as u64 * 7919),
                until,
            ))
        })
        .collect();

    // Chaos while the writers run: a random instance SIGKILLed and restarted every
    // 200-500 ms, and every daemon backend terminated every few seconds.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (mut kills, mut terminations, mut termination_rounds) = (0u64, 0i64, 0u64);
    let mut next_termination = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..=500))).await;
        let i = rng.random_range(0..INSTANCES);
        instances[i].kill();
        instances[i] = instance.spawn().unwrap();
        spawned += 1;
        kills += 1;
        if Instant::now() >= next_termination {
            terminations += terminate_daemon_backends(&admin, &db.name).await.unwrap();
            termination_rounds += 1;
            next_termination = Instant::now() + Duration::from_secs(rng.random_range(3..=6));
        }
    }
    for w in writers {
        w.await.expect("writer panicked");
    }
    instances.clear();
    kills += INSTANCES as u64;
    let applied_under_chaos = scalar_i64(
        &admin,
        "SELECT coalesce(sum(events_applied), 0)::bigint FROM pgfold.projectors",
    )
    .await
    .unwrap();

    // Catch up with one last instance, then compare with the independent folds.
    let out = process::run(
        PGFOLD,
        &["run", "--once"],
        &env.iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
    );
    let run_once_ok = out.status.success();
    let f = &shared.figures;
    let committed = f.committed.load(Ordering::Relaxed) as i64;
    let in_log = scalar_i64(&admin, "SELECT count(*) FROM events")
        .await
        .unwrap();
    let (revenue_rows, snapshot_rows) = workload::projection_differences(&admin).await.unwrap();
    let sql_rows = workload::example_differences(&admin).await.unwrap();
    // Each projector's events_applied against the committed events it consumes.
    let (mut missing, mut duplicated) = (0i64, 0i64);
    let mut per_projector = Vec::new();
    for (name, consumes) in [
        (
            "daily_revenue",
            "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
        ),
        (
            "order_snapshots",
            "SELECT count(*) FROM events WHERE stream_type = 'order'
               AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')",
        ),
        (
            "daily_revenue_sql",
            "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
        ),
        (
            "order_snapshots_sql",
            "SELECT count(*) FROM events WHERE stream_type = 'order'
               AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')",
        ),
        (
            "order_status",
            "SELECT count(*) FROM events WHERE stream_type = 'order'
               AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')",
        ),
    ] {
        let expected = scalar_i64(&admin, consumes).await.unwrap();
        let applied = scalar_i64(
            &admin,
            &format!("SELECT events_applied FROM pgfold.projectors WHERE name = '{name}'"),
        )
        .await
        .unwrap();
        missing += (expected - applied).max(0);
        duplicated += (applied - expected).max(0);
        per_projector.push(format!("{name} {applied}/{expected}"));
    }
    let inverted = scalar_i64(
        &admin,
        "SELECT count(*) FROM events a JOIN events b
             ON b.stream_id = a.stream_id AND b.sequence = a.sequence + 1
          WHERE b.tx_id < a.tx_id",
    )
    .await
    .unwrap();
    let dead_letters = scalar_i64(&admin, "SELECT count(*) FROM pgfold.dead_letters")
        .await
        .unwrap();

    println!(
        "torture (seed {seed}, {seconds} s of writing, {:.0} s in all):\n  \
         events committed      {committed} (in the log: {in_log})\n  \
         rollbacks             {}\n  \
         conflicts retried     {}\n  \
         early-xid transactions {} ({} committed; {inverted} stream pairs with inverted transaction ids)\n  \
         kills                 {kills}\n  \
         backend terminations  {terminations} (in {termination_rounds} rounds)\n  \
         instances             {}\n  \
         missing               {missing}\n  \
         duplicated            {duplicated}\n  \
         events applied/consumed: {} ({applied_under_chaos} applied before the final run --once)\n  \
         rows differing: daily_revenue {revenue_rows}, order_snapshots {snapshot_rows}; \
         SQL projections (daily_revenue_sql, order_snapshots_sql, order_status) {sql_rows:?}; dead letters {dead_letters}",
        started.elapsed().as_secs_f64(),
        f.rollbacks.load(Ordering::Relaxed),
        f.conflicts.load(Ordering::Relaxed),
        f.early_xid.load(Ordering::Relaxed),
        f.early_xid_committed.load(Ordering::Relaxed),
        spawned + 1,
        per_projector.join(", "),
    );

    assert!(
        run_once_ok,
        "the final run --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        committed, in_log,
        "the writers' count disagrees with the log"
    );
    assert_eq!(
        (missing, duplicated),
        (0, 0),
        "(missing, duplicated); daemon logs in {}",
        log_path.display()
    );
    assert_eq!(
        (revenue_rows, snapshot_rows),
        (0, 0),
        "rows differing from the independent folds (daily_revenue, order_snapshots); daemon logs in {}",
        log_path.display()
    );
    assert_eq!(
        sql_rows,
        (0, 0, 0),
        "rows differing from the independent folds (daily_revenue_sql, order_snapshots_sql, order_status); daemon logs in {}",
        log_path.display()
    );
    assert_eq!(dead_letters, 0);
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !logs.contains("panicked"),
        "a daemon panicked; logs in {}",
        log_path.display()
    );
    assert!(
        applied_under_chaos > 0,
        "the instances applied nothing while being killed: the chaos proved nothing"
    );
    assert!(
        committed > 1_000,
        "too few events to prove anything: {committed}"
    );
    assert!(kills > 10 && terminations > 0, "not enough chaos");
    assert!(
        inverted > 0,
        "no stream got the inverted transaction ids the early-xid writers are there to cause"
    );
    let _ = std::fs::remove_file(&log_path);
}
