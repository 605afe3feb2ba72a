//! Test scaffolding: a fresh database per test, the daemon in-process or as the
//! real binary, and waiting on conditions instead of sleeping.

use std::future::Future;
use std::process::Output;
use std::time::Duration;

use pgfold::config::Settings;
use pgfold::daemon::{self, Outcome, RunOptions};
use pgfold::projector::Registry;
use pgfold::store::{self, NewEvent};
pub use pgfold::testkit::db::TestDb;
pub use pgfold::testkit::process::Daemon;
use pgfold::testkit::{self, process, workload};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// The binary cargo built for these tests.
pub const PGFOLD: &str = env!("CARGO_BIN_EXE_pgfold");

pub async fn connect(url: &str) -> Client {
    testkit::db::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
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

/// The daemon running in-process until stopped: [`daemon::Handle`], with the
/// tests' timeouts.
pub struct RunningDaemon {
    handle: daemon::Handle,
}

impl RunningDaemon {
    pub fn start(settings: Settings, options: RunOptions) -> RunningDaemon {
        let handle = daemon::Daemon::build(settings, pgfold::projectors::builtin(), options)
            .expect("daemon::Daemon::build")
            .spawn();
        RunningDaemon { handle }
    }

    pub async fn stop(self) -> Outcome {
        tokio::time::timeout(Duration::from_secs(10), self.handle.stop())
            .await
            .expect("daemon did not stop within 10 s")
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

/// The rows of `sql`, as pairs of their first two columns.
pub async fn pairs<A, B>(client: &Client, sql: &str) -> Vec<(A, B)>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub async fn scalar_i64(client: &Client, sql: &str) -> i64 {
    testkit::db::scalar_i64(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
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
    assert_eq!(
        workload::projection_differences(client).await.unwrap(),
        (0, 0),
        "rows differing from the independent fold (daily_revenue, order_snapshots)"
    );
}

/// Runs the real binary.
pub fn pgfold(args: &[&str], env: &[(&str, &str)]) -> Output {
    process::run(PGFOLD, args, env)
}

/// [`pgfold`], which must succeed: the test fails with its stderr otherwise.
pub fn pgfold_ok(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = pgfold(args, env);
    assert!(
        out.status.success(),
        "pgfold {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------
// The real binary as a long-running child (`testkit::process::Daemon`), the
// daemon's backends, `status --json` (poison, privilege, stall, reconnect tests).

/// The backends the daemon has open in database `dbname`.
pub async fn daemon_backends(client: &Client, dbname: &str) -> Vec<i32> {
    testkit::db::daemon_backends(client, dbname)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `pg_terminate_backend` of every backend the daemon has in `dbname`; returns how
/// many were terminated.
pub async fn terminate_daemon_backends(client: &Client, dbname: &str) -> i64 {
    testkit::db::terminate_daemon_backends(client, dbname)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
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

/// A TCP proxy to `upstream` that a test can cut (every connection closed,
/// nothing listening) and restore on the same port: a server that goes away for
/// a moment and comes back with its state (RabbitMQ's queues, S3's objects).
pub struct Proxy {
    /// Where clients connect.
    pub port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            upstream: upstream.to_string(),
            task: None,
        };
        p.restore().await;
        p
    }

    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the proxy");
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Aborting the task drops the listener and, with the JoinSet, every
    /// connection.
    pub async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
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
    let path = std::path::Path::new(PGFOLD)
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

// ---------------------------------------------------------------------------
// SQL projection files, written as an operator installs them.

/// Writes `dir/name.toml` with mode 0644 whatever the umask (pgfold refuses a
/// projection file group or others may write). `dir` should come from
/// `tempfile::tempdir()`, which only its owner may write.
pub fn write_projection(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{name}.toml"));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

// ---------------------------------------------------------------------------
// Poison events: a log holding one event a projector cannot fold.

/// `db`'s settings with `projector` given `on_error` and `max_attempts`.
pub fn with_policy(
    db: &TestDb,
    projector: &str,
    on_error: pgfold::config::OnError,
    max_attempts: u32,
) -> Settings {
    let mut settings = db.settings();
    settings.projectors.insert(
        projector.into(),
        pgfold::config::ProjectorSettings {
            max_attempts,
            on_error,
            enabled: true,
            ..Default::default()
        },
    );
    settings
}

/// One of a projector's counters in `pgfold.projectors` (`events_applied`,
/// `archive_applied`).
pub async fn projector_counter(client: &Client, name: &str, column: &'static str) -> i64 {
    client
        .query_one(
            &format!("SELECT {column} FROM pgfold.projectors WHERE name = $1"),
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// (state, failing_event_id, attempts, last_error) of a projector's row.
pub async fn projector_row(
    client: &Client,
    name: &str,
) -> (String, Option<i64>, i32, Option<String>) {
    let row = client
        .query_one(
            "SELECT state, failing_event_id, attempts, last_error FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// A database of its own whose log holds one poison event for `projector`, and
/// settings giving that projector a policy.
pub struct Poisoned {
    pub db: TestDb,
    pub client: Client,
    pub projector: &'static str,
    /// The poison event's id.
    pub bad_id: i64,
    pub settings: Settings,
    /// What the assertions name: the case.
    pub case: String,
}

impl Poisoned {
    /// Appends `events`, all committed before anything runs (so that they fall
    /// into one batch); the poison is the one `poison` (a condition on `events`)
    /// picks. `projector` fails on it under `on_error` after `max_attempts`.
    pub async fn new(
        case: String,
        events: &[NewEvent],
        poison: &str,
        projector: &'static str,
        on_error: pgfold::config::OnError,
        max_attempts: u32,
    ) -> Poisoned {
        let db = TestDb::new().await;
        let mut client = db.client().await;
        append_all(&mut client, events).await;
        let bad_id = scalar_i64(&client, &format!("SELECT id FROM events WHERE {poison}")).await;
        let settings = with_policy(&db, projector, on_error, max_attempts);
        Poisoned {
            db,
            client,
            projector,
            bad_id,
            settings,
            case,
        }
    }

    /// `run --once` in-process under the policy.
    pub async fn run_once(&self) -> Outcome {
        run_once(&self.settings, RunOptions::default()).await
    }

    /// The run parked the projector, alone, on the poison `OrderPaid`, with an
    /// error containing `clue`.
    pub fn assert_parked(&self, outcome: &Outcome, clue: &str) {
        let case = &self.case;
        assert_eq!(outcome.parked.len(), 1, "{case}: {:?}", outcome.parked);
        let parked = &outcome.parked[0];
        assert_eq!(parked.projector, self.projector);
        assert_eq!(parked.event_id, self.bad_id);
        assert_eq!(parked.event_type, "OrderPaid");
        assert!(
            parked.error.contains(clue),
            "{case}: the error does not say what is wrong: {:?}",
            parked.error
        );
    }

    /// The projector's row: failed on the poison after `attempts`; its last error.
    pub async fn assert_failed(&self, attempts: i32) -> Option<String> {
        let (state, failing, tried, error) = projector_row(&self.client, self.projector).await;
        assert_eq!(
            (state.as_str(), failing, tried),
            ("failed", Some(self.bad_id), attempts),
            "{}: (state, failing event, attempts)",
            self.case
        );
        error
    }

    /// `pgfold status --json` exits 3 and shows the projector failed on the
    /// poison `OrderPaid`, its last error containing `clue`; the status.
    pub fn assert_status_failed(&self, clue: &str) -> Value {
        let (code, status) = status_json(&self.db.url, &[]);
        assert_eq!(code, Some(3), "{}: {status}", self.case);
        let entry = projector_status(&status, self.projector);
        assert_eq!(entry["state"], "failed", "{status}");
        assert_eq!(entry["failing_event"]["id"], self.bad_id, "{status}");
        assert_eq!(
            entry["failing_event"]["event_type"], "OrderPaid",
            "{status}"
        );
        assert!(
            entry["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(clue)),
            "{status}"
        );
        status
    }

    /// When the projector last failed, as text.
    pub async fn last_error_at(&self) -> String {
        self.client
            .query_one(
                "SELECT last_error_at::text FROM pgfold.projectors WHERE name = $1",
                &[&self.projector],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The binary's `run --once` with `max_attempts` 2: must exit non-zero, but
    /// not 1, with a line naming the projector and the poison; returns that line.
    pub fn run_once_binary_fails(&self) -> String {
        let attempts_var = format!(
            "PGFOLD_PROJECTORS__{}__MAX_ATTEMPTS",
            self.projector.to_uppercase()
        );
        let out = pgfold(
            &["run", "--once"],
            &[("DATABASE_URL", &self.db.url), (&attempts_var, "2")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "run --once exited 0 with a parked projector; stderr {stderr:?}"
        );
        assert_ne!(
            out.status.code(),
            Some(1),
            "exit 1 is for errors; a parked projector exits 3 (README): {stderr:?}"
        );
        let needle = format!("event {}", self.bad_id);
        stderr
            .lines()
            .find(|l| l.contains(self.projector) && l.contains(&needle))
            .unwrap_or_else(|| {
                panic!(
                    "no line naming {} and {needle} in {stderr:?}",
                    self.projector
                )
            })
            .to_string()
    }
}

// ---------------------------------------------------------------------------
// Shared setups: databases of orders, projected or not, and replays.

/// Appends `orders` orders numbered from `first` (testkit's workload); returns
/// the newest event id.
pub async fn append_orders(client: &Client, first: i64, orders: i64) -> i64 {
    workload::load_orders(client, first, orders)
        .await
        .unwrap_or_else(|e| panic!("load {orders} orders from {first}: {e}"));
    scalar_i64(client, "SELECT max(id) FROM events").await
}

/// A database of its own holding `orders` orders projected by one `run --once`:
/// the live projections a replay or a rebuild starts from. A client to it.
pub async fn projected_orders(orders: i64) -> (TestDb, Client) {
    let db = TestDb::new().await;
    let client = db.client().await;
    append_orders(&client, 1, orders).await;
    run_once(&db.settings(), RunOptions::default()).await;
    (db, client)
}

/// Damages both built-in projections so that only a replay repairs them.
pub async fn damage_projections(client: &Client) {
    client
        .batch_execute(
            "UPDATE daily_revenue SET total = total + 1;
             DELETE FROM order_snapshots WHERE stream_id LIKE 'order-1%';",
        )
        .await
        .unwrap();
}

/// `run --once` in-process, replaying the projectors named (`all`: every one).
pub async fn replay_once(settings: &Settings, replay: &[&str]) -> Outcome {
    let options = RunOptions {
        replay: replay.iter().map(|name| name.to_string()).collect(),
        ..RunOptions::default()
    };
    run_once(settings, options).await
}

/// A database with a table `scratch`, where a writer can take its transaction
/// id before it appends.
pub async fn with_scratch() -> TestDb {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE scratch (x int)")
        .await
        .unwrap();
    db
}

/// A connection to a database [`with_scratch`] that has taken its transaction
/// id by writing to `scratch`.
pub async fn early_writer(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute("BEGIN; INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    client
}
