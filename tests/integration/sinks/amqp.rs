//! RabbitMQ: order per stream under concurrent writers, at least once across
//! SIGKILLs with duplicates only after a checkpoint, an unroutable message
//! (parked or dead-lettered), a missing exchange refused at start, and the
//! connection cut and restored mid-flow through a proxy the test controls.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use pgfold::config::OnError;
use serde_json::{json, Value};

use super::*;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An exchange and a queue of the test's own, the queue bound to the exchange
/// for `binding`; deleted by [`TestExchange::delete`].
struct TestExchange {
    exchange: String,
    queue: String,
    channel: Channel,
    _connection: Connection,
}

impl TestExchange {
    /// `binding` may use `#` and `*`; `{prefix}` is replaced by the exchange's
    /// own routing-key prefix.
    async fn create(binding: &str) -> TestExchange {
        let suffix: String = (0..12)
            .map(|_| char::from(b'a' + rand::rng().random_range(0..26u8)))
            .collect();
        let connection = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        let exchange = format!("pgfold-test-{suffix}");
        let queue = format!("pgfold-test-{suffix}");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        TestExchange {
            exchange,
            queue,
            channel,
            _connection: connection,
        }
    }

    /// Every message in the queue, taken off it in order.
    async fn drain(&self) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m.delivery);
        }
        out
    }

    async fn delete(self) {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
    }
}

fn bodies(deliveries: &[lapin::message::Delivery]) -> Vec<Value> {
    deliveries
        .iter()
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect()
}

