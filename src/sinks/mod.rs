//! Sinks: consumers of the log that publish each event to another service (NATS
//! JetStream, RabbitMQ, a webhook) instead of folding it.
//!
//! A sink is a [`Projector`] whose fold is [`Fold::Events`]: the daemon hands it
//! each stream's events in `sequence` order, streams in position order, and its
//! `apply` returns only once the broker has acknowledged every message of the
//! batch. The daemon then moves the checkpoint in the batch's transaction, so
//! everything a projector has comes with it: one owner at a time across
//! instances, checkpoints in `pgfold.projectors`, `--replay` (republish from the
//! first event), `status`, metrics, and `on_error` with dead letters for an event
//! the broker refuses. A failure never moves the checkpoint past the failed
//! event; after a crash, the events after the checkpoint are published again (at
//! least once; JetStream's duplicate window makes that exactly once).
//!
//! A broker that cannot be reached is not the event's fault: the batch fails
//! with [`ProjectorError::Unavailable`], which the daemon retries with backoff
//! for as long as it takes, without counting attempts against the event.

mod amqp;
mod http;
mod nats;
mod secret;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use serde::Serialize;

use crate::config::SinkSettings;
use crate::projector::{
    valid_name, Event, EventFilter, EventFold, Fold, Projector, ProjectorError, Registry, Tx,
};
use crate::util::one_line;
pub use secret::Redactor;

/// Adds a sink for each `[sinks.<name>]` to `registry`. A name taken by a
/// projector, an unknown scheme or a bad subject template is a one-line error
/// naming the sink. Nothing connects yet: that happens when the daemon starts.
pub fn load(
    registry: Registry,
    sinks: &BTreeMap<String, SinkSettings>,
) -> anyhow::Result<Registry> {
    let mut registry = registry;
    for (name, settings) in sinks {
        if registry.get(name).is_some() {
            bail!(
                "sink {name}: the name is taken by a projector (sinks and projectors share names)"
            );
        }
        if !valid_name(name) {
            bail!("sink name {name:?} must be lowercase letters, digits and underscores");
        }
        let sink = Sink::new(name, settings).with_context(|| format!("sink {name}"))?;
        registry = registry
            .try_register(sink)
            .map_err(|e| anyhow::anyhow!("sink {name}: {e}"))?;
    }
    Ok(registry)
}

/// What a protocol's publisher does for a [`Sink`].
#[async_trait]
trait Publisher: Send + Sync {
    /// At the daemon's start: connects and checks what the operator must have
    /// set up (a stream, an exchange). `Err(Refused)` stops the daemon; an
    /// unreachable broker only warns, and is retried by the batches.
    async fn check(&self) -> Result<(), PublishError>;

    /// Publishes `events` in order and returns once the broker has acknowledged
    /// each one. On a refused event, the events before it are acknowledged; the
    /// ones after it may have been sent too (AMQP learns that a message was
    /// unroutable only once the batch is on its way), and are sent again, in
    /// order, once the failure is dealt with.
    async fn publish(&self, events: &[Event]) -> Result<(), PublishError>;

    /// Whether the connection is down now, as the client library sees it.
    fn disconnected(&self) -> Option<String> {
        None
    }

    /// How long the broker drops a republished message as a duplicate
    /// (JetStream's duplicate window), once known.
    fn duplicate_window(&self) -> Option<Duration> {
        None
    }
}

/// Why a publish failed, in one line with any password already removed.
#[derive(Debug)]
enum PublishError {
    /// The broker cannot be reached or did not answer in time: retried.
    Unavailable(String),
    /// The broker refused this event: a failure of the event, for `on_error`.
    Event { event_id: i64, message: String },
    /// The setup is wrong (no stream for the subject, no exchange): at start,
    /// the daemon refuses to run.
    Refused(String),
}

/// A consumer that publishes each event; see the module documentation.
pub struct Sink {
    name: String,
    filter: EventFilter,
    publisher: Box<dyn Publisher>,
    /// The URL with its password replaced, for messages.
    shown: String,
    redactor: Redactor,
    /// Since when publishing has failed for an unreachable broker, and why.
    outage: Mutex<Option<(Instant, String)>>,
    /// Whether this process has published a batch yet (the first one checks how
    /// long the sink was stopped).
    started: std::sync::atomic::AtomicBool,
}

