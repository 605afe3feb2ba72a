//! `daily_revenue`: revenue per UTC day and item category, from `OrderPaid`.
//!
//! A sum does not depend on the order of its terms, so this projector folds each
//! batch in one set-based statement inside the database: a rebuild runs at the
//! speed of a hand-written `INSERT … SELECT`. Money stays `numeric` throughout;
//! `price` may be a JSON number or a numeric string and is taken exactly as
//! written. A payload that cannot be summed raises an error naming the event rather
//! than being skipped.

use async_trait::async_trait;
use tokio_postgres::Transaction;

use crate::db::Db;
use crate::projector::{
    BatchTransaction, EventFilter, EventRange, Feed, Projector, ProjectorError,
};

pub struct DailyRevenue;

const EVENT_TYPE: &str = "OrderPaid";

impl DailyRevenue {
    /// The statement each batch runs: [`EventRange::params`] bound at `$1`–`$6`,
    /// then the event type at `$7`. Public so that its plans can be checked
    /// (`tests/integration/plan_robustness.rs`).
    pub fn statement() -> String {
        format!(
            r#"
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
FROM {source} e
CROSS JOIN LATERAL jsonb_array_elements(
  CASE WHEN jsonb_typeof(e.payload->'items') = 'array' THEN e.payload->'items'
       ELSE pgfold.bad_event(e.id, 'payload.items is '
              || coalesce(jsonb_typeof(e.payload->'items'), 'missing') || ', expected an array')
  END) WITH ORDINALITY AS i(item, n)
   WHERE e.event_type = $7
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
"#,
            source = EventRange::source()
        )
    }
}

#[async_trait]
impl Projector for DailyRevenue {
    fn name(&self) -> &str {
        "daily_revenue"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::event_types(&[EVENT_TYPE])
    }

    fn feed(&self) -> Feed {
        Feed::Set
    }

    // Its generic plan (EXPLAIN under force_generic_plan) reads the range through
    // the position index and unnests each event's items: the same as a custom one.
    fn generic_plans(&self) -> bool {
        true
    }

    async fn setup(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
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

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), ProjectorError> {
        tx.batch_execute("TRUNCATE daily_revenue").await?;
        Ok(())
    }

    async fn apply_range(
        &self,
        tx: &BatchTransaction<'_>,
        range: &EventRange,
    ) -> Result<u64, ProjectorError> {
        let sql = Self::statement();
        let [p1, p2, p3, p4, p5, p6] = range.params();
        let row = Db::query_one(tx, &sql, &[p1, p2, p3, p4, p5, p6, &EVENT_TYPE]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}
