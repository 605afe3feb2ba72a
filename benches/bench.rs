//! The benchmark of issues 4, 11 and 16: rebuild speed, live latency (and commit to
//! `wait_for`), what keeping the read models current costs the writers with pgfold
//! and with inline triggers, and the daemon's CPU per live event by size of the log.
//!
//! ```sh
//! cargo bench --bench bench -- [--events N] [--rate R] [--writers W] [--seconds T]
//! ```
//!
//! See `docs/benchmark.md` for every option and what the report means. Progress
//! goes to stderr as it runs; the report is printed to stdout at the end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use pgfold::feed::Position;
use pgfold::store::{self, AppendError, NewEvent};
use pgfold::testkit::workload;
use serde_json::Value;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The real binary, built by cargo for this benchmark.
const PGFOLD: &str = env!("CARGO_BIN_EXE_pgfold");
/// The application's table as the article has it: the CREATE TABLE and 3 indexes.
const BARE_SCHEMA: &str = include_str!("../migrations/V1__events.sql");
const DEFAULT_ADMIN_URL: &str = "host=127.0.0.1 user=postgres dbname=postgres";
/// Orders per `load_orders` call: progress every ~1.3 M events.
const LOAD_CHUNK_ORDERS: i64 = 500_000;
const SCRATCH_TABLE: &str = "bench_sql_daily_revenue";

const USAGE: &str = "\
usage: cargo bench --bench bench -- [options]
  --events N          events to load (default 1000000; 10M, 500k accepted)
  --rate R            live and live-cost phases: total append rate, events/s (default 2000)
  --writers W         live and live-cost phases: concurrent writers (default 8)
  --seconds T         live and live-cost phases: duration in seconds (default 20)
  --write-seconds S   write-side phase: seconds per round (default 10)
  --write-writers K   write-side phase: concurrent writers (default 8)
  --runs K            replay runs and write-side rounds (default 3)
  --db NAME           benchmark database, dropped and recreated (default pgfold_bench);
                      the write side's are NAME_wa/_wm/_wb/_wt (dropped at the end),
                      the live cost's NAME_lc<size> (kept), large payloads' NAME_large
  --only LIST         run only these phases: replay,live,write,livecost,large
                      (--only load: just create and load the database; write,
                      livecost and large alone do not load it: they use databases
                      of their own)
  --reuse             keep an already loaded NAME (skip drop/create/load; for profiling,
                      not for reported figures)
  --write-projectors LIST
                      write-side B rounds: run only these projectors (default: all), to
                      see what each one costs the writers
  --live-cost-sizes LIST
                      live-cost phase: log sizes to measure at (default 100k,10M); each
                      is loaded once into NAME_lc<size> and kept for later runs
environment: PGFOLD_BENCH_ADMIN_URL (default \"host=127.0.0.1 user=postgres dbname=postgres\")";

#[derive(Debug, Clone)]
struct Args {
    events: u64,
    rate: u64,
    writers: usize,
    seconds: u64,
    write_seconds: u64,
    write_writers: usize,
    runs: usize,
    db: String,
    only: Vec<String>,
    reuse: bool,
    write_projectors: Vec<String>,
    live_cost_sizes: Vec<u64>,
}

impl Args {
    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }

    /// The 1 M-event benchmark database is loaded only for the phases that use it.
    fn wants_main_db(&self) -> bool {
        ["load", "replay", "live"].iter().any(|p| self.wants(p))
    }
}

fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().replace('_', "");
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000.0),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000.0),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = digits
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    if v < 0.0 {
        bail!("{s:?} is negative");
    }
    Ok((v * mult).round() as u64)
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        events: 1_000_000,
        rate: 2_000,
        writers: 8,
        seconds: 20,
        write_seconds: 10,
        write_writers: 8,
        runs: 3,
        db: "pgfold_bench".to_string(),
        only: Vec::new(),
        reuse: false,
        write_projectors: Vec::new(),
        live_cost_sizes: vec![100_000, 10_000_000],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .with_context(|| format!("{key} needs a value\n{USAGE}")),
            }
        };
        match key.as_str() {
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            "--events" => args.events = parse_count(&value()?)?,
            "--rate" => args.rate = parse_count(&value()?)?,
            "--writers" => args.writers = parse_count(&value()?)? as usize,
            "--seconds" => args.seconds = parse_count(&value()?)?,
            "--write-seconds" => args.write_seconds = parse_count(&value()?)?,
            "--write-writers" => args.write_writers = parse_count(&value()?)? as usize,
            "--runs" => args.runs = parse_count(&value()?)? as usize,
            "--db" => args.db = value()?,
            "--only" => {
                args.only = value()?
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "--reuse" => args.reuse = true,
            "--write-projectors" => {
                args.write_projectors = value()?
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "--live-cost-sizes" => {
                args.live_cost_sizes = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(parse_count)
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.events == 0 || args.rate == 0 || args.writers == 0 || args.runs == 0 {
        bail!("--events, --rate, --writers and --runs must be positive");
    }
    if args.write_writers == 0 || args.write_seconds == 0 || args.seconds == 0 {
        bail!("--seconds, --write-seconds and --write-writers must be positive");
    }
    if args.db.is_empty()
        || !args
            .db
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        bail!("--db must be lowercase letters, digits and _");
    }
    if args.live_cost_sizes.is_empty() || args.live_cost_sizes.contains(&0) {
        bail!("--live-cost-sizes must be positive counts, e.g. 100k,10M");
    }
    for p in &args.only {
        if !["load", "replay", "live", "write", "livecost", "large"].contains(&p.as_str()) {
            bail!("--only takes load, replay, live, write, livecost, large; not {p:?}");
        }
    }
    Ok(args)
}

/// The allocator of pgfold's binary, for the child run as pgfold (see `AS_PGFOLD`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if std::env::var_os(AS_PGFOLD).is_some() {
        return pgfold::cli::main(pgfold::projectors::builtin().register(NotesLength));
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nBENCHMARK FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn admin_url() -> String {
    std::env::var("PGFOLD_BENCH_ADMIN_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// The admin connection string pointed at database `db` (URL or key=value form).
fn with_dbname(admin: &str, db: &str) -> String {
    if let Some(scheme_end) = admin.find("://") {
        let (head, query) = match admin.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (admin, None),
        };
        let after = scheme_end + 3;
        let base = match head[after..].find('/') {
            Some(slash) => &head[..after + slash],
            None => head,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    } else {
        let mut parts: Vec<&str> = admin
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .collect();
        let dbname = format!("dbname={db}");
        parts.push(&dbname);
        parts.join(" ")
    }
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A connection that LISTENs on pgfold's channel and counts the notifications it
/// receives: one per writer transaction that found the wake-up flag armed.
async fn notification_counter(url: &str) -> Result<(Client, Arc<AtomicU64>)> {
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
fn run_nonce() -> u128 {
    static NONCE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    })
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn median(v: &[f64]) -> f64 {
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

/// 1234567 -> "1,234,567".
fn thousands(n: u64) -> String {
    let digits: Vec<char> = n.to_string().chars().rev().collect();
    let groups: Vec<String> = digits
        .chunks(3)
        .map(|g| g.iter().rev().collect())
        .rev()
        .collect();
    groups.join(",")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// VmHWM (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn read_log(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut s);
    s
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn scalar_i64(client: &Client, sql: &str) -> Result<i64> {
    Ok(client
        .query_one(sql, &[])
        .await
        .with_context(|| format!("query failed: {sql}"))?
        .get(0))
}

async fn scalar_text(client: &Client, sql: &str) -> Result<String> {
    Ok(client
        .query_one(sql, &[])
        .await
        .with_context(|| format!("query failed: {sql}"))?
        .get(0))
}

/// A small deterministic generator for payloads (not for statistics).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An `items` array as the workload writes it: 1–5 items, 20 categories, 2-decimal
/// prices (as JSON numbers or numeric strings), qty 1–5.
fn items(rng: &mut Rng) -> Value {
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

fn order_created(stream: &str, items: &Value, rng: &mut Rng) -> NewEvent {
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
fn order_paid(stream: &str, items: &Value) -> NewEvent {
    NewEvent::new(
        stream,
        "order",
        "OrderPaid",
        serde_json::json!({"orderId": stream, "items": items}),
    )
}

// ---------------------------------------------------------------------------
// The daemon as a child process

/// A `pgfold run` child, its peak RSS watched every ~10 ms.
struct Daemon {
    child: Child,
    pid: u32,
    log: File,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn spawn(url: &str, args: &[&str]) -> Result<Daemon> {
        Daemon::spawn_program(Command::new(PGFOLD), url, args)
    }

    fn spawn_program(mut program: Command, url: &str, args: &[&str]) -> Result<Daemon> {
        let log = tempfile::tempfile().context("temp file for the daemon's log")?;
        let name = program.get_program().to_string_lossy().into_owned();
        let child = program
            .args(args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log.try_clone()?))
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let peak = peak_kib.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(k) = vm_hwm_kib(pid) {
                        peak.fetch_max(k, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Ok(Daemon {
            child,
            pid,
            log,
            peak_kib,
            stop,
            watcher: Some(watcher),
        })
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "pgfold exited early ({status}); its log:\n{}",
                tail(&read_log(&mut self.log), 30)
            );
        }
        Ok(())
    }

    fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(self.pid)
    }

    /// Waits (polling every 1 ms) for the child to exit on its own.
    fn wait(mut self) -> Result<(ExitStatus, u64, String)> {
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        Ok(self.finish(status))
    }

    /// SIGTERM, then waits up to 30 s (then SIGKILL).
    fn stop(mut self) -> Result<(ExitStatus, u64, String)> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Ok(self.finish(status))
    }

    fn finish(&mut self, status: ExitStatus) -> (ExitStatus, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        (
            status,
            self.peak_kib.load(Ordering::Relaxed),
            read_log(&mut self.log),
        )
    }
}

/// A benchmark that fails half-way must not leave a daemon running: it would go on
/// competing for the projectors (and the CPU) in whatever runs next.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `pgfold run --once ...`: wall time from spawn to exit, and peak RSS.
async fn pgfold_once(url: &str, args: &'static [&'static str]) -> Result<(f64, u64)> {
    once_of(|| Command::new(PGFOLD), url, args).await
}

/// The same with another program built on pgfold's command line.
async fn once_of(
    program: impl FnOnce() -> Command + Send + 'static,
    url: &str,
    args: &'static [&'static str],
) -> Result<(f64, u64)> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> Result<(f64, u64)> {
        let start = Instant::now();
        let daemon = Daemon::spawn_program(program(), &url, args)?;
        let (status, peak, output) = daemon.wait()?;
        let secs = start.elapsed().as_secs_f64();
        if !status.success() {
            bail!(
                "pgfold {} failed ({status}):\n{}",
                args.join(" "),
                tail(&output, 30)
            );
        }
        let warnings = output.lines().filter(|l| !l.trim().is_empty()).count();
        if warnings > 0 {
            log(format!(
                "pgfold {} logged {warnings} line(s):\n{}",
                args.join(" "),
                tail(&output, 10)
            ));
        }
        Ok((secs, peak))
    })
    .await?
}

async fn projector_positions(client: &Client) -> Result<HashMap<String, (Position, String)>> {
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
async fn wait_caught_up(
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

// ---------------------------------------------------------------------------
// The run

struct Env {
    args: Args,
    admin: String,
    url: String,
    report: String,
}

async fn run(args: Args) -> Result<()> {
    let admin = admin_url();
    let url = with_dbname(&admin, &args.db);
    let mut env = Env {
        args,
        admin,
        url,
        report: String::new(),
    };
    let started = Instant::now();
    // Two runs on one database would drop it under each other: hold a lock named
    // after it (session-level, on the admin connection) for the whole run.
    let guard = connect(&env.admin).await?;
    let free: bool = guard
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('pgfold-bench:' || $1, 0))",
            &[&env.args.db],
        )
        .await?
        .get(0);
    if !free {
        bail!(
            "another benchmark run is using database {} on this server: wait for it, or pass --db OTHER",
            env.args.db
        );
    }
    header(&mut env).await?;
    if env.args.wants_main_db() {
        load(&mut env).await?;
    }
    if env.args.wants("replay") {
        replay(&mut env).await?;
    }
    if env.args.wants("live") {
        live(&mut env).await?;
    }
    if env.args.wants("write") {
        write_side(&mut env).await?;
    }
    if env.args.wants("livecost") {
        live_cost(&mut env).await?;
    }
    if env.args.wants("large") {
        large_payloads(&mut env).await?;
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    writeln!(
        env.report,
        "\nTotal benchmark time: {:.0} s. Load average at the end: {}.",
        started.elapsed().as_secs_f64(),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    println!("\n{}", env.report);
    drop(guard);
    Ok(())
}

/// The source the daemon was built from: commit, and whether src/ had changes.
fn source_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "migrations",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            format!(
                "commit {commit}{}",
                if dirty {
                    " with uncommitted changes in src/, migrations/ or Cargo.*"
                } else {
                    ""
                }
            )
        }
        None => "unknown (not a git checkout)".to_string(),
    }
}

async fn header(env: &mut Env) -> Result<()> {
    let admin = connect(&env.admin).await?;
    let version = scalar_text(&admin, "SELECT split_part(version(), ' on ', 1)").await?;
    let mut settings = Vec::new();
    for name in [
        "shared_buffers",
        "work_mem",
        "synchronous_commit",
        "max_wal_size",
    ] {
        let v = scalar_text(&admin, &format!("SELECT current_setting('{name}')")).await?;
        settings.push(format!("{name}={v}"));
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let a = &env.args;
    let r = &mut env.report;
    writeln!(r, "pgfold benchmark (issue 4)")?;
    writeln!(r, "==========================")?;
    writeln!(
        r,
        "machine: {cpus} CPUs (shared with other work: figures are noisy; compare the ratios, \
         which come from the same run)"
    )?;
    writeln!(r, "server:  {version}; {}", settings.join(", "))?;
    writeln!(
        r,
        "pgfold:  {} (built by this cargo bench)",
        source_version()
    )?;
    writeln!(
        r,
        "load average at start: {}",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(
        r,
        "options: events={} rate={}/s writers={} seconds={} write-seconds={} write-writers={} runs={} db={} \
         live-cost-sizes={}{}",
        a.events,
        a.rate,
        a.writers,
        a.seconds,
        a.write_seconds,
        a.write_writers,
        a.runs,
        a.db,
        a.live_cost_sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        if a.reuse { " (reused, not fresh)" } else { "" }
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Load

async fn load(env: &mut Env) -> Result<()> {
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
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", a.db))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", a.db))
        .await?;
    let pg = pgfold::db::pg_config(Some(&env.url))?;
    let t = Instant::now();
    pgfold::daemon::migrate(&pg, &pgfold::projectors::builtin()).await?;
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

struct Loaded {
    orders: i64,
    written: u64,
    load_secs: f64,
    vacuum_secs: f64,
    checkpoint_secs: f64,
}

/// Appends about `events` events with `pgfold::workload::load_orders` to a migrated
/// database, then VACUUM (ANALYZE) and CHECKPOINT.
async fn load_orders(client: &Client, events: u64) -> Result<Loaded> {
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

// ---------------------------------------------------------------------------
// 2. Replay

async fn replay(env: &mut Env) -> Result<()> {
    let runs = env.args.runs;
    let client = connect(&env.url).await?;
    let events = scalar_i64(&client, "SELECT count(*) FROM events").await? as u64;
    let paid = scalar_i64(
        &client,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await? as u64;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {SCRATCH_TABLE};
             CREATE TABLE {SCRATCH_TABLE} (
               day DATE NOT NULL, category TEXT NOT NULL, total NUMERIC NOT NULL,
               PRIMARY KEY (day, category));
             ANALYZE events;"
        ))
        .await?;
    let insert = format!(
        "INSERT INTO {SCRATCH_TABLE} (day, category, total) {}",
        workload::EXPECTED_DAILY_REVENUE
    );
    let sql_once = || async {
        client
            .batch_execute(&format!("TRUNCATE {SCRATCH_TABLE}"))
            .await?;
        let t = Instant::now();
        client.execute(&insert, &[]).await?;
        anyhow::Ok(t.elapsed().as_secs_f64())
    };
    log("replay: warm-up (pure SQL once, untimed)");
    sql_once().await?;

    const DR: &[&str] = &[
        "run",
        "--once",
        "--replay",
        "daily_revenue",
        "--projector",
        "daily_revenue",
    ];
    const OS: &[&str] = &[
        "run",
        "--once",
        "--replay",
        "order_snapshots",
        "--projector",
        "order_snapshots",
    ];
    const ALL: &[&str] = &["run", "--once", "--replay", "all"];

    let mut sql = Vec::new();
    let mut dr = Vec::new();
    let mut os = Vec::new();
    let mut all = Vec::new();
    let mut checks: Vec<(String, i64, f64)> = Vec::new();
    for run in 1..=runs {
        let s = sql_once().await?;
        log(format!("replay run {run}/{runs}: pure SQL {s:.2} s"));
        sql.push(s);
        let r = pgfold_once(&env.url, DR).await?;
        log(format!(
            "replay run {run}/{runs}: pgfold daily_revenue {:.2} s, peak RSS {}",
            r.0,
            mib(r.1)
        ));
        dr.push(r);
        if run == runs {
            checks.push(check(&client, "daily_revenue", "after --replay daily_revenue").await?);
        }
        let r = pgfold_once(&env.url, OS).await?;
        log(format!(
            "replay run {run}/{runs}: pgfold order_snapshots {:.2} s, peak RSS {}",
            r.0,
            mib(r.1)
        ));
        os.push(r);
        if run == runs {
            checks.push(check(&client, "order_snapshots", "after --replay order_snapshots").await?);
        }
        let r = pgfold_once(&env.url, ALL).await?;
        log(format!(
            "replay run {run}/{runs}: pgfold all {:.2} s, peak RSS {}",
            r.0,
            mib(r.1)
        ));
        all.push(r);
    }
    checks.push(check(&client, "daily_revenue", "after --replay all").await?);
    checks.push(check(&client, "order_snapshots", "after --replay all").await?);

    let sql_median = median(&sql);
    let r = &mut env.report;
    writeln!(
        r,
        "\n2. Replay: {} events in the log ({} OrderPaid); {runs} runs each, interleaved \
         (SQL, daily_revenue, order_snapshots, all per round), after one untimed warm-up",
        thousands(events),
        thousands(paid)
    )?;
    writeln!(
        r,
        "   events/s = all events in the log / median wall time. pgfold times are the whole \
         child process\n   (`pgfold run --once --replay ...`: start, connect, reset, rebuild, exit). \
         Peak RSS = max VmHWM, polled every 10 ms."
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:<46} {:>9} {:>26} {:>11} {:>8} {:>10}",
        "rebuild", "median", "runs (s)", "events/s", "vs SQL", "peak RSS"
    )?;
    let line = |r: &mut String, name: &str, times: &[f64], peak: Option<u64>| -> Result<()> {
        let m = median(times);
        let runs_text = times
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            r,
            "   {:<46} {:>7.2} s {:>26} {:>11} {:>7.2}x {:>10}",
            name,
            m,
            runs_text,
            thousands((events as f64 / m) as u64),
            m / sql_median,
            peak.map(mib).unwrap_or_else(|| "-".into())
        )?;
        Ok(())
    };
    line(r, "pure SQL: INSERT ... SELECT (daily_revenue)", &sql, None)?;
    let times = |v: &[(f64, u64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let peak = |v: &[(f64, u64)]| v.iter().map(|x| x.1).max();
    line(r, "pgfold --replay daily_revenue", &times(&dr), peak(&dr))?;
    line(r, "pgfold --replay order_snapshots", &times(&os), peak(&os))?;
    line(r, "pgfold --replay all", &times(&all), peak(&all))?;
    writeln!(r)?;
    writeln!(
        r,
        "   daily_revenue consumes {} events (OrderPaid): {} consumed events/s for pgfold --replay daily_revenue",
        thousands(paid),
        thousands((paid as f64 / median(&times(&dr))) as u64)
    )?;
    correctness(env, &checks)
}

/// Prints the checks made by [`check`]; any difference prints the report so far
/// and fails the run.
fn correctness(env: &mut Env, checks: &[(String, i64, f64)]) -> Result<()> {
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

async fn check(client: &Client, projection: &str, when: &str) -> Result<(String, i64, f64)> {
    let (actual, expected) = match projection {
        "daily_revenue" => (
            "SELECT day, category, total FROM daily_revenue",
            workload::EXPECTED_DAILY_REVENUE,
        ),
        _ => (
            "SELECT stream_id, sequence, state FROM order_snapshots",
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

// ---------------------------------------------------------------------------
// 3. Live latency

struct Committed {
    position: Position,
    at: Instant,
    paid: bool,
}

struct LiveWriter {
    committed: Vec<Committed>,
    conflicts: u64,
    /// BEGIN to COMMIT returned, per event (retries included).
    durations: Vec<Duration>,
    /// COMMIT returned -> `pgfold::store::wait_for` returned true, per sampled event.
    waits: Vec<Duration>,
    /// Sampled events whose `wait_for` returned false (timed out).
    wait_timeouts: u64,
}

/// One live writer in this many also waits for its events with `wait_for`.
const WAIT_SAMPLE_EVERY: usize = 8;
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

async fn live_writer(
    url: String,
    writer: usize,
    a: Args,
    start: tokio::time::Instant,
    tag: String,
    sample_waits: bool,
) -> Result<LiveWriter> {
    let (writers, rate) = (a.writers, a.rate);
    let duration = Duration::from_secs(a.seconds);
    let mut client = connect(&url).await?;
    // The application's read-your-writes call, on a connection of its own. One wait
    // at a time: an event committed while the previous wait still runs is not
    // sampled, so that the writer keeps its pace.
    let waiter = match sample_waits {
        true => Some(Arc::new(tokio::sync::Mutex::new(connect(&url).await?))),
        false => None,
    };
    let mut pending = Vec::new();
    let period = Duration::from_secs_f64(writers as f64 / rate as f64);
    let offset = period.mul_f64(writer as f64 / writers as f64);
    let mut tick = tokio::time::interval_at(start + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = start + duration;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((writer as u64 + 1) * 0x1234_5678_9ABC));
    let mut out = LiveWriter {
        committed: Vec::with_capacity(
            (rate as f64 * duration.as_secs_f64() / writers as f64) as usize + 16,
        ),
        conflicts: 0,
        durations: Vec::new(),
        waits: Vec::new(),
        wait_timeouts: 0,
    };
    let mut order = 0u64;
    let mut step = 0u8;
    let mut expected = 1i64;
    let mut order_items = Value::Null;
    loop {
        let scheduled = tick.tick().await;
        if scheduled >= end {
            break;
        }
        let stream = format!("live-{tag}-{writer}-{order}");
        let event = match step {
            0 => {
                order_items = items(&mut rng);
                order_created(&stream, &order_items, &mut rng)
            }
            1 => order_paid(&stream, &order_items),
            _ => NewEvent::new(
                &stream,
                "order",
                "OrderShipped",
                serde_json::json!({"address": format!("{} Harbour Street", rng.below(999))}),
            ),
        };
        // The optimistic-concurrency path: append at the expected sequence in an
        // explicit transaction; on a conflict re-read the stream's last sequence.
        let began = Instant::now();
        loop {
            let tx = client.transaction().await?;
            match store::append(&tx, &event, expected).await {
                Ok(id) => {
                    let txid: String = tx
                        .query_one("SELECT tx_id::text FROM events WHERE id = $1", &[&id])
                        .await?
                        .get(0);
                    tx.commit().await?;
                    let at = Instant::now();
                    out.durations.push(at - began);
                    out.committed.push(Committed {
                        position: Position::new(txid.parse()?, id),
                        at,
                        paid: event.event_type == "OrderPaid",
                    });
                    if let Some(conn) = waiter
                        .as_ref()
                        .and_then(|w| w.clone().try_lock_owned().ok())
                    {
                        let (stream, sequence) = (stream.clone(), expected);
                        pending.push(tokio::spawn(async move {
                            let applied = store::wait_for(
                                &*conn,
                                "order_snapshots",
                                &stream,
                                sequence,
                                WAIT_TIMEOUT,
                            )
                            .await?;
                            anyhow::Ok(applied.then(|| at.elapsed()))
                        }));
                    }
                    break;
                }
                Err(AppendError::Conflict { .. }) => {
                    tx.rollback().await?;
                    out.conflicts += 1;
                    expected = store::last_sequence(&client, &stream).await? + 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        expected += 1;
        step += 1;
        if step == 3 {
            step = 0;
            order += 1;
            expected = 1;
        }
    }
    for wait in pending {
        match wait.await?? {
            Some(d) => out.waits.push(d),
            None => out.wait_timeouts += 1,
        }
    }
    Ok(out)
}

/// Runs the paced live writers (`--writers`, `--rate`, `--seconds`) to the end and
/// merges what they saw; also returns the seconds from their start to their end.
/// With `sample_waits`, one writer in [`WAIT_SAMPLE_EVERY`] also calls `wait_for`.
async fn live_writers(url: &str, a: &Args, sample_waits: bool) -> Result<(LiveWriter, f64)> {
    let tag = run_nonce().to_string();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        tasks.push(tokio::spawn(live_writer(
            url.to_string(),
            w,
            a.clone(),
            start,
            tag.clone(),
            sample_waits && w % WAIT_SAMPLE_EVERY == 0,
        )));
    }
    let mut all = LiveWriter {
        committed: Vec::new(),
        conflicts: 0,
        durations: Vec::new(),
        waits: Vec::new(),
        wait_timeouts: 0,
    };
    for t in tasks {
        let w = t.await??;
        all.conflicts += w.conflicts;
        all.committed.extend(w.committed);
        all.durations.extend(w.durations);
        all.waits.extend(w.waits);
        all.wait_timeouts += w.wait_timeouts;
    }
    Ok((all, start.elapsed().as_secs_f64()))
}

/// First time (when the answer arrived) each projector was seen at each position.
type Observations = HashMap<String, Vec<(Instant, Position)>>;

async fn poll_positions(url: String, stop: Arc<AtomicBool>) -> Result<(Observations, u64, f64)> {
    let client = connect(&url).await?;
    let stmt = client
        .prepare("SELECT name, position_tx::text, position_id FROM pgfold.projectors")
        .await?;
    let mut seen: Observations = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut polls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let rows = client.query(&stmt, &[]).await?;
        let at = Instant::now();
        polls += 1;
        for row in rows {
            let tx: String = row.get(1);
            let p = Position::new(tx.parse()?, row.get(2));
            let list = seen.entry(row.get(0)).or_default();
            if list.last().map(|(_, last)| *last) != Some(p) {
                list.push((at, p));
            }
        }
    }
    let mean_period_ms = started.elapsed().as_secs_f64() * 1000.0 / polls.max(1) as f64;
    Ok((seen, polls, mean_period_ms))
}

struct LatencyStats {
    consumed: usize,
    visible: usize,
    p50: Duration,
    p95: Duration,
    p99: Duration,
    max: Duration,
    negative: usize,
}

fn latencies(events: &[&Committed], obs: &[(Instant, Position)]) -> LatencyStats {
    let mut lat = Vec::with_capacity(events.len());
    let mut negative = 0;
    for e in events {
        // Checkpoints only move forward, so the first observation at or past the
        // event's position is where it became visible.
        let i = obs.partition_point(|(_, p)| *p < e.position);
        if let Some((at, _)) = obs.get(i) {
            if *at < e.at {
                negative += 1;
            }
            lat.push(at.saturating_duration_since(e.at));
        }
    }
    lat.sort();
    LatencyStats {
        consumed: events.len(),
        visible: lat.len(),
        p50: percentile(&lat, 50.0),
        p95: percentile(&lat, 95.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or_default(),
        negative,
    }
}

async fn live(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let client = connect(&env.url).await?;
    log("live: starting `pgfold run` and waiting until it has caught up");
    let daemon = running_daemon(&client, &env.url, vec!["run".to_string()], &[]).await?;
    // Let the workers go idle and arm the wake-up flag, as in production.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = daemon.cpu_ticks();

    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_positions(env.url.clone(), stop.clone()));
    let (_listener, notifications) = notification_counter(&env.url).await?;
    log(format!(
        "live: {} writers appending {} events/s in total for {} s",
        a.writers, a.rate, a.seconds
    ));
    let (
        LiveWriter {
            committed,
            conflicts,
            mut durations,
            mut waits,
            wait_timeouts,
        },
        written_in,
    ) = live_writers(&env.url, &a, true).await?;
    durations.sort();
    waits.sort();
    let cpu1 = daemon.cpu_ticks();
    let notified = notifications.load(Ordering::Relaxed);
    // Let the last events through before stopping the poller.
    let last = committed.iter().map(|c| c.position).max();
    let settle = Instant::now() + Duration::from_secs(30);
    if let Some(last) = last {
        loop {
            let pos = projector_positions(&client).await?;
            if pos.values().all(|(p, _)| *p >= last) || Instant::now() > settle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let (obs, polls, poll_ms) = poller.await??;
    let (status, peak, daemon_log) = tokio::task::spawn_blocking(move || daemon.stop()).await??;
    if !status.success() {
        log(format!(
            "pgfold run exited with {status} on SIGTERM:\n{}",
            tail(&daemon_log, 20)
        ));
    }

    let n = committed.len();
    let rate = n as f64 / a.seconds as f64;
    let tps = clock_ticks_per_second();
    let cpu = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) => format!(
            "{:.0} % of one core",
            100.0 * (c1 - c0) as f64 / tps / written_in
        ),
        _ => "n/a".into(),
    };
    let r = &mut env.report;
    writeln!(
        r,
        "\n3. Live latency: `pgfold run` caught up, then {} writers (own connections) appending new \
         orders\n   (OrderCreated, OrderPaid, OrderShipped) through pgfold::store::append at the expected \
         sequence,\n   one event per transaction, paced at {} events/s in total for {} s",
        a.writers, a.rate, a.seconds
    )?;
    writeln!(
        r,
        "   committed {} events ({:.0}/s achieved), {} conflicts retried; daemon CPU while writing: {}; \
         daemon peak RSS {}",
        thousands(n as u64),
        rate,
        conflicts,
        cpu,
        mib(peak)
    )?;
    writeln!(
        r,
        "   writer transactions that notified (found the wake-up flag armed): {} of {} ({:.0} %)",
        thousands(notified),
        thousands(n as u64),
        100.0 * notified as f64 / n.max(1) as f64
    )?;
    writeln!(
        r,
        "   writer transaction (BEGIN .. COMMIT returned, 4 round trips): p50 {}, p99 {}; \
         each writer must finish one every {:.1} ms to hold the rate{}",
        ms(percentile(&durations, 50.0)),
        ms(percentile(&durations, 99.0)),
        1000.0 * a.writers as f64 / a.rate as f64,
        if rate < 0.95 * a.rate as f64 {
            "\n   !!! the writers could not hold the requested rate on this machine; latencies are for the achieved rate"
        } else {
            ""
        }
    )?;
    writeln!(
        r,
        "   latency = commit returned to the writer -> first poll of pgfold.projectors showing the \
         checkpoint at or past the event.\n   Polled every 1 ms (measured: {} polls, one per {:.2} ms), \
         so figures carry up to ~1 ms + one query of resolution.",
        thousands(polls),
        poll_ms
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "projector", "events", "visible", "p50", "p95", "p99", "max"
    )?;
    let mut negatives = 0;
    for (name, filter) in [("daily_revenue", true), ("order_snapshots", false)] {
        let evs: Vec<&Committed> = committed.iter().filter(|c| !filter || c.paid).collect();
        let empty = Vec::new();
        let s = latencies(&evs, obs.get(name).unwrap_or(&empty));
        negatives += s.negative;
        writeln!(
            r,
            "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            s.consumed,
            s.visible,
            ms(s.p50),
            ms(s.p95),
            ms(s.p99),
            ms(s.max)
        )?;
        if s.visible < s.consumed {
            writeln!(
                r,
                "   !!! {} of {name}'s events never became visible within 30 s",
                s.consumed - s.visible
            )?;
        }
    }
    writeln!(
        r,
        "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "wait_for (os)",
        waits.len() as u64 + wait_timeouts,
        waits.len(),
        ms(percentile(&waits, 50.0)),
        ms(percentile(&waits, 95.0)),
        ms(percentile(&waits, 99.0)),
        ms(waits.last().copied().unwrap_or_default())
    )?;
    writeln!(
        r,
        "   (daily_revenue counts only OrderPaid, the events it consumes; order_snapshots all of them. \
         {negatives} observations\n   arrived before the writer saw its own COMMIT return and count as 0 ms.)"
    )?;
    writeln!(
        r,
        "   wait_for (os) = issue 16's read-your-writes: one writer in {WAIT_SAMPLE_EVERY} calls \
         pgfold::store::wait_for('order_snapshots', stream, sequence, {} s)\n   on a second connection \
         right after its COMMIT returns, one wait at a time (events committed meanwhile are not sampled);\n   \
         commit returned -> wait_for returned true. {wait_timeouts} of the sampled waits timed out.",
        WAIT_TIMEOUT.as_secs()
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Write-side cost

/// The write-side configurations, in the order each round runs them.
const WRITE_CONFIGS: [&str; 4] = ["A", "M", "B", "T"];

/// Configuration T: both read models kept inline by row triggers on `events`, as a
/// team without pgfold would write them. They must produce exactly the rows of
/// pgfold's built-ins (checked against `pgfold::workload`'s SQL folds after the
/// rounds), or the comparison would flatter one side.
const INLINE_TRIGGERS: &str = r#"
CREATE TABLE daily_revenue (
  day DATE NOT NULL,
  category TEXT NOT NULL,
  total NUMERIC NOT NULL,
  PRIMARY KEY (day, category)
);
CREATE TABLE order_snapshots (
  stream_id TEXT PRIMARY KEY,
  sequence BIGINT NOT NULL,
  state JSONB NOT NULL,
  projected_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE FUNCTION inline_daily_revenue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- Sorted so that concurrent payers lock the shared (day, category) rows in one
  -- order: otherwise two of them deadlock.
  INSERT INTO daily_revenue AS d (day, category, total)
  SELECT (NEW.occurred_at AT TIME ZONE 'UTC')::date, i->>'category',
         sum((i->>'price')::numeric * (i->>'qty')::numeric)
    FROM jsonb_array_elements(NEW.payload->'items') AS i
   GROUP BY 1, 2
   ORDER BY 2
  ON CONFLICT (day, category) DO UPDATE SET total = d.total + EXCLUDED.total;
  RETURN NULL;
END $$;
CREATE TRIGGER inline_daily_revenue AFTER INSERT ON events
  FOR EACH ROW WHEN (NEW.event_type = 'OrderPaid') EXECUTE FUNCTION inline_daily_revenue();

CREATE FUNCTION inline_order_snapshots() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  stamp text := to_char(NEW.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
BEGIN
  IF NEW.event_type = 'OrderCreated' THEN
    INSERT INTO order_snapshots AS o (stream_id, sequence, state)
    VALUES (NEW.stream_id, NEW.sequence, jsonb_build_object(
              'orderId', coalesce(NEW.payload->'orderId', 'null'),
              'customerId', coalesce(NEW.payload->'customerId', 'null'),
              'items', coalesce(NEW.payload->'items', 'null'),
              'status', 'pending'))
    ON CONFLICT (stream_id) DO UPDATE
      SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, projected_at = now();
  ELSE
    UPDATE order_snapshots
       SET sequence = NEW.sequence, projected_at = now(),
           state = state || CASE NEW.event_type
             WHEN 'OrderPaid' THEN jsonb_build_object('status', 'paid', 'paidAt', stamp)
             WHEN 'OrderShipped' THEN jsonb_build_object('status', 'shipped', 'shippedAt', stamp)
               || CASE WHEN NEW.payload->'address' IS NULL OR NEW.payload->'address' = 'null' THEN '{}'
                       ELSE jsonb_build_object('shippingAddress', NEW.payload->'address') END
             ELSE jsonb_build_object('status', 'cancelled') END
     WHERE stream_id = NEW.stream_id;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER inline_order_snapshots AFTER INSERT ON events
  FOR EACH ROW WHEN (NEW.stream_type = 'order'
                     AND NEW.event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled'))
  EXECUTE FUNCTION inline_order_snapshots();
"#;

/// Each client places new orders until the deadline: `OrderCreated` at sequence 1
/// and `OrderPaid` at sequence 2, each in a transaction of its own, as the article's
/// `appendEvent` does. Returns the clients, events committed, seconds and the
/// machine's CPU busy % over the round.
async fn order_round(
    clients: Vec<Client>,
    seconds: f64,
    tag: &str,
) -> Result<(Vec<Client>, u64, f64, f64)> {
    let cpu0 = machine_cpu();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for (w, mut client) in clients.into_iter().enumerate() {
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ ((w as u64 + 7) * 0x9E37_79B9));
            let mut n = 0u64;
            let mut order = 0u64;
            while Instant::now() < deadline {
                let stream = format!("w-{}-{tag}-{w}-{order}", run_nonce());
                order += 1;
                let order_items = items(&mut rng);
                let created = order_created(&stream, &order_items, &mut rng);
                let paid = order_paid(&stream, &order_items);
                for (sequence, event) in [(1, &created), (2, &paid)] {
                    let tx = client.transaction().await?;
                    store::append(&tx, event, sequence).await?;
                    tx.commit().await?;
                    n += 1;
                }
            }
            anyhow::Ok((client, n))
        }));
    }
    let mut clients = Vec::new();
    let mut total = 0;
    for t in tasks {
        let (c, n) = t.await??;
        clients.push(c);
        total += n;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let busy = match (cpu0, machine_cpu()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    Ok((clients, total, elapsed, busy))
}

/// Machine-wide (busy, total) jiffies from /proc/stat; idle and iowait count as idle.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// The daemon's PostgreSQL backends (its pool and LISTEN connections).
async fn daemon_backends(client: &Client) -> Result<Vec<u32>> {
    Ok(client
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'pgfold'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .collect())
}

fn ticks_of(pids: &[u32]) -> HashMap<u32, u64> {
    pids.iter()
        .filter_map(|&p| cpu_ticks(p).map(|t| (p, t)))
        .collect()
}

/// CPU seconds used so far by a daemon process and by its PostgreSQL backends.
struct DaemonCpu {
    daemon: Option<u64>,
    backends: HashMap<u32, u64>,
}

impl DaemonCpu {
    async fn sample(client: &Client, daemon: &Daemon) -> Result<DaemonCpu> {
        Ok(DaemonCpu {
            daemon: daemon.cpu_ticks(),
            backends: ticks_of(&daemon_backends(client).await?),
        })
    }

    /// (daemon, backends) CPU seconds from `self` to `later`. A backend that is gone
    /// by `later` is not counted; one that appeared counts from its start.
    fn until(&self, later: &DaemonCpu) -> (Option<f64>, f64) {
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

/// Drops and creates database `name`; returns its URL.
async fn fresh_database(env: &Env, admin: &Client, name: &str) -> Result<String> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(with_dbname(&env.admin, name))
}

async fn migrate(url: &str) -> Result<()> {
    let pg = pgfold::db::pg_config(Some(url))?;
    pgfold::daemon::migrate(&pg, &pgfold::projectors::builtin()).await
}

/// A `pgfold run` on `url`, once it has caught up (the projectors in `only`, or all).
async fn running_daemon(
    client: &Client,
    url: &str,
    args: Vec<String>,
    only: &[String],
) -> Result<Daemon> {
    let url = url.to_string();
    let mut daemon = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::spawn(&url, &args)
    })
    .await??;
    wait_caught_up(client, &mut daemon, only, Duration::from_secs(3600)).await?;
    Ok(daemon)
}

async fn stop_daemon(daemon: Daemon) -> Result<u64> {
    let (status, peak, dlog) = tokio::task::spawn_blocking(move || daemon.stop()).await??;
    if !status.success() {
        log(format!(
            "pgfold run exited with {status} on SIGTERM:\n{}",
            tail(&dlog, 20)
        ));
    }
    Ok(peak)
}

struct WriteConfig {
    db: String,
    url: String,
    clients: Vec<Client>,
}

/// Database `db`, dropped and created again with the application's bare table:
/// the admin connection and the database's URL.
async fn bare_database(admin_url: &str, db: &str) -> Result<(Client, String)> {
    let admin = connect(admin_url).await?;
    // Two calls: in one string, both would run in one transaction, which DROP
    // DATABASE refuses.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = with_dbname(admin_url, db);
    connect(&url).await?.batch_execute(BARE_SCHEMA).await?;
    Ok((admin, url))
}

async fn write_side(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let admin = connect(&env.admin).await?;
    let mut configs: HashMap<&str, WriteConfig> = HashMap::new();
    for k in WRITE_CONFIGS {
        let db = format!("{}_w{}", a.db, k.to_lowercase());
        let url = fresh_database(env, &admin, &db).await?;
        match k {
            "A" => connect(&url).await?.batch_execute(BARE_SCHEMA).await?,
            "T" => {
                connect(&url)
                    .await?
                    .batch_execute(&format!("{BARE_SCHEMA}\n{INLINE_TRIGGERS}"))
                    .await?
            }
            _ => migrate(&url).await?,
        }
        let mut clients = Vec::new();
        for _ in 0..a.write_writers {
            clients.push(connect(&url).await?);
        }
        configs.insert(k, WriteConfig { db, url, clients });
    }
    let b_client = connect(&configs["B"].url).await?;
    let secs = a.write_seconds as f64;
    let mut run_args = vec!["run".to_string()];
    for p in &a.write_projectors {
        run_args.extend(["--projector".to_string(), p.clone()]);
    }
    log("write side: 1 s warm-up on each database");
    for k in WRITE_CONFIGS {
        let c = configs.get_mut(k).expect("configured");
        c.clients = order_round(std::mem::take(&mut c.clients), 1.0, "warm")
            .await?
            .0;
    }

    // Per configuration: events/s and machine-wide CPU busy % of each round.
    let mut eps: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut busy: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut daemon_cpu = Vec::new();
    let mut backend_cpu = Vec::new();
    let mut notify_share = Vec::new();
    let mut peak_rss = 0;
    let mut checks = Vec::new();
    for round in 1..=a.runs {
        for k in WRITE_CONFIGS {
            let c = configs.get_mut(k).expect("configured");
            let tag = format!("{}{round}", k.to_lowercase());
            let clients = std::mem::take(&mut c.clients);
            let (clients, n, s, b) = if k == "B" {
                let mut daemon =
                    running_daemon(&b_client, &c.url, run_args.clone(), &a.write_projectors)
                        .await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (listener, notifications) = notification_counter(&c.url).await?;
                let cpu0 = DaemonCpu::sample(&b_client, &daemon).await?;
                let out = order_round(clients, secs, &tag).await?;
                let (d, be) = cpu0.until(&DaemonCpu::sample(&b_client, &daemon).await?);
                notify_share.push(
                    100.0 * notifications.load(Ordering::Relaxed) as f64 / out.1.max(1) as f64,
                );
                drop(listener);
                daemon_cpu.extend(d.map(|d| 100.0 * d / out.2));
                backend_cpu.push(100.0 * be / out.2);
                daemon.alive()?;
                if round == a.runs && a.write_projectors.is_empty() {
                    wait_caught_up(&b_client, &mut daemon, &[], Duration::from_secs(600)).await?;
                    for p in ["daily_revenue", "order_snapshots"] {
                        checks.push(check(&b_client, p, "in B (pgfold run)").await?);
                    }
                }
                peak_rss = peak_rss.max(stop_daemon(daemon).await?);
                out
            } else {
                order_round(clients, secs, &tag).await?
            };
            c.clients = clients;
            log(format!(
                "write side round {round}/{}: {k} {:.0} events/s (machine CPU busy {b:.0} %)",
                a.runs,
                n as f64 / s
            ));
            eps.entry(k).or_default().push(n as f64 / s);
            busy.entry(k).or_default().push(b);
        }
    }
    let t_client = connect(&configs["T"].url).await?;
    for p in ["daily_revenue", "order_snapshots"] {
        checks.push(check(&t_client, p, "in T (inline triggers)").await?);
    }
    drop((t_client, b_client));
    for c in configs.into_values() {
        drop(c.clients);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", c.db))
            .await?;
    }

    let med = |k: &str| median(&eps[k]);
    let per_round = |k: &str, base: &str| -> f64 {
        let ratios: Vec<f64> = eps[k].iter().zip(&eps[base]).map(|(x, b)| x / b).collect();
        median(&ratios)
    };
    let r = &mut env.report;
    writeln!(
        r,
        "\n4. Write-side cost: {} writers (own connections) placing new orders as the article's appendEvent \
         does:\n   OrderCreated (sequence 1), then OrderPaid (sequence 2), each BEGIN; INSERT at the expected \
         sequence\n   (pgfold::store::append); COMMIT; 1-5 items in 20 categories, occurred_at = now(). {} s per \
         round,\n   rounds interleaved A M B T x {}, medians; each configuration on a fresh database of its own \
         ({}_wa ...),\n   empty at the start but for a 1 s warm-up.",
        a.write_writers, a.write_seconds, a.runs, a.db
    )?;
    writeln!(
        r,
        "   A = bare events table (migrations/V1__events.sql: table + 3 indexes), no read models\n   \
         M = pgfold-migrated (tx_id column, position index, wake-up trigger), no daemon\n   \
         B = pgfold-migrated, `pgfold run` keeping the built-ins current (caught up before each round)\n   \
         T = bare table + both read models kept inline by AFTER INSERT FOR EACH ROW triggers (plpgsql), no pgfold"
    )?;
    if !a.write_projectors.is_empty() {
        writeln!(
            r,
            "   B runs only: {} (--write-projectors)",
            a.write_projectors.join(", ")
        )?;
    }
    writeln!(r)?;
    writeln!(
        r,
        "   {:<4} {:>30} {:>10} {:>12} {:>20} {:>16}",
        "", "events/s per round", "median", "median/A", "median of round/A", "machine CPU busy"
    )?;
    for k in WRITE_CONFIGS {
        let rounds = eps[k]
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            r,
            "   {:<4} {:>30} {:>10.0} {:>11.2}x {:>19.2}x {:>15.0}%",
            k,
            rounds,
            med(k),
            med(k) / med("A"),
            per_round(k, "A"),
            median(&busy[k])
        )?;
    }
    writeln!(r)?;
    let pcts = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.0} %"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        r,
        "   B rounds: share of writer transactions that notified (counted by an extra LISTEN connection): {}",
        pcts(&notify_share)
    )?;
    writeln!(
        r,
        "   B rounds: CPU of the daemon process {} and of its PostgreSQL backends {} (of one core, per round);\n   \
         daemon peak RSS {}",
        pcts(&daemon_cpu),
        pcts(&backend_cpu),
        mib(peak_rss)
    )?;
    writeln!(
        r,
        "   ratios (median events/s; in brackets the median of per-round ratios):\n   \
         B/A = {:.2}x ({:.2}x)   B/T = {:.2}x ({:.2}x)   T/A = {:.2}x ({:.2}x)   M/A = {:.2}x ({:.2}x)\n   \
         issue 11's targets: B/T >= 1.2 (stretch 1.3), B/A >= 0.78",
        med("B") / med("A"),
        per_round("B", "A"),
        med("B") / med("T"),
        per_round("B", "T"),
        med("T") / med("A"),
        per_round("T", "A"),
        med("M") / med("A"),
        per_round("M", "A"),
    )?;
    correctness(env, &checks)
}

// ---------------------------------------------------------------------------
// 5. Live cost

/// The live-cost database for a log of `size` events: reused when it already
/// holds within 10 % of that many (loading 10 M events takes minutes), otherwise
/// created, migrated and loaded. Returns its URL and whether it was reused.
async fn live_cost_database(env: &Env, admin: &Client, size: u64) -> Result<(String, bool)> {
    let db = format!("{}_lc{size}", env.args.db);
    let url = with_dbname(&env.admin, &db);
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
    let url = fresh_database(env, admin, &db).await?;
    migrate(&url).await?;
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

async fn live_cost(env: &mut Env) -> Result<()> {
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
        let cpu0 = DaemonCpu::sample(&client, &daemon).await?;
        log(format!(
            "live cost at {in_log} events: {} writers appending {} events/s in total for {} s",
            a.writers, a.rate, a.seconds
        ));
        let (writers, secs) = live_writers(&url, &a, false).await?;
        // The cost of the live events includes projecting the last of them.
        wait_caught_up(&client, &mut daemon, &[], Duration::from_secs(60)).await?;
        let (daemon_secs, backend_secs) = cpu0.until(&DaemonCpu::sample(&client, &daemon).await?);
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

// ---------------------------------------------------------------------------
// 5. Large payloads: peak RSS of a decoded-events replay (issue 17)

/// Set in the environment of this benchmark's own binary run as a pgfold whose only
/// projector is [`NotesLength`]: the built-in projectors are set-based and never
/// decode a payload.
const AS_PGFOLD: &str = "PGFOLD_BENCH_AS_PGFOLD";
const LARGE_EVENTS: i32 = 200;
const LARGE_NOTES_BYTES: i32 = 2_000_000;

/// A decoded-events projector that reads every payload: the length of each order's
/// `notes`.
struct NotesLength;

#[async_trait::async_trait]
impl pgfold::projector::Projector for NotesLength {
    fn name(&self) -> &str {
        "notes_length"
    }

    fn filter(&self) -> pgfold::projector::EventFilter {
        pgfold::projector::EventFilter::event_types(&["OrderNoted"])
    }

    async fn setup(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), pgfold::projector::ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS notes_length (stream_id TEXT PRIMARY KEY, chars BIGINT NOT NULL)",
        )
        .await?;
        Ok(())
    }

    async fn reset(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), pgfold::projector::ProjectorError> {
        tx.batch_execute("TRUNCATE notes_length").await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &pgfold::projector::BatchTransaction<'_>,
        events: &[pgfold::projector::Event],
    ) -> Result<(), pgfold::projector::ProjectorError> {
        for e in events {
            let chars = e.payload["notes"].as_str().map_or(0, |n| n.chars().count()) as i64;
            tx.execute(
                "INSERT INTO notes_length VALUES ($1, $2)
                 ON CONFLICT (stream_id) DO UPDATE SET chars = EXCLUDED.chars",
                &[&e.stream_id, &chars],
            )
            .await?;
        }
        Ok(())
    }
}

/// `pgfold run --once --replay` of [`NotesLength`] over events of 2 MB each, in a
/// database of their own (NAME_large), at the default `daemon.batch_bytes`.
async fn large_payloads(env: &mut Env) -> Result<()> {
    let db = format!("{}_large", env.args.db);
    let (admin, url) = bare_database(&env.admin, &db).await?;
    let client = connect(&url).await?;
    log(format!(
        "large: appending {LARGE_EVENTS} events of {} MB",
        LARGE_NOTES_BYTES / 1_000_000
    ));
    client
        .execute(
            "INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
             SELECT 'order-' || i, 'order', 'OrderNoted',
                    jsonb_build_object('notes', repeat(md5(i::text), $2 / 32)), 1
               FROM generate_series(1, $1) i",
            &[&LARGE_EVENTS, &LARGE_NOTES_BYTES],
        )
        .await?;
    const REPLAY: &[&str] = &["run", "--once", "--replay", "notes_length"];
    let this = std::env::current_exe()?;
    let mut runs = Vec::new();
    for run in 1..=env.args.runs {
        let this = this.clone();
        let program = move || {
            let mut c = Command::new(this);
            c.env(AS_PGFOLD, "1");
            c
        };
        let r = once_of(program, &url, REPLAY).await?;
        log(format!(
            "large run {run}/{}: {:.2} s, peak RSS {}",
            env.args.runs,
            r.0,
            mib(r.1)
        ));
        runs.push(r);
    }
    let wrong = scalar_i64(
        &client,
        &format!(
            "SELECT count(*) FROM events e LEFT JOIN notes_length n USING (stream_id)
              WHERE n.chars IS DISTINCT FROM {LARGE_NOTES_BYTES} / 32 * 32"
        ),
    )
    .await?;
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    if wrong != 0 {
        bail!("notes_length is wrong for {wrong} events");
    }
    let times: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let r = &mut env.report;
    writeln!(
        r,
        "\n5. Large payloads: `run --once --replay` of a decoded-events projector over {LARGE_EVENTS} \
         events of {} MB ({} MB of JSON)\n   at the default daemon.batch_bytes; {} runs",
        LARGE_NOTES_BYTES / 1_000_000,
        i64::from(LARGE_EVENTS) * i64::from(LARGE_NOTES_BYTES) / 1_000_000,
        env.args.runs
    )?;
    writeln!(
        r,
        "   median {:.2} s, peak RSS {} (max VmHWM, polled every 10 ms)",
        median(&times),
        mib(runs.iter().map(|x| x.1).max().unwrap_or(0))
    )?;
    Ok(())
}
