//! NATS JetStream: each event published to its subject with `Nats-Msg-Id` set to
//! the event's id, pipelined, and the batch acknowledged once every `PubAck` is
//! in. The stream is the operator's: pgfold checks at start that one covers the
//! subject and never creates one.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::{ContextBuilder, GetStreamByNameErrorKind, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::{Client, ConnectOptions, HeaderMap};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{body, secret, PublishError, Publisher, Redactor, Subject};
use super::{HEADER_EVENT_TYPE, HEADER_SEQUENCE, HEADER_STREAM_ID, HEADER_STREAM_TYPE};
use crate::config::SinkSettings;
use crate::projector::{Event, EventFilter};

pub(super) struct Nats {
    /// The URL without user information (that goes to the options).
    address: String,
    user: Option<(String, String)>,
    tls: rustls::ClientConfig,
    require_tls: bool,
    subject: Subject,
    filter: EventFilter,
    timeout: Duration,
    redactor: Redactor,
    connection: OnceCell<(Client, Context)>,
    /// The smallest duplicate window of the streams that take the subject, once
    /// checked.
    window: Mutex<Option<Duration>>,
}

impl Nats {
    pub(super) fn new(
        settings: &SinkSettings,
        redactor: &Redactor,
        subject: Subject,
    ) -> anyhow::Result<Nats> {
        let user = secret::user(&settings.url).map(|u| {
            (
                secret::percent_decode(u),
                secret::percent_decode(secret::password(&settings.url).unwrap_or("")),
            )
        });
        Ok(Nats {
            address: secret::without_userinfo(&settings.url),
            user,
            tls: super::tls_config(settings.root_certificate.as_deref())?,
            require_tls: settings.url.to_ascii_lowercase().starts_with("tls://")
                || settings.root_certificate.is_some(),
            subject,
            filter: EventFilter {
                event_types: settings.event_types.clone(),
                stream_types: settings.stream_types.clone(),
                ..EventFilter::all()
            },
            timeout: settings.timeout(),
            redactor: redactor.clone(),
            connection: OnceCell::new(),
            window: Mutex::new(None),
        })
    }

    /// The client, created once; it connects (and reconnects) in the
    /// background, so an unreachable server at start is not an error here.
    async fn connection(&self) -> Result<&(Client, Context), PublishError> {
        self.connection
            .get_or_try_init(|| async {
                let mut options = ConnectOptions::new()
                    .name("pgfold")
                    .retry_on_initial_connect()
                    .max_reconnects(None)
                    .connection_timeout(self.timeout)
                    .tls_client_config(self.tls.clone())
                    .require_tls(self.require_tls);
                if let Some((user, password)) = &self.user {
                    options = options.user_and_password(user.clone(), password.clone());
                }
                let client = options
                    .connect(self.address.as_str())
                    .await
                    .map_err(|e| PublishError::Refused(self.redactor.redact(&e.to_string())))?;
                let context = ContextBuilder::new()
                    .timeout(self.timeout)
                    .build(client.clone());
                Ok((client, context))
            })
            .await
    }

    /// Waits up to the timeout for the connection to be up.
    async fn connected(&self, client: &Client) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        while client.connection_state() != State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(PublishError::Unavailable(format!(
                    "not connected after {} ms",
                    self.timeout.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Finds the streams that take the subject, and their duplicate window.
    async fn check_streams(&self, context: &Context) -> Result<(), PublishError> {
        let mut window: Option<Duration> = None;
        for subject in self.subject.covering(&self.filter, "*") {
            let name = context
                .stream_by_subject(subject.clone())
                .await
                .map_err(|e| match e.kind() {
                    GetStreamByNameErrorKind::NotFound => PublishError::Refused(format!(
                        "no JetStream stream takes subject {subject}: create one that does (pgfold never creates streams)"
                    )),
                    GetStreamByNameErrorKind::InvalidSubject => PublishError::Refused(format!(
                        "subject {subject} is not a valid NATS subject"
                    )),
                    _ => PublishError::Unavailable(format!("JetStream did not answer: {e}")),
                })?;
            let stream = context
                .get_stream(&name)
                .await
                .map_err(|e| PublishError::Unavailable(format!("stream {name}: {e}")))?;
            let duplicates = stream.cached_info().config.duplicate_window;
            window = Some(window.map_or(duplicates, |w| w.min(duplicates)));
        }
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = window;
        Ok(())
    }

    async fn publish_all(&self, context: &Context, events: &[Event]) -> Result<(), PublishError> {
        let mut acks = Vec::with_capacity(events.len());
        let mut refused = None;
        for event in events {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, event.id.to_string().as_str());
            headers.insert(HEADER_STREAM_ID, event.stream_id.as_str());
            headers.insert(HEADER_STREAM_TYPE, event.stream_type.as_str());
            headers.insert(HEADER_SEQUENCE, event.sequence.to_string().as_str());
            headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
            let subject = self.subject.render(event, token);
            let message = PublishMessage::build()
                .payload(body(event).into())
                .headers(headers);
            match context.send_publish(subject.clone(), message).await {
                Ok(ack) => acks.push((event.id, subject, ack)),
                Err(e) => match e.kind() {
                    // Checked before anything is sent: nothing after this
                    // event leaves ahead of it.
                    PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::Other => {
                        refused = Some(PublishError::Event {
                            event_id: event.id,
                            message: format!("NATS refused the message on {subject}: {e}"),
                        });
                        break;
                    }
                    _ => return Err(PublishError::Unavailable(e.to_string())),
                },
            }
        }
        for (event_id, subject, ack) in acks {
            match ack.await {
                Ok(_) => {}
                Err(e) => {
                    return Err(match e.kind() {
                        PublishErrorKind::StreamNotFound => PublishError::Unavailable(format!(
                            "no JetStream stream took subject {subject} (no responders)"
                        )),
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                            PublishError::Unavailable(format!("no acknowledgement: {e}"))
                        }
                        _ => PublishError::Event {
                            event_id,
                            message: format!("JetStream refused the message on {subject}: {e}"),
                        },
                    })
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A placeholder's value as one subject token: the characters NATS gives a
/// meaning to in a subject (white space, and the wildcards `*` and `>`) become
/// `_`, and an empty value `_`. Dots are kept: they split tokens, as the
/// application chose.
fn token(value: &str) -> String {
    if value.is_empty() {
        return "_".to_string();
    }
    value
        .chars()
        .map(|c| match c {
            '*' | '>' => '_',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect()
}

#[async_trait]
impl Publisher for Nats {
    async fn check(&self) -> Result<(), PublishError> {
        let (client, context) = self.connection().await?;
        self.connected(client).await?;
        self.check_streams(context).await
    }

    async fn publish(&self, events: &[Event]) -> Result<(), PublishError> {
        let (client, context) = self.connection().await?;
        self.connected(client).await?;
        if self.duplicate_window().is_none() {
            // Not checked at start (the server was down then).
            self.check_streams(context).await.map_err(super::retried)?;
        }
        super::within(
            self.timeout,
            events.len(),
            self.publish_all(context, events),
        )
        .await
    }

    fn disconnected(&self) -> Option<String> {
        let (client, _) = self.connection.get()?;
        match client.connection_state() {
            State::Connected => None,
            state => Some(format!(
                "NATS at {} is unreachable ({state:?})",
                self.address
            )),
        }
    }

    fn duplicate_window(&self) -> Option<Duration> {
        *self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_values_cannot_become_wildcards() {
        assert_eq!(token("a b*c>"), "a_b_c_");
        assert_eq!(token(""), "_");
        assert_eq!(token("order-1.x"), "order-1.x");
    }
}
