//! NATS JetStream: order per stream, exactly once across SIGKILLs, a refusal
//! at start when no stream takes the subject, and the server stopped and
//! started again mid-flow (with a password that never shows).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::{json, Value};

use super::*;

const NATS: &str = "nats://127.0.0.1:4222";

/// A JetStream stream of the test's own, on subjects `<prefix>.>`, deleted at
/// the end of the test (or when dropped, if the test failed).
pub struct TestStream {
    pub name: String,
    pub prefix: String,
    url: String,
    context: jetstream::Context,
}

impl TestStream {
    pub async fn create(url: &str) -> TestStream {
        TestStream::with_duplicate_window(url, Duration::from_secs(120)).await
    }

    pub async fn with_duplicate_window(url: &str, window: Duration) -> TestStream {
        let suffix: String = (0..12)
            .map(|_| char::from(b'a' + rand::rng().random_range(0..26u8)))
            .collect();
        let client = nats_client(url).await.expect("connect to NATS");
        let context = jetstream::new(client);
        let name = format!("PGFOLD_TEST_{}", suffix.to_uppercase());
        let prefix = format!("pgfoldtest{suffix}");
        context
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window: window,
                ..Default::default()
            })
            .await
            .expect("create stream");
        TestStream {
            name,
            prefix,
            url: url.to_string(),
            context,
        }
    }

    /// Every message in the stream, in stream order: (headers, JSON body).
    pub async fn messages(&self) -> Vec<(async_nats::HeaderMap, Value)> {
        let mut stream = self.context.get_stream(&self.name).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let m = stream.get_raw_message(seq).await.unwrap();
            out.push((m.headers, serde_json::from_slice(&m.payload).unwrap()));
        }
        out
    }

    pub async fn delete(self) {
        self.context.delete_stream(&self.name).await.unwrap();
        std::mem::forget(self);
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                if let Ok(client) = nats_client(&url).await {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// A client for `url`, with its user and password if it has them.
async fn nats_client(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    match url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
    {
        Some((userinfo, host)) => {
            let (user, password) = userinfo.split_once(':').unwrap();
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(format!("nats://{host}"))
                .await
        }
        None => async_nats::connect(url).await,
    }
}

fn nats_sink(url: &str, prefix: &str) -> pgfold::config::SinkSettings {
    sink(json!({
        "url": url,
        "subject": format!("{prefix}.{{stream_type}}.{{event_type}}"),
        "stream_types": ["order"],
        "max_attempts": 1,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_gets_every_event_once_in_stream_order_under_concurrent_writers() {
    let db = database().await;
    let client = db.client().await;
    let js = TestStream::create(NATS).await;
    let mut settings = with_sink(db.settings(), "to_nats", nats_sink(NATS, &js.prefix));
    // Small batches, so streams and inversions straddle batch boundaries.
    settings.daemon.batch_size = 7;
    let daemon = start(&settings, "to_nats");

    let committed = concurrent_writers(&db, 6, 60, 8, "order").await;

    wait_for("every event published", Duration::from_secs(60), || async {
        published(&client, "to_nats").await == committed as i64
    })
    .await;
    daemon.stop().await.unwrap();
    let messages = js.messages().await;
    let inverted = scalar_i64(
        &client,
        "SELECT count(*) FROM events a JOIN events b ON a.stream_id = b.stream_id
             AND b.sequence = a.sequence + 1 WHERE b.tx_id < a.tx_id",
    )
    .await;
    eprintln!("{committed} events, {inverted} inverted pairs");
    assert_eq!(messages.len(), committed);
    // The headers: the id to deduplicate on, and the stream's place.
    let (headers, body) = &messages[0];
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(body["id"].to_string().as_str())
    );
    assert_eq!(
        headers.get("Pgfold-Sequence").map(|v| v.as_str()),
        Some(body["sequence"].to_string().as_str())
    );
    for key in [
        "id",
        "stream_id",
        "stream_type",
        "event_type",
        "event_version",
        "sequence",
        "occurred_at",
        "payload",
        "metadata",
    ] {
        assert!(body.get(key).is_some(), "{key} missing from {body}");
    }
    assert_eq!(body["payload"]["amount"], "12.50");
    let bodies: Vec<Value> = messages.into_iter().map(|(_, b)| b).collect();
    assert_complete_in_order(&client, &bodies, true).await;
    js.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_while_publishing_each_event_is_in_the_stream_exactly_once_in_order() {
    let db = database().await;
    let client = db.client().await;
    let js = TestStream::create(NATS).await;
    let subject = format!("{}.{{stream_type}}.{{event_type}}", js.prefix);
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__BATCH_SIZE", "50"),
        ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "100"),
        ("PGFOLD_SINKS__TO_NATS__URL", NATS),
        ("PGFOLD_SINKS__TO_NATS__SUBJECT", subject.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let (committed, kills) = kill_while_writing(&db, "to_nats", &env).await;
    pgfold_ok(&["run", "--once", "--projector", "to_nats"], &env);

    let bodies: Vec<Value> = js.messages().await.into_iter().map(|(_, b)| b).collect();
    eprintln!(
        "{committed} events, {} kills, {} published, checkpoint {}",
        kills.len(),
        bodies.len(),
        published(&client, "to_nats").await
    );
    assert_complete_in_order(&client, &bodies, true).await;
    js.delete().await;
}

#[tokio::test]
async fn no_stream_for_the_subject_is_refused_at_start_in_one_line() {
    let db = TestDb::new().await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_SINKS__TO_NATS__URL", NATS),
        (
            "PGFOLD_SINKS__TO_NATS__SUBJECT",
            "pgfold-nobody-listens.{event_type}",
        ),
    ];
    refused_at_start(
        &env,
        "to_nats",
        "no JetStream stream takes subject pgfold-nobody-listens.*",
    );
}

/// A nats-server of the test's own, with JetStream and a password, that the
/// test can stop and start again on the same port and store.
struct OwnServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

const USER: &str = "pgfold";
const PASSWORD: &str = "s3cret-Pa55word";

impl OwnServer {
    fn start() -> OwnServer {
        let mut s = OwnServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.resume();
        s
    }

    fn resume(&mut self) {
        let child = std::process::Command::new("/usr/sbin/nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .args(["--user", USER, "--pass", PASSWORD])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stopped_and_started_again_loses_nothing_and_shows_the_outage() {
    let db = database().await;
    let client = db.client().await;
    let mut server = OwnServer::start();
    let url = server.url();
    let js = TestStream::create(&url).await;
    let subject = format!("{}.{{stream_type}}.{{event_type}}", js.prefix);
    let http = format!("127.0.0.1:{}", free_port());
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_HTTP__LISTEN", http.as_str()),
        ("PGFOLD_SINKS__TO_NATS__URL", url.as_str()),
        ("PGFOLD_SINKS__TO_NATS__SUBJECT", subject.as_str()),
        ("PGFOLD_SINKS__TO_NATS__TIMEOUT_MS", "1000"),
        ("PGFOLD_LOG__FORMAT", "json"),
        // Every level: async-nats writes its CONNECT message, password included, at
        // trace.
        ("RUST_LOG", "trace"),
    ];
    let mut daemon = Daemon::spawn(PGFOLD, &["run", "--projector", "to_nats"], &env);
    append_paid(&db, 0, 50, 5).await;
    wait_for(
        "the first events published",
        Duration::from_secs(30),
        || async { published(&client, "to_nats").await == 50 },
    )
    .await;
    assert_eq!(get(&http, "/readyz").await.0, 200);

    server.stop();
    append_paid(&db, 50, 100, 5).await;
    let (body, status) = outage_shown(&http, &db, &env[2..4], "to_nats").await;
    assert_eq!(
        published(&client, "to_nats").await,
        50,
        "nothing is acknowledged while down"
    );

    server.resume();
    wait_for("the rest published", Duration::from_secs(60), || async {
        published(&client, "to_nats").await == 100
    })
    .await;
    wait_for("/readyz ready again", Duration::from_secs(30), || async {
        get(&http, "/readyz").await.0 == 200
    })
    .await;
    daemon.stop(Duration::from_secs(10)).unwrap();
    let log = daemon.output();

    let bodies: Vec<Value> = js.messages().await.into_iter().map(|(_, b)| b).collect();
    assert_complete_in_order(&client, &bodies, true).await;
    // The password never shows: not in a log line, /readyz or status.
    assert!(
        log.contains("unavailable"),
        "the outage was not logged: {log}"
    );
    for (what, text) in [
        ("the log", log.as_str()),
        ("/readyz", body.as_str()),
        ("status", &status.to_string()),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the password shows in {what}: {text}"
        );
    }
    assert!(body.contains("nats://") || body.contains("NATS"), "{body}");
    js.delete().await;
}

#[tokio::test]
async fn a_sink_down_longer_than_the_duplicate_window_warns_in_the_log_and_status() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let js = TestStream::with_duplicate_window(NATS, Duration::from_secs(1)).await;
    let subject = format!("{}.{{stream_type}}.{{event_type}}", js.prefix);
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_SINKS__TO_NATS__URL", NATS),
        ("PGFOLD_SINKS__TO_NATS__SUBJECT", subject.as_str()),
        ("RUST_LOG", "warn"),
    ];
    append_paid(&db, 0, 3, 5).await;
    let first = pgfold_ok(&["run", "--once", "--projector", "to_nats"], &env);
    assert!(
        !String::from_utf8_lossy(&first.stderr).contains("duplicate window"),
        "a new sink has not been down"
    );
    // Stopped for longer than the window.
    wait_for("the window to pass", Duration::from_secs(10), || async {
        scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors WHERE name = 'to_nats' AND now() - last_advanced_at > interval '1.5 s'",
        )
        .await
            == 1
    })
    .await;
    append_paid(&db, 3, 4, 5).await;

    let second = pgfold_ok(&["run", "--once", "--projector", "to_nats"], &env);

    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("longer than the stream's duplicate window (1s)"),
        "{stderr}"
    );
    let (_, status) = status_json(&db.url, &env[1..3]);
    let error = projector_status(&status, "to_nats")["last_error"].to_string();
    assert!(error.contains("duplicate window"), "{error}");
    assert_eq!(js.messages().await.len(), 4);
    js.delete().await;
}
