//! Layered configuration: compiled-in defaults (`config/default.toml`), then the
//! file given with `--config`, then `PGFOLD_<SECTION>__<KEY>` environment
//! variables, then `DATABASE_URL`. Every struct denies unknown keys, so a typo is an
//! error instead of a silently ignored setting.
//!
//! Only variables with the double underscore are configuration. Others that merely
//! start with `PGFOLD_` are not ours to judge: Kubernetes creates
//! `PGFOLD_SERVICE_HOST`, `PGFOLD_PORT_9187_TCP` and friends in every container of
//! a namespace with a Service named `pgfold`, and teams use the prefix for their own
//! scripts. They are left out and named in [`Settings::ignored_env`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::util::one_line;

/// The documented defaults; the same file the README points to.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// Everything `config/default.toml` documents, after the layers are applied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[database]`: where and how to connect.
    pub database: DatabaseSettings,
    /// `[daemon]`: batches, polling and timeouts.
    pub daemon: DaemonSettings,
    /// `[log]`: format and level.
    pub log: LogSettings,
    /// `[http]`: the operator's endpoints.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[projectors.<name>]`: per projector; see [`Settings::projector`].
    #[serde(default)]
    pub projectors: BTreeMap<String, ProjectorSettings>,
    /// `[archive]`: old events moved to object storage; `None`: never.
    #[serde(default)]
    pub archive: Option<ArchiveSettings>,
    /// `[sinks.<name>]`: consumers that publish each event to a broker or a
    /// webhook (see `crate::sinks`).
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkSettings>,
    /// `[[upcasters]]`: events read in the shape of their newest version; see
    /// [`Settings::upcasters`].
    #[serde(default)]
    pub upcasters: Vec<Upcaster>,
    /// `PGFOLD_*` environment variables that were not read as configuration (no
    /// `__`), for a debug line once logging is up.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection string; `None` means libpq-style defaults from the PG* variables.
    pub url: Option<String>,
    /// The connection for LISTEN and migrations, which need a session; `None`:
    /// the same as `url`.
    pub listen_url: Option<String>,
    /// Connections the daemon may open besides its LISTEN connection.
    pub pool_size: usize,
    /// `false`: no named prepared statement is ever sent, so every connection
    /// survives a transaction-mode pooler.
    pub prepared_statements: bool,
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// How often to look for new events when no notification arrives.
    pub poll_interval_ms: u64,
    /// Most events handed to an event-by-event projector in one transaction.
    pub batch_size: u32,
    /// Most events a set-based projector covers in one transaction (a paced
    /// catch-up's ceiling).
    pub set_batch_size: u32,
    /// Bytes of event payload and metadata (as JSON text) in one decoded-events
    /// batch; an event larger than this is applied alone.
    pub batch_bytes: u64,
    /// `run --once`: how long to keep retrying an unreachable database.
    pub connect_timeout_ms: u64,
    /// Warn once an open transaction has held new events back this long.
    pub stall_warn_after_ms: u64,
    /// A directory of SQL projections, one `*.toml` file each; `None`: none.
    pub projections_dir: Option<std::path::PathBuf>,
    /// Whether a batch's commit waits for its WAL to reach disk.
    pub synchronous_commit: bool,
}

impl DaemonSettings {
    /// `poll_interval_ms`.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    /// `connect_timeout_ms`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// `stall_warn_after_ms`.
    pub fn stall_warn_after(&self) -> Duration {
        Duration::from_millis(self.stall_warn_after_ms)
    }
}

/// `[http]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address for `/healthz`, `/readyz`, `/metrics` and `/wait`; `None`: no HTTP server.
    pub listen: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// A tracing filter (`info`, `pgfold::daemon=debug`, …); `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
/// `log.format`.
pub enum LogFormat {
    /// Readable on a terminal; coloured only when stderr is one and NO_COLOR is unset.
    Text,
    /// One JSON object per line.
    Json,
}

