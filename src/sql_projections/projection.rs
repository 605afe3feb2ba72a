//! A projection file as a projector: the same contract, batch path and
//! guarantees as a built-in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use async_trait::async_trait;
use futures_util::future::join_all;
use sha2::{Digest, Sha256};

use super::file::{Definition, Order};
use super::scan;
use crate::db;
use crate::feed::{EventFilter, EventRange, Position, Upcasters};
use crate::projector::{
    with_first, Event, EventFold, Fold, Projector, ProjectorError, SetBatch, SetFold, Tx,
};

/// One projection file, loaded.
pub struct SqlProjection {
    def: Definition,
    filter: EventFilter,
    fingerprint: String,
    /// Whether `apply` reports how many events it consumed (a column named
    /// [`EVENTS_COLUMN`]): learnt from its first batch, since a statement's
    /// columns do not change. Until then, and if it does not, the daemon counts.
    reports_count: OnceLock<bool>,
}

/// The column through which an `apply` statement may say how many events of the
/// batch it consumed, sparing the daemon a second read of the batch to count them.
pub const EVENTS_COLUMN: &str = "pgfold_events";

/// The one-row relation an `event` handler reads, through the upcasters the
/// projector's events are read through.
fn event_cte(upcasters: &Upcasters) -> String {
    format!(
        "event AS {}",
        upcasters.layer("(SELECT e.* FROM events e WHERE e.id = $1::bigint)")
    )
}

/// What a statement over `batch` or `event` may start with.
const READS_OR_WRITES: [&str; 7] = [
    "WITH", "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES",
];

impl SqlProjection {
    pub(super) fn new(def: Definition) -> anyhow::Result<SqlProjection> {
        let shown = def.path.display().to_string();
        let one_statement = |what: &str, sql: &str| -> anyhow::Result<()> {
            let parts = scan::statements(sql);
            if parts.len() > 1 {
                anyhow::bail!(
                    "{shown}: {what}: must be one statement, found {}",
                    parts.len()
                );
            }
            let word = scan::first_word(sql);
            if !READS_OR_WRITES.contains(&word.as_str()) {
                anyhow::bail!(
                    "{shown}: {what}: must be a SELECT, INSERT, UPDATE, DELETE or MERGE (optionally after WITH), found {}",
                    if word.is_empty() { "nothing".to_string() } else { word }
                );
            }
            Ok(())
        };
        if let Some(apply) = &def.apply {
            one_statement("apply", apply)?;
        }
        for (event_type, sql) in &def.handlers {
            one_statement(&format!("handlers.{event_type}"), sql)?;
        }
        if def.tables.is_empty() {
            anyhow::bail!("{shown}: tables is missing: name the tables the projection writes, which --replay empties");
        }
        let filter = EventFilter {
            event_types: def.event_types.clone(),
            stream_types: def.stream_types.clone(),
            ..EventFilter::default()
        };
        let fingerprint = fingerprint(&def);
        Ok(SqlProjection {
            def,
            filter,
            fingerprint,
            reports_count: OnceLock::new(),
        })
    }

    /// `path: what: message`, the one line every error of this file gets.
    fn error(&self, what: &str, e: &tokio_postgres::Error) -> ProjectorError {
        ProjectorError::Other(anyhow::anyhow!(
            "{}: {what}: {}",
            self.def.path.display(),
            crate::util::one_line(&db::error_text(e))
        ))
    }
}

/// A hash of what the projection's tables are built from: its statements and
/// filters, not the file's comments or layout.
fn fingerprint(def: &Definition) -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        def.order,
        def.event_types,
        def.stream_types,
        def.tables,
        def.setup,
        def.apply,
        def.handlers
    );
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sql:{hex}")
}

#[async_trait]
impl Projector for SqlProjection {
    fn name(&self) -> &str {
        &self.def.name
    }

