//! What a pass moves: each policy's events, chosen into the pass's temporary
//! table `pg_temp.pgfold_archive_chosen`.
//!
//! The choice is one statement over every event of the policy's stream types,
//! and nothing else of the pass runs while it does: on the benchmark's log, a
//! quarter of a lone pass with one core idle. While the application is quiet, a
//! second connection (the recorder's, idle until the first segment) chooses
//! the streams from the median stream id on, while the pass's own chooses
//! those before it, and its rows are copied into the table after.

use std::time::Instant;

use futures_util::TryStreamExt;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::holders::class_filter;
use super::yielding::Writes;
use crate::config::ArchivePolicy;
use crate::db::{Client, Db};
use crate::feed::Position;

/// The chosen table's columns, in the order every statement here gives them.
const COLUMNS: &str = "id, stream_id, whole, stream_last, policy, pass_first, pass_last, \
                       last_sequence, last_id";

/// Their types, for the binary copy of the second half's rows.
const TYPES: [Type; 9] = [
    Type::INT8,
    Type::TEXT,
    Type::BOOL,
    Type::BOOL,
    Type::INT4,
    Type::BOOL,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
];

/// The second half's rows held in memory at most (some 80 bytes each, 20 MB
/// in all: below what a segment takes later) while the first half is
/// inserted: a pass's memory does not grow with the log. Past it, the rest
/// are copied as the server sends them, and the server's per-row work (the
/// window's verdicts) waits for the copy: held 100,000 at a time, the
/// benchmark's choice of 250,000 a half took 1.37-1.40 s instead of 1.21-1.26.
const BUFFERED_ROWS: usize = 250_000;

/// Creates the (empty) chosen table.
pub(super) async fn create_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "DROP TABLE IF EXISTS pg_temp.pgfold_archive_chosen;
             CREATE TEMPORARY TABLE pgfold_archive_chosen (
               id BIGINT NOT NULL, stream_id TEXT NOT NULL, whole BOOLEAN NOT NULL,
               stream_last BOOLEAN NOT NULL, policy INT NOT NULL,
               pass_first BOOLEAN NOT NULL, pass_last BOOLEAN NOT NULL,
               last_sequence BIGINT NOT NULL, last_id BIGINT NOT NULL)",
        )
        .await
}

/// Where a policy's choice may take a second connection: the first policy's
/// only (its rows go in before the table's unique index exists, so a copy
/// meets no conflict), and only while the application is quiet (two server
/// processes at once took both cores from its commits).
pub(super) struct Helper<'a> {
    pub client: &'a Client,
    /// Transaction ids read as the pass began choosing.
    pub writes: Writes,
}