fn amqp_sink(url: &str, exchange: &str, on_error: &str) -> pgfold::config::SinkSettings {
    sink(json!({
        "url": url,
        "exchange": exchange,
        "subject": "pgfold.{stream_type}.{event_type}",
        "max_attempts": 1,
        "on_error": on_error,
        "timeout_ms": 2000,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_gets_every_event_in_stream_order_with_confirms() {
    let db = database().await;
    let client = db.client().await;
    let ex = TestExchange::create("pgfold.#").await;
    let mut settings = with_sink(
        db.settings(),
        "to_rabbit",
        amqp_sink(AMQP, &ex.exchange, "stop"),
    );
    settings.daemon.batch_size = 7;
    let daemon = start(&settings, "to_rabbit");

    let committed = concurrent_writers(&db, 6, 60, 8, "order").await;

    wait_for("every event published", Duration::from_secs(60), || async {
        published(&client, "to_rabbit").await == committed as i64
    })
    .await;
    daemon.stop().await.unwrap();
    let deliveries = ex.drain().await;
    let first = &deliveries[0];
    let body: Value = serde_json::from_slice(&first.data).unwrap();
    let props = &first.properties;
    assert_eq!(
        props.message_id().as_ref().map(|m| m.to_string()),
        Some(body["id"].to_string())
    );
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    let headers = props.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("Pgfold-Sequence"),
        Some(&AMQPValue::LongLongInt(body["sequence"].as_i64().unwrap()))
    );
    assert_eq!(
        first.routing_key.as_str(),
        format!("pgfold.order.{}", body["event_type"].as_str().unwrap())
    );
    // Without the daemon's restarts, nothing is delivered twice.
    assert_complete_in_order(&client, &bodies(&deliveries), true).await;
    ex.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_while_publishing_every_event_arrives_in_order_duplicates_only_after_a_checkpoint(
) {
    let db = database().await;
    let client = db.client().await;
    let ex = TestExchange::create("pgfold.#").await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__BATCH_SIZE", "50"),
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "100"),
        ("PGFOLD_SINKS__TO_RABBIT__URL", AMQP),
        ("PGFOLD_SINKS__TO_RABBIT__EXCHANGE", ex.exchange.as_str()),
        (
            "PGFOLD_SINKS__TO_RABBIT__SUBJECT",
            "pgfold.{stream_type}.{event_type}",
        ),
        ("RUST_LOG", "warn"),
    ];
    let (committed, checkpoints) = kill_while_writing(&db, "to_rabbit", &env).await;
    pgfold_ok(&["run", "--once", "--projector", "to_rabbit"], &env);

    let bodies = bodies(&ex.drain().await);
    eprintln!(
        "{committed} events, {} kills, {} delivered",
        checkpoints.len(),
        bodies.len()
    );
    assert_complete_in_order(&client, &bodies, false).await;
    // A copy is sent again only from a checkpoint a killed daemon left: it lies
    // within one batch (50) after one of them.
    let mut counts = std::collections::HashMap::<i64, usize>::new();
    for b in &bodies {
        *counts.entry(b["id"].as_i64().unwrap()).or_default() += 1;
    }
    let twice: Vec<i64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    // A copy is sent again only by the life after a kill, from the checkpoint
    // that kill left: the event lies in the batch read after it (the next 50
    // events), or was delivered ahead for a later event of its stream in it.
    for id in &twice {
        let mut in_a_batch_after_a_checkpoint = false;
        for (tx, position_id) in &checkpoints {
            in_a_batch_after_a_checkpoint |= client
                .query_one(
                    "WITH batch AS (
                       SELECT e.id, e.stream_id, e.sequence FROM events e
                        WHERE (e.tx_id, e.id) > ($1::text::xid8, $2)
                        ORDER BY e.tx_id, e.id LIMIT 50)
                     SELECT EXISTS (
                       SELECT 1 FROM batch b, events d
                        WHERE d.id = $3
                          AND (b.id = d.id OR (b.stream_id = d.stream_id AND b.sequence > d.sequence)))",
                    &[tx, position_id, id],
                )
                .await
                .unwrap()
                .get::<_, bool>(0);
        }
        assert!(
            in_a_batch_after_a_checkpoint,
            "event {id} was delivered twice but lies in no batch read after a checkpoint"
        );
    }
    eprintln!("{} events delivered twice", twice.len());
    ex.delete().await;
}

/// Only OrderPaid is bound: the third event, an OrderShipped, has nowhere to go.
async fn unroutable_setup(db: &TestDb) -> (TestExchange, Vec<i64>) {
    let ex = TestExchange::create("pgfold.order.OrderPaid").await;
    (ex, third_refused(db).await)
}

#[tokio::test]
async fn an_unroutable_message_parks_the_sink_with_on_error_stop() {
    let db = database().await;
    let client = db.client().await;
    let (ex, ids) = unroutable_setup(&db).await;
    let settings = with_sink(
        db.settings(),
        "to_rabbit",
        amqp_sink(AMQP, &ex.exchange, "stop"),
    );

    let outcome = run_once_sink(&settings, "to_rabbit").await;

    assert_eq!(outcome.parked.len(), 1, "{:?}", outcome.parked);
    let parked = &outcome.parked[0];
    assert_eq!(parked.event_id, ids[2]);
    assert!(parked.error.contains("unroutable"), "{}", parked.error);
    // Its checkpoint stops before it: the two events before it, no further.
    assert_eq!(published(&client, "to_rabbit").await, 2);
    ex.delete().await;
}

#[tokio::test]
async fn an_unroutable_message_is_dead_lettered_with_on_error_skip() {
    let db = database().await;
    let client = db.client().await;
    let (ex, ids) = unroutable_setup(&db).await;
    let settings = with_sink(
        db.settings(),
        "to_rabbit",
        amqp_sink(AMQP, &ex.exchange, "skip"),
    );
    assert_eq!(settings.projector("to_rabbit").on_error, OnError::Skip);

    let outcome = run_once_sink(&settings, "to_rabbit").await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let dead = dead_letters(&client, "to_rabbit").await;
    assert_eq!(dead, [ids[2]]);
    let delivered: Vec<i64> = bodies(&ex.drain().await)
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .collect();
    // Everything routable arrived, the last event after the dead letter too.
    for id in [ids[0], ids[1], ids[3]] {
        assert!(delivered.contains(&id), "{id} missing from {delivered:?}");
    }
    ex.delete().await;
}

#[tokio::test]
async fn a_missing_exchange_is_refused_at_start_in_one_line() {
    let db = TestDb::new().await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_SINKS__TO_RABBIT__URL", AMQP),
        (
            "PGFOLD_SINKS__TO_RABBIT__EXCHANGE",
            "pgfold-no-such-exchange",
        ),
        ("PGFOLD_SINKS__TO_RABBIT__SUBJECT", "x.{event_type}"),
    ];
    refused_at_start(
        &env,
        "to_rabbit",
        "exchange \"pgfold-no-such-exchange\" does not exist",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cut_and_restored_loses_nothing_and_shows_the_outage() {
    let db = database().await;
    let client = db.client().await;
    let ex = TestExchange::create("pgfold.#").await;
    let mut proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let http = format!("127.0.0.1:{}", free_port());
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_HTTP__LISTEN", http.as_str()),
        ("PGFOLD_SINKS__TO_RABBIT__URL", url.as_str()),
        ("PGFOLD_SINKS__TO_RABBIT__EXCHANGE", ex.exchange.as_str()),
        (
            "PGFOLD_SINKS__TO_RABBIT__SUBJECT",
            "pgfold.{stream_type}.{event_type}",
        ),
        ("PGFOLD_SINKS__TO_RABBIT__TIMEOUT_MS", "1000"),
        ("RUST_LOG", "info"),
    ];
    let mut daemon = Daemon::spawn(PGFOLD, &["run", "--projector", "to_rabbit"], &env);
    append_paid(&db, 0, 30, 4).await;
    wait_for(
        "the first events published",
        Duration::from_secs(30),
        || async { published(&client, "to_rabbit").await == 30 },
    )
    .await;
    assert_eq!(get(&http, "/readyz").await.0, 200);

    proxy.cut().await;
    append_paid(&db, 30, 60, 4).await;
    outage_shown(&http, &db, &env[2..5], "to_rabbit").await;
    assert_eq!(published(&client, "to_rabbit").await, 30);

    proxy.restore().await;
    wait_for("the rest published", Duration::from_secs(60), || async {
        published(&client, "to_rabbit").await == 60
    })
    .await;
    wait_for("/readyz ready again", Duration::from_secs(30), || async {
        get(&http, "/readyz").await.0 == 200
    })
    .await;
    daemon.stop(Duration::from_secs(10)).unwrap();
    assert_complete_in_order(&client, &bodies(&ex.drain().await), false).await;
    ex.delete().await;
}
