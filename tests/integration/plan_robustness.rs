//! Issue 11: plans that cannot depend on statistics. Every statement that reads a
//! range of the log reads it through the position index (or the primary key, for
//! explicit ids), with custom and generic plans alike, whatever the statistics say
//! and whatever indexes the application keeps on `events`: a plan that reads
//! another index of the whole log (or the whole table) costs every live batch
//! time in proportion to the log.
//!
//! Each statement is explained as the daemon would run it (in a transaction),
//! once with its values (custom plan) and once
//! prepared under `plan_cache_mode = force_generic_plan`, on tables whose
//! statistics mislead: a log written before pgfold was migrated (every row reads
//! as transaction 0, so any range of it looks like all of it) and a log that grew
//! from empty and was never analysed.

use std::sync::Mutex;

use async_trait::async_trait;
use pgfold::db::{Db, Params};
use pgfold::feed::{self, Horizon, Position};
use pgfold::projectors::{DailyRevenue, OrderSnapshots};
use pgfold::{EventFilter, EventRange, SetBatch};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row, Transaction};

use crate::helpers::*;

/// The application's own table, as it is before pgfold migrates it.
const BARE_SCHEMA: &str = include_str!("../../migrations/V1__events.sql");

/// The indexes through which pgfold may read `events`: the position index for
/// ranges, the primary key for explicit ids, and the stream index for per-stream
/// probes by key.
const ALLOWED: [&str; 3] = [
    "pgfold_events_position",
    "events_pkey",
    "idx_events_stream_sequence",
];

/// One read of `events` in a plan.
#[derive(Debug, Clone)]
struct Read {
    statement: String,
    plan: &'static str,
    node: String,
    index: Option<String>,
    /// Whether the index is searched (an Index Cond) rather than read whole.
    searched: bool,
}

/// A [`Db`] that explains every statement before running it, and records where
/// each plan reads `events`.
struct Explaining<'a> {
    tx: &'a Transaction<'a>,
    /// Names of the indexes on `events`.
    events_indexes: Vec<String>,
    /// What the statements run next are called in the report.
    label: Mutex<String>,
    reads: Mutex<Vec<Read>>,
    /// `None`: each statement is prepared afresh and explained with its custom
    /// and its generic plan. `Some`: each is prepared once for the session
    /// (statement text to name, kept across transactions) and explained as the
    /// transaction's `plan_cache_mode` has it, reusing whatever plan the
    /// statement has kept, as the daemon's connections do.
    kept: Option<&'a Mutex<Vec<String>>>,
}

impl<'a> Explaining<'a> {
    async fn new(tx: &'a Transaction<'a>) -> Explaining<'a> {
        let events_indexes = tx
            .query(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'events'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        Explaining {
            tx,
            events_indexes,
            label: Mutex::new(String::new()),
            reads: Mutex::new(Vec::new()),
            kept: None,
        }
    }

    /// An explainer whose statements stay prepared in `kept` (see the field).
    async fn keeping(tx: &'a Transaction<'a>, kept: &'a Mutex<Vec<String>>) -> Explaining<'a> {
        Explaining {
            kept: Some(kept),
            ..Explaining::new(tx).await
        }
    }

    fn label(&self, label: &str) {
        *self.label.lock().unwrap() = label.to_string();
    }

    /// Records the reads of `events` of `sql`'s custom and generic plans.
    async fn explain(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) {
        let statement = self.label.lock().unwrap().clone();
        if let Some(kept) = self.kept {
            return self.explain_kept(&statement, kept, sql).await;
        }
        let custom: Value = self
            .tx
            .query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), params)
            .await
            .unwrap_or_else(|e| panic!("{statement}: EXPLAIN failed: {e}\n{sql}"))
            .get(0);
        self.record(&statement, "custom", &custom);

