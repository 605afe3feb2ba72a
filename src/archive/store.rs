//! Where segments live: `archive.url`, a local directory (`file:///…`), an
//! S3-compatible bucket (`s3://bucket/prefix`, configured by the standard `AWS_*`
//! variables, `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` included) or an Azure
//! Blob Storage container (`az://container/prefix`, `AZURE_*`). Objects are created once, with
//! a conditional create, and never overwritten.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::util::one_line;

/// An opened archive location.
#[derive(Clone)]
pub struct Store {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

/// A few quick retries: a server that is down fails the pass in seconds, not
/// after object_store's default three minutes.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(20),
    }
}

/// The bucket (`s3`) or container (`az`), configured as each cloud's own tools
/// are: from the standard `AWS_*` and `AZURE_*` variables,
/// then `vars` (`AWS_ENDPOINT_URL`, say) over them.
fn cloud(
    scheme: &str,
    bucket: &str,
    vars: &[(String, String)],
) -> object_store::Result<Arc<dyn ObjectStore>> {
    // Only this cloud's keys: another's are not errors, just not ours.
    fn keys<K: std::str::FromStr>(vars: &[(String, String)]) -> Vec<(K, String)> {
        vars.iter()
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v.clone())))
            .collect()
    }
    Ok(match scheme {
        "az" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env();
            for (k, v) in keys(vars) {
                b = b.with_config(k, v);
            }
            Arc::new(b.with_container_name(bucket).with_retry(retry()).build()?)
        }
        _ => {
            let mut b = object_store::aws::AmazonS3Builder::from_env();
            for (k, v) in keys(vars) {
                b = b.with_config(k, v);
            }
            Arc::new(b.with_bucket_name(bucket).with_retry(retry()).build()?)
        }
    })
}

/// What a conditional create found.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// The object is new.
    Written,
    /// An object was there already (left by a pass that crashed before recording it).
    Exists,
}

impl Store {
    /// Opens `url` (checked with [`check_url`]). A local directory is created if missing.
    pub fn open(url: &str) -> anyhow::Result<Store> {
        Store::open_with(url, &[])
    }

    /// [`Store::open`], with `vars` (`AWS_ENDPOINT_URL`, `AZURE_STORAGE_USE_EMULATOR`
    /// …) taken over the process's environment: a program that opens stores of
    /// several endpoints needs no process-wide variable for each.
    pub fn open_with(url: &str, vars: &[(String, String)]) -> anyhow::Result<Store> {
        crate::config::check_archive_url(url)?;
        let (store, prefix): (Arc<dyn ObjectStore>, Path) =
            if let Some(dir) = url.strip_prefix("file://") {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create the archive directory {dir}"))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .with_context(|| format!("cannot open the archive directory {dir}"))?;
                (Arc::new(fs), Path::default())
            } else {
                // HTTPS goes through rustls with ring (see Cargo.toml): the
                // process-wide provider, unless one is installed already.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let (scheme, rest) = url.split_once("://").unwrap_or_default();
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                (
                    cloud(scheme, bucket, vars)
                        .with_context(|| format!("cannot open the archive {url}"))?,
                    Path::from(prefix.trim_matches('/')),
                )
            };
        Ok(Store {
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// The key of the segment holding ids `first..=last`; `attempt` > 0 names
    /// another object for the same range when one with other contents is there.
    pub fn key(first: i64, last: i64, attempt: u32) -> String {
        match attempt {
            0 => format!("events-{first:020}-{last:020}.parquet"),
            n => format!("events-{first:020}-{last:020}.{n}.parquet"),
        }
    }

    fn path(&self, key: &str) -> Path {
        self.prefix.clone().join(key)
    }

    /// Where `key` is, for messages.
    pub fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    /// Creates `key` with `bytes` unless an object is there already.
    pub async fn create(&self, key: &str, bytes: Bytes) -> anyhow::Result<Created> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(Created::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Exists),
            Err(e) => Err(anyhow::anyhow!(
                "cannot write segment {}: {}",
                self.describe(key),
                one_line(&e.to_string())
            )),
        }
    }

    /// The bytes of `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, FetchError> {
        let got = async { self.store.get(&self.path(key)).await?.bytes().await };
        got.await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => FetchError::Bad(format!(
                "{} is missing from the archive",
                self.describe(key)
            )),
            e => {
                let text = format!(
                    "cannot read {}: {}",
                    self.describe(key),
                    one_line(&e.to_string())
                );
                match e {
                    object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. } => FetchError::Bad(text),
                    // Refused connections, timeouts, 5xx, and credentials the
                    // operator may yet fix: the store may answer next time.
                    _ => FetchError::Unavailable(text),
                }
            }
        })
    }
}

/// Why a segment could not be had. One line, naming the segment or its object.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store did not answer, or failed: another try may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Missing, corrupt, or not the segment that was recorded: no retry helps.
    #[error("{0}")]
    Bad(String),
}
