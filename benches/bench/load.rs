//! Phase 1, load: the benchmark database created, migrated and loaded with the orders
//! workload (`pgfold::testkit::workload::load_orders`).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result};
use pgfold::testkit::db::{self, connect, scalar_i64};
use pgfold::testkit::workload;
use tokio_postgres::Client;

use crate::common::{log, mib, thousands};
use crate::Env;

/// Orders per `load_orders` call: progress every ~1.3 M events.
const LOAD_CHUNK_ORDERS: i64 = 500_000;

pub async fn load(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let admin = connect(&env.admin).await?;
    let exists = scalar_i64(
        &admin,
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            a.db
        ),
    )
    .await?
        > 0;
    writeln!(env.report, "\n1. Load")?;
    if a.reuse && exists {
        let client = connect(&env.url).await?;
        let n = scalar_i64(&client, "SELECT count(*) FROM events").await?;
        log(format!("reusing {} with {n} events", a.db));
        writeln!(
            env.report,
            "   reused database {} ({} events); no load timed",
            a.db,
            thousands(n as u64)
        )?;
        return Ok(());
    }
    log(format!("creating database {}", a.db));
    db::recreate_database(&admin, &a.db).await?;
    let t = Instant::now();
    db::migrate(&env.url).await?;
    let migrate_secs = t.elapsed().as_secs_f64();

    let client = connect(&env.url).await?;
    let Loaded {
        orders,
        written,
        load_secs,
        vacuum_secs,
        checkpoint_secs,
    } = load_orders(&client, a.events).await?;
    let heap = scalar_i64(&client, "SELECT pg_relation_size('events')").await?;
    let total = scalar_i64(&client, "SELECT pg_total_relation_size('events')").await?;
    let paid = scalar_i64(
        &client,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await?;
    let r = &mut env.report;
    writeln!(
        r,
        "   migrate (pgfold::daemon::migrate)   {migrate_secs:.2} s"
    )?;
    writeln!(
        r,
        "   load_orders                         {load_secs:.1} s for {} events ({} orders, {} OrderPaid): {} events/s",
        thousands(written),
        thousands(orders as u64),
        thousands(paid as u64),
        thousands((written as f64 / load_secs) as u64)
    )?;
    writeln!(
        r,
        "   VACUUM (ANALYZE) events             {vacuum_secs:.1} s; CHECKPOINT {checkpoint_secs:.1} s"
    )?;
    writeln!(
        r,
        "   events table                        {} heap, {} with indexes",
        mib(heap as u64 / 1024),
        mib(total as u64 / 1024)
    )?;
    Ok(())
}

pub struct Loaded {
    pub orders: i64,
    pub written: u64,
    pub load_secs: f64,
    pub vacuum_secs: f64,
    pub checkpoint_secs: f64,
}

/// Appends about `events` events with `workload::load_orders` to a migrated
/// database, then VACUUM (ANALYZE) and CHECKPOINT.
pub async fn load_orders(client: &Client, events: u64) -> Result<Loaded> {
    let orders = ((events as f64) / workload::EVENTS_PER_ORDER)
        .round()
        .max(1.0) as i64;
    log(format!(
        "loading {orders} orders (~{events} events) with pgfold::workload::load_orders"
    ));
    let t = Instant::now();
    let mut first = 1i64;
    let mut written = 0u64;
    while first <= orders {
        let n = LOAD_CHUNK_ORDERS.min(orders - first + 1);
        written += workload::load_orders(client, first, n)
            .await
            .context("load_orders")?;
        first += n;
        log(format!(
            "  {written} events after {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    let load_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    client.batch_execute("VACUUM (ANALYZE) events").await?;
    let vacuum_secs = t.elapsed().as_secs_f64();
    // Start the timed phases with no checkpoint owed for the load's WAL.
    let t = Instant::now();
    client.batch_execute("CHECKPOINT").await?;
    let checkpoint_secs = t.elapsed().as_secs_f64();
    Ok(Loaded {
        orders,
        written,
        load_secs,
        vacuum_secs,
        checkpoint_secs,
    })
}
