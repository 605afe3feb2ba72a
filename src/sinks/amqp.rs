//! RabbitMQ (AMQP 0-9-1).

use async_trait::async_trait;

use super::{PublishError, Publisher, Redactor, Subject};
use crate::config::SinkSettings;
use crate::projector::Event;

pub(super) struct Amqp {}

impl Amqp {
    pub(super) fn new(
        _settings: &SinkSettings,
        _redactor: &Redactor,
        _subject: Subject,
    ) -> anyhow::Result<Amqp> {
        anyhow::bail!("AMQP is not built yet")
    }
}

#[async_trait]
impl Publisher for Amqp {
    async fn check(&self) -> Result<(), PublishError> {
        Ok(())
    }
    async fn publish(&self, _events: &[Event]) -> Result<(), PublishError> {
        Ok(())
    }
}
