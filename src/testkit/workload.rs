//! The "orders" workload, shared by the tests and the benchmark, and the
//! independent SQL folds they compare pgfold's projections against.
//!
//! One stream per order (`stream_type = 'order'`): `OrderCreated` (sequence 1,
//! 1–5 items over 20 categories, 2-decimal prices, qty 1–5), `OrderPaid`
//! (sequence 2) for 90 % of orders, `OrderShipped` (sequence 3) for 70 % of those,
//! `OrderCancelled` for 5 % of the rest; `occurred_at` spread over a year; about 2.6
//! events per order. Generated set-based in SQL, so millions of events load in
//! seconds; prices alternate between JSON numbers and numeric strings, as real
//! applications write both.

use tokio_postgres::GenericClient;

/// Events per order, on average (1 + 0.9 + 0.63 + 0.005).
pub const EVENTS_PER_ORDER: f64 = 2.535;

/// Appends the events of `orders` orders numbered from `first`, in one statement
/// per event type (so in few transactions), deterministic for given numbers.
/// Returns the number of events written.
pub async fn load_orders<C: GenericClient>(
    client: &C,
    first: i64,
    orders: i64,
) -> Result<u64, tokio_postgres::Error> {
    let last = first + orders - 1;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&first, &last];
    // Per order, deterministic pseudo-random draws from hashes of its number.
    let created = client
        .execute(
            r#"
WITH o AS (
  SELECT n, 'order-' || n AS stream_id,
         timestamptz '2025-01-01 00:00:00+00' + (abs(hashint8(n)) % 31536000) * interval '1 second' AS at,
         1 + abs(hashint8(n * 7)) % 5 AS item_count
    FROM generate_series($1::bigint, $2::bigint) AS n
)
INSERT INTO events (stream_id, stream_type, event_type, payload, occurred_at, sequence)
SELECT o.stream_id, 'order', 'OrderCreated',
       jsonb_build_object('orderId', o.stream_id, 'customerId', 'customer-' || (abs(hashint8(o.n * 3)) % 50000),
                          'items', items.list),
       o.at, 1
  FROM o
  CROSS JOIN LATERAL (
    SELECT jsonb_agg(jsonb_build_object(
             'sku', 'sku-' || (abs(hashint8(o.n * 31 + k)) % 1000),
             'category', 'category-' || (abs(hashint8(o.n * 17 + k)) % 20),
             'price', CASE WHEN k % 2 = 0
                           THEN to_jsonb(((100 + abs(hashint8(o.n * 13 + k)) % 99900) / 100.0)::numeric(10, 2))
                           ELSE to_jsonb(((100 + abs(hashint8(o.n * 13 + k)) % 99900) / 100.0)::numeric(10, 2)::text)
                      END,
             'qty', 1 + abs(hashint8(o.n * 11 + k)) % 5) ORDER BY k) AS list
      FROM generate_series(1, o.item_count) AS k
  ) items
"#,
            &params,
        )
        .await?;
    let paid = client
        .execute(
            r#"
INSERT INTO events (stream_id, stream_type, event_type, payload, occurred_at, sequence)
SELECT c.stream_id, 'order', 'OrderPaid',
       jsonb_build_object('orderId', c.stream_id, 'items', c.payload->'items'),
       c.occurred_at + (1 + abs(hashint8(n * 5)) % 7200) * interval '1 second', 2
  FROM generate_series($1::bigint, $2::bigint) AS n
  JOIN events c ON c.stream_id = 'order-' || n AND c.sequence = 1
 WHERE abs(hashint8(n * 19)) % 100 < 90
"#,
            &params,
        )
        .await?;
    let later = client
        .execute(
            r#"
INSERT INTO events (stream_id, stream_type, event_type, payload, occurred_at, sequence)
SELECT e.stream_id, 'order',
       CASE WHEN e.sequence = 2 THEN 'OrderShipped' ELSE 'OrderCancelled' END,
       CASE WHEN e.sequence = 2
            THEN jsonb_build_object('address', (abs(hashint8(n * 23)) % 999) || ' Harbour Street')
            ELSE jsonb_build_object('reason', 'customer request') END,
       e.occurred_at + (1 + abs(hashint8(n * 29)) % 86400) * interval '1 second',
       e.sequence + 1
  FROM generate_series($1::bigint, $2::bigint) AS n
  JOIN LATERAL (SELECT * FROM events x WHERE x.stream_id = 'order-' || n ORDER BY sequence DESC LIMIT 1) e ON true
 WHERE (e.sequence = 2 AND abs(hashint8(n * 37)) % 100 < 70)
    OR (e.sequence = 1 AND abs(hashint8(n * 41)) % 100 < 5)
"#,
            &params,
        )
        .await?;
    Ok(created + paid + later)
}

/// `daily_revenue`'s rows, as [`EXPECTED_DAILY_REVENUE`] computes them.
pub const DAILY_REVENUE: &str = "SELECT day, category, total FROM daily_revenue";

/// `order_snapshots`'s rows, as [`EXPECTED_ORDER_SNAPSHOTS`] computes them.
pub const ORDER_SNAPSHOTS: &str = "SELECT stream_id, sequence, state FROM order_snapshots";

