//! The archive in Azure Blob Storage, and write-once creates in every store.
//!
//! Azure's is Azurite (from npm), which `.ci/run` installs and starts on
//! `PGFOLD_TEST_AZURITE` (default `http://127.0.0.1:10000`). It speaks the Blob
//! protocol with the emulator's well-known account
//! (`AZURE_STORAGE_USE_EMULATOR=true`) and, as Azure does, refuses a create
//! (`If-None-Match: *`) over an existing blob.

use std::io::{Read, Write};

use bytes::Bytes;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use pgfold::archive::{Created, Store};
use sha2::Sha256;

use super::archive::{round_trip, uuid_like};

/// The emulator's account and its published key (not a secret: every Azurite
/// has it).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite() -> String {
    std::env::var("PGFOLD_TEST_AZURITE").unwrap_or_else(|_| "http://127.0.0.1:10000".to_string())
}

fn azure_env() -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", azurite()),
    ]
}

/// Creates `container` in Azurite: a Put Container signed with the account's
/// shared key, which is what Azure asks of every request.
fn create_container(container: &str) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let date = Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let version = "2021-08-06";
    // Verb, eleven empty standard headers, the x-ms-* headers, the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&b64.decode(ACCOUNT_KEY).unwrap()).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    let host = azurite();
    let host = host.trim_start_matches("http://");
    let request = format!(
        "PUT /{ACCOUNT}/{container}?restype=container HTTP/1.1\r\nHost: {host}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut conn = std::net::TcpStream::connect(host)
        .unwrap_or_else(|e| panic!("Azurite at {host} is not running (.ci/run starts it): {e}"));
    conn.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn a_pass_to_an_azure_container_and_a_rebuild_from_it() {
    let container = format!("c{}", uuid_like());
    create_container(&container);
    let env = azure_env();
    round_trip(&format!("az://{container}/events"), &env_refs(&env)).await;
}

/// What an object store does with a second create of the same key: keeps the
/// first bytes, and says so.
async fn written_once(url: &str, env: &[(&'static str, String)]) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let store = Store::open_with(url, &env).unwrap();
    let first = Bytes::from_static(b"first");
    assert_eq!(
        store.create("k.parquet", first.clone()).await.unwrap(),
        Created::Written,
        "{url}"
    );
    assert_eq!(
        store
            .create("k.parquet", Bytes::from_static(b"second"))
            .await
            .unwrap(),
        Created::Exists,
        "{url}"
    );
    assert_eq!(store.get("k.parquet").await.unwrap(), first, "{url}");
}

#[tokio::test]
async fn every_store_creates_a_segment_once_and_never_overwrites_it() {
    let dir = tempfile::tempdir().unwrap();
    written_once(&format!("file://{}", dir.path().display()), &[]).await;

    let container = format!("c{}", uuid_like());
    create_container(&container);
    written_once(&format!("az://{container}/once"), &azure_env()).await;

    let endpoint = super::archive::s3_endpoint();
    let bucket = format!("b{}", uuid_like());
    super::archive::create_bucket(&endpoint, &bucket);
    written_once(
        &format!("s3://{bucket}/once"),
        &super::archive::s3_env(&endpoint),
    )
    .await;
}