    fn filter(&self) -> EventFilter {
        self.filter.clone()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn fold(&self) -> Fold<'_> {
        match self.def.order {
            Order::Set => Fold::Set(self),
            Order::Stream => Fold::StreamSet(self),
            Order::Event => Fold::Events(self),
        }
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        if let Some(setup) = &self.def.setup {
            tx.batch_execute(setup)
                .await
                .map_err(|e| self.error("setup", &e))?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        // The names are resolved as SQL resolves them (search_path, case folding)
        // and quoted by regclass: nothing from the file is spliced into SQL.
        let row = tx
            .query_one(
                "SELECT 'TRUNCATE ' || string_agg(to_regclass(t)::text, ', ')
                   FROM unnest($1::text[]) t",
                &[&self.def.tables],
            )
            .await?;
        let truncate: Option<String> = row.get(0);
        if let Some(sql) = truncate {
            tx.batch_execute(&sql)
                .await
                .map_err(|e| self.error("tables", &e))?;
        }
        Ok(())
    }

    async fn validate(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        let shown = self.def.path.display();
        let missing: Vec<String> = tx
            .query(
                "SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NULL",
                &[&self.def.tables],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !missing.is_empty() {
            return Err(ProjectorError::Other(anyhow::anyhow!(
                "{shown}: tables: {} does not exist after setup",
                missing.join(", ")
            )));
        }
        // Parsed, analysed and planned as the daemon will send them, through
        // the upcasters; EXPLAIN runs nothing.
        let filter = EventFilter {
            upcasters: tx.upcasters(),
            ..self.filter.clone()
        };
        if let Some(apply) = &self.def.apply {
            let range = EventRange::new(Position::START, Position::START, vec![], vec![], &filter);
            let mut ranges = vec![range.clone()];
            if self.def.order == Order::Stream {
                ranges.push(range.streams(None, None));
            }
            for range in ranges {
                let sql = format!("EXPLAIN {}", SetBatch::statement_over(&range, apply, 0));
                tx.query(&sql, &range.params())
                    .await
                    .map_err(|e| self.error("apply", &e))?;
            }
        }
        let cte = event_cte(&filter.upcasters);
        for (event_type, sql) in &self.def.handlers {
            tx.query(&format!("EXPLAIN {}", with_first(&cte, sql)), &[&0i64])
                .await
                .map_err(|e| self.error(&format!("handlers.{event_type}"), &e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl SetFold for SqlProjection {
    async fn apply(&self, tx: &Tx<'_>, batch: &SetBatch<'_>) -> Result<(), ProjectorError> {
        let apply = self.def.apply.as_deref().unwrap_or_default();
        if self.reports_count.get() == Some(&true) {
            let rows = batch.query(tx, apply, &[]).await?;
            batch.counted(reported(&rows).unwrap_or_default());
            return Ok(());
        }
        // The count rides in the same round trip, right behind the statement.
        let (applied, count) = tokio::join!(
            batch.query(tx, apply, &[]),
            batch.query_one(tx, "SELECT count(*) FROM batch", &[]),
        );
        // The statement's own error, not the count's "transaction is aborted".
        let rows = applied?;
        let _ = self.reports_count.set(reported(&rows).is_some());
        batch.counted(count?.get::<_, i64>(0) as u64);
        Ok(())
    }
}

#[async_trait]
impl EventFold for SqlProjection {
    async fn apply(&self, tx: &Tx<'_>, events: &[Event]) -> Result<(), ProjectorError> {
        // Every event's statement is sent before the first answer is awaited: one
        // round trip for the batch, executed in order by the server. That order
        // holds only if no statement needs a round trip of its own first (to be
        // prepared): ready each handler the batch uses beforehand.
        let mut used: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        used.sort_unstable();
        used.dedup();
        let cte = event_cte(&tx.upcasters());
        let handlers: BTreeMap<&str, String> = used
            .iter()
            .filter_map(|t| Some((*t, with_first(&cte, self.def.handlers.get(*t)?))))
            .collect();
        let readied = handlers.values().map(|sql| tx.prepare(sql, &[&0i64]));
        for result in join_all(readied).await {
            result?;
        }
        let handlers = &handlers;
        let sent = events.iter().map(|e| async move {
            let sql = handlers.get(e.event_type.as_str()).ok_or_else(|| {
                ProjectorError::event(e, format!("no handler for event type {}", e.event_type))
            })?;
            tx.execute(sql, &[&e.id])
                .await
                .map_err(|err| (e, err))
                .map_err(|(e, err)| {
                    if db::is_transient(&err) || names_an_event(&err) {
                        ProjectorError::Database(err)
                    } else {
                        ProjectorError::event(e, crate::util::one_line(&db::error_text(&err)))
                    }
                })
        });
        for result in join_all(sent).await {
            result?;
        }
        Ok(())
    }
}

/// The count a statement reported in its one row's [`EVENTS_COLUMN`], if it did.
fn reported(rows: &[tokio_postgres::Row]) -> Option<u64> {
    let [row] = rows else { return None };
    let column = row
        .columns()
        .iter()
        .position(|c| c.name() == EVENTS_COLUMN)?;
    let events: Option<i64> = row.try_get(column).ok()?;
    Some(events.unwrap_or_default().max(0) as u64)
}

/// Whether the error is `pgfold.bad_event`'s, which names its event itself.
fn names_an_event(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.message().starts_with("event ") && d.message().contains(": "))
}
