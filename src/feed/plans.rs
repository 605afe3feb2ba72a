//! How a batch's statements are planned: for their values, or once generically.
//!
//! A generic plan is made once and kept by the prepared statement until the
//! table's statistics change, and it is made from the size `events` has *then*.
//! One made while the log is a few pages (a new deployment's first batches)
//! reads the log with a sequential scan, the cheapest way through a few pages,
//! and keeps doing so as the log grows, until autovacuum happens to analyse the
//! table: measured, a whole-log scan of 26,000 rows on every live batch. A custom
//! plan has no such memory: it is made for each execution from the table's
//! current size. And PostgreSQL's own choice (`plan_cache_mode = auto`) makes a
//! generic plan after five executions to compare against, and keeps it.
//!
//! So a batch never plans in `auto` mode: generically only when it asks to and
//! the log has grown past [`GENERIC_PLANS_FROM_BYTES`], for its values
//! otherwise. Any generic plan is then made from a log of that size or more,
//! where reading a few rows through an index costs far less than a scan
//! (`tests/integration/plan_robustness.rs` makes the plans while the log is
//! empty, again just past the threshold, and explains them after the log has
//! grown a hundredfold).

/// The size of `events`' main fork (`pg_relation_size`) from which a batch may
/// reuse generic plans: 1 MiB, about 4,000 of the article's events.
pub const GENERIC_PLANS_FROM_BYTES: i64 = 1 << 20;

/// A select-list expression that sets, for the rest of the transaction, how
/// the statements after it are planned: generically, with JIT off, when the
/// SQL boolean `wanted` holds and the log is at least
/// [`GENERIC_PLANS_FROM_BYTES`]; for their values otherwise. Reads the table's
/// size from the file system (no statistics, no privilege needed).
pub fn plan_mode(wanted: &str) -> String {
    format!(
        "CASE WHEN ({wanted}) AND pg_relation_size('events') >= {GENERIC_PLANS_FROM_BYTES}
              THEN set_config('plan_cache_mode', 'force_generic_plan', true)
                   || set_config('jit', 'off', true)
              ELSE set_config('plan_cache_mode', 'force_custom_plan', true) END"
    )
}

/// Sets how the rest of the transaction plans, as a batch does ([`plan_mode`]),
/// and returns whether it plans generically. For tests and tools; the daemon
/// sends the expression inside its batches' first statement.
pub async fn set_plan_mode<C: crate::db::Db>(
    client: &C,
    generic_wanted: bool,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT starts_with({}, 'force_generic_plan')",
                plan_mode("$1::bool")
            ),
            &[&generic_wanted],
        )
        .await?;
    Ok(row.get(0))
}
