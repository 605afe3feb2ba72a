//! Upcasters: events read in the shape of their newest version, whatever version
//! they were written in.
//!
//! An upcaster (`[[upcasters]]` in the configuration) turns the payload of one
//! event type from one version into the next with a SQL expression over the
//! event's columns. It is applied inside the read, in SQL, by a layer over the
//! fenced reads of the log ([`Upcasters::layer`]), so that every path sees the
//! same event: the decoded [`super::Event`] of a Rust projector (and the events
//! the per-stream order repair delivers ahead), the `batch` relation of a set
//! fold, the `event` relation of a SQL projection's handlers. The stored rows
//! are never rewritten.
//!
//! Each upcaster moves one version up (`to_version = from_version + 1`), so a
//! type's upcasters form one chain with no gap, and an event of any version the
//! chain covers reads as its last version. A version that was never written
//! still needs its step (`payload = "payload"`): that keeps "which version does
//! this event read as" a question with one answer.
//!
//! The layer is one subquery per step of the longest chain, each fenced with
//! `OFFSET 0` so that a statement that reads `payload` twice computes it once,
//! and each holding the step of every type at that depth. With no upcaster of
//! the event types a projector consumes, there is no layer: its statements are
//! exactly what they were without upcasters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

use super::EventFilter;
pub use crate::config::Upcaster;

/// The `CASE` condition of `u`: the event is of its type and version.
fn matches(u: &Upcaster) -> String {
    format!(
        "u.event_type = {} AND u.event_version = {}",
        literal(&u.event_type),
        u.from_version
    )
}

