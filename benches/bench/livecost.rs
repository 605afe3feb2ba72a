//! Phase 5, live cost: the daemon's CPU per 1,000 live events, by the size of the log.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use pgfold::testkit::db::{self, connect, scalar_i64};
use tokio_postgres::Client;

use crate::common::{log, running_daemon, stop_daemon, thousands, wait_caught_up, DaemonCpu};
use crate::live::live_writers;
use crate::load::load_orders;
use crate::Env;

/// The live-cost database for a log of `size` events: reused when it already
/// holds within 10 % of that many (loading 10 M events takes minutes), otherwise
/// created, migrated and loaded. Returns its URL and whether it was reused.
/// The live-cost database for a log of `size` events: NAME_lc<size>.
fn live_cost_db(env: &Env, size: u64) -> String {
    format!("{}_lc{size}", env.args.db)
}

async fn live_cost_database(env: &Env, admin: &Client, size: u64) -> Result<(String, bool)> {
    let db = live_cost_db(env, size);
    let url = db::with_dbname(&env.admin, &db);
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&db],
        )
        .await?
        .get(0);
    if exists {
        let client = connect(&url).await?;
        let ready: bool = client
            .query_one(
                "SELECT to_regclass('events') IS NOT NULL AND to_regclass('pgfold.projectors') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        if ready {
            let n = scalar_i64(&client, "SELECT count(*) FROM events").await? as u64;
            if n.abs_diff(size) * 10 <= size {
                log(format!("live cost: reusing {db} with {n} events"));
                return Ok((url, true));
            }
            log(format!(
                "live cost: {db} holds {n} events, not ~{size}: loading it again"
            ));
        }
    }
    db::recreate_database(admin, &db).await?;
    db::migrate(&url).await?;
    load_orders(&connect(&url).await?, size).await?;
    Ok((url, false))
}

struct LiveCost {
    size: u64,
    in_log: u64,
    reused: bool,
    events: u64,
    rate: f64,
    daemon_secs: f64,
    backend_secs: f64,
}

pub async fn live_cost(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let admin = connect(&env.admin).await?;
    let mut results = Vec::new();
    for &size in &a.live_cost_sizes {
        let (url, reused) = live_cost_database(env, &admin, size).await?;
        let client = connect(&url).await?;
        let in_log = scalar_i64(&client, "SELECT count(*) FROM events").await? as u64;
        log(format!(
            "live cost at {in_log} events: starting `pgfold run` and waiting until it has caught up"
        ));
        let mut daemon = running_daemon(&client, &url, vec!["run".to_string()], &[]).await?;
        // Let the workers go idle and arm the wake-up flag, as in production.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu0 = DaemonCpu::sample(&client, &live_cost_db(env, size), &daemon).await?;
        log(format!(
            "live cost at {in_log} events: {} writers appending {} events/s in total for {} s",
            a.writers, a.rate, a.seconds
        ));
        let (writers, secs) = live_writers(&url, &a, false).await?;
        // The cost of the live events includes projecting the last of them.
        wait_caught_up(&client, &mut daemon, &[], Duration::from_secs(60)).await?;
        let (daemon_secs, backend_secs) =
            cpu0.until(&DaemonCpu::sample(&client, &live_cost_db(env, size), &daemon).await?);
        stop_daemon(daemon).await?;
        let events = writers.committed.len() as u64;
        results.push(LiveCost {
            size,
            in_log,
            reused,
            events,
            rate: events as f64 / secs,
            daemon_secs: daemon_secs.unwrap_or(f64::NAN),
            backend_secs,
        });
    }

    let per_1000 = |secs: f64, events: u64| 1_000_000.0 * secs / events.max(1) as f64;
    let total = |c: &LiveCost| per_1000(c.daemon_secs + c.backend_secs, c.events);
    let r = &mut env.report;
    writeln!(
        r,
        "\n5. Live cost: CPU the daemon spends per 1,000 live events, by the size of the log. For each size a \
         database\n   {}_lc<size> loaded with pgfold::workload::load_orders (kept for later runs), `pgfold run` \
         caught up,\n   then the live phase's writers ({} writers, {} events/s for {} s); CPU from the writers' \
         start until the\n   daemon has caught up with their last event: the daemon process (/proc/<pid>/stat) \
         and its PostgreSQL backends.",
        a.db, a.writers, a.rate, a.seconds
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:>12} {:>13} {:>10} {:>22} {:>22} {:>16}",
        "log", "live events", "rate", "daemon ms/1k events", "backends ms/1k events", "total ms/1k"
    )?;
    for c in &results {
        writeln!(
            r,
            "   {:>12} {:>13} {:>8.0}/s {:>22.1} {:>22.1} {:>16.1}{}",
            thousands(c.in_log),
            thousands(c.events),
            c.rate,
            per_1000(c.daemon_secs, c.events),
            per_1000(c.backend_secs, c.events),
            total(c),
            if c.reused { "  (reused database)" } else { "" }
        )?;
    }
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        if results.len() > 1 {
            writeln!(
                r,
                "   cost per event at {} / at {}: {:.2}x (issue 11's target: within 1.1x)",
                thousands(last.size),
                thousands(first.size),
                total(last) / total(first)
            )?;
        }
    }
    Ok(())
}