/// One `[[upcasters]]` entry: the payload of `event_type` at `from_version`
/// rewritten to `to_version` (see `feed::upcast`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upcaster {
    /// The event type whose payload it rewrites.
    pub event_type: String,
    /// The version it reads.
    pub from_version: i32,
    /// The version it produces: `from_version + 1`.
    pub to_version: i32,
    /// A SQL expression of type `jsonb` over the event's unqualified columns
    /// (`payload`, `metadata`, `occurred_at`, ...): the payload at `to_version`.
    pub payload: String,
}

impl Upcaster {
    /// The upcaster of `event_type` from `from_version` to `to_version`.
    pub fn new(event_type: &str, from_version: i32, to_version: i32, payload: &str) -> Upcaster {
        Upcaster {
            event_type: event_type.into(),
            from_version,
            to_version,
            payload: payload.into(),
        }
    }

    /// How errors and rebuild reasons name it: `OrderPaid 1->2`.
    pub fn label(&self) -> String {
        format!(
            "{} {}->{}",
            self.event_type, self.from_version, self.to_version
        )
    }
}

/// Checks `[[upcasters]]`: each moves one version up, so that a type's upcasters
/// form one chain, with no duplicate, gap or cycle; every field is there. The
/// error is one line naming the upcaster. (Their expressions are planned against
/// the database at start, by each projector that reads through them.)
pub fn check_upcasters(list: &[Upcaster]) -> anyhow::Result<()> {
    let mut chains: BTreeMap<&str, Vec<&Upcaster>> = BTreeMap::new();
    for u in list {
        let name = format!("[[upcasters]] {}", u.label());
        if u.event_type.trim().is_empty() {
            bail!("{name}: event_type is empty");
        }
        if u.payload.trim().is_empty() {
            bail!("{name}: payload is empty");
        }
        if u.to_version <= u.from_version {
            bail!("{name}: to_version must be from_version + 1 (an upcaster that goes back or stays would make a cycle)");
        }
        if Some(u.to_version) != u.from_version.checked_add(1) {
            bail!("{name}: to_version must be from_version + 1: write one upcaster per version (payload = \"payload\" for a version that changed nothing)");
        }
        chains.entry(u.event_type.as_str()).or_default().push(u);
    }
    for chain in chains.values_mut() {
        chain.sort_by_key(|u| u.from_version);
        for pair in chain.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.from_version == b.from_version {
                bail!(
                    "[[upcasters]] {}: a duplicate: two upcasters read {} version {}",
                    b.label(),
                    b.event_type,
                    b.from_version
                );
            }
            if b.from_version != a.to_version {
                bail!(
                    "[[upcasters]] {}: a gap in the chain of {}: nothing upcasts version {} to {}",
                    b.label(),
                    b.event_type,
                    a.to_version,
                    b.from_version
                );
            }
        }
    }
    Ok(())
}

/// `[projectors.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSettings {
    /// A disabled projector is not run (its checkpoint and tables are left alone).
    pub enabled: bool,
    /// Attempts at a failing event, with backoff between them, before `on_error`.
    pub max_attempts: u32,
    /// What happens then.
    pub on_error: OnError,
    /// Whether a replay or rebuild reads the archive before the table.
    pub history: History,
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            enabled: true,
            max_attempts: 5,
            on_error: OnError::Stop,
            history: History::All,
        }
    }
}

/// `projectors.<name>.history`: where a projector's history starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum History {
    /// The archived segments, in order, then the table.
    All,
    /// The table only: archived events are never applied.
    Hot,
}

/// `[archive]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSettings {
    /// `file:///absolute/path`, `s3://bucket/prefix` or `az://container/prefix`.
    pub url: String,
    /// `pgfold run` runs a pass this often (`30s`, `15m`, `1h`, `1d`); `None`:
    /// only `pgfold archive` does.
    pub interval: Option<String>,
    /// `[[archive.policy]]`: what may leave the table.
    #[serde(default)]
    pub policy: Vec<ArchivePolicy>,
}

