//! The projection file: its format, and the checks that need no database.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::scan;
use crate::projector::valid_name;
use crate::util::one_line;

/// How a projection's batches arrive (`order` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// `apply` over `batch`, a set in no order.
    Set,
    /// `apply` over `batch`, each stream's events following what is applied.
    Stream,
    /// One handler per event type, over the one-row relation `event`.
    Event,
}

/// A projection file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    order: Order,
    event_types: Option<Vec<String>>,
    stream_types: Option<Vec<String>>,
    #[serde(default)]
    tables: Vec<String>,
    setup: Option<String>,
    apply: Option<String>,
    handlers: Option<BTreeMap<String, String>>,
}

/// A projection file, read and checked as far as it can be without a database.
#[derive(Debug, Clone)]
pub struct Definition {
    /// The file's name without `.toml`.
    pub name: String,
    /// Where it was read from, for errors.
    pub path: PathBuf,
    pub order: Order,
    pub event_types: Option<Vec<String>>,
    pub stream_types: Option<Vec<String>>,
    pub tables: Vec<String>,
    pub setup: Option<String>,
    /// `set` and `stream`: the statement over `batch`.
    pub apply: Option<String>,
    /// `event`: event type → statement over `event`.
    pub handlers: BTreeMap<String, String>,
}

/// Reads and checks one file. Errors are one line naming the file.
pub fn read(path: &Path) -> anyhow::Result<Definition> {
    let shown = path.display();
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    if !valid_name(&name) {
        anyhow::bail!(
            "{shown}: the file name must be lowercase letters, digits and _ (it is the projection's name)"
        );
    }
    let mut text = String::new();
    super::trust::open(path)?
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("{shown}: cannot read it: {e}"))?;
    let raw: Raw =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{shown}: {}", one_line(e.message())))?;
    let nonempty = |what: &str, s: &Option<String>| -> anyhow::Result<()> {
        if s.as_deref().is_some_and(|s| s.trim().is_empty()) {
            anyhow::bail!("{shown}: {what} is empty");
        }
        Ok(())
    };
    nonempty("setup", &raw.setup)?;
    if let Some(setup) = &raw.setup {
        for statement in scan::statements(setup) {
            if let Some(word) = scan::transaction_control(statement) {
                anyhow::bail!(
                    "{shown}: setup: {word} is not allowed: setup runs inside pgfold's transaction, which commits it"
                );
            }
        }
    }
    nonempty("apply", &raw.apply)?;
    for (key, list) in [
        ("event_types", &raw.event_types),
        ("stream_types", &raw.stream_types),
    ] {
        if list.as_ref().is_some_and(|l| l.is_empty()) {
            anyhow::bail!("{shown}: {key} is empty: leave it out to take every type");
        }
    }
    for table in &raw.tables {
        if table.trim().is_empty() {
            anyhow::bail!("{shown}: tables has an empty name");
        }
    }
    let handlers = match raw.order {
        Order::Set | Order::Stream => {
            if raw.apply.is_none() {
                anyhow::bail!("{shown}: order = \"{}\" needs apply", order_word(raw.order));
            }
            if raw.handlers.is_some() {
                anyhow::bail!(
                    "{shown}: [handlers] is for order = \"event\"; order = \"{}\" takes apply",
                    order_word(raw.order)
                );
            }
            BTreeMap::new()
        }
        Order::Event => {
            if raw.apply.is_some() {
                anyhow::bail!("{shown}: order = \"event\" takes [handlers], one statement per event type, not apply");
            }
            if raw.event_types.is_some() {
                anyhow::bail!("{shown}: order = \"event\" consumes the event types of its [handlers]; leave event_types out");
            }
            let handlers = raw.handlers.unwrap_or_default();
            if handlers.is_empty() {
                anyhow::bail!(
                    "{shown}: order = \"event\" needs [handlers], one statement per event type"
                );
            }
            for (event_type, sql) in &handlers {
                if sql.trim().is_empty() {
                    anyhow::bail!("{shown}: handlers.{event_type} is empty");
                }
            }
            handlers
        }
    };
    let event_types = match raw.order {
        Order::Event => Some(handlers.keys().cloned().collect()),
        Order::Set | Order::Stream => raw.event_types.map(dedup),
    };
    Ok(Definition {
        name,
        path: path.to_path_buf(),
        order: raw.order,
        event_types,
        stream_types: raw.stream_types.map(dedup),
        tables: raw.tables,
        setup: raw.setup,
        apply: raw.apply,
        handlers,
    })
}

fn order_word(order: Order) -> &'static str {
    match order {
        Order::Set => "set",
        Order::Stream => "stream",
        Order::Event => "event",
    }
}

fn dedup(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list.dedup();
    list
}
