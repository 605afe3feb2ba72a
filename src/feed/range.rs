//! The events of one set batch, as a relation SQL can read.

use tokio_postgres::types::ToSql;

use super::reader::in_range_from;
use super::{EventFilter, Position, Upcasters};

/// The events of one set batch: those whose position is in `(after, upto]`, less
/// those delivered ahead by an earlier batch, plus those this batch delivers ahead
/// (a stream-ordered batch's earlier events of a stream whose position lies beyond
/// `upto`; see `src/feed/order.rs`), and of those only what the projector's filter
/// passes. A part of a range ([`EventRange::streams`]) holds only the events of
/// the streams whose id is in `[from, before)`.
#[derive(Debug, Clone)]
pub struct EventRange {
    after: Position,
    upto: Position,
    after_tx: String,
    upto_tx: String,
    skip: Vec<i64>,
    ahead: Vec<i64>,
    event_types: Option<Vec<String>>,
    stream_types: Option<Vec<String>>,
    /// A part's stream ids, `[from, before)`; `None` on either side: unbounded.
    part: Option<(Option<String>, Option<String>)>,
    /// The events are an archived segment's, staged in [`STAGED_TABLE`], not a
    /// range of the table.
    staged: bool,
    /// What the batch's events are read through (see `feed::upcast`).
    upcasters: Upcasters,
}

/// The temporary table a replay stages an archived segment's events in, with the
/// columns of `events` (see `worker::archived`).
pub const STAGED_TABLE: &str = "pg_temp.pgfold_archive_batch";

/// What gives [`STAGED_TABLE`] the primary key of `events`, so that a
/// statement's lookups by id in [`EventRange::log`] go through an index on both
/// sides of the union, as they do in `events` alone. Built once the events are
/// staged (cheaper than kept up row by row), and only for a fold that looks
/// events up (see `SetBatch`): it costs a tenth of what staging does.
///
/// No other index and no statistics: a statement over the staged events reads
/// them all, the planner takes their number from the table's size, and the
/// `(stream_id, sequence)` index and `ANALYZE` together cost a replay of half a
/// million archived events more than a second for lookups no fold needed.
pub fn key_staged() -> String {
    format!("ALTER TABLE {STAGED_TABLE} ADD PRIMARY KEY (id)")
}

/// The events delivered ahead, by id (`$ahead`), through the primary key. The
/// array is nearly always empty, and the test of its length is a one-time
/// filter: an empty array reads nothing at all, whatever plan the statement
/// holds (a generic plan made while the log was a few pages long read all of it
/// here, on every live batch, to find nothing; see `feed::plan_mode`).
fn delivered_ahead(ahead: usize) -> String {
    format!(
        "(SELECT e.* FROM events e
           WHERE cardinality(${ahead}::bigint[]) > 0 AND e.id = ANY(${ahead}::bigint[])
          OFFSET 0)"
    )
}

/// How many parameters [`EventRange::source`] takes.
pub const RANGE_PARAMS: usize = 8;

/// How many parameters [`EventRange::source_in_streams`] takes.
pub const PART_PARAMS: usize = RANGE_PARAMS + 2;

impl EventRange {
    /// The daemon builds the range of each batch; public so that tests can
    /// explain the statements a projector runs over one.
    pub fn new(
        after: Position,
        upto: Position,
        skip: Vec<i64>,
        ahead: Vec<i64>,
        filter: &EventFilter,
    ) -> EventRange {
        EventRange {
            after,
            upto,
            after_tx: after.tx_text(),
            upto_tx: upto.tx_text(),
            skip,
            ahead,
            event_types: filter.event_types.clone(),
            stream_types: filter.stream_types.clone(),
            part: None,
            upcasters: filter.upcasters.clone(),
            staged: false,
        }
    }

    /// The events staged in [`STAGED_TABLE`] (archived segments'), staged
    /// already cut to `filter`, read through its upcasters: what a set fold reads
    /// as `batch` while a replay reads the archive.
    pub fn staged(filter: &EventFilter) -> EventRange {
        EventRange {
            staged: true,
            ..EventRange::new(
                Position::START,
                Position::START,
                Vec::new(),
                Vec::new(),
                filter,
            )
        }
    }

    /// The part of this range that holds the streams whose id is in `[from,
    /// before)` (`None`: unbounded on that side), compared in the column's
    /// collation, the order of the `(stream_id, sequence)` index. A stream's
    /// events in the range, those delivered ahead included, all fall in the same
    /// part, so parts can be folded one after another (see `worker::parts`).
    pub fn streams(&self, from: Option<String>, before: Option<String>) -> EventRange {
        EventRange {
            part: Some((from, before)),
            ..self.clone()
        }
    }

    /// Whether this is a part of a range ([`EventRange::streams`]), to be read
    /// with [`EventRange::source_in_streams`].
    pub fn is_part(&self) -> bool {
        self.part.is_some()
    }

    /// The position the batch starts after.
    pub fn after(&self) -> Position {
        self.after
    }

    /// The position the batch ends at.
    pub fn upto(&self) -> Position {
        self.upto
    }

    /// What the batch's events are read through: a statement that reads
    /// `events` itself reads it through [`Upcasters::layer`] to see them as
    /// `batch` shows them.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// The ids of the events delivered ahead with this batch.
    pub fn ahead(&self) -> &[i64] {
        &self.ahead
    }

