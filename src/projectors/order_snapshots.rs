//! `order_snapshots`: each order stream's current state, the article's
//! `projectOrder` fold kept incrementally.
//!
//! The state depends on the order of the stream's events, so this projector takes
//! [`Fold::StreamSet`] batches: the daemon guarantees that each stream's events in
//! the batch, taken in `sequence` order, follow everything already applied. The
//! fold runs in one statement inside the database. Every event either starts a
//! state (`OrderCreated`) or sets a few keys of it, so a batch reduces each stream
//! to one full state (upserted) or one set of keys (merged into the stored state
//! with `||`). Nothing travels to the daemon and back, so a rebuild runs at the
//! speed of the equivalent `INSERT … SELECT`.

use async_trait::async_trait;

use crate::feed::Upcasters;
use crate::projector::{EventFilter, Fold, Projector, ProjectorError, SetBatch, SetFold, Tx};

/// Each order stream's current state; see the module documentation.
pub struct OrderSnapshots;

const STREAM_TYPE: &str = "order";
const EVENT_TYPES: [&str; 4] = [
    "OrderCreated",
    "OrderPaid",
    "OrderShipped",
    "OrderCancelled",
];

/// `occurred_at` in whole microseconds since the epoch: exact, and orderable
/// inside an array beside `sequence`.
const MICROS: &str = "(extract(epoch FROM e.occurred_at) * 1000000)::bigint";

/// Microseconds since the epoch ([`MICROS`]) as the state stores a time: RFC 3339,
/// UTC, microseconds.
fn timestamp(micros: &str) -> String {
    format!(
        r#"to_char(timestamp '1970-01-01' + {micros} * interval '1 microsecond', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#
    )
}

impl OrderSnapshots {
    /// The statement each batch runs over the relation `batch` ([`SetBatch`]).
    /// Public so that its plans can be checked
    /// (`tests/integration/plan_robustness.rs`, with [`SetBatch::statement`]).
    pub fn statement() -> String {
        OrderSnapshots::statement_through(&Upcasters::none(), "events")
    }