impl Sink {
    fn new(name: &str, settings: &SinkSettings) -> anyhow::Result<Sink> {
        let redactor = Redactor::for_url(&settings.url);
        let shown = redactor.redact(&settings.url);
        let scheme = settings
            .url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .ok_or_else(|| anyhow::anyhow!("url {shown:?} has no scheme (nats://, tls://, amqp://, amqps://, http://, https://)"))?;
        let publisher: Box<dyn Publisher> = match scheme.as_str() {
            "nats" | "tls" => Box::new(nats::Nats::new(
                settings,
                &redactor,
                subject(settings, "NATS")?,
            )?),
            "amqp" | "amqps" => Box::new(amqp::Amqp::new(
                settings,
                &redactor,
                subject(settings, "AMQP")?,
            )?),
            "http" | "https" => Box::new(http::Webhook::new(settings, &redactor)?),
            other => {
                bail!("url scheme {other:?} is not one of nats, tls, amqp, amqps, http, https")
            }
        };
        let filter = EventFilter {
            event_types: settings.event_types.clone(),
            stream_types: settings.stream_types.clone(),
            ..EventFilter::all()
        };
        Ok(Sink {
            name: name.to_string(),
            filter,
            publisher,
            shown,
            redactor,
            outage: Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// After a batch the broker acknowledged: ends an outage, and warns when it
    /// (or the time since the last publish, for the first batch of a process)
    /// outlasted the broker's duplicate window.
    async fn published(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        let ended = self
            .outage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|(since, _)| since.elapsed());
        let first = !self
            .started
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        let Some(window) = self.publisher.duplicate_window() else {
            return Ok(());
        };
        let down = match (ended, first) {
            (Some(down), _) => Some(down),
            // Stopped (or crashed) since its last publish, as far as the
            // checkpoint tells.
            (None, true) => {
                let row = tx
                    .query_one(
                        "SELECT extract(epoch FROM now() - last_advanced_at)::float8
                           FROM pgfold.projectors WHERE name = $1",
                        &[&self.name],
                    )
                    .await?;
                row.get::<_, Option<f64>>(0)
                    .map(|s| Duration::from_secs_f64(s.max(0.0)))
            }
            (None, false) => None,
        };
        let Some(down) = down.filter(|d| *d > window) else {
            return Ok(());
        };
        let message = format!(
            "sink was down {}s, longer than the stream's duplicate window ({}s): events published before the outage and published again after it are not deduplicated",
            down.as_secs(),
            window.as_secs()
        );
        tracing::warn!(sink = %self.name, "{message}");
        tx.execute(
            "UPDATE pgfold.projectors SET last_error = $2, last_error_at = now() WHERE name = $1",
            &[&self.name, &message],
        )
        .await?;
        Ok(())
    }

    fn failed(&self, e: PublishError) -> ProjectorError {
        match e {
            PublishError::Unavailable(why) => {
                let why = self
                    .redactor
                    .redact(&format!("{} unavailable: {why}", self.shown));
                let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
                let since = outage.as_ref().map_or_else(Instant::now, |(s, _)| *s);
                *outage = Some((since, why.clone()));
                ProjectorError::Unavailable(why)
            }
            PublishError::Event { event_id, message } => ProjectorError::Event {
                event_id,
                message: self.redactor.redact(&message),
            },
            PublishError::Refused(why) => {
                ProjectorError::Unavailable(self.redactor.redact(&format!("{}: {why}", self.shown)))
            }
        }
    }
}

#[async_trait]
impl Projector for Sink {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> EventFilter {
        self.filter.clone()
    }

    fn fold(&self) -> Fold<'_> {
        Fold::Events(self)
    }

    async fn setup(&self, _tx: &Tx<'_>) -> Result<(), ProjectorError> {
        Ok(())
    }

    /// Nothing to empty: a replay publishes everything again.
    async fn reset(&self, _tx: &Tx<'_>) -> Result<(), ProjectorError> {
        Ok(())
    }

    async fn validate(&self, _tx: &Tx<'_>) -> Result<(), ProjectorError> {
        match self.publisher.check().await {
            Ok(()) => Ok(()),
            Err(PublishError::Refused(why)) => Err(ProjectorError::Other(anyhow::anyhow!(
                "{}",
                self.redactor.redact(&format!(
                    "sink {} ({}): {}",
                    self.name,
                    self.shown,
                    one_line(&why)
                ))
            ))),
            Err(e) => {
                let e = self.failed(e);
                tracing::warn!(sink = %self.name, error = %e, "broker unreachable at start; publishing will retry until it is back");
                Ok(())
            }
        }
    }

    fn has_tables(&self) -> bool {
        false
    }

    fn unavailable(&self) -> Option<String> {
        if let Some(why) = self.publisher.disconnected() {
            return Some(self.redactor.redact(&format!("sink {}: {why}", self.name)));
        }
        let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        outage.as_ref().map(|(since, why)| {
            format!(
                "sink {} for {}s: {why}",
                self.name,
                since.elapsed().as_secs()
            )
        })
    }
}

#[async_trait]
impl EventFold for Sink {
    async fn apply(&self, tx: &Tx<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        match self.publisher.publish(events).await {
            Ok(()) => self.published(tx).await,
            Err(e) => Err(self.failed(e)),
        }
    }
}

/// `publish` for a batch of `events`, given `timeout` for every 1,000 events
/// (at least once): publishing waits for room in a client's buffer while the
/// broker is away, and each acknowledgement for the timeout. Past that, the
/// broker is unavailable.
async fn within(
    timeout: Duration,
    events: usize,
    publish: impl std::future::Future<Output = Result<(), PublishError>>,
) -> Result<(), PublishError> {
    let limit = timeout * (1 + events as u32 / 1000);
    match tokio::time::timeout(limit, publish).await {
        Ok(result) => result,
        Err(_) => Err(PublishError::Unavailable(format!(
            "batch of {events} not acknowledged within {} ms",
            limit.as_millis()
        ))),
    }
}

/// Where a setup problem found after start (the broker was down then) leaves
/// the sink: retrying, as for an outage, until the operator has fixed it.
fn retried(e: PublishError) -> PublishError {
    match e {
        PublishError::Refused(why) => PublishError::Unavailable(why),
        e => e,
    }
}

/// The message body: the event as one JSON object.
#[derive(Serialize)]
struct Body<'a> {
    id: i64,
    stream_id: &'a str,
    stream_type: &'a str,
    event_type: &'a str,
    event_version: i32,
    sequence: i64,
    occurred_at: String,
    payload: &'a serde_json::Value,
    metadata: &'a serde_json::Value,
}