    /// The batch's events as a `FROM` item with the columns of `events`, with
    /// [`RANGE_PARAMS`] placeholders numbered from `$first`: bind
    /// [`EventRange::params`] there.
    ///
    /// The filter stays outside the reads of the log: each branch is fenced with
    /// `OFFSET 0`, so the range is read through the position index (and the ids
    /// delivered ahead through the primary key), whatever the table's statistics
    /// and whatever other indexes the application keeps on `events` (see
    /// `src/feed/reader.rs`).
    pub fn source(first: usize) -> String {
        let (skip, ahead, types, streams) = (first + 4, first + 5, first + 6, first + 7);
        // Two branches rather than one condition with OR: each keeps its own index
        // (the position index for the range, the primary key for the few ahead).
        format!(
            "(SELECT e.* FROM
               ((SELECT e.* FROM events e
                  WHERE {range} AND e.id <> ALL(${skip}::bigint[])
                 OFFSET 0)
                UNION ALL
                {ahead_branch}) e
              WHERE (${types}::text[] IS NULL OR e.event_type = ANY(${types}::text[]))
                AND (${streams}::text[] IS NULL OR e.stream_type = ANY(${streams}::text[])))",
            range = in_range_from("e", first),
            ahead_branch = delivered_ahead(ahead),
        )
    }

    /// [`EventRange::source`] for a part of the range ([`EventRange::streams`]),
    /// with [`PART_PARAMS`] placeholders: the part's bounds on `stream_id` are read
    /// inside the fence with the range, so that the planner can read a part of a
    /// long range through the `(stream_id, sequence)` index instead of the whole
    /// range through the position index; they are tested on the events delivered
    /// ahead too. A part's statement runs with custom plans (`worker::parts`), in
    /// which an unbounded side's `IS NULL` folds away.
    pub fn source_in_streams(first: usize) -> String {
        let (skip, ahead, types, streams) = (first + 4, first + 5, first + 6, first + 7);
        let (from, before) = (first + 8, first + 9);
        let keys = format!(
            "(${from}::text IS NULL OR e.stream_id >= ${from}::text)
                  AND (${before}::text IS NULL OR e.stream_id < ${before}::text)"
        );
        format!(
            "(SELECT e.* FROM
               ((SELECT e.* FROM events e
                  WHERE {range} AND {keys} AND e.id <> ALL(${skip}::bigint[])
                 OFFSET 0)
                UNION ALL
                {ahead_branch}) e
              WHERE (${types}::text[] IS NULL OR e.event_type = ANY(${types}::text[]))
                AND (${streams}::text[] IS NULL OR e.stream_type = ANY(${streams}::text[]))
                AND {keys})",
            range = in_range_from("e", first),
            ahead_branch = delivered_ahead(ahead),
        )
    }

    /// The source of a staged range ([`EventRange::staged`]): the events in
    /// [`STAGED_TABLE`], all of them. A replay stages only the events the
    /// projector's filter passes (`segment::Keep`), so testing the filter again
    /// would only cost: with no statistics on the staged table, the planner
    /// took the test to keep one event in ten thousand, and planned the fold
    /// for fifty where there were half a million.
    pub fn source_staged() -> String {
        format!("(SELECT e.* FROM {STAGED_TABLE} e)")
    }

    /// The log as a statement over this range looks events up in it by id:
    /// `events`, and while a replay reads archived segments, the staged events
    /// too, which are no longer in `events`. A statement run through
    /// [`SetBatch`] that names them finds them keyed by id ([`key_staged`]);
    /// a lookup by anything else reads all the staged events.
    ///
    /// [`SetBatch`]: crate::projector::SetBatch
    pub fn log(&self) -> String {
        if self.staged {
            format!("(SELECT * FROM {STAGED_TABLE} UNION ALL SELECT * FROM events)")
        } else {
            "events".into()
        }
    }

    /// Whether this is a staged range ([`EventRange::staged`]).
    pub fn is_staged(&self) -> bool {
        self.staged
    }

    /// The source this range is read with: [`EventRange::source`], or for a part
    /// [`EventRange::source_in_streams`], read through the upcasters of the
    /// projector's filter (none: the source as it is); its placeholders numbered
    /// from `$first`. A fold that builds its own statements over
    /// [`SetBatch::range`] reads it with this, since a stream-set batch may come
    /// in parts.
    ///
    /// [`SetBatch::range`]: crate::projector::SetBatch::range
    pub fn source_for(&self, first: usize) -> String {
        let source = if self.staged {
            EventRange::source_staged()
        } else {
            match self.part {
                Some(_) => EventRange::source_in_streams(first),
                None => EventRange::source(first),
            }
        };
        self.upcasters.layer(&source)
    }

    /// The values for the placeholders of [`EventRange::source_for`], in order.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        if self.staged {
            return Vec::new();
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &self.after_tx,
            &self.after.id,
            &self.upto_tx,
            &self.upto.id,
            &self.skip,
            &self.ahead,
            &self.event_types,
            &self.stream_types,
        ];
        if let Some((from, before)) = &self.part {
            params.push(from);
            params.push(before);
        }
        params
    }
}