        let n = self.tx.prepare(sql).await.unwrap().params().len();
        self.tx
            .batch_execute(&format!(
                "PREPARE plan_probe AS {sql}; SET LOCAL plan_cache_mode = force_generic_plan"
            ))
            .await
            .unwrap_or_else(|e| panic!("{statement}: PREPARE failed: {e}"));
        let args = match n {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n].join(", ")),
        };
        let generic: Value = self
            .tx
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) EXECUTE plan_probe{args}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        self.tx
            .batch_execute("DEALLOCATE plan_probe; SET LOCAL plan_cache_mode = auto")
            .await
            .unwrap();
        self.record(&statement, "generic", &generic);
    }

    /// Records the reads of `events` of the plan `sql`'s kept prepared statement
    /// runs with now (prepared on first sight), with every argument NULL: a
    /// generic plan does not depend on them, and a custom plan is never kept.
    async fn explain_kept(&self, statement: &str, kept: &Mutex<Vec<String>>, sql: &str) {
        let known = kept.lock().unwrap().iter().position(|k| k == sql);
        let name = match known {
            Some(i) => format!("kept_{i}"),
            None => {
                let i = {
                    let mut kept = kept.lock().unwrap();
                    kept.push(sql.to_string());
                    kept.len() - 1
                };
                self.tx
                    .batch_execute(&format!("PREPARE kept_{i} AS {sql}"))
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: PREPARE failed: {e}"));
                format!("kept_{i}")
            }
        };
        let n = self.tx.prepare(sql).await.unwrap().params().len();
        let args = match n {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n].join(", ")),
        };
        // More than the five executions after which PostgreSQL's `auto` mode
        // makes a generic plan of its own and keeps it.
        let mut explained = Value::Null;
        for _ in 0..6 {
            explained = self
                .tx
                .query_one(&format!("EXPLAIN (FORMAT JSON) EXECUTE {name}{args}"), &[])
                .await
                .unwrap_or_else(|e| panic!("{statement}: EXPLAIN EXECUTE failed: {e}"))
                .get(0);
        }
        self.record(statement, "kept", &explained);
    }

    fn record(&self, statement: &str, plan: &'static str, explained: &Value) {
        let mut reads = self.reads.lock().unwrap();
        let mut stack = vec![&explained[0]["Plan"]];
        while let Some(node) = stack.pop() {
            if let Some(children) = node["Plans"].as_array() {
                stack.extend(children);
            }
            let index = node["Index Name"].as_str().map(str::to_string);
            let on_events = node["Relation Name"] == "events"
                || index
                    .as_ref()
                    .is_some_and(|i| self.events_indexes.contains(i));
            if on_events {
                reads.push(Read {
                    statement: statement.to_string(),
                    plan,
                    node: node["Node Type"].as_str().unwrap_or("?").to_string(),
                    searched: node.get("Index Cond").is_some(),
                    index,
                });
            }
        }
    }

    /// Every read of `events` recorded so far, checked: no sequential scan, no
    /// index but the allowed ones, every index searched rather than read whole,
    /// and each statement in `ranges` reading through the position index in both
    /// of its plans.
    fn assert_reads_by_position(&self, ranges: &[&str]) {
        let reads = self.reads.lock().unwrap().clone();
        let bad: Vec<&Read> = reads
            .iter()
            .filter(|r| match &r.index {
                None => r.node == "Seq Scan",
                Some(i) => !ALLOWED.contains(&i.as_str()) || !r.searched,
            })
            .collect();
        assert!(
            bad.is_empty(),
            "reads of events that do not go through the position index or a key:\n{bad:#?}"
        );
        let plans: std::collections::BTreeSet<&str> = reads.iter().map(|r| r.plan).collect();
        for statement in ranges {
            for &plan in &plans {
                assert!(
                    reads.iter().any(|r| r.statement == *statement
                        && r.plan == plan
                        && r.index.as_deref() == Some("pgfold_events_position")),
                    "{statement} ({plan} plan) does not read its range through pgfold_events_position: {:#?}",
                    reads
                        .iter()
                        .filter(|r| r.statement == *statement)
                        .collect::<Vec<_>>()
                );
            }
        }
    }
}

