//! A segment's bytes: the article's columns one to one, as Parquet, sorted by `id`;
//! `payload` and `metadata` as JSON text.
//!
//! Row groups are cut by their encoded size, not by a row count, so a segment of
//! 1.9 MB payloads holds a few of them per row group and a reader decodes one row
//! group at a time within a bounded amount of memory.

use std::sync::Arc;

use arrow_array::builder::{
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::BooleanArray;
use arrow_array::{
    Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    RowFilter,
};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};

/// A row group is closed once its encoded size reaches this.
const ROW_GROUP_BYTES: usize = 4 << 20;

/// Rows decoded at a time when a segment is read ([`Reader::each_batch`]).
const DECODED_ROWS: usize = 4_096;

/// A batch of rows is handed to the writer once it holds this much text.
const CHUNK_BYTES: usize = 1 << 20;

/// One event as the archive keeps it: the table's row, JSON as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedEvent {
    /// `events.id`.
    pub id: i64,
    /// `events.tx_id` (pgfold's column): the writing transaction, if recorded.
    pub tx_id: Option<i64>,
    /// `events.stream_id`.
    pub stream_id: String,
    /// `events.stream_type`.
    pub stream_type: String,
    /// `events.event_type`.
    pub event_type: String,
    /// `events.event_version`.
    pub event_version: i32,
    /// JSON text.
    pub payload: String,
    /// JSON text.
    pub metadata: String,
    /// Microseconds since the epoch, UTC.
    pub occurred_at: i64,
    /// `events.sequence`.
    pub sequence: i64,
}

/// The columns of `events` (aliased `e`) that [`ArchivedEvent::from_row`] reads.
pub const COLUMNS: &str = "e.id, e.tx_id::text, e.stream_id, e.stream_type, e.event_type, \
     e.event_version, e.payload::text, e.metadata::text, e.occurred_at, e.sequence";

/// How many columns [`COLUMNS`] has: a query may select more after them.
pub const COLUMN_COUNT: usize = 10;

impl ArchivedEvent {
    /// A row of [`COLUMNS`].
    pub fn from_row(row: &tokio_postgres::Row) -> ArchivedEvent {
        let tx: Option<String> = row.get(1);
        ArchivedEvent {
            id: row.get(0),
            tx_id: tx.and_then(|t| t.parse().ok()),
            stream_id: row.get(2),
            stream_type: row.get(3),
            event_type: row.get(4),
            event_version: row.get(5),
            payload: row.get(6),
            metadata: row.get(7),
            occurred_at: row
                .get::<_, chrono::DateTime<chrono::Utc>>(8)
                .timestamp_micros(),
            sequence: row.get(9),
        }
    }

    /// The size the segment budget counts: its JSON text.
    pub fn bytes(&self) -> usize {
        self.payload.len() + self.metadata.len()
    }

    /// `occurred_at` as a time.
    pub fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_micros(self.occurred_at).unwrap_or_default()
    }
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("stream_id", DataType::Utf8, false),
        Field::new("stream_type", DataType::Utf8, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("event_version", DataType::Int32, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, false),
        Field::new(
            "occurred_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("sequence", DataType::Int64, false),
        Field::new("tx_id", DataType::Int64, true),
    ]))
}

/// What a segment holds, as written or as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// How many events.
    pub events: i64,
    /// The smallest event id it holds.
    pub first_id: i64,
    /// The largest event id it holds.
    pub last_id: i64,
    /// SHA-256 of the object's bytes, hex.
    pub checksum: String,
    /// Bytes.
    pub bytes: i64,
}

