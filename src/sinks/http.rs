//! A webhook: each batch is one `POST` of `{"events": [...]}` in position order.
//! A 2xx answer acknowledges the whole batch; 408, 429, 5xx, a timeout or no
//! connection are the receiver being unavailable, retried with backoff; any
//! other answer fails the batch's first event, for `on_error`.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::Serialize;

use super::{Body, PublishError, Publisher, Redactor};
use crate::config::SinkSettings;
use crate::projector::Event;

pub(super) struct Webhook {
    client: reqwest::Client,
    url: String,
    redactor: Redactor,
}

#[derive(Serialize)]
struct Batch<'a> {
    events: Vec<Body<'a>>,
}

/// At most this much of an error answer's body is quoted.
const QUOTED_BODY_CHARS: usize = 300;

impl Webhook {
    pub(super) fn new(settings: &SinkSettings, redactor: &Redactor) -> anyhow::Result<Webhook> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(super::tls_config(settings.root_certificate.as_deref())?)
            .timeout(settings.timeout())
            .connect_timeout(settings.timeout().min(Duration::from_secs(10)))
            .user_agent(concat!("pgfold/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Webhook {
            client,
            url: settings.url.clone(),
            redactor: redactor.clone(),
        })
    }
}

#[async_trait]
impl Publisher for Webhook {
    /// Nothing to check: a webhook has no setup pgfold could look at.
    async fn check(&self) -> Result<(), PublishError> {
        Ok(())
    }

    async fn publish(&self, events: &[Event]) -> Result<(), PublishError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let batch = Batch {
            events: events.iter().map(Body::of).collect(),
        };
        let body = serde_json::to_vec(&batch).expect("events serialize to JSON");
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                PublishError::Unavailable(self.redactor.redact(&e.without_url().to_string()))
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let quoted: String = crate::util::one_line(&text)
            .chars()
            .take(QUOTED_BODY_CHARS)
            .collect();
        let answer = format!("the webhook answered {status}: {quoted}");
        if retried(status) {
            Err(PublishError::Unavailable(answer))
        } else {
            Err(PublishError::Event {
                event_id: first.id,
                message: answer,
            })
        }
    }
}

/// The answers that mean "not now" rather than "not this".
fn retried(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status.is_informational()
        || status.is_redirection()
}
