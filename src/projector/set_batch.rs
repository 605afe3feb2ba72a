//! A set batch, offered to SQL as the relation `batch`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::Tx;
use crate::db::Params;
use crate::feed::{key_staged, EventRange, PART_PARAMS, STAGED_TABLE};

/// The events of one batch of a [`super::SetFold`], for statements that read them
/// as a relation named `batch`, with the columns of `events`, already cut to the
/// projector's filter:
///
/// ```sql
/// INSERT INTO revenue AS r (day, total)
/// SELECT occurred_at::date, sum((payload->>'amount')::numeric) FROM batch GROUP BY 1
/// ON CONFLICT (day) DO UPDATE SET total = r.total + EXCLUDED.total
/// ```
///
/// Number your own parameters from `$1`: the daemon binds the batch's after them.
/// A statement may start with its own `WITH` (also `WITH RECURSIVE`), use
/// data-modifying CTEs and refer to `batch` more than once; it must not name a
/// CTE `batch` itself.
pub struct SetBatch<'a> {
    range: &'a EventRange,
    counted: OnceLock<u64>,
    /// Whether the staged events have their keys yet (see [`SetBatch::ready`]).
    keyed: AtomicBool,
}

impl<'a> SetBatch<'a> {
    pub(crate) fn new(range: &'a EventRange) -> SetBatch<'a> {
        SetBatch {
            range,
            counted: OnceLock::new(),
            keyed: AtomicBool::new(false),
        }
    }

    /// The statement the daemon sends for `sql`, a statement over `batch` with
    /// `own_params` parameters of its own: public so that its plans can be
    /// checked (`tests/integration/plan_robustness.rs`).
    pub fn statement(sql: &str, own_params: usize) -> String {
        let batch = format!("batch AS {}", EventRange::source(own_params + 1));
        with_first(&batch, sql)
    }

    /// [`SetBatch::statement`] for a batch that is a part of a range, a few
    /// streams of it ([`EventRange::streams`]).
    pub fn statement_in_streams(sql: &str, own_params: usize) -> String {
        let batch = format!("batch AS {}", EventRange::source_in_streams(own_params + 1));
        with_first(&batch, sql)
    }

    /// The statement the daemon sends for `sql` over a batch of `range`:
    /// [`SetBatch::statement`], or [`SetBatch::statement_in_streams`] for a part,
    /// read through the upcasters of the filter the range was made with
    /// ([`EventRange::source_for`]). Public so that its plans can be checked.
    pub fn statement_over(range: &EventRange, sql: &str, own_params: usize) -> String {
        let batch = format!("batch AS {}", range.source_for(own_params + 1));
        with_first(&batch, sql)
    }

    fn statement_for(&self, sql: &str, own_params: usize) -> String {
        SetBatch::statement_over(self.range, sql, own_params)
    }

    /// Before the first statement over archived events that looks events up in
    /// the staged segment ([`EventRange::log`]), gives it its
    /// key ([`key_staged`]); a fold that only reads `batch` never pays for it.
    async fn ready(&self, tx: &Tx<'_>, sql: &str) -> Result<(), tokio_postgres::Error> {
        let table = STAGED_TABLE.trim_start_matches("pg_temp.");
        if self.range.is_staged()
            && sql.contains(table)
            && !self.keyed.swap(true, Ordering::Relaxed)
        {
            tx.batch_execute(&key_staged()).await?;
        }
        Ok(())
    }

    /// Runs `sql` over the batch; how many rows it wrote.
    pub async fn execute(
        &self,
        tx: &Tx<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        self.ready(tx, sql).await?;
        let sql = self.statement_for(sql, params.len());
        tx.execute(&sql, &self.params(params)).await
    }

    /// The rows of `sql` over the batch.
    pub async fn query(
        &self,
        tx: &Tx<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.ready(tx, sql).await?;
        let sql = self.statement_for(sql, params.len());
        tx.query(&sql, &self.params(params)).await
    }

    /// The one row of `sql` over the batch.
    pub async fn query_one(
        &self,
        tx: &Tx<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        self.ready(tx, sql).await?;
        let sql = self.statement_for(sql, params.len());
        tx.query_one(&sql, &self.params(params)).await
    }

    /// Tells the daemon how many events of the batch the fold consumed, when the
    /// fold's statement counts them anyway. Optional: without it the daemon
    /// counts them itself, at the cost of reading the batch once more.
    pub fn counted(&self, events: u64) {
        let _ = self.counted.set(events);
    }

    /// The range the batch covers.
    pub fn range(&self) -> &EventRange {
        self.range
    }

    pub(crate) fn reported_count(&self) -> Option<u64> {
        self.counted.get().copied()
    }

    fn params<'p>(&'p self, own: Params<'p>) -> Vec<&'p (dyn ToSql + Sync)> {
        let mut all = Vec::with_capacity(own.len() + PART_PARAMS);
        all.extend_from_slice(own);
        all.extend(self.range.params());
        all
    }
}

/// `sql` with the common table expression `cte` in front: merged into `sql`'s
/// own leading `WITH` (or `WITH RECURSIVE`) if it has one, since a statement
/// takes only one.
pub(crate) fn with_first(cte: &str, sql: &str) -> String {
    let start = skip_blanks(sql, 0);
    if let Some(after_with) = keyword_at(sql, start, "with") {
        let next = skip_blanks(sql, after_with);
        let (head, rest) = match keyword_at(sql, next, "recursive") {
            Some(after) => ("WITH RECURSIVE", &sql[after..]),
            None => ("WITH", &sql[after_with..]),
        };
        return format!("{}{head} {cte},{rest}", &sql[..start]);
    }
    format!("WITH {cte}\n{sql}")
}

/// The index after whitespace and comments (`-- …`, and `/* … */`, which nest).
fn skip_blanks(sql: &str, mut i: usize) -> usize {
    let b = sql.as_bytes();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            return i;
        }
    }
}

/// If the keyword `word` (lowercase) stands at `i`, the index after it.
fn keyword_at(sql: &str, i: usize, word: &str) -> Option<usize> {
    let end = i + word.len();
    let candidate = sql.get(i..end)?;
    let boundary = sql[end..]
        .chars()
        .next()
        .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'));
    (candidate.eq_ignore_ascii_case(word) && boundary).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::with_first;

    #[test]
    fn a_statement_without_with_gets_one() {
        assert_eq!(
            with_first("batch AS (x)", "SELECT 1 FROM batch"),
            "WITH batch AS (x)\nSELECT 1 FROM batch"
        );
    }

    #[test]
    fn a_leading_with_is_merged_whatever_its_case_and_comments() {
        assert_eq!(
            with_first("batch AS (x)", "  -- sums\n/* a /* nested */ note */ with t AS (SELECT 1) SELECT * FROM t"),
            "  -- sums\n/* a /* nested */ note */ WITH batch AS (x), t AS (SELECT 1) SELECT * FROM t"
        );
        assert_eq!(
            with_first(
                "batch AS (x)",
                "WITH RECURSIVE r(n) AS (SELECT 1) SELECT * FROM r"
            ),
            "WITH RECURSIVE batch AS (x), r(n) AS (SELECT 1) SELECT * FROM r"
        );
    }

    #[test]
    fn a_word_that_only_starts_like_with_is_not_merged() {
        assert_eq!(
            with_first("batch AS (x)", "without_table"),
            "WITH batch AS (x)\nwithout_table"
        );
        assert_eq!(
            with_first("batch AS (x)", "WITH recursive_t AS (SELECT 1) SELECT 1"),
            "WITH batch AS (x), recursive_t AS (SELECT 1) SELECT 1"
        );
    }
}