/// SHA-256 of `bytes`, hex.
pub fn checksum(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes events, in ascending `id` order, into one Parquet object in memory.
pub struct Writer {
    writer: ArrowWriter<Vec<u8>>,
    pending: Vec<ArchivedEvent>,
    pending_bytes: usize,
    events: i64,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

impl Writer {
    /// An empty segment, zstd-compressed.
    ///
    /// `payload` and `metadata` are nearly all distinct values: a dictionary
    /// of them is built only to be dropped, and their minimum and maximum
    /// mean nothing, so they get neither. The other columns keep per row group
    /// statistics, by which a reader (DuckDB, say) skips row groups by id or time.
    pub fn new() -> Result<Writer, parquet::errors::ParquetError> {
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_statistics_enabled(EnabledStatistics::Chunk);
        for json in ["payload", "metadata"] {
            let column = ColumnPath::from(json);
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_statistics_enabled(column, EnabledStatistics::None);
        }
        let props = props.build();
        Ok(Writer {
            writer: ArrowWriter::try_new(Vec::new(), schema(), Some(props))?,
            pending: Vec::new(),
            pending_bytes: 0,
            events: 0,
            first_id: None,
            last_id: None,
        })
    }

    /// Adds the next event; ids must ascend.
    pub fn push(&mut self, event: ArchivedEvent) -> Result<(), parquet::errors::ParquetError> {
        if let Some(last) = self.last_id {
            if event.id <= last {
                return Err(parquet::errors::ParquetError::General(format!(
                    "segment rows out of id order: {} after {last}",
                    event.id
                )));
            }
        }
        self.first_id.get_or_insert(event.id);
        self.last_id = Some(event.id);
        self.events += 1;
        self.pending_bytes += event.bytes();
        self.pending.push(event);
        if self.pending_bytes >= CHUNK_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Events pushed so far.
    pub fn events(&self) -> i64 {
        self.events
    }

    fn write_pending(&mut self) -> Result<(), parquet::errors::ParquetError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.writer.write(&to_batch(&rows)?)?;
        if self.writer.in_progress_size() >= ROW_GROUP_BYTES {
            self.writer.flush()?;
        }
        Ok(())
    }

    /// The object's bytes and what they hold; `None` for a segment of no event.
    pub fn finish(mut self) -> Result<Option<(Bytes, Summary)>, parquet::errors::ParquetError> {
        self.write_pending()?;
        let (Some(first_id), Some(last_id)) = (self.first_id, self.last_id) else {
            return Ok(None);
        };
        let bytes = Bytes::from(self.writer.into_inner()?);
        let summary = Summary {
            events: self.events,
            first_id,
            last_id,
            checksum: checksum(&bytes),
            bytes: bytes.len() as i64,
        };
        Ok(Some((bytes, summary)))
    }
}

fn to_batch(rows: &[ArchivedEvent]) -> Result<RecordBatch, parquet::errors::ParquetError> {
    let n = rows.len();
    let mut id = Int64Builder::with_capacity(n);
    let mut stream_id = StringBuilder::new();
    let mut stream_type = StringBuilder::new();
    let mut event_type = StringBuilder::new();
    let mut event_version = Int32Builder::with_capacity(n);
    let mut payload = StringBuilder::new();
    let mut metadata = StringBuilder::new();
    let mut occurred_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut sequence = Int64Builder::with_capacity(n);
    let mut tx_id = Int64Builder::with_capacity(n);
    for r in rows {
        id.append_value(r.id);
        stream_id.append_value(&r.stream_id);
        stream_type.append_value(&r.stream_type);
        event_type.append_value(&r.event_type);
        event_version.append_value(r.event_version);
        payload.append_value(&r.payload);
        metadata.append_value(&r.metadata);
        occurred_at.append_value(r.occurred_at);
        sequence.append_value(r.sequence);
        tx_id.append_option(r.tx_id);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(stream_id.finish()),
        Arc::new(stream_type.finish()),
        Arc::new(event_type.finish()),
        Arc::new(event_version.finish()),
        Arc::new(payload.finish()),
        Arc::new(metadata.finish()),
        Arc::new(occurred_at.finish()),
        Arc::new(sequence.finish()),
        Arc::new(tx_id.finish()),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// A segment opened for reading: its footer parsed once, its row groups read one
/// at a time, each within one row group's worth of memory.
pub struct Reader {
    bytes: Bytes,
    meta: ArrowReaderMetadata,
}

/// Which events a reader keeps: a projector's event and stream types (`None`:
/// all). The rows it drops are never materialised, their payloads not even
/// copied out of the decoded pages.
#[derive(Debug, Clone, Default)]
pub struct Keep {
    /// `event_type` in these.
    pub event_types: Option<Vec<String>>,
    /// `stream_type` in these.
    pub stream_types: Option<Vec<String>>,
}

impl Keep {
    /// Every event.
    pub fn all() -> Keep {
        Keep::default()
    }

    fn everything(&self) -> bool {
        self.event_types.is_none() && self.stream_types.is_none()
    }
}

impl Reader {
    /// Parses the footer; fails on anything that is not a Parquet object.
    pub fn new(bytes: Bytes) -> anyhow::Result<Reader> {
        let meta = ArrowReaderMetadata::load(&bytes, ArrowReaderOptions::default())?;
        // The columns the writer's schema has; the schema is their one list.
        for field in schema().fields() {
            let name = field.name();
            if meta.schema().field_with_name(name).is_err() {
                anyhow::bail!("not a pgfold segment: column {name} is missing");
            }
        }
        Ok(Reader { bytes, meta })
    }

    /// How many row groups.
    pub fn row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    /// How many rows, as the footer says.
    pub fn rows(&self) -> i64 {
        self.meta.metadata().file_metadata().num_rows()
    }

    fn builder(&self) -> ParquetRecordBatchReaderBuilder<Bytes> {
        ParquetRecordBatchReaderBuilder::new_with_metadata(self.bytes.clone(), self.meta.clone())
    }

    /// The rows of row group `group` that `keep` keeps, in `id` order, as one
    /// batch (`None`: it keeps none).
    pub fn batch(&self, group: usize, keep: &Keep) -> anyhow::Result<Option<RecordBatch>> {
        let mut batches = Vec::new();
        self.each_batch(group, keep, |batch| {
            batches.push(batch);
            Ok(())
        })?;
        Ok(match batches.len() {
            0 => None,
            1 => batches.pop(),
            _ => Some(concat(&batches)?),
        })
    }

    /// Hands `each` the rows of row group `group` that `keep` keeps, in `id`
    /// order, [`DECODED_ROWS`] at a time at most (no empty batch): a row group's
    /// text decoded whole, once per projector of a replay of all of them, took
    /// a replay past 128 MiB.
    pub fn each_batch(
        &self,
        group: usize,
        keep: &Keep,
        mut each: impl FnMut(RecordBatch) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut builder = self
            .builder()
            .with_row_groups(vec![group])
            .with_batch_size(DECODED_ROWS);
        if !keep.everything() {
            let mask =
                ProjectionMask::columns(builder.parquet_schema(), ["event_type", "stream_type"]);
            let keep = keep.clone();
            let predicate = ArrowPredicateFn::new(mask, move |batch: RecordBatch| {
                let types = |name: &str| {
                    batch
                        .column_by_name(name)
                        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                        .ok_or_else(|| {
                            arrow_schema::ArrowError::SchemaError(format!(
                                "not a pgfold segment: column {name} is not text"
                            ))
                        })
                };
                let (event_type, stream_type) = (types("event_type")?, types("stream_type")?);
                let within = |set: &Option<Vec<String>>, v: &str| {
                    set.as_ref().is_none_or(|s| s.iter().any(|t| t == v))
                };
                Ok((0..batch.num_rows())
                    .map(|i| {
                        Some(
                            within(&keep.event_types, event_type.value(i))
                                && within(&keep.stream_types, stream_type.value(i)),
                        )
                    })
                    .collect::<BooleanArray>())
            });
            builder = builder.with_row_filter(RowFilter::new(vec![Box::new(predicate)]));
        }
        for batch in builder.build()? {
            let batch = batch?;
            if batch.num_rows() > 0 {
                each(batch)?;
            }
        }
        Ok(())
    }

    /// The ids of every row, read from the `id` column alone, in file order.
    pub fn ids(&self) -> anyhow::Result<Vec<i64>> {
        let mask = ProjectionMask::columns(self.meta.parquet_schema(), ["id"]);
        let mut ids = Vec::with_capacity(self.rows().max(0) as usize);
        for batch in self.builder().with_projection(mask).build()? {
            ids.extend(
                column::<Int64Array>(&batch?, "id")?
                    .values()
                    .iter()
                    .copied(),
            );
        }
        Ok(ids)
    }
}

/// Concatenates batches of one schema (a row group read in several batches).
fn concat(batches: &[RecordBatch]) -> anyhow::Result<RecordBatch> {
    let mut events = Vec::new();
    for b in batches {
        events.extend(from_batch(b)?);
    }
    Ok(to_batch(&events)?)
}

/// How many row groups a segment has (reading only its footer).
pub fn row_groups(bytes: &Bytes) -> anyhow::Result<usize> {
    Ok(Reader::new(bytes.clone())?.row_groups())
}

/// The events of row group `group`, in `id` order: one row group's worth of
/// memory at a time.
pub fn row_group(bytes: &Bytes, group: usize) -> anyhow::Result<Vec<ArchivedEvent>> {
    match Reader::new(bytes.clone())?.batch(group, &Keep::all())? {
        Some(batch) => from_batch(&batch),
        None => Ok(Vec::new()),
    }
}

/// Reads a segment's events back, one row group at a time, handing each group's
/// events to `each` in `id` order. Fails on anything that is not a segment.
pub fn read(
    bytes: Bytes,
    mut each: impl FnMut(Vec<ArchivedEvent>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let reader = Reader::new(bytes)?;
    for group in 0..reader.row_groups() {
        each(match reader.batch(group, &Keep::all())? {
            Some(batch) => from_batch(&batch)?,
            None => Vec::new(),
        })?;
    }
    Ok(())
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            anyhow::anyhow!("not a pgfold segment: column {name} is missing or of another type")
        })
}

/// A batch's columns, typed: what a reader takes each row's values from without
/// copying them.
pub struct Columns<'a> {
    /// `id`.
    pub id: &'a Int64Array,
    /// `tx_id`, nullable.
    pub tx_id: &'a Int64Array,
    /// `stream_id`.
    pub stream_id: &'a StringArray,
    /// `stream_type`.
    pub stream_type: &'a StringArray,
    /// `event_type`.
    pub event_type: &'a StringArray,
    /// `event_version`.
    pub event_version: &'a Int32Array,
    /// `payload`, JSON text.
    pub payload: &'a StringArray,
    /// `metadata`, JSON text.
    pub metadata: &'a StringArray,
    /// `occurred_at`, microseconds since the epoch.
    pub occurred_at: &'a TimestampMicrosecondArray,
    /// `sequence`.
    pub sequence: &'a Int64Array,
}

impl<'a> Columns<'a> {
    /// The columns of `batch`, or an error if it is not a segment's.
    pub fn of(batch: &'a RecordBatch) -> anyhow::Result<Columns<'a>> {
        Ok(Columns {
            id: column(batch, "id")?,
            tx_id: column(batch, "tx_id")?,
            stream_id: column(batch, "stream_id")?,
            stream_type: column(batch, "stream_type")?,
            event_type: column(batch, "event_type")?,
            event_version: column(batch, "event_version")?,
            payload: column(batch, "payload")?,
            metadata: column(batch, "metadata")?,
            occurred_at: column(batch, "occurred_at")?,
            sequence: column(batch, "sequence")?,
        })
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    /// `tx_id` of row `i`.
    pub fn tx_id(&self, i: usize) -> Option<i64> {
        (!self.tx_id.is_null(i)).then(|| self.tx_id.value(i))
    }
}

/// The events of `batch`, as owned values.
pub fn from_batch(batch: &RecordBatch) -> anyhow::Result<Vec<ArchivedEvent>> {
    let c = Columns::of(batch)?;
    Ok((0..c.len())
        .map(|i| ArchivedEvent {
            id: c.id.value(i),
            tx_id: c.tx_id(i),
            stream_id: c.stream_id.value(i).to_string(),
            stream_type: c.stream_type.value(i).to_string(),
            event_type: c.event_type.value(i).to_string(),
            event_version: c.event_version.value(i),
            payload: c.payload.value(i).to_string(),
            metadata: c.metadata.value(i).to_string(),
            occurred_at: c.occurred_at.value(i),
            sequence: c.sequence.value(i),
        })
        .collect())
}

/// What a segment holds as far as its footer and `id` column say, without
/// decoding its other columns: row count, id range (ids must ascend), size and
/// checksum. What the pass checks of an object it read back before it deletes
/// anything, and a replay of a segment before it applies it: the bytes hash as
/// those [`Writer`] made (whose encoding the tests decode in full), so decoding
/// every value again would check nothing more. `archive verify` does, through
/// [`summarize`].
pub fn check(bytes: Bytes) -> anyhow::Result<Summary> {
    let reader = Reader::new(bytes.clone())?;
    let ids = reader.ids()?;
    if let Some(w) = ids.windows(2).find(|w| w[1] <= w[0]) {
        anyhow::bail!("ids out of order at {}", w[1]);
    }
    if ids.len() as i64 != reader.rows() {
        anyhow::bail!(
            "its footer counts {} rows, its id column {}",
            reader.rows(),
            ids.len()
        );
    }
    Ok(Summary {
        events: ids.len() as i64,
        first_id: ids.first().copied().unwrap_or(0),
        last_id: ids.last().copied().unwrap_or(0),
        checksum: checksum(&bytes),
        bytes: bytes.len() as i64,
    })
}

/// Reads `bytes` through and says what they hold: the row count, the id range
/// (ids must ascend), the checksum.
pub fn summarize(bytes: Bytes) -> anyhow::Result<Summary> {
    let mut events = 0i64;
    let mut first_id = None;
    let mut last_id: Option<i64> = None;
    read(bytes.clone(), |rows| {
        for r in rows {
            if last_id.is_some_and(|last| r.id <= last) {
                anyhow::bail!("ids out of order at {}", r.id);
            }
            first_id.get_or_insert(r.id);
            last_id = Some(r.id);
            events += 1;
        }
        Ok(())
    })?;
    Ok(Summary {
        events,
        first_id: first_id.unwrap_or(0),
        last_id: last_id.unwrap_or(0),
        checksum: checksum(&bytes),
        bytes: bytes.len() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, payload: &str) -> ArchivedEvent {
        ArchivedEvent {
            id,
            tx_id: (id % 2 == 0).then_some(id * 10),
            stream_id: format!("s-{}", id % 3),
            stream_type: "order".into(),
            event_type: "OrderCreated".into(),
            event_version: 1,
            payload: payload.into(),
            metadata: "{}".into(),
            occurred_at: 1_700_000_000_000_000 + id,
            sequence: id,
        }
    }

    #[test]
    fn a_segment_reads_back_as_written_in_bounded_row_groups() {
        // Like issue 17's payloads: 1.9 MB that compress poorly.
        let mut state = 7u64;
        let noise: String = (0..1_900_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b"0123456789abcdef"[(state >> 60) as usize])
            })
            .collect();
        let big = format!("{{\"x\":\"{noise}\"}}");
        let mut w = Writer::new().unwrap();
        let written: Vec<_> = (1..=12)
            .map(|i| event(i, if i % 2 == 0 { &big } else { "{\"n\":1}" }))
            .collect();
        for e in &written {
            w.push(e.clone()).unwrap();
        }
        let (bytes, summary) = w.finish().unwrap().unwrap();
        assert_eq!(
            (summary.events, summary.first_id, summary.last_id),
            (12, 1, 12)
        );
        assert_eq!(summarize(bytes.clone()).unwrap(), summary);
        assert_eq!(check(bytes.clone()).unwrap(), summary);
        let meta = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        assert!(
            meta.metadata().num_row_groups() > 1,
            "row groups are cut by bytes"
        );
        let mut back = Vec::new();
        read(bytes, |rows| {
            back.extend(rows);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, written);
    }

    #[test]
    fn ids_must_ascend() {
        let mut w = Writer::new().unwrap();
        w.push(event(2, "{}")).unwrap();
        assert!(w.push(event(2, "{}")).is_err());
    }
}