    /// [`OrderSnapshots::statement`] for events read through `upcasters`, which
    /// looks events up in `log` ([`crate::feed::EventRange::log`]): the payloads
    /// it looks up by id (a stream with two `OrderCreated` in one batch) are read
    /// through the upcasters too, as `batch` is.
    pub fn statement_through(upcasters: &Upcasters, log: &str) -> String {
        let by_id = |alias: &str, id: &str| {
            upcasters.layer(&format!(
                "(SELECT {alias}.* FROM {log} {alias} WHERE {alias}.id = {id})"
            ))
        };
        format!(
            r#"
WITH ev AS (
  -- Only what the fold needs, computed before grouping: the payload travels
  -- only for OrderCreated, the address only for OrderShipped.
  SELECT e.stream_id, e.sequence, e.id,
     CASE e.event_type WHEN 'OrderCreated' THEN 1 WHEN 'OrderPaid' THEN 2
                       WHEN 'OrderShipped' THEN 3 ELSE 4 END AS kind,
     {MICROS} AS micros,
     CASE WHEN e.event_type = 'OrderCreated' THEN e.payload END AS created_payload,
     CASE WHEN e.event_type = 'OrderShipped' AND e.payload->'address' <> 'null'
          THEN e.payload->'address' END AS address
FROM batch e
  OFFSET 0
),
agg AS (
  SELECT stream_id,
     count(*) AS events,
     max(sequence) AS sequence,
     min(ARRAY[sequence, id]) AS first,
     min(sequence) FILTER (WHERE kind = 1) AS first_created_seq,
     max(ARRAY[sequence, id]) FILTER (WHERE kind = 1) AS created,
     array_agg(created_payload) FILTER (WHERE kind = 1) AS created_payloads,
     max(ARRAY[sequence, kind]) AS last,
     max(ARRAY[sequence, micros]) FILTER (WHERE kind = 2) AS paid,
     max(ARRAY[sequence, micros]) FILTER (WHERE kind = 3) AS shipped,
     max(ARRAY[sequence, id]) FILTER (WHERE address IS NOT NULL) AS addressed,
     array_agg(address) FILTER (WHERE address IS NOT NULL) AS addresses
FROM ev
   GROUP BY stream_id
),
-- The payload of the last OrderCreated and the last address: the only ones in
-- the batch, but for the rare stream with two.
picked AS (
  SELECT a.*,
     CASE WHEN cardinality(a.created_payloads) = 1 THEN a.created_payloads[1]
          ELSE (SELECT c.payload FROM {created} c) END AS c,
     CASE WHEN a.addressed[1] > coalesce(a.created[1], 0) THEN
       CASE WHEN cardinality(a.addresses) = 1 THEN a.addresses[1]
            ELSE (SELECT d.payload->'address' FROM {addressed} d) END
     END AS address
FROM agg a
),
folded AS (
  SELECT a.stream_id, a.events, a.sequence, a.first[1] AS first_seq, a.first[2] AS first_id,
     a.first_created_seq,
     a.created IS NOT NULL AS is_full,
     CASE WHEN a.created IS NULL THEN '{{}}'::jsonb
          WHEN jsonb_typeof(a.c) <> 'object' THEN
            pgfold.bad_event(a.created[2], 'payload is '
              || CASE jsonb_typeof(a.c) WHEN 'null' THEN 'null'
                   WHEN 'array' THEN 'an array' ELSE 'a ' || jsonb_typeof(a.c) END
              || ', expected an object')
          WHEN a.c ?& '{{orderId,customerId,items}}'
           AND a.c - '{{orderId,customerId,items}}'::text[] = '{{}}' THEN a.c
          ELSE jsonb_build_object('orderId', coalesce(a.c->'orderId', 'null'),
                                  'customerId', coalesce(a.c->'customerId', 'null'),
                                  'items', coalesce(a.c->'items', 'null'))
     END
     || (jsonb_build_object(
           'status', CASE a.last[2] WHEN 1 THEN 'pending' WHEN 2 THEN 'paid'
                                    WHEN 3 THEN 'shipped' ELSE 'cancelled' END,
           'paidAt', {paid_at},
           'shippedAt', {shipped_at},
           'shippingAddress', a.address)
         - array_remove(ARRAY[
             CASE WHEN a.paid[1] > coalesce(a.created[1], 0) THEN NULL ELSE 'paidAt' END,
             CASE WHEN a.shipped[1] > coalesce(a.created[1], 0) THEN NULL ELSE 'shippedAt' END,
             CASE WHEN a.address IS NOT NULL THEN NULL ELSE 'shippingAddress' END], NULL))
       AS state
FROM picked a
),
upserted AS (
  INSERT INTO order_snapshots AS o (stream_id, sequence, state, projected_at)
  SELECT stream_id, sequence, state, now() FROM folded WHERE is_full
  ON CONFLICT (stream_id) DO UPDATE
 SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, projected_at = EXCLUDED.projected_at
),
patched AS (
  UPDATE order_snapshots AS o
 SET state = o.state || f.state, sequence = f.sequence, projected_at = now()
FROM folded f
   WHERE NOT f.is_full AND o.stream_id = f.stream_id
),
-- Planned on its own, for all its rows: under the LIMIT below, the planner
-- would walk the log in id order hoping for an early match, and there is
-- nearly never one (over a staged segment, whose union with `events` has no
-- statistics, that walk was quadratic).
offending AS MATERIALIZED (
  SELECT e.id, e.event_type, e.stream_id
FROM folded f
JOIN {log} e ON e.id = f.first_id
   WHERE (f.first_created_seq IS NULL OR f.first_seq < f.first_created_seq)
 AND NOT EXISTS (SELECT 1 FROM order_snapshots o WHERE o.stream_id = f.stream_id)
)
SELECT coalesce(sum(events), 0)::bigint,
   (SELECT pgfold.bad_event(e.id, format('%s on stream %s before its OrderCreated',
                                         e.event_type, e.stream_id))::text
      FROM offending e
     ORDER BY e.id
     LIMIT 1)
  FROM folded
"#,
            paid_at = timestamp("a.paid[2]"),
            shipped_at = timestamp("a.shipped[2]"),
            created = by_id("c", "a.created[2]"),
            addressed = by_id("d", "a.addressed[2]"),
        )
    }
}

#[async_trait]
impl Projector for OrderSnapshots {
    fn name(&self) -> &str {
        "order_snapshots"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::event_types(&EVENT_TYPES).in_streams_of(&[STREAM_TYPE])
    }

    fn fold(&self) -> Fold<'_> {
        Fold::StreamSet(self)
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS order_snapshots (
               stream_id TEXT PRIMARY KEY,
               sequence BIGINT NOT NULL,
               state JSONB NOT NULL,
               projected_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
             )",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE order_snapshots").await?;
        Ok(())
    }
}

#[async_trait]
impl SetFold for OrderSnapshots {
    async fn apply(&self, tx: &Tx<'_>, batch: &SetBatch<'_>) -> Result<(), ProjectorError> {
        // Per stream, the batch reduces to: the last OrderCreated (the state
        // starts afresh there), the last event (the status), and the last
        // OrderPaid / OrderShipped / shipping address after that OrderCreated.
        // "Last" is `max(ARRAY[sequence, x])`: plain aggregates, no per-stream
        // sort, and each state is built once. A created payload with exactly the
        // three keys the state takes is used as it is. A stream whose first event
        // here is not an OrderCreated merges its keys into the stored state, which
        // must exist: every part of the statement sees the table as it was before
        // it, so the check at the end sees what the batch started from.
        let range = batch.range();
        let statement = Self::statement_through(range.upcasters(), &range.log());
        let row = batch.query_one(tx, &statement, &[]).await?;
        batch.counted(row.get::<_, i64>(0) as u64);
        Ok(())
    }

    // Its generic plan (EXPLAIN under force_generic_plan) reads the range through
    // the position index, and reaches stored snapshots and earlier events by key.
    fn generic_plans(&self) -> bool {
        true
    }
}
