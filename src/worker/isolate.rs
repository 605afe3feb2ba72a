//! A batch the projector rejected: narrowed until the failing event stands
//! alone, which is then retried with backoff, and at last parked or
//! dead-lettered as `on_error` says.

use std::time::Duration;

use super::{Step, Transaction, Transient, Worker};
use crate::bookkeeping::{self as checkpoint, Checkpoint, Failure};
use crate::config::OnError;
use crate::db::{self, Db};
use crate::feed::Position;
use crate::projector::ProjectorError;
use crate::util::one_line;

/// Where a batch the projector rejects is rolled back to.
pub(super) const SAVEPOINT: &str = "SAVEPOINT apply";
pub(super) const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT apply";

impl Worker {
    /// Shrinks the next batch to `keep` events to isolate a failure.
    pub(super) fn narrow(&mut self, e: ProjectorError, keep: u32, failed_upto: Position) -> Step {
        tracing::debug!(
            projector = self.projector.name(),
            error = %e,
            keep,
            "batch failed; narrowing it to isolate the failing event"
        );
        self.limit = keep.clamp(1, self.limit);
        self.isolating_until = Some(
            self.isolating_until
                .map_or(failed_upto, |u| u.max(failed_upto)),
        );
        Step::Retry(Duration::ZERO)
    }

    /// A batch the projector rejected (rolled back to its savepoint): narrow the
    /// next one, or, once the failing event stands alone, retry it later, park
    /// the projector or dead-letter the event.
    pub(super) async fn isolate(
        &mut self,
        tx: Transaction<'_>,
        e: ProjectorError,
        ck: &Checkpoint,
        isolated: Isolated,
        upto: Position,
        ahead: &[(i64, Position)],
    ) -> Result<Step, Transient> {
        match isolated {
            Isolated::Narrow(keep) => Ok(self.narrow(e, keep, upto)),
            Isolated::Alone {
                event_id,
                event_type,
                others,
            } => {
                let failure = Failure {
                    projector: self.key.clone(),
                    event_id,
                    event_type,
                    error: message_of(&e),
                    attempts: attempts_after(ck, event_id),
                };
                self.give_up_or_retry(tx, failure, &others, upto, ahead)
                    .await
            }
        }
    }

    /// After the lone failing event (with `others`, the events delivered with it)
    /// has failed once more: retry later, park, or dead-letter them all.
    pub(super) async fn give_up_or_retry(
        &mut self,
        tx: Transaction<'_>,
        failure: Failure,
        others: &[(i64, String)],
        upto: Position,
        ahead: &[(i64, Position)],
    ) -> Result<Step, Transient> {
        let name = failure.projector.clone();
        let attempts = failure.attempts as u32;
        if attempts < self.settings.max_attempts {
            tracing::warn!(
                projector = %name,
                event_id = failure.event_id,
                event_type = %failure.event_type,
                attempt = attempts,
                max_attempts = self.settings.max_attempts,
                error = %failure.error,
                "event failed; will retry"
            );
            checkpoint::record_failure(&tx, &failure).await?;
            tx.commit().await?;
            return Ok(Step::Retry(retry_delay(attempts)));
        }
        match self.settings.on_error {
            OnError::Stop => {
                tracing::error!(
                    projector = %name,
                    event_id = failure.event_id,
                    event_type = %failure.event_type,
                    attempts,
                    error = %failure.error,
                    "event failed too many times; projector parked (on_error = \"stop\")"
                );
                checkpoint::park(&tx, &failure).await?;
                tx.commit().await?;
                Ok(Step::Parked(failure))
            }
            OnError::Skip => {
                tracing::warn!(
                    projector = %name,
                    event_id = failure.event_id,
                    event_type = %failure.event_type,
                    attempts,
                    error = %failure.error,
                    "event failed too many times; recorded as a dead letter (on_error = \"skip\")"
                );
                checkpoint::dead_letter(&tx, &failure).await?;
                // The stream's earlier events delivered with it cannot be applied
                // without it in the same transaction; they are skipped with it, and
                // recorded, never dropped in silence.
                for (id, event_type) in others {
                    let with = Failure {
                        projector: name.clone(),
                        event_id: *id,
                        event_type: event_type.clone(),
                        error: format!(
                            "skipped with event {} of the same stream, which failed: {}",
                            failure.event_id, failure.error
                        ),
                        attempts: failure.attempts,
                    };
                    checkpoint::dead_letter(&tx, &with).await?;
                }
                self.commit(tx, ahead, upto, 0, true, true).await
            }
        }
    }
}

