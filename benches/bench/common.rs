//! What several phases use: progress lines and report formatting, the live
//! writers' payloads, the daemon as a child (`pgfold::testkit::process::Daemon`)
//! with its CPU, and the correctness checks against the SQL folds.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use pgfold::feed::Position;
use pgfold::store::NewEvent;
use pgfold::testkit::db::daemon_backends;
use pgfold::testkit::process::{clock_ticks_per_second, cpu_ticks, tail, Daemon, Sink, Spawn};
use pgfold::testkit::workload;
use serde_json::Value;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::{Env, PGFOLD};

/// A connection that LISTENs on pgfold's channel and counts the notifications it
/// receives: one per writer transaction that found the wake-up flag armed.
pub async fn notification_counter(url: &str) -> Result<(Client, Arc<AtomicU64>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", pgfold::daemon::CHANNEL))
        .await?;
    Ok((client, count))
}

/// Distinguishes this run's streams from those of earlier runs (with --reuse).
pub fn run_nonce() -> u128 {
    static NONCE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    })
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The values with `decimals` decimals, separated by spaces.
pub fn joined(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits: Vec<char> = n.to_string().chars().rev().collect();
    let groups: Vec<String> = digits
        .chunks(3)
        .map(|g| g.iter().rev().collect())
        .rev()
        .collect();
    groups.join(",")
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A small deterministic generator for payloads (not for statistics).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An `items` array as the workload writes it: 1–5 items, 20 categories, 2-decimal
/// prices (as JSON numbers or numeric strings), qty 1–5.
pub fn items(rng: &mut Rng) -> Value {
    let count = 1 + rng.below(5);
    let mut text = String::from("[");
    for k in 0..count {
        if k > 0 {
            text.push(',');
        }
        let cents = 100 + rng.below(99_900);
        let price = format!("{}.{:02}", cents / 100, cents % 100);
        let price = if k % 2 == 0 {
            price
        } else {
            format!("\"{price}\"")
        };
        write!(
            text,
            r#"{{"sku":"sku-{}","category":"category-{}","price":{},"qty":{}}}"#,
            rng.below(1000),
            rng.below(20),
            price,
            1 + rng.below(5)
        )
        .unwrap();
    }
    text.push(']');
    serde_json::from_str(&text).expect("items JSON")
}

pub fn order_created(stream: &str, items: &Value, rng: &mut Rng) -> NewEvent {
    NewEvent::new(
        stream,
        "order",
        "OrderCreated",
        serde_json::json!({
            "orderId": stream,
            "customerId": format!("customer-{}", rng.below(50_000)),
            "items": items,
        }),
    )
}

/// `OrderPaid` carries the order's items: `daily_revenue` sums them.
pub fn order_paid(stream: &str, items: &Value) -> NewEvent {
    NewEvent::new(
        stream,
        "order",
        "OrderPaid",
        serde_json::json!({"orderId": stream, "items": items}),
    )
}
// ---------------------------------------------------------------------------
// The daemon as a child process

/// Starts `program ARGS` on `url`, its stdout and stderr in a temporary file, its
/// peak RSS watched every ~10 ms.
pub fn spawn_daemon(program: Spawn, url: &str, args: &[&str]) -> Result<Daemon> {
    let log = tempfile::tempfile().context("temp file for the daemon's log")?;
    program
        .args(args)
        .env("DATABASE_URL", url)
        .stdout(Sink::File(log.try_clone()?))
        .stderr(Sink::File(log))
        .watch_peak_rss()
        .spawn()
}

/// One `pgfold run --once ...`: wall time from spawn to exit, and peak RSS.
pub async fn pgfold_once(url: &str, args: &[&str]) -> Result<(f64, u64)> {
    once_of(Daemon::command(PGFOLD), url, args).await
}

/// `run --once --replay NAME --projector NAME`: rebuild one projector in place.
pub const fn replay_args(name: &str) -> [&str; 6] {
    ["run", "--once", "--replay", name, "--projector", name]
}

/// The same with another program built on pgfold's command line.
pub async fn once_of(program: Spawn, url: &str, args: &[&str]) -> Result<(f64, u64)> {
    let (secs, peak, output) = output_of(program, url, args).await?;
    let warnings = output.lines().filter(|l| !l.trim().is_empty()).count();
    if warnings > 0 {
        log(format!(
            "pgfold {} logged {warnings} line(s):\n{}",
            args.join(" "),
            tail(&output, 10)
        ));
    }
    Ok((secs, peak))
}

/// One run of `program ARGS` to its end, which must be a success: wall time
/// from spawn to exit, peak RSS, and what it wrote (stdout and stderr).
pub async fn output_of(program: Spawn, url: &str, args: &[&str]) -> Result<(f64, u64, String)> {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || -> Result<(f64, u64, String)> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let mut daemon = spawn_daemon(program, &url, &args)?;
        let status = daemon.wait()?;
        let (peak, output) = (daemon.peak_rss_kib(), daemon.output());
        let secs = start.elapsed().as_secs_f64();
        if !status.success() {
            bail!(
                "pgfold {} failed ({status}):\n{}",
                args.join(" "),
                tail(&output, 30)
            );
        }
        Ok((secs, peak, output))
    })
    .await?
}

pub async fn projector_positions(client: &Client) -> Result<HashMap<String, (Position, String)>> {
    let rows = client
        .query(
            "SELECT name, position_tx::text, position_id, state FROM pgfold.projectors",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let tx: String = r.get(1);
            (
                r.get::<_, String>(0),
                (
                    Position::new(tx.parse().unwrap_or(0), r.get(2)),
                    r.get::<_, String>(3),
                ),
            )
        })
        .collect())
}

