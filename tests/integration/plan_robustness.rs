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
        }
    }

    fn label(&self, label: &str) {
        *self.label.lock().unwrap() = label.to_string();
    }

    /// Records the reads of `events` of `sql`'s custom and generic plans.
    async fn explain(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) {
        let statement = self.label.lock().unwrap().clone();
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
        for statement in ranges {
            for plan in ["custom", "generic"] {
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

    // A long stream-set range applied in parts (`daemon::parts`): the walk that
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
    let statement = OrderSnapshots::statement_through(range.upcasters());
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