/// `[[archive.policy]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivePolicy {
    /// The stream types it applies to.
    pub stream_types: Vec<String>,
    /// A PostgreSQL interval: how old an event (or a stream's newest event) must be.
    pub after: String,
    /// `true`: a stream moves whole, once its newest event is older than `after`.
    #[serde(default = "whole_streams_default")]
    pub whole_streams: bool,
    /// Only events with this `retention_class` (the article's column); never `hot`.
    pub retention_class: Option<String>,
}

/// Checks the form of `archive.url` (no I/O): `file:///absolute/path`, or a
/// bucket (`s3://`) or container (`az://`) with an optional prefix.
pub fn check_archive_url(url: &str) -> anyhow::Result<()> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            anyhow::bail!(
                "archive.url {url:?}: a relative path is refused (write file:///absolute/path)"
            );
        }
        return Ok(());
    }
    for (scheme, what) in [("s3://", "bucket"), ("az://", "container")] {
        if let Some(rest) = url.strip_prefix(scheme) {
            if rest.is_empty() || rest.starts_with('/') {
                anyhow::bail!("archive.url {url:?}: no {what} (write {scheme}{what}/prefix)");
            }
            return Ok(());
        }
    }
    // No GCS emulator these tests can reach honours a create's precondition or
    // answers with an ETag: gs:// stays out until it can be shown to work.
    if url.starts_with("gs://") {
        anyhow::bail!(
            "archive.url {url:?}: gs:// is not built into this pgfold (file://, s3:// and az:// are)"
        );
    }
    for scheme in ["abfs://", "abfss://", "azure://", "adl://"] {
        if url.starts_with(scheme) {
            anyhow::bail!(
                "archive.url {url:?}: write az://container/prefix (the account comes from AZURE_STORAGE_ACCOUNT_NAME)"
            );
        }
    }
    anyhow::bail!(
        "archive.url {url:?}: a relative path is refused; write file:///absolute/path, s3://bucket/prefix or az://container/prefix"
    )
}

fn whole_streams_default() -> bool {
    true
}

impl ArchiveSettings {
    /// `interval` as a duration.
    pub fn interval(&self) -> anyhow::Result<Option<Duration>> {
        let Some(text) = &self.interval else {
            return Ok(None);
        };
        let bad = || {
            anyhow::anyhow!("archive.interval {text:?}: write a number and a unit, as in \"30s\", \"15m\", \"1h\" or \"1d\"")
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86_400,
            _ => return Err(bad()),
        };
        if secs == 0 {
            return Err(bad());
        }
        Ok(Some(Duration::from_secs(secs)))
    }

    fn validate(&self) -> anyhow::Result<()> {
        check_archive_url(&self.url)?;
        self.interval()?;
        for (i, p) in self.policy.iter().enumerate() {
            let n = i + 1;
            if p.stream_types.is_empty() {
                bail!("archive.policy {n}: stream_types is empty");
            }
            if p.after.trim().is_empty() {
                bail!("archive.policy {n}: after is empty (a PostgreSQL interval, as in \"730 days\")");
            }
            if p.retention_class.as_deref() == Some("hot") {
                bail!("archive.policy {n}: retention_class \"hot\" is never archived");
            }
        }
        Ok(())
    }
}

/// `[sinks.<name>]`: where and what a sink publishes. The protocol is the URL's
/// scheme: `nats`/`tls` (NATS JetStream), `amqp`/`amqps` (RabbitMQ), `http`/`https`
/// (a webhook).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// The broker or the webhook. A password in it is never logged nor shown.
    pub url: String,
    /// Only events of streams of these types (`None`: all).
    #[serde(default)]
    pub stream_types: Option<Vec<String>>,
    /// Only events of these types (`None`: all).
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// The NATS subject, or the AMQP routing key; may use `{stream_type}`,
    /// `{event_type}` and `{stream_id}`.
    #[serde(default)]
    pub subject: Option<String>,
    /// AMQP only: the exchange, which must exist (pgfold never declares it).
    #[serde(default)]
    pub exchange: Option<String>,
    /// A PEM file of root certificates to verify the server against, instead
    /// of the system's.
    #[serde(default)]
    pub root_certificate: Option<std::path::PathBuf>,
    /// How long to wait for the broker's acknowledgement (or the webhook's
    /// answer) before treating the broker as unavailable.
    #[serde(default = "default_sink_timeout_ms")]
    pub timeout_ms: u64,
    /// As for projectors.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// As for projectors: attempts at an event the broker refuses.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// As for projectors.
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
}