#[async_trait]
impl Db for Explaining<'_> {
    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
        self.explain(sql, params).await;
        self.tx.query(sql, params).await
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
        self.explain(sql, params).await;
        self.tx.execute(sql, params).await
    }

    async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.tx.batch_execute(sql).await
    }

    async fn row_count_error(&self) -> Error {
        self.tx
            .query_one("SELECT 1 WHERE false", &[])
            .await
            .unwrap_err()
    }
}

/// Explains every statement a batch runs over `(after, upto]`, for every feed and
/// both built-ins, and for a custom projector's filter on the offered source.
async fn explain_batches(x: &Explaining<'_>, after: Position, upto: Position) {
    // A plan that reads the log per row fails here rather than hanging the test.
    x.tx.batch_execute("SET LOCAL statement_timeout = '20s'")
        .await
        .unwrap();
    let horizon = feed::horizon(x.tx).await.unwrap();
    let limited = Horizon {
        tx: upto.tx + 1,
        blocker: None,
    };
    let filters = [
        ("all events", EventFilter::all()),
        ("daily_revenue", EventFilter::event_types(&["OrderPaid"])),
        (
            "order_snapshots",
            EventFilter::event_types(&[
                "OrderCreated",
                "OrderPaid",
                "OrderShipped",
                "OrderCancelled",
            ])
            .in_streams_of(&["order"]),
        ),
    ];
    for (name, filter) in &filters {
        x.label(&format!("read_events [{name}]"));
        feed::read_events(x, after, limited, filter, 2000, 16 << 20)
            .await
            .unwrap();
        x.label(&format!("ahead_of_range to the newest [{name}]"));
        feed::ahead_of_range(x, after, upto, true, &[], filter)
            .await
            .unwrap();
        x.label(&format!("ahead_of_range cut at its size [{name}]"));
        feed::ahead_of_range(x, after, upto, false, &[], filter)
            .await
            .unwrap();
    }
    x.label("set_batch_end exact");
    feed::set_batch_end(x, after, Some(horizon), 2000, true)
        .await
        .unwrap();
    x.label("set_batch_end guessed");
    feed::set_batch_end(x, after, Some(horizon), 2000, false)
        .await
        .unwrap();
    // As a batch's first round trip sends it: behind the horizon it reads.
    x.label("kept horizon");
    feed::kept_horizon(x).await.unwrap();
    x.label("set_batch_end exact, kept horizon");
    feed::set_batch_end(x, after, None, 2000, true)
        .await
        .unwrap();
    x.label("set_batch_end guessed, kept horizon");
    feed::set_batch_end(x, after, None, 2000, false)
        .await
        .unwrap();

    // A set fold's statement over `batch`, as the daemon sends it: its own
    // parameters first, then the range's, the filter above the fenced reads.
    let over_batch = |sql: &str, own_params: usize, filter: &EventFilter| {
        let range = EventRange::new(after, upto, vec![1, 2], vec![3], filter);
        (SetBatch::statement(sql, own_params), range)
    };
    let custom = "SELECT count(*) FROM batch e WHERE e.event_type = $1 AND e.stream_type = $2";
    let (sql, range) = over_batch(custom, 2, &EventFilter::all());
    x.label("custom projector on SetBatch (batch)");
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&"OrderPaid", &"order"];
    params.extend(range.params());
    x.explain(&sql, &params).await;
    let (sql, range) = over_batch(DailyRevenue::STATEMENT, 0, &filters[1].1);
    x.label("daily_revenue");
    x.explain(&sql, &range.params()).await;
    let (sql, range) = over_batch(&OrderSnapshots::statement(), 0, &filters[2].1);
    x.label("order_snapshots");
    x.explain(&sql, &range.params()).await;

    // A long stream-set range applied in parts (`worker::parts`): the walk that
    // finds each part's last stream, and a part, which may read its streams
    // through the stream index instead of the range through the position index.
    // Its offset can reach most of the log (here about 70,000 of 75,000 events).
    x.label("stream_key_after");
    let cursor = feed::stream_key_after(x, None, 500).await.unwrap();
    feed::stream_key_after(x, cursor.as_ref(), 70_000)
        .await
        .unwrap();
    let part = EventRange::new(after, upto, vec![1, 2], vec![3], &filters[2].1).streams(
        Some("order-1".into()),
        cursor.map(|(stream_id, _)| stream_id),
    );
    x.label("order_snapshots, a part of a long range");
    x.explain(
        &SetBatch::statement_in_streams(&OrderSnapshots::statement(), 0),
        &part.params(),
    )
    .await;

    // The same reads through upcasters of every type the built-ins consume
    // (`feed::upcast`): their layer sits above the fenced reads, which keep
    // their index.
    let upcasters = crate::upcast::upcasters_of_every_kind();
    let upcast = |filter: &EventFilter| EventFilter {
        upcasters: upcasters.consumed_by(filter),
        ..filter.clone()
    };
    for (name, filter) in &filters[1..] {
        x.label(&format!("read_events [{name}, upcast]"));
        feed::read_events(x, after, limited, &upcast(filter), 2000, 16 << 20)
            .await
            .unwrap();
    }
    let range = EventRange::new(after, upto, vec![1, 2], vec![3], &upcast(&filters[1].1));
    assert!(!range.upcasters().is_empty());
    x.label("daily_revenue, upcast");
    x.explain(
        &SetBatch::statement_over(&range, DailyRevenue::STATEMENT, 0),
        &range.params(),
    )
    .await;
    let range = EventRange::new(after, upto, vec![1, 2], vec![3], &upcast(&filters[2].1));
    let statement = OrderSnapshots::statement_through(range.upcasters(), &range.log());
    x.label("order_snapshots, upcast");
    x.explain(
        &SetBatch::statement_over(&range, &statement, 0),
        &range.params(),
    )
    .await;
    let part = range.streams(Some("order-1".into()), Some("order-2".into()));
    x.label("order_snapshots, a part, upcast");
    x.explain(
        &SetBatch::statement_over(&part, &statement, 0),
        &part.params(),
    )
    .await;
}

