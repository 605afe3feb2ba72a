//! A projector read through upcasters: the same projector, whose filter carries
//! the upcasters of the event types it consumes (so that every read of its
//! events applies them, see `feed::upcast`) and whose fingerprint names them (so
//! that adding or changing one rebuilds it).

use std::sync::Arc;

use async_trait::async_trait;

use super::{Event, EventFilter, EventFold, Fold, Projector, ProjectorError, Tx};
use crate::db;
use crate::feed::{Upcasters, COLUMNS_SQL};
use crate::util::one_line;

/// `inner`, whose events are read through `upcasters` (never empty: a
/// projector no upcaster concerns is left unwrapped, so nothing about it changes).
pub(super) struct Upcast {
    pub(super) inner: Arc<dyn Projector>,
    pub(super) upcasters: Upcasters,
}

#[async_trait]
impl Projector for Upcast {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn filter(&self) -> EventFilter {
        EventFilter {
            upcasters: self.upcasters.clone(),
            ..self.inner.filter()
        }
    }

    fn version(&self) -> u32 {
        self.inner.version()
    }

    fn fingerprint(&self) -> String {
        self.upcasters.fingerprint(&self.inner.fingerprint())
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.unavailable()
    }

    fn has_tables(&self) -> bool {
        self.inner.has_tables()
    }

    fn fold(&self) -> Fold<'_> {
        match self.inner.fold() {
            // Its statements may read `events` by id (a SQL projection's `event`):
            // the transaction tells them which upcasters to read through.
            Fold::Events(_) => Fold::Events(self),
            // A set fold reads its batch through the range, which carries them.
            set => set,
        }
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        self.inner.setup(&tx.with_upcasters(&self.upcasters)).await
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        self.inner.reset(&tx.with_upcasters(&self.upcasters)).await
    }

    /// Each upcaster's expression is planned on its own, as it is read (so that
    /// an error names it), then the projector's statements with them.
    async fn validate(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        // The columns the application keeps on `events` are carried through.
        let columns = tx.query(COLUMNS_SQL, &[]).await?;
        self.upcasters
            .learn_columns(columns.iter().map(|r| r.get(0)).collect());
        for upcaster in self.upcasters.iter() {
            let sql = format!(
                "EXPLAIN SELECT * FROM {} e",
                self.upcasters.only(upcaster).layer("events")
            );
            tx.query(&sql, &[]).await.map_err(|e| {
                ProjectorError::Other(anyhow::anyhow!(
                    "[[upcasters]] {}: payload: {}",
                    upcaster.label(),
                    one_line(&db::error_text(&e))
                ))
            })?;
        }
        self.inner
            .validate(&tx.with_upcasters(&self.upcasters))
            .await
    }
}

#[async_trait]
impl EventFold for Upcast {
    async fn apply(&self, tx: &Tx<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        let Fold::Events(fold) = self.inner.fold() else {
            return Err(ProjectorError::Other(anyhow::anyhow!(
                "projector {} changed how it folds while running",
                self.name()
            )));
        };
        fold.apply(&tx.with_upcasters(&self.upcasters), events)
            .await
    }
}