fn default_sink_timeout_ms() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    ProjectorSettings::default().max_attempts
}
fn default_on_error() -> OnError {
    ProjectorSettings::default().on_error
}

impl SinkSettings {
    /// `timeout_ms`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
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
        Settings::load_with_env(file, std::env::vars_os())
    }

    /// [`Settings::load`] with the process environment given as `vars` (the
    /// `PGFOLD_*` part of it; `DATABASE_URL` is always read from the process).
    pub fn load_with_env(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> anyhow::Result<Settings> {
        let (env, ignored_env) = split_environment(vars)?;
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
                .try_parsing(true)
                .source(Some(env)),
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
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| anyhow::anyhow!("invalid {source}: {}", one_line(&e.to_string())))?;
        settings
            .validate()
            .with_context(|| format!("invalid {source}"))?;
        settings.ignored_env = ignored_env;
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
        if let Some(archive) = &self.archive {
            archive.validate()?;
        }
        for (name, s) in &self.sinks {
            if s.max_attempts == 0 {
                bail!("sinks.{name}.max_attempts must be at least 1");
            }
            if s.timeout_ms == 0 {
                bail!("sinks.{name}.timeout_ms must be at least 1");
            }
            if self.projectors.contains_key(name) {
                bail!("sinks.{name}: the name is taken by [projectors.{name}]; sinks and projectors share names");
            }
        }
        check_upcasters(&self.upcasters)?;
        Ok(())
    }

    /// The settings of one projector (defaults for one the file does not mention).
    /// A sink's come from its `[sinks.<name>]`.
    pub fn projector(&self, name: &str) -> ProjectorSettings {
        if let Some(sink) = self.sinks.get(name) {
            return ProjectorSettings {
                enabled: sink.enabled,
                max_attempts: sink.max_attempts,
                on_error: sink.on_error,
                history: History::All,
            };
        }
        self.projectors.get(name).cloned().unwrap_or_default()
    }
}