impl<'a> Body<'a> {
    fn of(e: &'a Event) -> Body<'a> {
        Body {
            id: e.id,
            stream_id: &e.stream_id,
            stream_type: &e.stream_type,
            event_type: &e.event_type,
            event_version: e.event_version,
            sequence: e.sequence,
            occurred_at: e
                .occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            payload: &e.payload,
            metadata: &e.metadata,
        }
    }
}

/// `event` as the JSON body of its message.
fn body(event: &Event) -> Vec<u8> {
    serde_json::to_vec(&Body::of(event)).expect("an event serializes to JSON")
}

/// The names of the headers that carry the stream id, stream type, sequence and
/// event type, where the protocol has headers.
const HEADER_STREAM_ID: &str = "Pgfold-Stream-Id";
const HEADER_STREAM_TYPE: &str = "Pgfold-Stream-Type";
const HEADER_SEQUENCE: &str = "Pgfold-Sequence";
const HEADER_EVENT_TYPE: &str = "Pgfold-Event-Type";

/// `subject`, required for the protocols that route by it.
fn subject(settings: &SinkSettings, protocol: &str) -> anyhow::Result<Subject> {
    match &settings.subject {
        Some(template) => Subject::parse(template),
        None => bail!("subject is required for a {protocol} sink (e.g. \"events.{{stream_type}}.{{event_type}}\")"),
    }
}

/// A subject (or routing key) template: text with `{stream_type}`, `{event_type}`
/// and `{stream_id}`.
#[derive(Debug, Clone)]
struct Subject {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    StreamType,
    EventType,
    StreamId,
}

impl Subject {
    fn parse(template: &str) -> anyhow::Result<Subject> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                bail!("subject {template:?}: unclosed {{");
            };
            parts.push(match &rest[open + 1..open + close] {
                "stream_type" => Part::StreamType,
                "event_type" => Part::EventType,
                "stream_id" => Part::StreamId,
                other => bail!(
                    "subject {template:?}: unknown placeholder {{{other}}} (known: {{stream_type}}, {{event_type}}, {{stream_id}})"
                ),
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            bail!("subject {template:?}: unmatched }}");
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            bail!("subject is empty");
        }
        Ok(Subject { parts })
    }

