//! Phase `sql`: the SQL projections of `examples/projections/` replayed beside
//! the built-ins they equal, interleaved in the same run: `daily_revenue_sql`
//! (order = "set") against `daily_revenue`, `order_snapshots_sql` (order =
//! "stream") against `order_snapshots`, and `order_status` (order = "event", one
//! upsert per event) in events/s.

use std::fmt::Write as _;

use anyhow::Result;
use pgfold::testkit::db::{connect, scalar_i64};
use pgfold::testkit::process::Daemon;
use pgfold::testkit::workload;

use crate::common::{joined, log, median, once_of, replay_args, thousands};
use crate::Env;
use crate::PGFOLD;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/projections");

/// Replayed in this order, each with `pgfold run --once --replay NAME --projector NAME`.
const REPLAYS: [&str; 5] = [
    "daily_revenue",
    "daily_revenue_sql",
    "order_snapshots",
    "order_snapshots_sql",
    "order_status",
];

pub async fn sql_projections(env: &mut Env) -> Result<()> {
    let runs = env.args.runs;
    let client = connect(&env.url).await?;
    let consumed = |sql: &'static str| {
        let client = &client;
        async move { anyhow::Ok(scalar_i64(client, sql).await? as u64) }
    };
    let paid = consumed("SELECT count(*) FROM events WHERE event_type = 'OrderPaid'").await?;
    let orders = consumed(
        "SELECT count(*) FROM events WHERE stream_type = 'order'
            AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')",
    )
    .await?;
    let program = || Daemon::command(PGFOLD).env("PGFOLD_DAEMON__PROJECTIONS_DIR", EXAMPLES);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); REPLAYS.len()];
    for run in 1..=runs {
        for (i, name) in REPLAYS.iter().enumerate() {
            let (secs, _) = once_of(program(), &env.url, &replay_args(name)).await?;
            log(format!(
                "sql run {run}/{runs}: pgfold --replay {name} {secs:.2} s"
            ));
            times[i].push(secs);
        }
    }
    let differences = workload::example_differences(&client).await?;
    let m: Vec<f64> = times.iter().map(|t| median(t)).collect();
    let r = &mut env.report;
    writeln!(
        r,
        "\nSQL projections (examples/projections/) beside the built-ins they equal; {runs} runs each, \
         interleaved; whole `pgfold run --once --replay NAME --projector NAME` processes"
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:<22} {:>9} {:>26} {:>18} {:>14}",
        "replay", "median", "runs (s)", "consumed events/s", "vs built-in"
    )?;
    let consumed_by = [paid, paid, orders, orders, orders];
    let built_in = [None, Some(0), None, Some(2), None];
    for (i, name) in REPLAYS.iter().enumerate() {
        let ratio = built_in[i]
            .map(|b| format!("{:.2}x", m[i] / m[b]))
            .unwrap_or_else(|| "-".into());
        writeln!(
            r,
            "   {:<22} {:>7.2} s {:>26} {:>18} {:>14}",
            name,
            m[i],
            joined(&times[i], 2),
            thousands((consumed_by[i] as f64 / m[i]) as u64),
            ratio
        )?;
    }
    writeln!(
        r,
        "   rows differing from the independent folds (daily_revenue_sql, order_snapshots_sql, order_status): {differences:?} (must be (0, 0, 0))"
    )?;
    if differences != (0, 0, 0) {
        println!("\n{}", env.report);
        anyhow::bail!("the SQL projections differ from the independent folds: {differences:?}");
    }
    Ok(())
}
