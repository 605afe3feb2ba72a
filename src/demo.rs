//! `pgfold demo`: a first look. Creates a demo database on the configured server,
//! appends a steady flow of sample orders the way an application would (optimistic
//! concurrency, retried on conflict), runs the daemon beside them, and shows daily
//! revenue and lag updating live until Ctrl-C.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::daemon::{self, RunOptions};
use crate::projector::Registry;
use crate::store::{self, NewEvent};
use crate::{db, status};

/// `pgfold demo`'s options.
pub struct DemoOptions {
    /// The demo database, created on the configured server unless it exists (then
    /// reused); lowercase letters, digits and underscores only, since it is
    /// spliced into `CREATE DATABASE`.
    pub database: String,
    /// Orders per second.
    pub rate: u32,
    /// Stop after this long (for scripted use); `None`: until Ctrl-C.
    pub duration: Option<Duration>,
}

/// Runs the demo until `shutdown` resolves or `options.duration` passes: creates
/// the database, migrates it, and runs the daemon, an order writer and a live
/// display of daily revenue and lag side by side. `settings.database.url` names the
/// server; its database is not touched.
pub async fn run(
    mut settings: Settings,
    registry: Registry,
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = db::pg_config(settings.database.url.as_deref())?;
    let demo = create_database(&server, &options.database).await?;
    settings.database.url = None;
    let token = CancellationToken::new();
    {
        let token = token.clone();
        let duration = options.duration;
        tokio::spawn(async move {
            match duration {
                Some(d) => {
                    tokio::select! { _ = shutdown => {}, _ = tokio::time::sleep(d) => {} }
                }
                None => shutdown.await,
            }
            token.cancel();
        });
    }
    daemon::migrate(&demo, &registry).await?;
    eprintln!(
        "pgfold demo: appending {} orders/s to database {}; Ctrl-C to stop",
        options.rate, options.database
    );

    let daemon = daemon::Daemon::build_with(
        settings,
        registry.clone(),
        RunOptions::default(),
        demo.clone(),
        demo.clone(),
    )?
    .spawn();
    let writer = tokio::spawn(write_orders(demo.clone(), options.rate, token.clone()));
    show(&demo, &registry, token.clone()).await?;
    writer.await.context("the order writer stopped")??;
    daemon.stop().await.context("the daemon stopped")?;
    Ok(())
}

async fn create_database(server: &db::PgConfig, name: &str) -> anyhow::Result<db::PgConfig> {
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        anyhow::bail!(
            "demo database name {name:?} must be lowercase letters, digits and underscores"
        );
    }
    let client = db::connect(server).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // The name was checked above: an identifier can't be a bind parameter.
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("cannot create the demo database {name}"))?;
    }
    Ok(server.with_dbname(name))
}

/// Appends orders as an application would: each order's events in sequence, each
/// append re-reading the stream and retrying on a conflict.
async fn write_orders(pg: db::PgConfig, rate: u32, token: CancellationToken) -> anyhow::Result<()> {
    let mut client = db::connect(&pg).await?;
    let categories = ["books", "games", "garden", "kitchen", "music", "toys"];
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut pending: Vec<(String, serde_json::Value)> = Vec::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        let order = format!("demo-{}-{n}", std::process::id());
        let items = json!([{
            "sku": format!("sku-{}", n % 97),
            "category": categories[(n % categories.len() as u64) as usize],
            "price": format!("{}.{:02}", 5 + n % 40, n % 100),
            "qty": 1 + n % 3,
        }]);
        store::append_next(
            &mut client,
            &NewEvent::new(
                &order,
                "order",
                "OrderCreated",
                json!({"orderId": order, "customerId": format!("customer-{}", n % 50), "items": items}),
            ),
        )
        .await?;
        pending.push((order, items));
        // Pay for the order placed a few ticks ago.
        if pending.len() > 3 {
            let (order, items) = pending.remove(0);
            store::append_next(
                &mut client,
                &NewEvent::new(
                    &order,
                    "order",
                    "OrderPaid",
                    json!({"orderId": order, "items": items}),
                ),
            )
            .await?;
        }
    }
}

/// Redraws today's revenue and each projector's lag once a second.
async fn show(
    pg: &db::PgConfig,
    registry: &Registry,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let client = db::connect(pg).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let rows = client
            .query(
                "SELECT category, total::text FROM daily_revenue
                  WHERE day = (now() AT TIME ZONE 'UTC')::date ORDER BY category",
                &[],
            )
            .await?;
        let report = status::collect(&client, registry, Duration::from_secs(30), None).await?;
        let mut out = String::new();
        if terminal {
            out.push_str("\x1b[2J\x1b[H");
        }
        out.push_str("today's revenue by category (daily_revenue)\n");
        for row in &rows {
            out.push_str(&format!(
                "  {:<10} {:>12}\n",
                row.get::<_, String>(0),
                row.get::<_, String>(1)
            ));
        }
        for p in &report.projectors {
            out.push_str(&format!(
                "{:<16} {:<9} applied {:>8}  lag {:>5} events\n",
                p.name, p.state, p.events_applied, p.lag_events
            ));
        }
        println!("{out}");
    }
}
