//! Test scaffolding: a fresh database per test, the daemon in-process or as the
//! real binary, and waiting on conditions instead of sleeping.

use std::future::Future;
use std::process::{Command, Output};
use std::time::Duration;

use pgfold::config::Settings;
use pgfold::daemon::{self, Outcome, RunOptions};
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
pub async fn run_once(settings: &Settings, mut options: RunOptions) -> Outcome {
    options.once = true;
    tokio::time::timeout(
        Duration::from_secs(120),
        daemon::run(
            settings,
            &pgfold::projectors::builtin(),
            &options,
            std::future::pending(),
        ),
    )
    .await
    .expect("run --once did not finish within 120 s")
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
