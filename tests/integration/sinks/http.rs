//! Webhooks, against an HTTP server inside the test: order per stream under
//! concurrent writers, 503 and 429 retried without counting against an event,
//! and an HTTP 400 parking the sink or dead-lettering the event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use pgfold::config::SinkSettings;
use serde_json::{json, Value};

use super::*;

/// What the receiver answers to a batch.
type Answer = Arc<dyn Fn(&[Value], usize) -> StatusCode + Send + Sync>;

/// The webhook's receiver: records each batch it accepts (2xx), in order.
#[derive(Clone)]
struct Receiver {
    accepted: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<usize>>,
    answer: Answer,
}

impl Receiver {
    /// Serves `POST /hook` on a free port; returns the URL.
    async fn serve(answer: Answer) -> (Receiver, String) {
        let receiver = Receiver {
            accepted: Arc::default(),
            requests: Arc::default(),
            answer,
        };
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, format!("http://{address}/hook"))
    }

    fn accepted(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }
}

async fn hook(State(r): State<Receiver>, body: Bytes) -> StatusCode {
    let batch: Value = serde_json::from_slice(&body).expect("a JSON body");
    let events = batch["events"]
        .as_array()
        .expect("{\"events\": [...]}")
        .clone();
    let n = {
        let mut requests = r.requests.lock().unwrap();
        *requests += 1;
        *requests
    };
    let status = (r.answer)(&events, n);
    if status.is_success() {
        r.accepted.lock().unwrap().extend(events);
    }
    status
}

fn webhook(url: &str, on_error: &str) -> SinkSettings {
    sink(json!({
        "url": url,
        "max_attempts": 1,
        "on_error": on_error,
        "timeout_ms": 2000,
    }))
}