/// A short hash of what `u` does, for fingerprints.
fn digest(u: &Upcaster) -> String {
    let text = format!(
        "{}\n{}\n{}\n{}",
        u.event_type,
        u.from_version,
        u.to_version,
        u.payload.trim()
    );
    let digest = Sha256::digest(text.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The columns of `events` a layer carries until it has learnt the table's own
/// ([`Upcasters::learn_columns`]): pgfold's schema (the article's, plus `tx_id`).
const COLUMNS: [&str; 10] = [
    "id",
    "tx_id",
    "stream_id",
    "stream_type",
    "event_type",
    "event_version",
    "payload",
    "metadata",
    "occurred_at",
    "sequence",
];

/// The columns of `events`, quoted, in the table's order: what a layer carries,
/// so that a column the application added to `events` reads through it too.
pub const COLUMNS_SQL: &str = "SELECT quote_ident(attname) FROM pg_attribute
  WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

/// A checked set of upcasters, sorted so that each type's chain applies in order.
/// Cheap to clone. Equal (and hashing equal) when they upcast the same way.
#[derive(Debug, Clone, Default)]
pub struct Upcasters {
    steps: Arc<[Upcaster]>,
    /// The columns of `events` ([`COLUMNS_SQL`]), once learnt at start; shared
    /// by every set taken from this one.
    columns: Arc<OnceLock<Vec<String>>>,
}

impl PartialEq for Upcasters {
    fn eq(&self, other: &Upcasters) -> bool {
        self.steps == other.steps
    }
}

impl Eq for Upcasters {}

impl std::hash::Hash for Upcasters {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.steps.hash(state);
    }
}

impl Upcasters {
    /// None at all.
    pub fn none() -> Upcasters {
        Upcasters::default()
    }

    /// `list` (the configuration's `[[upcasters]]`), checked (see
    /// [`crate::config::check_upcasters`]) and sorted so that each type's chain
    /// applies in order.
    pub fn new(list: &[Upcaster]) -> anyhow::Result<Upcasters> {
        crate::config::check_upcasters(list)?;
        let mut steps = list.to_vec();
        steps.sort_by(|a, b| (&a.event_type, a.from_version).cmp(&(&b.event_type, b.from_version)));
        Ok(Upcasters {
            steps: steps.into(),
            columns: Arc::default(),
        })
    }

    /// `steps`, sharing what this set has learnt of `events`.
    fn with_steps(&self, steps: Arc<[Upcaster]>) -> Upcasters {
        Upcasters {
            steps,
            columns: self.columns.clone(),
        }
    }

    /// Records the columns of `events` (the rows of [`COLUMNS_SQL`]), read at
    /// start: from then on a layer carries every one of them, not only pgfold's.
    /// A table without `payload` or `event_version` is not one pgfold reads, and
    /// is ignored.
    pub fn learn_columns(&self, columns: Vec<String>) {
        if ["payload", "event_version"]
            .iter()
            .all(|c| columns.iter().any(|k| k == c))
        {
            let _ = self.columns.set(columns);
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The upcasters, each type's chain in order.
    pub fn iter(&self) -> impl Iterator<Item = &Upcaster> {
        self.steps.iter()
    }

    /// Those of the event types `filter` passes: what a projector with that
    /// filter reads through.
    pub fn consumed_by(&self, filter: &EventFilter) -> Upcasters {
        let passes = |u: &Upcaster| {
            filter
                .event_types
                .as_ref()
                .is_none_or(|types| types.contains(&u.event_type))
        };
        if self.steps.iter().all(passes) {
            return self.clone();
        }
        self.with_steps(self.steps.iter().filter(|u| passes(u)).cloned().collect())
    }

    /// `upcaster` alone, as a set (to check its expression on its own).
    pub fn only(&self, upcaster: &Upcaster) -> Upcasters {
        self.with_steps(Arc::new([upcaster.clone()]))
    }

    /// `source`, a `FROM` item with the columns of `events`, read through the
    /// upcasters: a parenthesised subquery with the same columns (all of
    /// `events`' once learnt, see [`Upcasters::learn_columns`]),
    /// each event's `payload` and `event_version` those of the last version of
    /// its type's chain. `source` itself when there are no upcasters.
    ///
    /// `source` is left as it is: whatever fences it holds keep the read of the
    /// log on its index, and the layer's `CASE`s are computed above them.
    pub fn layer(&self, source: &str) -> String {
        if self.steps.is_empty() {
            return source.to_string();
        }
        // Depth k holds the k-th step of every chain.
        let mut depths: Vec<Vec<&Upcaster>> = Vec::new();
        let mut at = 0;
        let mut previous: Option<&str> = None;
        for u in self.steps.iter() {
            at = match previous {
                Some(t) if t == u.event_type => at + 1,
                _ => 0,
            };
            previous = Some(&u.event_type);
            if depths.len() <= at {
                depths.push(Vec::new());
            }
            depths[at].push(u);
        }
        let mut sql = source.to_string();
        for steps in depths {
            let mut version = String::from("CASE");
            let mut payload = String::from("CASE");
            for u in &steps {
                let _ = write!(version, " WHEN {} THEN {}", matches(u), u.to_version);
                let _ = write!(payload, " WHEN {} THEN ({}\n)", matches(u), u.payload);
            }
            version.push_str(" ELSE u.event_version END");
            payload.push_str(" ELSE u.payload END");
            let columns: Vec<String> = self
                .columns()
                .map(|c| match c {
                    "event_version" => format!("{version} AS event_version"),
                    "payload" => format!("{payload} AS payload"),
                    c => format!("u.{c}"),
                })
                .collect();
            sql = format!(
                "(SELECT {} FROM {sql} u OFFSET 0)",
                columns.join(",\n        ")
            );
        }
        sql
    }

    /// A statement that reads event `$1` through the upcasters: it fails where
    /// a batch that holds the event fails to read it.
    pub fn probe(&self) -> String {
        format!(
            "SELECT u.payload, u.event_version FROM {} u",
            self.layer("(SELECT * FROM events x WHERE x.id = $1::bigint)")
        )
    }

    /// The columns a layer carries: those of `events` once learnt, else pgfold's.
    fn columns(&self) -> impl Iterator<Item = &str> {
        let learnt = self.columns.get().map(|c| c.iter().map(String::as_str));
        let fixed = learnt.is_none().then(|| COLUMNS.iter().copied());
        learnt
            .into_iter()
            .flatten()
            .chain(fixed.into_iter().flatten())
    }

    /// `base` (a projector's own fingerprint) with these upcasters: `base` when
    /// there are none, so that a projector no upcaster concerns keeps the
    /// fingerprint its tables were built with.
    pub fn fingerprint(&self, base: &str) -> String {
        if self.steps.is_empty() {
            return base.to_string();
        }
        let list: Vec<String> = self
            .steps
            .iter()
            .map(|u| format!("{} #{}", u.label(), digest(u)))
            .collect();
        format!("{base}{MARK}{}]", list.join(", "))
    }
}

/// What separates a projector's own fingerprint from its upcasters'.
const MARK: &str = " upcasters[";

/// Which upcasters differ between two fingerprints ([`Upcasters::fingerprint`]),
/// for the reason of a rebuild: `upcaster OrderPaid 1->2 added`. `None` when the
/// projector's own definition changed too, or the upcasters did not.
pub fn changed_upcasters(stored: &str, current: &str) -> Option<String> {
    let split = |f: &str| -> (String, BTreeMap<String, String>) {
        let Some((base, rest)) = f.split_once(MARK) else {
            return (f.to_string(), BTreeMap::new());
        };
        let list = rest
            .trim_end_matches(']')
            .split(", ")
            .filter_map(|u| u.rsplit_once(" #"))
            .map(|(label, hash)| (label.to_string(), hash.to_string()))
            .collect();
        (base.to_string(), list)
    };
    let (old_base, old) = split(stored);
    let (new_base, new) = split(current);
    if old_base != new_base || old == new {
        return None;
    }
    let mut what = Vec::new();
    for (label, hash) in &new {
        match old.get(label) {
            None => what.push(format!("upcaster {label} added")),
            Some(h) if h != hash => what.push(format!("upcaster {label} changed")),
            Some(_) => {}
        }
    }
    for label in old.keys().filter(|l| !new.contains_key(*l)) {
        what.push(format!("upcaster {label} removed"));
    }
    Some(what.join(", "))
}

/// `text` as a SQL string literal, right whatever `standard_conforming_strings`
/// says (libpq's `PQescapeLiteral`): quotes doubled, and with a backslash, an
/// `E''` literal with backslashes doubled.
fn literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(event_type: &str, from: i32, payload: &str) -> Upcaster {
        Upcaster::new(event_type, from, from + 1, payload)
    }

    #[test]
    fn chains_are_sorted() {
        let ok = Upcasters::new(&[
            up("OrderPaid", 2, "payload"),
            up("A", 1, "payload"),
            up("OrderPaid", 1, "payload"),
        ])
        .unwrap();
        let labels: Vec<String> = ok.iter().map(Upcaster::label).collect();
        assert_eq!(labels, ["A 1->2", "OrderPaid 1->2", "OrderPaid 2->3"]);
    }

    #[test]
    fn no_upcaster_leaves_the_source_and_fingerprint_alone() {
        let none = Upcasters::none();
        assert_eq!(none.layer("events"), "events");
        assert_eq!(none.fingerprint("v1"), "v1");
        let some = Upcasters::new(&[up("OrderPaid", 1, "payload")]).unwrap();
        let other = EventFilter::event_types(&["OrderShipped"]);
        assert!(some.consumed_by(&other).is_empty());
        assert!(!some.consumed_by(&EventFilter::all()).is_empty());
    }

    #[test]
    fn each_depth_of_the_chains_is_one_fenced_step() {
        let u = Upcasters::new(&[
            up("P", 1, "payload || '{\"a\": 1}'"),
            up("P", 2, "payload - 'a'"),
            up("Q's", 7, "payload"),
        ])
        .unwrap();
        let sql = u.layer("events");
        assert_eq!(sql.matches("OFFSET 0").count(), 2, "{sql}");
        assert!(sql.contains("u.event_type = 'Q''s' AND u.event_version = 7"));
        assert_eq!(literal("a\\'b"), "E'a\\\\''b'");
    }

    #[test]
    fn the_rebuild_reason_names_the_upcaster() {
        let one = Upcasters::new(&[up("P", 1, "payload")]).unwrap();
        let two = Upcasters::new(&[up("P", 1, "payload - 'x'"), up("P", 2, "payload")]).unwrap();
        assert_eq!(
            changed_upcasters("v1", &one.fingerprint("v1")).as_deref(),
            Some("upcaster P 1->2 added")
        );
        assert_eq!(
            changed_upcasters(&one.fingerprint("v1"), &two.fingerprint("v1")).as_deref(),
            Some("upcaster P 1->2 changed, upcaster P 2->3 added")
        );
        assert_eq!(
            changed_upcasters(&one.fingerprint("v1"), "v1").as_deref(),
            Some("upcaster P 1->2 removed")
        );
        assert_eq!(changed_upcasters("v1", &one.fingerprint("v2")), None);
    }
}