/// Adds what `policy` lets leave the table to the chosen set: events that every
/// projector has consumed (at or before its checkpoint) or never will (its
/// recorded filter passes them not: a projector's checkpoint moves only with the
/// events it consumes), older than `after`, of its stream types and class, and
/// never `hot`. Whole streams: every event of the stream qualifies. One by one:
/// a stream's qualifying prefix, less its newest event, which stays so that an
/// append's `currentMax + 1` stays right.
///
/// `oldest` is the oldest checkpoint of all: an event at or before it is
/// consumed by every projector, which spares the per-projector test for all but
/// the log's tail. The cut-off time is computed once, not per row.
///
/// With a `helper`, the streams from the median stream id on are chosen on its
/// connection meanwhile (see the module's comment). Either way each stream is
/// chosen whole by one statement, which its verdict needs.
pub(super) async fn choose(
    client: &Client,
    helper: Option<Helper<'_>>,
    policy: &ArchivePolicy,
    n: i32,
    has_class: bool,
    oldest: Position,
) -> Result<(), tokio_postgres::Error> {
    let cutoff: chrono::DateTime<chrono::Utc> = client
        .query_one("SELECT now() - $1::text::interval", &[&policy.after])
        .await?
        .get(0);
    let oldest_tx = oldest.tx_text();
    let params: [&(dyn ToSql + Sync); 6] = [
        &policy.stream_types,
        &cutoff,
        &n,
        &policy.retention_class,
        &oldest_tx,
        &oldest.id,
    ];
    // The first policy's rows go into the table before its index exists.
    let conflict = if n > 1 {
        "ON CONFLICT (id) DO NOTHING"
    } else {
        ""
    };
    let insert = |range: &str| {
        format!(
            "INSERT INTO pg_temp.pgfold_archive_chosen ({COLUMNS}) {} {conflict}",
            select(policy, has_class, range)
        )
    };
    let split = match helper {
        Some(helper) if n == 1 => match median(client, &policy.stream_types).await? {
            Some(median) if split_always() || !helper.writes.busy(client).await? => {
                Some((helper.client, median))
            }
            _ => None,
        },
        _ => None,
    };
    let Some((helper, median)) = split else {
        client.execute(&insert(""), &params).await?;
        return Ok(());
    };
    let t = Instant::now();
    let mut split_params = params.to_vec();
    split_params.push(&median);
    let before = insert("AND e.stream_id < $7");
    let after = select(policy, has_class, "AND e.stream_id >= $7");
    // The second half's rows wait in memory while the first half is inserted,
    // up to BUFFERED_ROWS; then the server holds the rest back until they are
    // copied. Either way its scan and sort, the choice's work, are done by then.
    let (inserted, head) = tokio::join!(client.execute(&before, &split_params), async {
        let mut rows = Box::pin(
            helper
                .query_raw(&after, split_params.iter().copied())
                .await?,
        );
        let (most, mut head, mut ended) = (buffered_rows(), Vec::new(), false);
        while !ended && head.len() < most {
            match rows.try_next().await? {
                Some(r) => head.push(Chosen::from_row(&r)?),
                None => ended = true,
            }
        }
        Ok::<_, tokio_postgres::Error>((head, rows, ended))
    });
    inserted?;
    let (head, mut rest, ended) = head?;
    let sink = client
        .copy_in(&format!(
            "COPY pg_temp.pgfold_archive_chosen ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &TYPES);
    futures_util::pin_mut!(writer);
    let mut copied = 0;
    for r in head {
        r.write(writer.as_mut()).await?;
        copied += 1;
    }
    if !ended {
        while let Some(r) = rest.try_next().await? {
            Chosen::from_row(&r)?.write(writer.as_mut()).await?;
            copied += 1;
        }
    }
    writer.finish().await?;
    tracing::debug!(
        median = %median,
        copied,
        seconds = format!("{:.3}", t.elapsed().as_secs_f64()),
        "archive: chose in two halves, the second on the recorder's connection"
    );
    Ok(())
}

/// Whether a test asks for the choice in two halves whatever the server's
/// other databases are doing (transaction ids are the cluster's), with
/// `PGFOLD_TEST_ARCHIVE_SPLIT`.
fn split_always() -> bool {
    std::env::var_os("PGFOLD_TEST_ARCHIVE_SPLIT").is_some()
}

/// [`BUFFERED_ROWS`], or the number `PGFOLD_TEST_ARCHIVE_SPLIT` gives (a
/// test's small log reaching it).
fn buffered_rows() -> usize {
    std::env::var("PGFOLD_TEST_ARCHIVE_SPLIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BUFFERED_ROWS)
}

/// The policy's choice as a query of the chosen table's columns, for streams
/// in `range` (a condition on `e.stream_id`, or nothing).
///
/// One read of the policy's stream types, in stream order: each stream's
/// verdict is a window over its own rows, where a GROUP BY and a join back
/// would read it twice.
fn select(policy: &ArchivePolicy, has_class: bool, range: &str) -> String {
    let class = class_filter("e", "$4", has_class, policy.retention_class.is_some());
    let qualifies = format!(
        "(e.occurred_at < $2 {class}
          AND ((COALESCE(e.tx_id, '0'::xid8), e.id) <= ($5::text::xid8, $6::bigint)
               OR NOT EXISTS (
                 SELECT 1 FROM pgfold.projectors p
                  WHERE (COALESCE(e.tx_id, '0'::xid8), e.id) > (p.position_tx, p.position_id)
                    AND (p.event_types IS NULL OR e.event_type = ANY(p.event_types))
                    AND (p.stream_types IS NULL OR e.stream_type = ANY(p.stream_types)))))"
    );
    if policy.whole_streams {
        format!(
            "SELECT q.id, q.stream_id, true, q.id = q.newest, $3::int, q.id = q.oldest,
                    q.id = q.newest, q.last_sequence, q.newest
               FROM (SELECT e.id, e.stream_id,
                            bool_and({qualifies}) OVER s AS ok, max(e.id) OVER s AS newest,
                            min(e.id) OVER s AS oldest, max(e.sequence) OVER s AS last_sequence
                       FROM events e WHERE e.stream_type = ANY($1) {range}
                     WINDOW s AS (PARTITION BY e.stream_id)) q
              WHERE q.ok"
        )
    } else {
        format!(
            "SELECT q.id, q.stream_id, false, false, $3::int, true, true, q.sequence, q.id
               FROM (SELECT e.id, e.stream_id, e.sequence,
                            coalesce(min(e.sequence) FILTER (WHERE NOT {qualifies})
                                       OVER (PARTITION BY e.stream_id),
                                     max(e.sequence) OVER (PARTITION BY e.stream_id)) AS keep_from
                       FROM events e WHERE e.stream_type = ANY($1) {range}) q
              WHERE q.sequence < q.keep_from"
        )
    }
}

/// The median stream id of the policy's stream types, from a sample of some
/// 10,000 rows (all of them in a smaller table): halves of about equal work.
/// `None` when the sample holds no row.
async fn median(
    client: &Client,
    stream_types: &[String],
) -> Result<Option<String>, tokio_postgres::Error> {
    let rows: f32 = client
        .query_one(
            "SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await?
        .get(0);
    let percent = if rows > 0.0 {
        (1_000_000.0 / rows).clamp(0.01, 100.0)
    } else {
        100.0
    };
    client
        .query_one(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY stream_id)
               FROM events TABLESAMPLE SYSTEM ($1) WHERE stream_type = ANY($2)",
            &[&percent, &stream_types],
        )
        .await
        .map(|r| r.get(0))
}

/// A row of the chosen table.
struct Chosen {
    id: i64,
    stream_id: String,
    whole: bool,
    stream_last: bool,
    policy: i32,
    pass_first: bool,
    pass_last: bool,
    last_sequence: i64,
    last_id: i64,
}

impl Chosen {
    fn from_row(r: &tokio_postgres::Row) -> Result<Chosen, tokio_postgres::Error> {
        Ok(Chosen {
            id: r.try_get(0)?,
            stream_id: r.try_get(1)?,
            whole: r.try_get(2)?,
            stream_last: r.try_get(3)?,
            policy: r.try_get(4)?,
            pass_first: r.try_get(5)?,
            pass_last: r.try_get(6)?,
            last_sequence: r.try_get(7)?,
            last_id: r.try_get(8)?,
        })
    }

    async fn write(
        &self,
        writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    ) -> Result<(), tokio_postgres::Error> {
        writer
            .write(&[
                &self.id,
                &self.stream_id,
                &self.whole,
                &self.stream_last,
                &self.policy,
                &self.pass_first,
                &self.pass_last,
                &self.last_sequence,
                &self.last_id,
            ])
            .await
    }
}