fn ok() -> Answer {
    Arc::new(|_, _| StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_webhook_gets_every_event_in_stream_order_under_concurrent_writers() {
    let db = database().await;
    let client = db.client().await;
    let (receiver, url) = Receiver::serve(ok()).await;
    let mut settings = with_sink(db.settings(), "to_hook", webhook(&url, "stop"));
    settings.daemon.batch_size = 7;
    let daemon = start(&settings, "to_hook");

    let committed = concurrent_writers(&db, 6, 60, 8, "order").await;

    wait_for("every event posted", Duration::from_secs(60), || async {
        published(&client, "to_hook").await == committed as i64
    })
    .await;
    daemon.stop().await.unwrap();
    let accepted = receiver.accepted();
    assert_eq!(accepted[0]["payload"]["amount"], "12.50");
    assert!(accepted[0]["occurred_at"].is_string());
    assert_complete_in_order(&client, &accepted, true).await;
}

#[tokio::test]
async fn busy_and_failing_answers_are_retried_without_counting_against_an_event() {
    let db = database().await;
    let client = db.client().await;
    // 503, 429 and 408 first: with max_attempts = 1, a single counted failure
    // would park the sink.
    let (receiver, url) = Receiver::serve(Arc::new(|_, n| match n {
        1 => StatusCode::SERVICE_UNAVAILABLE,
        2 => StatusCode::TOO_MANY_REQUESTS,
        3 => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::NO_CONTENT,
    }))
    .await;
    append_paid(&db, 0, 5, 1).await;
    let settings = with_sink(db.settings(), "to_hook", webhook(&url, "stop"));

    let outcome = run_once_sink(&settings, "to_hook").await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    assert_eq!(*receiver.requests.lock().unwrap(), 4);
    assert_complete_in_order(&client, &receiver.accepted(), true).await;
    let failing: Option<i64> = client
        .query_one(
            "SELECT failing_event_id FROM pgfold.projectors WHERE name = 'to_hook'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failing, None);
}

/// The receiver refuses with 400 any batch with an `OrderShipped`: the third
/// event of [`third_refused`].
async fn refused_setup(db: &TestDb) -> (Receiver, String, Vec<i64>) {
    let (receiver, url) = Receiver::serve(Arc::new(|events: &[Value], _| {
        match events.iter().any(|e| e["event_type"] == "OrderShipped") {
            true => StatusCode::BAD_REQUEST,
            false => StatusCode::OK,
        }
    }))
    .await;
    (receiver, url, third_refused(db).await)
}

#[tokio::test]
async fn an_http_400_parks_the_sink_on_that_event_with_on_error_stop() {
    let db = database().await;
    let client = db.client().await;
    let (receiver, url, ids) = refused_setup(&db).await;
    let settings = with_sink(db.settings(), "to_hook", webhook(&url, "stop"));

    let outcome = run_once_sink(&settings, "to_hook").await;

    assert_eq!(outcome.parked.len(), 1, "{:?}", outcome.parked);
    assert_eq!(outcome.parked[0].event_id, ids[2]);
    assert!(
        outcome.parked[0].error.contains("400"),
        "{}",
        outcome.parked[0].error
    );
    let accepted: Vec<i64> = receiver
        .accepted()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        accepted,
        [ids[0], ids[1]],
        "nothing after the refused event"
    );
    assert_eq!(published(&client, "to_hook").await, 2);
}

#[tokio::test]
async fn an_http_400_dead_letters_the_event_with_on_error_skip() {
    let db = database().await;
    let client = db.client().await;
    let (receiver, url, ids) = refused_setup(&db).await;
    let settings = with_sink(db.settings(), "to_hook", webhook(&url, "skip"));

    let outcome = run_once_sink(&settings, "to_hook").await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let dead = dead_letters(&client, "to_hook").await;
    assert_eq!(dead, [ids[2]]);
    let accepted: Vec<i64> = receiver
        .accepted()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(accepted, [ids[0], ids[1], ids[3]]);
}

#[tokio::test]
async fn a_replay_posts_every_event_again_in_order_and_a_rebuild_is_refused() {
    let db = database().await;
    let client = db.client().await;
    let (receiver, url) = Receiver::serve(ok()).await;
    append_paid(&db, 0, 6, 2).await;
    let settings = with_sink(db.settings(), "to_hook", webhook(&url, "stop"));
    run_once_sink(&settings, "to_hook").await;
    assert_eq!(receiver.accepted().len(), 6);

    let registry = pgfold::sinks::load(pgfold::projectors::builtin(), &settings.sinks).unwrap();
    let options = RunOptions {
        replay: vec!["to_hook".into()],
        projectors: vec!["to_hook".into()],
        ..RunOptions::default()
    };
    let outcome = run_once_with(&settings, &registry, options).await;

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 12, "every event again");
    assert_complete_in_order(&client, &accepted[6..], true).await;

    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_SINKS__TO_HOOK__URL", url.as_str()),
    ];
    let out = pgfold(&["run", "--once", "--rebuild", "to_hook"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "pgfold: to_hook is a sink: it has no tables to rebuild beside the live ones; use --replay to_hook to publish every event again"
    );
}

#[tokio::test]
async fn an_upcaster_added_later_shapes_what_a_sink_posts_from_then_on() {
    let db = database().await;
    let client = db.client().await;
    let (receiver, url) = Receiver::serve(ok()).await;
    append_paid(&db, 0, 2, 1).await;
    let mut settings = with_sink(db.settings(), "to_hook", webhook(&url, "stop"));
    run_once_sink(&settings, "to_hook").await;
    append_paid(&db, 2, 3, 1).await;

    // A sink has no tables to rebuild: the changed definition holds at once,
    // rather than leaving the sink waiting for a rebuild that never comes.
    settings.upcasters = vec![pgfold::feed::Upcaster::new(
        "OrderPaid",
        1,
        2,
        "payload || jsonb_build_object('currency', 'EUR')",
    )];
    let registry = pgfold::sinks::load(pgfold::projectors::builtin(), &settings.sinks)
        .unwrap()
        .with_upcasters(&pgfold::feed::Upcasters::new(&settings.upcasters).unwrap());
    let options = RunOptions {
        once: true,
        projectors: vec!["to_hook".into()],
        ..RunOptions::default()
    };
    let run = daemon::run(&settings, &registry, &options, std::future::pending());
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the sink caught up")
        .unwrap();

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 3);
    assert!(accepted[1]["payload"].get("currency").is_none());
    assert_eq!(accepted[2]["payload"]["currency"], "EUR");
    assert_eq!(accepted[2]["event_version"], 2);
    assert_complete_in_order(&client, &accepted, true).await;
}
