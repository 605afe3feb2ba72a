//! `daily_revenue`: revenue per UTC day and item category, from `OrderPaid`.
//!
//! A sum does not depend on the order of its terms, so this projector folds each
//! batch in one set-based statement inside the database: a rebuild runs at the
//! speed of a hand-written `INSERT … SELECT`. Money stays `numeric` throughout;
//! `price` may be a JSON number or a numeric string and is taken exactly as
//! written. A payload that cannot be summed raises an error naming the event rather
//! than being skipped.

use async_trait::async_trait;

use crate::projector::{EventFilter, Fold, Projector, ProjectorError, SetBatch, SetFold, Tx};

/// Revenue per UTC day and item category; see the module documentation.
pub struct DailyRevenue;

const EVENT_TYPE: &str = "OrderPaid";

impl DailyRevenue {
    /// The statement each batch runs over the relation `batch` ([`SetBatch`]).
    /// Public so that its plans can be checked
    /// (`tests/integration/plan_robustness.rs`, with [`SetBatch::statement`]).
    pub const STATEMENT: &'static str = r#"
WITH items AS (
  SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
     i.n,
     coalesce(i.item->>'category',
              pgfold.bad_event(e.id, format('payload.items[%s].category is missing', i.n - 1))::text)
       AS category,
     coalesce((i.item->>'price')::numeric,
              pgfold.bad_event(e.id, format('payload.items[%s].price is missing', i.n - 1))::text::numeric)
     * coalesce((i.item->>'qty')::numeric,
              pgfold.bad_event(e.id, format('payload.items[%s].qty is missing', i.n - 1))::text::numeric)
       AS amount
FROM batch e
CROSS JOIN LATERAL jsonb_array_elements(
  CASE WHEN jsonb_typeof(e.payload->'items') = 'array' THEN e.payload->'items'
       ELSE pgfold.bad_event(e.id, 'payload.items is '
              || coalesce(jsonb_typeof(e.payload->'items'), 'missing') || ', expected an array')
  END) WITH ORDINALITY AS i(item, n)
),
totals AS (
  SELECT day, category, sum(amount) AS total, count(*) FILTER (WHERE n = 1) AS events
FROM items
   GROUP BY day, category
),
upsert AS (
  INSERT INTO daily_revenue AS d (day, category, total)
  SELECT day, category, total FROM totals
  ON CONFLICT (day, category) DO UPDATE SET total = d.total + EXCLUDED.total
)
SELECT coalesce(sum(events), 0)::bigint FROM totals
"#;
}

#[async_trait]
impl Projector for DailyRevenue {
    fn name(&self) -> &str {
        "daily_revenue"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::event_types(&[EVENT_TYPE])
    }

    fn fold(&self) -> Fold<'_> {
        Fold::Set(self)
    }

    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS daily_revenue (
               day DATE NOT NULL,
               category TEXT NOT NULL,
               total NUMERIC NOT NULL,
               PRIMARY KEY (day, category)
             )",
        )
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE daily_revenue").await?;
        Ok(())
    }
}

#[async_trait]
impl SetFold for DailyRevenue {
    async fn apply(&self, tx: &Tx<'_>, batch: &SetBatch<'_>) -> Result<(), ProjectorError> {
        let row = batch.query_one(tx, Self::STATEMENT, &[]).await?;
        batch.counted(row.get::<_, i64>(0) as u64);
        Ok(())
    }

    // Its generic plan (EXPLAIN under force_generic_plan) reads the range through
    // the position index and unnests each event's items: the same as a custom one.
    fn generic_plans(&self) -> bool {
        true
    }
}
