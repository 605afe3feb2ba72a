//! Issue 29: sinks publish each event to NATS JetStream, RabbitMQ or a webhook,
//! in order per stream, and move their checkpoint only once the broker has
//! acknowledged. Against the real brokers of the machine (or one started by the
//! test), and a real HTTP server inside the test.

mod amqp;
mod http;
mod nats;
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pgfold::config::{Settings, SinkSettings};
use pgfold::daemon::{self, RunOptions};
use pgfold::store::{self, AppendError, NewEvent};
use rand::Rng;
use serde_json::{json, Value};

use crate::helpers::*;

/// A sink's settings from TOML-like JSON (the keys as the issue spells them).
pub fn sink(keys: Value) -> SinkSettings {
    serde_json::from_value(keys).expect("sink settings")
}

/// `settings` with `[sinks.<name>]`, running only that sink.
pub fn with_sink(mut settings: Settings, name: &str, sink: SinkSettings) -> Settings {
    settings.sinks.insert(name.to_string(), sink);
    settings
}

/// The daemon in-process, running only `name`, until stopped.
pub fn start(settings: &Settings, name: &str) -> daemon::Handle {
    let registry =
        pgfold::sinks::load(pgfold::projectors::builtin(), &settings.sinks).expect("sinks load");
    daemon::Daemon::build(
        settings.clone(),
        registry,
        RunOptions {
            projectors: vec![name.to_string()],
            ..RunOptions::default()
        },
    )
    .expect("daemon build")
    .spawn()
}

/// `run --once` in-process, for the sink `name` only.
pub fn run_once_sink(
    settings: &Settings,
    name: &str,
) -> impl std::future::Future<Output = daemon::Outcome> {
    let registry = pgfold::sinks::load(pgfold::projectors::builtin(), &settings.sinks).unwrap();
    let settings = settings.clone();
    let name = name.to_string();
    async move {
        run_once_with(
            &settings,
            &registry,
            RunOptions {
                projectors: vec![name],
                ..RunOptions::default()
            },
        )
        .await
    }
}

