//! Layered configuration: compiled-in defaults (`config/default.toml`), then the
//! file given with `--config`, then `PGFOLD_`-prefixed environment variables, then
//! `DATABASE_URL`. Every struct denies unknown keys, so a typo is an error instead
//! of a silently ignored setting.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The documented defaults; the same file the README points to.
const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub daemon: DaemonSettings,
    pub log: LogSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub projectors: BTreeMap<String, ProjectorSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection string; `None` means libpq-style defaults from the PG* variables.
    pub url: Option<String>,
    pub pool_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    pub poll_interval_ms: u64,
    pub batch_size: u32,
    pub set_batch_size: u32,
    /// Bytes of event payload and metadata (as JSON text) in one decoded-events
    /// batch; an event larger than this is applied alone.
    pub batch_bytes: u64,
    pub connect_timeout_ms: u64,
    pub stall_warn_after_ms: u64,
}

impl DaemonSettings {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn stall_warn_after(&self) -> Duration {
        Duration::from_millis(self.stall_warn_after_ms)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address for `/healthz`, `/readyz` and `/metrics`; `None`: no HTTP server.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSettings {
    pub enabled: bool,
    pub max_attempts: u32,
    pub on_error: OnError,
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            enabled: true,
            max_attempts: 5,
            on_error: OnError::Stop,
        }
    }
}

/// What happens to a projector once an event has failed `max_attempts` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Park the projector in state `failed`; the others keep going.
    Stop,
    /// Record a dead letter and move past the event.
    Skip,
}

impl Settings {
    /// Loads the layers. `file` is the `--config` argument, if any.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("PGFOLD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.is_empty() {
                builder = builder.set_override("database.url", url)?;
            }
        }
        let source = match file {
            Some(path) => format!("configuration ({})", path.display()),
            None => "configuration".to_string(),
        };
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| anyhow::anyhow!("invalid {source}: {}", one_line(&e.to_string())))?;
        settings
            .validate()
            .with_context(|| format!("invalid {source}"))?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.database.pool_size < 2 {
            bail!("database.pool_size must be at least 2");
        }
        if self.daemon.batch_size == 0 || self.daemon.set_batch_size == 0 {
            bail!("daemon.batch_size and daemon.set_batch_size must be at least 1");
        }
        if self.daemon.batch_bytes == 0 {
            bail!("daemon.batch_bytes must be at least 1");
        }
        if self.daemon.poll_interval_ms == 0 {
            bail!("daemon.poll_interval_ms must be at least 1");
        }
        for (name, p) in &self.projectors {
            if p.max_attempts == 0 {
                bail!("projectors.{name}.max_attempts must be at least 1");
            }
        }
        Ok(())
    }

    /// The settings of one projector (defaults for one the file does not mention).
    pub fn projector(&self, name: &str) -> ProjectorSettings {
        self.projectors.get(name).cloned().unwrap_or_default()
    }
}

/// Error messages from parsers sometimes span lines; the CLI promises one.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