/// The event a projector named: directly, or in SQL through `pgfold.bad_event`.
pub(super) fn named_event(e: &ProjectorError) -> Option<i64> {
    match e {
        ProjectorError::Event { event_id, .. } => Some(*event_id),
        ProjectorError::Database(pg) => {
            bad_event_parts(pg.as_db_error()?.message()).map(|(id, _)| id)
        }
        ProjectorError::Other(_) | ProjectorError::Unavailable(_) => None,
    }
}

/// `pgfold.bad_event`'s message, "event N: problem", as (N, problem).
fn bad_event_parts(text: &str) -> Option<(i64, &str)> {
    let (id, problem) = text.strip_prefix("event ")?.split_once(": ")?;
    Some((id.parse().ok()?, problem))
}

/// The event type of each of `ids`, in one query.
pub(super) async fn event_types(
    tx: &Transaction<'_>,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, Transient> {
    Ok(tx
        .query(
            "SELECT id, event_type FROM events WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn attempts_after(ck: &Checkpoint, event_id: i64) -> i32 {
    if ck.failing_event_id == Some(event_id) {
        ck.attempts + 1
    } else {
        1
    }
}

/// How far isolating a rejected batch has come.
pub(super) enum Isolated {
    /// Retry at once with the first `keep` events (rows read) only.
    Narrow(u32),
    /// The failing event stands alone, with `others` delivered with it.
    Alone {
        event_id: i64,
        event_type: String,
        others: Vec<(i64, String)>,
    },
}

/// After the projector rejected a batch: a connection error is not the event's
/// fault, and aborts the round instead of counting against the batch; any other
/// error is the batch's, and its work is rolled back to the savepoint.
pub(super) async fn rolled_back(
    tx: &Transaction<'_>,
    e: ProjectorError,
) -> Result<ProjectorError, Transient> {
    match e {
        ProjectorError::Database(pg) if db::is_transient(&pg) => Err(Transient::Database(pg)),
        ProjectorError::Unavailable(why) => Err(Transient::Unavailable(why)),
        e => {
            Db::execute(tx, ROLLBACK_TO_SAVEPOINT, &[]).await?;
            Ok(e)
        }
    }
}

/// The text stored and shown for a failed event.
fn message_of(e: &ProjectorError) -> String {
    let text = match e {
        ProjectorError::Database(pg) => db::error_text(pg),
        ProjectorError::Event { message, .. } => message.clone(),
        ProjectorError::Other(e) => format!("{e:#}"),
        ProjectorError::Unavailable(why) => why.clone(),
    };
    // SQL raised through pgfold.bad_event already names the event.
    let problem = bad_event_parts(&text).map(|(_, problem)| problem.to_owned());
    let text = problem.unwrap_or(text);
    at_most(one_line(&text), MAX_ERROR_BYTES)
}

/// The longest error text stored (`last_error`, dead letters) and shown by
/// `status`. A projector's message, or PostgreSQL's, can quote the value that
/// failed, and that value can be a payload of megabytes.
const MAX_ERROR_BYTES: usize = 2048;

fn at_most(mut text: String, bytes: usize) -> String {
    if text.len() > bytes {
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(100u64 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn error_text_is_cut_at_a_char_boundary() {
        assert_eq!(at_most("short".into(), 2048), "short");
        let long = "é".repeat(2000);
        let cut = at_most(long, MAX_ERROR_BYTES);
        assert!(cut.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(cut.ends_with("é…"), "{cut}");
    }
}