/// The `PGFOLD_<SECTION>__<KEY>` variables (the prefix matched in any case, as the
/// `config` crate does), and the names of the other `PGFOLD_*` ones, sorted.
fn split_environment(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> anyhow::Result<(HashMap<String, String>, Vec<String>)> {
    const PREFIX: &str = "pgfold_";
    let mut config = HashMap::new();
    let mut ignored = Vec::new();
    for (name, value) in vars {
        // A name that is not Unicode cannot spell a key.
        let Ok(name) = name.into_string() else {
            continue;
        };
        let Some(rest) = name
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .map(|_| &name[PREFIX.len()..])
        else {
            continue;
        };
        if !rest.contains("__") {
            ignored.push(name);
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| anyhow::anyhow!("environment variable {name} is not valid UTF-8"))?;
        config.insert(name, value);
    }
    ignored.sort();
    Ok((config, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::load_with_env(
            None,
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    #[test]
    fn archive_urls_name_a_directory_a_bucket_or_a_container() {
        for good in [
            "file:///var/lib/a",
            "s3://b",
            "s3://b/p/q",
            "az://c",
            "az://c/p",
        ] {
            assert!(check_archive_url(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("archive", "relative path"),
            ("file://archive", "relative path"),
            ("s3://", "no bucket"),
            ("az:///p", "no container"),
            ("gs://b/p", "gs:// is not built"),
            (
                "abfss://c@a.dfs.core.windows.net/p",
                "write az://container/prefix",
            ),
        ] {
            let e = check_archive_url(bad).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn variables_without_the_double_underscore_are_not_configuration() {
        // Kubernetes' service links, and a team's own variable (the real binary
        // with the full set: tests/integration/deploy.rs).
        let settings = load(&[
            ("PGFOLD_SERVICE_PORT_METRICS", "9187"),
            ("PGFOLD_PORT", "tcp://10.96.12.34:9187"),
            ("PGFOLD_DAEMON__POLL_INTERVAL_MS", "250"),
            ("PGFOLD_TEST_ADMIN_URL", "postgres://elsewhere"),
        ])
        .unwrap();
        assert_eq!(settings.daemon.poll_interval_ms, 250);
        assert_eq!(
            settings.ignored_env,
            [
                "PGFOLD_PORT",
                "PGFOLD_SERVICE_PORT_METRICS",
                "PGFOLD_TEST_ADMIN_URL"
            ]
        );
    }

    use Upcaster as U;

    #[test]
    fn a_chain_of_upcasters_moves_one_version_at_a_time() {
        let err = |list: &[Upcaster]| check_upcasters(list).unwrap_err().to_string();
        assert!(
            check_upcasters(&[U::new("P", 2, 3, "payload"), U::new("P", 1, 2, "payload")]).is_ok()
        );
        assert_eq!(
            err(&[U::new("P", 1, 2, "payload"), U::new("P", 3, 4, "payload")]),
            "[[upcasters]] P 3->4: a gap in the chain of P: nothing upcasts version 2 to 3"
        );
        let dup = err(&[
            U::new("P", 1, 2, "payload"),
            U::new("P", 1, 2, "payload || '{}'"),
        ]);
        assert!(dup.contains("P 1->2: a duplicate"), "{dup}");
        assert!(err(&[U::new("P", 2, 1, "payload")]).contains("P 2->1: to_version must be"));
        assert!(err(&[U::new("P", 1, 3, "payload")]).contains("P 1->3: to_version must be"));
        assert!(err(&[U::new("P", 1, 2, " ")]).contains("payload is empty"));
    }

    #[test]
    fn a_misspelled_key_or_section_is_still_an_error() {
        let err = load(&[("PGFOLD_DAEMON__POLL_INTERVL_MS", "250")]).unwrap_err();
        assert!(err.to_string().contains("poll_intervl_ms"), "{err}");
        let err = load(&[("PGFOLD_DEAMON__POLL_INTERVAL_MS", "250")]).unwrap_err();
        assert!(err.to_string().contains("deamon"), "{err}");
        // The prefix in any case, as before.
        let settings = load(&[("pgfold_log__level", "debug")]).unwrap();
        assert_eq!(settings.log.level, "debug");
    }

    #[test]
    fn a_sink_is_configured_from_the_environment() {
        let settings = load(&[
            ("PGFOLD_SINKS__ORDER_EVENTS__URL", "nats://127.0.0.1:4222"),
            ("PGFOLD_SINKS__ORDER_EVENTS__SUBJECT", "events.{event_type}"),
            ("PGFOLD_SINKS__ORDER_EVENTS__ON_ERROR", "skip"),
        ])
        .unwrap();
        let sink = &settings.sinks["order_events"];
        assert_eq!(sink.url, "nats://127.0.0.1:4222");
        assert_eq!(sink.subject.as_deref(), Some("events.{event_type}"));
        assert_eq!(settings.projector("order_events").on_error, OnError::Skip);
        assert_eq!(settings.projector("order_events").max_attempts, 5);
    }

    #[test]
    fn a_sink_named_like_a_projector_is_an_error() {
        let err =
            load(&[("PGFOLD_SINKS__DAILY_REVENUE__URL", "http://127.0.0.1/hook")]).unwrap_err();
        assert!(
            format!("{err:#}").contains("sinks.daily_revenue: the name is taken"),
            "{err:#}"
        );
    }
}
