//! TLS: `tls://` to a nats-server of the test's own and `https://` to a
//! webhook served over rustls in the test, each verified against the
//! configured root certificate (and refused under another CA).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};

use super::*;

/// ca.pem, other-ca.pem, and server.crt/server.key for `localhost` signed by
/// ca.pem, in `dir`.
fn certificates(dir: &Path) {
    fn ca(name: &str) -> (CertificateParams, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (params, KeyPair::generate().unwrap())
    }
    let (ca_params, ca_key) = ca("pgfold sinks test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let (other_params, other_key) = ca("some other CA");
    let other = other_params.self_signed(&other_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

#[tokio::test]
async fn tls_to_nats_is_verified_against_the_root_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new("/usr/sbin/nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .arg("--tls")
        .arg("--tlscert")
        .arg(dir.path().join("server.crt"))
        .arg("--tlskey")
        .arg(dir.path().join("server.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let client = async {
        for _ in 0..100 {
            let connected = async_nats::ConnectOptions::new()
                .add_root_certificates(dir.path().join("ca.pem"))
                .require_tls(true)
                .connect(format!("tls://localhost:{port}"))
                .await;
            if let Ok(c) = connected {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server with TLS did not come up");
    }
    .await;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TLS".into(),
        subjects: vec!["tls.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let db = TestDb::new().await;
    append_paid(&db, 0, 4, 2).await;
    let url = format!("tls://localhost:{port}");
    let ca = dir.path().join("ca.pem");
    let other = dir.path().join("other-ca.pem");
    let env = |root: &Path| {
        vec![
            ("DATABASE_URL".to_string(), db.url.clone()),
            ("PGFOLD_SINKS__TO_NATS__URL".into(), url.clone()),
            (
                "PGFOLD_SINKS__TO_NATS__SUBJECT".into(),
                "tls.{event_type}".into(),
            ),
            (
                "PGFOLD_SINKS__TO_NATS__ROOT_CERTIFICATE".into(),
                root.display().to_string(),
            ),
            ("PGFOLD_SINKS__TO_NATS__TIMEOUT_MS".into(), "1000".into()),
            ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS".into(), "2000".into()),
        ]
    };

    // Under another CA, the server is not trusted: nothing is published.
    let wrong = env(&other);
    let out = pgfold(
        &["run", "--once", "--projector", "to_nats"],
        &env_pairs(&wrong),
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "published to an untrusted server"
    );
    let mut stream = js.get_stream("TLS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);

    let right = env(&ca);
    pgfold_ok(
        &["run", "--once", "--projector", "to_nats"],
        &env_pairs(&right),
    );
    assert_eq!(stream.info().await.unwrap().state.messages, 4);
    let _ = server.kill();
    let _ = server.wait();
}

fn env_pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A webhook over TLS (rustls, blocking, one request per connection) that
/// answers 200 and records the events.
fn https_receiver(dir: &Path) -> (u16, Arc<Mutex<Vec<Value>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let into = received.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut reader = BufReader::new(&mut tls);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_ok() {
                        let batch: Value = serde_json::from_slice(&body).unwrap();
                        into.lock()
                            .unwrap()
                            .extend(batch["events"].as_array().unwrap().clone());
                        let _ = tls.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                        let _ = tls.flush();
                    }
                    break;
                }
            }
        }
    });
    (port, received)
}

#[tokio::test]
async fn https_to_a_webhook_is_verified_against_the_root_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (port, received) = https_receiver(dir.path());
    let db = database().await;
    append_paid(&db, 0, 3, 2).await;
    let hook = |root: &Path| {
        sink(json!({
            "url": format!("https://localhost:{port}/hook"),
            "root_certificate": root,
            "max_attempts": 1,
            "timeout_ms": 2000,
        }))
    };
    let mut settings = with_sink(
        db.settings(),
        "to_hook",
        hook(&dir.path().join("other-ca.pem")),
    );
    settings.daemon.connect_timeout_ms = 1500;

    // Under another CA: an error (a retried outage, until --once gives up).
    let registry = pgfold::sinks::load(pgfold::projectors::builtin(), &settings.sinks).unwrap();
    let options = RunOptions {
        once: true,
        projectors: vec!["to_hook".into()],
        ..RunOptions::default()
    };
    let refused = daemon::run(&settings, &registry, &options, std::future::pending()).await;
    let err = format!("{:#}", refused.expect_err("posted to an untrusted server"));
    assert!(err.contains("unavailable"), "{err}");
    assert!(received.lock().unwrap().is_empty());

    let settings = with_sink(db.settings(), "to_hook", hook(&dir.path().join("ca.pem")));
    let outcome = run_once_sink(&settings, "to_hook").await;
    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    assert_eq!(received.lock().unwrap().len(), 3);
}