/// The statements above that read a range of the log.
const RANGE_READS: [&str; 14] = [
    "read_events [all events]",
    "read_events [daily_revenue]",
    "read_events [order_snapshots]",
    "read_events [daily_revenue, upcast]",
    "read_events [order_snapshots, upcast]",
    "daily_revenue, upcast",
    "order_snapshots, upcast",
    "ahead_of_range cut at its size [daily_revenue]",
    "ahead_of_range to the newest [daily_revenue]",
    "set_batch_end exact",
    "set_batch_end exact, kept horizon",
    "custom projector on SetBatch (batch)",
    "daily_revenue",
    "order_snapshots",
];

/// Appends a few orders as the application does, after the bulk of the log.
async fn append_live(client: &mut tokio_postgres::Client) {
    for n in 0..5 {
        let order = format!("live-{n}");
        append_all(
            client,
            &[
                created(&order, "books", serde_json::json!("9.99"), 1),
                paid(&order, "books", serde_json::json!("9.99"), 1),
            ],
        )
        .await;
    }
}

async fn newest(client: &tokio_postgres::Client) -> Position {
    feed::newest(client).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_log_written_before_pgfold_was_migrated_is_read_by_position() {
    // Arrange: the application's table, filled before pgfold came, then migrated
    // and analysed. Every old row reads as transaction 0, so the statistics say
    // any range of them holds all of them.
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    client.batch_execute(BARE_SCHEMA).await.unwrap();
    pgfold::testkit::workload::load_orders(&client, 1, 30_000)
        .await
        .unwrap();
    let pg = pgfold::db::pg_config(Some(&db.url)).unwrap();
    pgfold::daemon::migrate(&pg, &pgfold::projectors::builtin())
        .await
        .unwrap();
    client.batch_execute("ANALYZE events").await.unwrap();
    let before_live = newest(&client).await;
    append_live(&mut client).await;
    let live_to = newest(&client).await;

    // Act: a replay batch inside the old rows, and a live batch.
    let tx = client.transaction().await.unwrap();
    let x = Explaining::new(&tx).await;
    explain_batches(&x, Position::new(0, 1_000), Position::new(0, 3_000)).await;
    explain_batches(&x, before_live, live_to).await;

    // Assert
    x.assert_reads_by_position(&RANGE_READS);
}

#[tokio::test]
async fn a_log_that_grew_from_empty_and_was_never_analysed_is_read_by_position() {
    // Arrange: migrated while empty, autovacuum kept away, so the planner has no
    // statistics at all; plus an index of the application's on a column a
    // projector filters on.
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "ALTER TABLE events SET (autovacuum_enabled = false);
             CREATE INDEX app_events_by_stream_type ON events (stream_type, event_type);",
        )
        .await
        .unwrap();
    pgfold::testkit::workload::load_orders(&client, 1, 30_000)
        .await
        .unwrap();
    let middle = client
        .query_one(
            "SELECT COALESCE(tx_id, '0')::text, id FROM events WHERE id = 40000",
            &[],
        )
        .await
        .unwrap();
    let middle = Position::new(middle.get::<_, String>(0).parse().unwrap(), 40_000);
    let before_live = newest(&client).await;
    append_live(&mut client).await;
    let live_to = newest(&client).await;

    // Act
    let tx = client.transaction().await.unwrap();
    let x = Explaining::new(&tx).await;
    explain_batches(&x, middle, Position::new(middle.tx, 42_000)).await;
    explain_batches(&x, before_live, live_to).await;

    // Assert
    x.assert_reads_by_position(&RANGE_READS);
}