    /// The subject of `event`, each placeholder's value passed through `clean`.
    fn render(&self, event: &Event, clean: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::StreamType => out.push_str(&clean(&event.stream_type)),
                Part::EventType => out.push_str(&clean(&event.event_type)),
                Part::StreamId => out.push_str(&clean(&event.stream_id)),
            }
        }
        out
    }

    /// The subjects this template can produce for `filter`: concrete where the
    /// filter lists every value a placeholder can take, `wildcard` elsewhere.
    fn covering(&self, filter: &EventFilter, wildcard: &str) -> Vec<String> {
        let mut subjects = vec![String::new()];
        for p in &self.parts {
            let values: Vec<String> = match p {
                Part::Text(t) => vec![t.clone()],
                Part::StreamType => filter
                    .stream_types
                    .clone()
                    .unwrap_or_else(|| vec![wildcard.to_string()]),
                Part::EventType => filter
                    .event_types
                    .clone()
                    .unwrap_or_else(|| vec![wildcard.to_string()]),
                Part::StreamId => vec![wildcard.to_string()],
            };
            subjects = subjects
                .iter()
                .flat_map(|s| values.iter().map(move |v| format!("{s}{v}")))
                .collect();
        }
        subjects
    }
}

/// A rustls configuration that verifies servers against `root_certificate` (a
/// PEM file) or, without one, the system's trust store.
fn tls_config(root_certificate: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match root_certificate {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("root_certificate {}: {e}", path.display()))?;
            if certs.is_empty() {
                bail!("root_certificate {}: no certificate in it", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("root_certificate {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_templates_take_the_three_placeholders_and_nothing_else() {
        let s = Subject::parse("events.{stream_type}.{event_type}.{stream_id}").unwrap();
        assert_eq!(s.parts.len(), 6);
        let e = Subject::parse("events.{stream}").unwrap_err().to_string();
        assert!(e.contains("unknown placeholder {stream}"), "{e}");
        assert!(Subject::parse("events.{event_type").is_err());
        assert!(Subject::parse("events.}").is_err());
    }

    fn settings(keys: serde_json::Value) -> BTreeMap<String, SinkSettings> {
        serde_json::from_value(keys).unwrap()
    }

    fn load_error(keys: serde_json::Value) -> String {
        let registry = crate::projectors::builtin();
        match load(registry, &settings(keys)) {
            Ok(_) => panic!("loaded"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn bad_sinks_are_one_line_errors_naming_them() {
        let e = load_error(serde_json::json!({"daily_revenue": {"url": "http://h/x"}}));
        assert!(
            e.contains("sink daily_revenue: the name is taken by a projector"),
            "{e}"
        );
        let e = load_error(serde_json::json!({"out": {"url": "kafka://h:9092"}}));
        assert!(e.contains("sink out: url scheme \"kafka\""), "{e}");
        let e = load_error(serde_json::json!({"out": {"url": "nats://h:4222"}}));
        assert!(
            e.contains("sink out: subject is required for a NATS sink"),
            "{e}"
        );
        let e = load_error(serde_json::json!({"out": {"url": "amqp://h", "subject": "x"}}));
        assert!(e.contains("sink out: exchange is required"), "{e}");
        let e = load_error(serde_json::json!({"Out": {"url": "http://h/x"}}));
        assert!(e.contains("lowercase"), "{e}");
    }

    #[test]
    fn a_loaded_sink_has_no_tables_and_its_errors_hide_the_password() {
        let registry = load(
            crate::projectors::builtin(),
            &settings(serde_json::json!({
                "out": {"url": "amqp://app:hunter2@rabbit/shop", "subject": "x", "exchange": "e"}
            })),
        )
        .unwrap();
        let sink = registry.get("out").unwrap();
        assert!(!sink.has_tables());
        assert_eq!(sink.unavailable(), None, "not connected yet, not down");
        let e = load_error(serde_json::json!({"out": {"url": "kafka://u:hunter2@h"}}));
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn covering_subjects_list_the_filtered_values_and_wildcard_the_rest() {
        let s = Subject::parse("events.{stream_type}.{event_type}").unwrap();
        let filter = EventFilter::event_types(&["OrderPaid", "OrderShipped"]);
        assert_eq!(
            s.covering(&filter, "*"),
            ["events.*.OrderPaid", "events.*.OrderShipped"]
        );
    }
}
