//! Applying a set fold to a range: the one call a whole set batch and each of
//! its parts make.

use super::Transaction;
use crate::feed::EventRange;
use crate::projector::{ProjectorError, SetBatch, SetFold, Tx};

/// Applies a set batch; how many events it consumed: as the fold counted them,
/// or counted here in the same round trip.
pub(super) async fn apply_set(
    tx: &Transaction<'_>,
    fold: &dyn SetFold,
    range: &EventRange,
) -> Result<u64, ProjectorError> {
    let batch = SetBatch::new(range);
    fold.apply(&Tx::new(tx), &batch).await?;
    match batch.reported_count() {
        Some(events) => Ok(events),
        None => Ok(count_range(tx, range).await?),
    }
}

/// How many events a set batch's range holds, for the projector's filter.
pub(super) async fn count_range(
    tx: &Transaction<'_>,
    range: &EventRange,
) -> Result<u64, tokio_postgres::Error> {
    let batch = SetBatch::new(range);
    let row = batch
        .query_one(&Tx::new(tx), "SELECT count(*) FROM batch", &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}