/// `daily_revenue` computed independently, straight from the log.
pub const EXPECTED_DAILY_REVENUE: &str = r#"
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day, i->>'category' AS category,
       sum((i->>'price')::numeric * (i->>'qty')::numeric) AS total
  FROM events e, jsonb_array_elements(e.payload->'items') AS i
 WHERE e.event_type = 'OrderPaid'
 GROUP BY 1, 2
"#;

/// `order_snapshots` (stream_id, sequence, state) computed independently: the
/// article's fold, written as SQL over each stream's events in `sequence` order.
pub const EXPECTED_ORDER_SNAPSHOTS: &str = r#"
WITH ev AS (
  SELECT stream_id, sequence, event_type, occurred_at, payload,
         max(sequence) FILTER (WHERE event_type = 'OrderCreated') OVER (PARTITION BY stream_id) AS created_seq
    FROM events
   WHERE stream_type = 'order'
     AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')
),
folded AS (
  SELECT stream_id,
         max(sequence) AS sequence,
         (array_agg(payload ORDER BY sequence DESC) FILTER (WHERE sequence = created_seq))[1] AS created,
         (array_agg(event_type ORDER BY sequence DESC))[1] AS last_type,
         (array_agg(occurred_at ORDER BY sequence DESC)
            FILTER (WHERE event_type = 'OrderPaid' AND sequence > created_seq))[1] AS paid_at,
         (array_agg(occurred_at ORDER BY sequence DESC)
            FILTER (WHERE event_type = 'OrderShipped' AND sequence > created_seq))[1] AS shipped_at,
         (array_agg(payload->'address' ORDER BY sequence DESC)
            FILTER (WHERE event_type = 'OrderShipped' AND sequence > created_seq
                      AND payload->'address' IS NOT NULL AND payload->'address' <> 'null'::jsonb))[1] AS address
    FROM ev
   WHERE created_seq IS NOT NULL
   GROUP BY stream_id
)
SELECT stream_id, sequence,
       jsonb_build_object(
         'orderId', coalesce(created->'orderId', 'null'::jsonb),
         'customerId', coalesce(created->'customerId', 'null'::jsonb),
         'items', coalesce(created->'items', 'null'::jsonb),
         'status', CASE last_type WHEN 'OrderCreated' THEN 'pending' WHEN 'OrderPaid' THEN 'paid'
                                  WHEN 'OrderShipped' THEN 'shipped' ELSE 'cancelled' END)
       || CASE WHEN paid_at IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('paidAt',
            to_char(paid_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) END
       || CASE WHEN shipped_at IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('shippedAt',
            to_char(shipped_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) END
       || CASE WHEN address IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('shippingAddress', address) END
         AS state
  FROM folded
"#;

/// `order_status` (stream_id, status, changed_at) of `examples/projections/`,
/// computed independently: each order's last event.
pub const EXPECTED_ORDER_STATUS: &str = r#"
SELECT DISTINCT ON (stream_id) stream_id,
       CASE event_type WHEN 'OrderCreated' THEN 'pending' WHEN 'OrderPaid' THEN 'paid'
                       WHEN 'OrderShipped' THEN 'shipped' ELSE 'cancelled' END,
       occurred_at
  FROM events
 WHERE stream_type = 'order'
   AND event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled')
 ORDER BY stream_id, sequence DESC
"#;

/// Rows differing from the independent folds for the SQL projections of
/// `examples/projections/`: (daily_revenue_sql, order_snapshots_sql, order_status).
pub async fn example_differences<C: GenericClient>(
    client: &C,
) -> Result<(i64, i64, i64), tokio_postgres::Error> {
    let revenue = differences(
        client,
        "SELECT day, category, total FROM daily_revenue_sql",
        EXPECTED_DAILY_REVENUE,
    )
    .await?;
    let snapshots = differences(
        client,
        "SELECT stream_id, sequence, state FROM order_snapshots_sql",
        EXPECTED_ORDER_SNAPSHOTS,
    )
    .await?;
    let status = differences(
        client,
        "SELECT stream_id, status, changed_at FROM order_status",
        EXPECTED_ORDER_STATUS,
    )
    .await?;
    Ok((revenue, snapshots, status))
}

/// Rows that differ between a projection and its expected value, both ways;
/// 0 means equal. `actual` and `expected` are queries with the same columns.
pub async fn differences<C: GenericClient>(
    client: &C,
    actual: &str,
    expected: &str,
) -> Result<i64, tokio_postgres::Error> {
    let sql = format!(
        "SELECT (SELECT count(*) FROM (({actual}) EXCEPT ALL ({expected})) a)
              + (SELECT count(*) FROM (({expected}) EXCEPT ALL ({actual})) b)"
    );
    Ok(client.query_one(&sql, &[]).await?.get(0))
}

/// Rows of the two built-in projections that differ from their independent folds:
/// (`daily_revenue`, `order_snapshots`); (0, 0) means both are exact.
pub async fn projection_differences<C: GenericClient>(
    client: &C,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let revenue = differences(client, DAILY_REVENUE, EXPECTED_DAILY_REVENUE).await?;
    let snapshots = differences(client, ORDER_SNAPSHOTS, EXPECTED_ORDER_SNAPSHOTS).await?;
    Ok((revenue, snapshots))
}
