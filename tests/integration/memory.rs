//! Issue 17, bounded memory whatever the events weigh: a decoded-events projector
//! (examples/custom_projector, the full command line in a child process) folds a
//! few hundred events with multi-megabyte payloads; batches are cut by
//! `daemon.batch_bytes`, so the child's peak RSS follows the budget, not the log.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use crate::helpers::*;

/// The budget the tests run with: small, so that a log of a few hundred large
/// events needs many batches.
const BATCH_BYTES: u64 = 8 << 20;

/// Peak RSS allowed: 64 MiB (the binary, its runtime, pool and buffers) plus this
/// many times the larger of the budget and the largest event. Measured: the
/// decoded events of a batch (serde_json keeps a string's bytes once), the one
/// row being decoded, and tokio-postgres's read buffer, which grows to the
/// largest message. Measured (debug build): 2.0-2.3 times, over an idle 27 MiB.
const FACTOR: u64 = 3;

/// Anonymous resident memory (what the batches allocated) allowed once the large
/// batches are applied and the child is idle. Measured (debug build): 12 MiB idle
/// before them, 17 MiB after; 46-64 MiB of resident memory in all, for good, with
/// mimalloc's default purge delays. The binary's own pages are left out: they are
/// file-backed, say nothing of freed batches, and grow with every crate linked
/// (17 MiB before the broker clients of issue 29, 22 MiB with them).
const IDLE_ANON_AFTER: u64 = 24 << 20;

/// `orders` orders, each an `OrderCreated` whose `notes` hold `notes_bytes` of
/// text (compressible, so that the server stores it compressed) and a small
/// `OrderPaid`. Generated in the server: the test is about reading them.
async fn append_large_orders(client: &Client, orders: i32, notes_bytes: i32) {
    client
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             SELECT 'order-' || i, 'order', kind,
                    CASE kind
                      WHEN 'OrderCreated' THEN jsonb_build_object(
                        'orderId', 'order-' || i, 'customerId', 'c-' || (i % 5),
                        'notes', repeat(md5(i::text), $2 / 32))
                      ELSE jsonb_build_object('orderId', 'order-' || i, 'items',
                        jsonb_build_array(jsonb_build_object('sku', 's', 'price', (i % 90) || '.25', 'qty', 1 + i % 3)))
                    END,
                    CASE kind WHEN 'OrderCreated' THEN 1 ELSE 2 END
               FROM generate_series(1, $1) i, unnest(ARRAY['OrderCreated', 'OrderPaid']) kind
              ORDER BY i, kind",
            &[&orders, &notes_bytes],
        )
        .await
        .expect("append large orders");
}

/// Rows of `customer_spend` that differ from the fold computed in SQL.
async fn spend_differences(client: &Client) -> i64 {
    scalar_i64(
        client,
        "WITH expected AS (
           SELECT c.payload->>'customerId' AS customer_id,
                  sum((i->>'price')::numeric * (i->>'qty')::numeric) AS paid
             FROM events p
             JOIN events c ON c.stream_id = p.stream_id AND c.event_type = 'OrderCreated'
             CROSS JOIN jsonb_array_elements(p.payload->'items') i
            WHERE p.event_type = 'OrderPaid'
            GROUP BY 1)
         SELECT count(*) FROM (
           (SELECT * FROM expected EXCEPT SELECT customer_id, paid FROM customer_spend)
           UNION ALL
           (SELECT customer_id, paid FROM customer_spend EXCEPT SELECT * FROM expected)) d",
    )
    .await
}

const OVERSIZED: &str = "larger than daemon.batch_bytes";

/// The child's log lines whose message contains `text`.
fn logged(daemon: &Daemon, text: &str) -> Vec<Value> {
    daemon
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

/// A field of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Runs `customer_spend` in a child over what is in `db` until its checkpoint
/// reaches the newest event; returns the child (still running) and its peak RSS
/// in bytes.
async fn catch_up(db: &TestDb) -> (Daemon, u64) {
    let client = db.client().await;
    let newest = scalar_i64(&client, "SELECT max(id) FROM events").await;
    let budget = BATCH_BYTES.to_string();
    let daemon = Daemon::spawn(
        custom_projector_binary(),
        &["run", "--projector", "customer_spend"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("PGFOLD_DAEMON__BATCH_BYTES", budget.as_str()),
            ("PGFOLD_LOG__FORMAT", "json"),
        ],
    );
    wait_for(
        "customer_spend to reach the newest event",
        Duration::from_secs(240),
        || async {
            client
                .query_opt(
                    "SELECT 1 FROM pgfold.projectors WHERE name = 'customer_spend' AND position_id = $1",
                    &[&newest],
                )
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    let peak = proc_kib(daemon.pid(), "VmHWM") * 1024;
    assert_eq!(
        spend_differences(&client).await,
        0,
        "customer_spend is wrong"
    );
    (daemon, peak)
}

fn assert_peak_within(peak: u64, largest: u64) {
    let bound = (64 << 20) + FACTOR * largest.max(BATCH_BYTES);
    assert!(
        peak < bound,
        "peak RSS {} MiB, above the bound of {} MiB",
        peak >> 20,
        bound >> 20
    );
}

#[tokio::test]
async fn a_log_of_large_events_is_folded_within_the_byte_budget() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // 200 events of 2.5 MB (500 MB of JSON) and 200 small ones.
    append_large_orders(&client, 200, 2_500_000).await;
    let (mut daemon, peak) = catch_up(&db).await;
    assert_peak_within(peak, 2_500_000);
    // Nothing keeps the batches once they are applied: the child's anonymous
    // memory falls back near its idle size. This does not show
    // `cli::return_freed_memory`: here the memory is back (about 21 MiB) by the
    // time the catch-up ends, with that call and without it.
    let pid = daemon.pid();
    wait_for(
        "the child's RSS to fall back after the large batches",
        Duration::from_secs(30),
        || async { proc_kib(pid, "RssAnon") * 1024 < IDLE_ANON_AFTER },
    )
    .await;
    daemon.kill();
    assert_eq!(logged(&daemon, OVERSIZED), Vec::<Value>::new());
    // Why the batches are small is said once, naming the largest event.
    let cut = logged(&daemon, "batches are cut at daemon.batch_bytes");
    assert_eq!(cut.len(), 1, "one warning: {cut:?}");
    assert_eq!(cut[0]["level"], "WARN", "{}", cut[0]);
    assert!(
        cut[0]["largest_bytes"]
            .as_u64()
            .is_some_and(|b| b >= 2_500_000),
        "{}",
        cut[0]
    );
}

#[tokio::test]
async fn an_event_larger_than_the_budget_is_applied_alone_with_one_warning() {
    let db = TestDb::new().await;
    let client = db.client().await;
    append_large_orders(&client, 60, 2_500_000).await;
    // One order's notes exceed the budget on their own: 20 MB.
    let huge: i64 = client
        .query_one(
            "UPDATE events SET payload = payload || jsonb_build_object('notes', repeat('n', 20000000))
              WHERE stream_id = 'order-30' AND event_type = 'OrderCreated' RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (mut daemon, peak) = catch_up(&db).await;
    assert_peak_within(peak, 20_000_000);
    daemon.kill();
    let warnings = logged(&daemon, OVERSIZED);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    let w = &warnings[0];
    assert_eq!(w["level"], "WARN", "{w}");
    assert_eq!(w["event_id"], huge, "{w}");
    assert_eq!(w["stream_id"], "order-30", "{w}");
    assert!(w["bytes"].as_u64().is_some_and(|b| b >= 20_000_000), "{w}");
}