/// The events the sink dead-lettered.
pub async fn dead_letters(client: &tokio_postgres::Client, name: &str) -> Vec<i64> {
    client
        .query(
            "SELECT event_id FROM pgfold.dead_letters WHERE projector = $1 ORDER BY event_id",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The sink's checkpoint: events published and acknowledged so far.
pub async fn published(client: &tokio_postgres::Client, name: &str) -> i64 {
    client
        .query_opt(
            "SELECT events_applied FROM pgfold.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map_or(0, |r| r.get(0))
}

/// Appends `per_writer` events from each of `writers` concurrent writers over
/// `streams` shared streams, through the optimistic path; a fifth of the
/// transactions take their id before appending and pause, so that another
/// writer's later append to the same stream commits first with a newer id
/// (inverted transaction ids, as in `stream_order`). Returns how many committed.
pub async fn concurrent_writers(
    db: &TestDb,
    writers: usize,
    per_writer: usize,
    streams: usize,
    prefix: &str,
) -> usize {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = db.client().await;
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut committed = 0;
            for k in 0..per_writer {
                let stream_id = format!("{prefix}-{}", rand::rng().random_range(0..streams));
                loop {
                    let early = rand::rng().random_bool(0.2);
                    let tx = client.transaction().await.unwrap();
                    if early {
                        tx.execute("INSERT INTO scratch VALUES (1)", &[])
                            .await
                            .unwrap();
                        let pause = rand::rng().random_range(1..10);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    let last = store::last_sequence(&tx, &stream_id).await.unwrap();
                    let event_type =
                        ["OrderCreated", "OrderPaid", "OrderShipped"][(last % 3) as usize];
                    let event = NewEvent::new(
                        stream_id.clone(),
                        "order",
                        event_type,
                        json!({"writer": w, "k": k, "amount": "12.50"}),
                    );
                    match store::append(&tx, &event, last + 1).await {
                        Ok(_) => {
                            tx.commit().await.unwrap();
                            committed += 1;
                            break;
                        }
                        Err(AppendError::Conflict { .. }) => {
                            tx.rollback().await.unwrap();
                        }
                        Err(e) => panic!("append: {e}"),
                    }
                }
            }
            committed
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// [`concurrent_writers`] (4 writers, 10 streams) for at least `how_long`:
/// long enough for a test that kills the daemon meanwhile, however fast the
/// machine writes.
pub async fn write_for(db: &TestDb, how_long: Duration) -> usize {
    let start = std::time::Instant::now();
    let mut committed = 0;
    while start.elapsed() < how_long {
        committed += concurrent_writers(db, 4, 40, 10, "order").await;
    }
    committed
}

/// Loads a backlog (so that most kills land while a batch is being
/// published), then writes with [`write_for`] for 6 s while `pgfold run
/// --projector NAME` (with `env`) is started and SIGKILLed every 200-600 ms.
/// Returns the events the writers committed and the sink's checkpoint (as
/// position text and id) after each kill: where the next life started.
pub async fn kill_while_writing(
    db: &TestDb,
    name: &str,
    env: &[(&str, &str)],
) -> (usize, Vec<(String, i64)>) {
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 4_000)
        .await
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let write = async {
        let n = write_for(db, Duration::from_secs(6)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        n
    };
    let kill = async {
        let mut checkpoints = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let mut daemon = Daemon::spawn(PGFOLD, &["run", "--projector", name], env);
            let pause = rand::rng().random_range(200..600);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            daemon.kill();
            let row = client
                .query_opt(
                    "SELECT position_tx::text, position_id FROM pgfold.projectors WHERE name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            checkpoints.push(row.map_or(("0".into(), 0), |r| (r.get(0), r.get(1))));
        }
        checkpoints
    };
    let (committed, checkpoints) = tokio::join!(write, kill);
    assert!(
        checkpoints.len() >= 5,
        "the writers finished too early to test anything"
    );
    (committed, checkpoints)
}

/// Appends `OrderPaid` events numbered `from..to`, spread over `streams`
/// streams, one transaction each.
pub async fn append_paid(db: &TestDb, from: usize, to: usize, streams: usize) {
    let mut client = db.client().await;
    for i in from..to {
        store::append_next(
            &mut client,
            &NewEvent::new(
                format!("order-{}", i % streams),
                "order",
                "OrderPaid",
                json!({"i": i}),
            ),
        )
        .await
        .unwrap();
    }
}

/// Four events, the third an `OrderShipped` of order-1 (the one the tests make
/// the broker refuse), the others `OrderPaid`; their ids.
pub async fn third_refused(db: &TestDb) -> Vec<i64> {
    let mut client = db.client().await;
    let mut ids = Vec::new();
    for (stream, event_type) in [
        ("order-1", "OrderPaid"),
        ("order-2", "OrderPaid"),
        ("order-1", "OrderShipped"),
        ("order-2", "OrderPaid"),
    ] {
        let appended = store::append_next(
            &mut client,
            &NewEvent::new(stream, "order", event_type, json!({})),
        )
        .await
        .unwrap();
        ids.push(appended.id);
    }
    ids
}

/// `pgfold run --once` with `env` refuses to start: exit code 1, and one last
/// line naming the sink and the problem.
pub fn refused_at_start(env: &[(&str, &str)], sink: &str, problem: &str) {
    let out = pgfold(&["run", "--once"], env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("pgfold: ") && last.contains(sink) && last.contains(problem),
        "{stderr}"
    );
}

/// Waits until the outage of sink `name` shows in `/readyz` (on `http`) and in
/// `status` (run with the sink's settings, `sink_env`), and checks that it is
/// not taken for an event's failure; returns `/readyz`'s body and the status.
pub async fn outage_shown(
    http: &str,
    db: &TestDb,
    sink_env: &[(&str, &str)],
    name: &str,
) -> (String, Value) {
    wait_for(
        "/readyz to report the outage",
        Duration::from_secs(30),
        || async {
            let (code, body) = get(http, "/readyz").await;
            code == 503 && body.contains(name)
        },
    )
    .await;
    let (_, readyz) = get(http, "/readyz").await;
    wait_for(
        "status to show the outage",
        Duration::from_secs(30),
        || async {
            let (_, status) = status_json(&db.url, sink_env);
            projector_status(&status, name)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unavailable"))
        },
    )
    .await;
    let (_, status) = status_json(&db.url, sink_env);
    let failing = &projector_status(&status, name)["failing_event"];
    assert!(
        failing.is_null(),
        "an outage is not an event's failure: {failing}"
    );
    (readyz, status)
}

/// Checks messages received (event bodies, in arrival order): every event of
/// the log exactly once when `exactly_once`, else at least once; each stream's
/// in `sequence` order (a duplicate may repeat an earlier stretch, never jump
/// back past a newer event without starting again from the checkpoint: with
/// `exactly_once`, strictly 1, 2, 3...).
pub async fn assert_complete_in_order(
    client: &tokio_postgres::Client,
    messages: &[Value],
    exactly_once: bool,
) {
    let expected: HashMap<i64, (String, i64)> = client
        .query("SELECT id, stream_id, sequence FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for m in messages {
        let id = m["id"].as_i64().expect("id");
        let stream = m["stream_id"].as_str().expect("stream_id").to_string();
        let sequence = m["sequence"].as_i64().expect("sequence");
        assert_eq!(
            expected.get(&id),
            Some(&(stream.clone(), sequence)),
            "message {m} is not an event of the log"
        );
        *seen.entry(id).or_default() += 1;
        let previous = last.get(&stream).copied().unwrap_or(0);
        if exactly_once {
            assert_eq!(
                sequence,
                previous + 1,
                "stream {stream}: sequence {sequence} after {previous}"
            );
        } else {
            // Redelivery restarts from a checkpoint, so it never skips ahead.
            assert!(
                sequence <= previous + 1,
                "stream {stream}: sequence {sequence} after {previous} (a gap)"
            );
        }
        last.insert(stream, sequence);
    }
    let missing: Vec<_> = expected
        .keys()
        .filter(|id| !seen.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived: {missing:?}",
        missing.len()
    );
    if exactly_once {
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "events arrived more than once: {twice:?}");
    }
}

/// A fresh database with the `scratch` table the early writers need.
pub async fn database() -> TestDb {
    with_scratch().await
}