/// Waits until every projector's checkpoint (of those in `only`, unless empty) has
/// reached the newest event.
pub async fn wait_caught_up(
    client: &Client,
    daemon: &mut Daemon,
    only: &[String],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        daemon.alive()?;
        let newest = pgfold::feed::newest(client)
            .await?
            .unwrap_or(Position::START);
        let mut positions = projector_positions(client).await?;
        if !only.is_empty() {
            positions.retain(|name, _| only.contains(name));
        }
        if !positions.is_empty()
            && positions
                .values()
                .all(|(p, state)| *p >= newest && state == "running")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon did not catch up within {timeout:?}: newest {newest}, projectors {positions:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU ticks so far of each of these processes.
pub fn ticks_of(pids: &[u32]) -> HashMap<u32, u64> {
    pids.iter()
        .filter_map(|&p| cpu_ticks(p).map(|t| (p, t)))
        .collect()
}

/// CPU seconds used so far by a daemon process and by its PostgreSQL backends.
pub struct DaemonCpu {
    daemon: Option<u64>,
    backends: HashMap<u32, u64>,
}

impl DaemonCpu {
    /// The daemon's and its backends' in database `db`.
    pub async fn sample(client: &Client, db: &str, daemon: &Daemon) -> Result<DaemonCpu> {
        let backends: Vec<u32> = daemon_backends(client, db)
            .await?
            .into_iter()
            .map(|pid| pid as u32)
            .collect();
        Ok(DaemonCpu {
            daemon: daemon.cpu_ticks(),
            backends: ticks_of(&backends),
        })
    }

    /// (daemon, backends) CPU seconds from `self` to `later`. A backend that is gone
    /// by `later` is not counted; one that appeared counts from its start.
    pub fn until(&self, later: &DaemonCpu) -> (Option<f64>, f64) {
        let ticks = clock_ticks_per_second();
        let daemon = match (self.daemon, later.daemon) {
            (Some(t0), Some(t1)) => Some(t1.saturating_sub(t0) as f64 / ticks),
            _ => None,
        };
        let backends: u64 = later
            .backends
            .iter()
            .map(|(pid, t1)| t1.saturating_sub(self.backends.get(pid).copied().unwrap_or(0)))
            .sum();
        (daemon, backends as f64 / ticks)
    }
}

/// A `pgfold run` on `url`, once it has caught up (the projectors in `only`, or all).
pub async fn running_daemon(
    client: &Client,
    url: &str,
    args: Vec<String>,
    only: &[String],
) -> Result<Daemon> {
    running_daemon_of(Daemon::command(PGFOLD), client, url, args, only).await
}

/// The same with `program` (pgfold with settings in its environment, for one).
pub async fn running_daemon_of(
    program: Spawn,
    client: &Client,
    url: &str,
    args: Vec<String>,
    only: &[String],
) -> Result<Daemon> {
    let url = url.to_string();
    let mut daemon = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_daemon(program, &url, &args)
    })
    .await??;
    wait_caught_up(client, &mut daemon, only, Duration::from_secs(3600)).await?;
    Ok(daemon)
}

/// SIGTERM, then waits up to 30 s (then SIGKILL); logs what it wrote if it did
/// not exit cleanly. Returns its peak RSS in KiB.
pub async fn stop_daemon(mut daemon: Daemon) -> Result<u64> {
    let (status, peak, dlog) = tokio::task::spawn_blocking(move || {
        let status = daemon.stop(Duration::from_secs(30))?;
        anyhow::Ok((status, daemon.peak_rss_kib(), daemon.output()))
    })
    .await??;
    if !status.success() {
        log(format!(
            "pgfold run exited with {status} on SIGTERM:\n{}",
            tail(&dlog, 20)
        ));
    }
    Ok(peak)
}

// ---------------------------------------------------------------------------
// Correctness

/// Prints the checks made by [`check`]; any difference prints the report so far
/// and fails the run.
pub fn correctness(env: &mut Env, checks: &[(String, i64, f64)]) -> Result<()> {
    let r = &mut env.report;
    writeln!(
        r,
        "   correctness (pgfold::workload::differences, rows differing both ways; must be 0):"
    )?;
    let mut failed = Vec::new();
    for (what, n, secs) in checks {
        writeln!(r, "     {what:<52} {n} (check took {secs:.1} s)")?;
        if *n != 0 {
            failed.push(what.clone());
        }
    }
    if !failed.is_empty() {
        println!("\n{}", env.report);
        bail!("the projections differ from the SQL folds: {failed:?}");
    }
    Ok(())
}

pub async fn check(client: &Client, projection: &str, when: &str) -> Result<(String, i64, f64)> {
    let (actual, expected) = match projection {
        "daily_revenue" => (workload::DAILY_REVENUE, workload::EXPECTED_DAILY_REVENUE),
        _ => (
            workload::ORDER_SNAPSHOTS,
            workload::EXPECTED_ORDER_SNAPSHOTS,
        ),
    };
    let t = Instant::now();
    let n = workload::differences(client, actual, expected).await?;
    let secs = t.elapsed().as_secs_f64();
    log(format!(
        "check {projection} {when}: {n} differences ({secs:.1} s)"
    ));
    if n != 0 {
        log(format!(
            "!!! {projection} DIFFERS from the SQL fold {when}: {n} rows"
        ));
    }
    Ok((format!("{projection} {when}"), n, secs))
}