#[tokio::test]
async fn a_log_bulk_loaded_in_a_few_transactions_is_read_by_position() {
    // Arrange: tens of thousands of events written by three transactions (an
    // import), then analysed. A batch of two thousand events inside one of them
    // looks, to the statistics, like a third of the log: cheaper to scan whole.
    let db = TestDb::new().await;
    let mut client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 30_000)
        .await
        .unwrap();
    client.batch_execute("ANALYZE events").await.unwrap();
    let tx_of = |row: tokio_postgres::Row| {
        Position::new(row.get::<_, String>(0).parse().unwrap(), row.get(1))
    };
    let from = tx_of(
        client
            .query_one("SELECT tx_id::text, id FROM events WHERE id = 40000", &[])
            .await
            .unwrap(),
    );
    let to = Position::new(from.tx, 42_000);
    let before_live = newest(&client).await;
    append_live(&mut client).await;
    let live_to = newest(&client).await;

    // Act
    let tx = client.transaction().await.unwrap();
    let x = Explaining::new(&tx).await;
    explain_batches(&x, from, to).await;
    explain_batches(&x, before_live, live_to).await;

    // Assert
    x.assert_reads_by_position(&RANGE_READS);
}

/// Grows the log by whole orders until `events` is at least `bytes` on disk.
async fn grow_to(client: &tokio_postgres::Client, bytes: i64) {
    let mut next = 1_000_000;
    loop {
        let size: i64 = client
            .query_one("SELECT pg_relation_size('events')", &[])
            .await
            .unwrap()
            .get(0);
        if size >= bytes {
            return;
        }
        pgfold::testkit::workload::load_orders(client, next, 500)
            .await
            .unwrap();
        next += 500;
    }
}

