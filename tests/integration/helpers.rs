//! Test scaffolding: a fresh database per test, the daemon in-process or as the
//! real binary, and waiting on conditions instead of sleeping.

use std::future::Future;
use std::process::{Command, Output};
use std::time::Duration;

use pgfold::config::Settings;
use pgfold::daemon::{self, Outcome, RunOptions};
use pgfold::projector::Registry;
use pgfold::store::{self, NewEvent};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Where test databases are created; override with PGFOLD_TEST_ADMIN_URL.
fn admin_url() -> String {
    std::env::var("PGFOLD_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".to_string())
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own, migrated, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        let pg = pgfold::db::pg_config(Some(&db.url)).unwrap();
        daemon::migrate(&pg, &pgfold::projectors::builtin())
            .await
            .expect("migrate");
        db
    }

    /// A database of its own with nothing in it.
    pub async fn empty() -> TestDb {
        init_logging();
        let name = format!("pgfold_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Default settings pointed at this database, with a short poll interval.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::load(None).expect("default settings");
        settings.database.url = Some(self.url.clone());
        settings.daemon.poll_interval_ms = 200;
        settings
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime we may use; give the drop its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

fn init_logging() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// `pgfold run --once` in-process.
pub async fn run_once(settings: &Settings, options: RunOptions) -> Outcome {
    run_once_with(settings, &pgfold::projectors::builtin(), options).await
}

/// `pgfold run --once` in-process, with these projectors.
pub async fn run_once_with(
    settings: &Settings,
    registry: &Registry,
    mut options: RunOptions,
) -> Outcome {
    options.once = true;
    // Generous: CI machines are small and shared.
    tokio::time::timeout(
        Duration::from_secs(300),
        daemon::run(settings, registry, &options, std::future::pending()),
    )
    .await
    .expect("run --once did not finish within 300 s")
    .expect("run --once failed")
}

/// The daemon running in-process until stopped.
pub struct RunningDaemon {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<Outcome>>,
}

impl RunningDaemon {
    pub fn start(settings: Settings, options: RunOptions) -> RunningDaemon {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            daemon::run(
                &settings,
                &pgfold::projectors::builtin(),
                &options,
                async move {
                    let _ = stopped.await;
                },
            )
            .await
        });
        RunningDaemon {
            stop: Some(stop),
            handle,
        }
    }

    pub async fn stop(mut self) -> Outcome {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.handle)
            .await
            .expect("daemon did not stop within 10 s")
            .expect("daemon task panicked")
            .expect("daemon failed")
    }
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn scalar_i64(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// An order's `OrderCreated` payload with one item.
pub fn created(order: &str, category: &str, price: Value, qty: i64) -> NewEvent {
    NewEvent::new(
        order,
        "order",
        "OrderCreated",
        json!({"orderId": order, "customerId": "c-1",
               "items": [{"sku": "sku-1", "category": category, "price": price, "qty": qty}]}),
    )
}

pub fn paid(order: &str, category: &str, price: Value, qty: i64) -> NewEvent {
    NewEvent::new(
        order,
        "order",
        "OrderPaid",
        json!({"orderId": order, "items": [{"sku": "sku-1", "category": category, "price": price, "qty": qty}]}),
    )
}

pub fn shipped(order: &str, address: &str) -> NewEvent {
    NewEvent::new(
        order,
        "order",
        "OrderShipped",
        json!({ "address": address }),
    )
}

/// Appends as the application does, each event in its own transaction.
pub async fn append_all(client: &mut Client, events: &[NewEvent]) {
    for e in events {
        store::append_next(client, e).await.expect("append");
    }
}

/// Both built-in projections equal their independent SQL folds.
pub async fn assert_projections_exact(client: &Client) {
    let revenue = pgfold::workload::differences(
        client,
        "SELECT day, category, total FROM daily_revenue",
        pgfold::workload::EXPECTED_DAILY_REVENUE,
    )
    .await
    .unwrap();
    let snapshots = pgfold::workload::differences(
        client,
        "SELECT stream_id, sequence, state FROM order_snapshots",
        pgfold::workload::EXPECTED_ORDER_SNAPSHOTS,
    )
    .await
    .unwrap();
    assert_eq!(
        (revenue, snapshots),
        (0, 0),
        "rows differing from the independent fold (daily_revenue, order_snapshots)"
    );
}

/// Runs the real binary.
pub fn pgfold(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfold"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pgfold")
}

// ---------------------------------------------------------------------------
// The real binary as a long-running child, the daemon's backends, `status --json`
// (poison, privilege, stall, reconnect and torture tests).

/// A `pgfold` process (the real binary) whose stderr is collected line by line.
/// SIGKILLed when dropped, so a failing test leaves nothing running.
pub struct Daemon {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts `pgfold ARGS` with `env` (RUST_LOG=warn unless `env` sets it).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_program(
            std::path::Path::new(env!("CARGO_BIN_EXE_pgfold")),
            args,
            env,
        )
    }

    /// The same with another binary built on pgfold's command line (an example).
    pub fn spawn_program(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        use std::io::BufRead;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                match line {
                    Ok(line) => sink.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
        });
        Daemon {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Everything it has written to stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (it has not exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGKILL, reap it, and collect the rest of its stderr.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The backends the daemon has open in database `dbname` (it connects with
/// application_name = 'pgfold').
pub async fn daemon_backends(client: &Client, dbname: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'pgfold' AND pid <> pg_backend_pid()
              ORDER BY pid",
            &[&dbname],
        )
        .await
        .expect("list the daemon's backends")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `pg_terminate_backend` of every backend the daemon has in `dbname`; returns how
/// many were terminated.
pub async fn terminate_daemon_backends(client: &Client, dbname: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FILTER (WHERE t) FROM (
               SELECT pg_terminate_backend(pid) AS t FROM pg_stat_activity
                WHERE datname = $1 AND application_name = 'pgfold' AND pid <> pg_backend_pid()
             ) x",
            &[&dbname],
        )
        .await
        .expect("terminate the daemon's backends")
        .get(0)
}

/// `pgfold status --json` (the binary) against `url`: the exit code and the JSON.
pub fn status_json(url: &str, env: &[(&str, &str)]) -> (Option<i32>, Value) {
    let mut all = vec![("DATABASE_URL", url)];
    all.extend_from_slice(env);
    let out = pgfold(&["status", "--json"], &all);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}); stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), json)
}

/// One projector's entry in `status --json`.
pub fn projector_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["projectors"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no projector {name} in {status}"))
}

impl Daemon {
    /// SIGTERM, then wait for it to exit on its own (up to `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Whether `order_snapshots` has a row for `stream`.
pub async fn snapshot_exists(client: &Client, stream: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM order_snapshots WHERE stream_id = $1",
            &[&stream],
        )
        .await
        .unwrap()
        .is_some()
}

// ---------------------------------------------------------------------------
// HTTP (health, readiness, metrics).

/// A plain HTTP/1.1 GET: (status code, body).
pub async fn get(address: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `examples/custom_projector` (a decoded-events projector on the full command
/// line), which `cargo test` builds next to the pgfold binary.
pub fn custom_projector_binary() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_pgfold"))
        .parent()
        .expect("the pgfold binary lies in a directory")
        .join("examples/custom_projector");
    assert!(
        path.is_file(),
        "{} is missing: run the whole `cargo test` (it builds the examples) or `cargo build --examples` first",
        path.display()
    );
    path
}