/// Issue 25: statements prepared on the connection of a new deployment, while
/// `events` is empty, and run as live batches run them, then the log grown a
/// hundredfold without ANALYZE and the same prepared statements explained
/// again. A generic plan kept from the empty log read all of it with a
/// sequential scan on every batch. `analysed`: the empty table was vacuumed
/// and analysed first, so the planner knows it to be empty rather than
/// guessing ten pages.
async fn plans_kept_from_an_empty_log_read_by_position(analysed: bool) {
    // Arrange: an empty, migrated log that autovacuum never analyses.
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute("ALTER TABLE events SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    if analysed {
        client.batch_execute("VACUUM ANALYZE events").await.unwrap();
    }
    let kept = Mutex::new(Vec::new());
    // A live batch's statements over (after, upto], under the plan setting a
    // live batch asks for: returns whether it planned generically, and the reads.
    async fn live_batch(
        client: &mut tokio_postgres::Client,
        kept: &Mutex<Vec<String>>,
    ) -> (bool, Vec<Read>) {
        let after = match feed::newest(&*client).await.unwrap() {
            Some(p) => p,
            None => Position::new(0, 0),
        };
        append_live(client).await;
        let upto = newest(client).await;
        let tx = client.transaction().await.unwrap();
        let generic = feed::set_plan_mode(&tx, true).await.unwrap();
        let x = Explaining::keeping(&tx, kept).await;
        explain_batches(&x, after, upto).await;
        // A custom plan is made for the values, which here are all NULL.
        if generic {
            x.assert_reads_by_position(&RANGE_READS);
        }
        let reads = x.reads.lock().unwrap().clone();
        drop(x);
        tx.commit().await.unwrap();
        (generic, reads)
    }

    // Act: batches on the empty log, then just past the size from which live
    // batches plan generically, then on a log a hundred times that.
    let (generic_empty, _) = live_batch(&mut client, &kept).await;
    grow_to(&client, feed::GENERIC_PLANS_FROM_BYTES).await;
    let (generic_small, _) = live_batch(&mut client, &kept).await;
    pgfold::testkit::workload::load_orders(&client, 1, 50_000)
        .await
        .unwrap();
    let (generic_grown, reads) = live_batch(&mut client, &kept).await;

    // Assert: no plan made on the empty log was kept, and the plans made at the
    // threshold still read the grown log by position (checked in `live_batch`).
    assert!(!generic_empty, "an empty log was planned generically");
    assert!(
        generic_small && generic_grown,
        "a grown log was not planned generically"
    );
    let events: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(events >= 100_000, "the log holds only {events} events");
    assert!(
        reads.iter().any(|r| r.plan == "kept"),
        "nothing was explained"
    );
}

#[tokio::test]
async fn plans_kept_from_a_new_empty_log_read_by_position() {
    plans_kept_from_an_empty_log_read_by_position(false).await;
}

#[tokio::test]
async fn plans_kept_from_an_analysed_empty_log_read_by_position() {
    plans_kept_from_an_empty_log_read_by_position(true).await;
}

/// Issue 25, the application's side: `pgfold.applied` (behind `wait_for`) called
/// on a session that began while the log was empty, then the log grown a
/// hundredfold without ANALYZE. PL/pgSQL keeps its statements' plans for the
/// session, and a generic one made on the empty log scanned all of it per call.
/// The scans are counted in the calling transaction's own statistics.
#[tokio::test]
async fn read_your_writes_look_ups_made_on_an_empty_log_read_by_key() {
    // Arrange: an empty log, analysed as such, never again; the projectors
    // registered; one session that has called `applied` more than five times.
    let db = TestDb::new().await;
    let mut client = db.client().await;
    for sql in [
        "ALTER TABLE events SET (autovacuum_enabled = false)",
        "VACUUM ANALYZE events",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    run_once(&db.settings(), pgfold::daemon::RunOptions::default()).await;
    append_live(&mut client).await;
    let applied = "SELECT pgfold.applied('order_snapshots', 'live-0', 1),
                          pgfold.applied('daily_revenue', 'live-0', 2)";
    for _ in 0..8 {
        client.query_one(applied, &[]).await.unwrap();
    }
    pgfold::testkit::workload::load_orders(&client, 1, 50_000)
        .await
        .unwrap();

    // Act
    let tx = client.transaction().await.unwrap();
    tx.query_one(applied, &[]).await.unwrap();
    let scans: i64 = tx
        .query_one(
            "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // Assert
    assert_eq!(scans, 0, "pgfold.applied scanned the log");
}
