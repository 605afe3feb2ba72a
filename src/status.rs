//! `pgfold status`: where each projector is, how far behind, and what is wrong.

use crate::db::Db;
use serde::Serialize;

pub use crate::bookkeeping::RebuildProgress;
use crate::bookkeeping::{self as checkpoint, State};
use crate::feed::{self, Blocker};
use crate::projector::Registry;

/// The `--json` shape. Fields are only ever added, never renamed or removed.
#[derive(Debug, Serialize)]
pub struct Status {
    /// One per registered projector, in the registry's order.
    pub projectors: Vec<ProjectorStatus>,
    /// The open transaction keeping new events out of reach, if any.
    pub horizon_blocked_by: Option<Blocker>,
    /// The archive: segments, events and bytes, the last pass, and the projector
    /// whose checkpoint bounds what may leave the table.
    pub archive: crate::archive::Report,
}

/// One projector's line of `pgfold status`.
#[derive(Debug, Serialize)]
pub struct ProjectorStatus {
    /// The projector's name.
    pub name: String,
    /// `running`, `replaying`, `failed`, or `new` (never run).
    pub state: String,
    /// Id of the last event consumed (0: none yet).
    pub position: i64,
    /// Committed events it consumes that it has not applied yet.
    pub lag_events: i64,
    /// Age, by `occurred_at`, of the oldest of those events; 0 when caught up.
    pub lag_seconds: f64,
    /// Events applied since the projector began (or last replayed).
    pub events_applied: i64,
    /// When the checkpoint last moved past events, in UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    pub last_advanced_at: Option<String>,
    /// The event being retried or parked on, if any.
    pub failing_event: Option<FailingEvent>,
    /// The last error recorded (a failing event's, or a dead letter's).
    pub last_error: Option<String>,
    /// How many events `on_error = "skip"` gave up on.
    pub dead_letters: i64,
    /// A replay in progress (state `replaying`), else `null`.
    pub replay: Option<ReplayProgress>,
    /// The definition the live tables were built with (`Projector::fingerprint`);
    /// `null` before it was first recorded.
    pub fingerprint: Option<String>,
    /// The projector's definition differs from the one its live tables were built
    /// with: `run` rebuilds it (see `rebuild`).
    pub definition_changed: bool,
    /// A rebuild beside the live tables in progress, else `null`. The live
    /// projection keeps serving (and its own fields describe it) until the swap.
    pub rebuild: Option<RebuildProgress>,
}

/// How far a replay has come. Measured in event ids, as the daemon's progress is.
#[derive(Debug, Serialize)]
pub struct ReplayProgress {
    /// Id of the last event consumed; while a batch applied in parts is in
    /// flight, how far it has come (`pgfold.batch_progress`).
    pub position: i64,
    /// Id of the newest event when the replay began: where it ends.
    pub target: i64,
    /// Events applied since the replay began, per second of it; `null` until
    /// something is known.
    pub events_per_second: Option<f64>,
    /// Seconds left at the rate so far; `null` until the first batch has committed.
    pub eta_seconds: Option<f64>,
}

impl ReplayProgress {
    /// From the checkpoint, the events applied since the replay began, and how
    /// long ago it began (unknown for a replay begun before this was recorded).
    fn estimate(position: i64, target: i64, applied: i64, elapsed: Option<f64>) -> ReplayProgress {
        let elapsed = elapsed.filter(|s| *s > 0.0);
        ReplayProgress {
            position,
            target,
            events_per_second: elapsed.map(|s| (applied as f64 / s).round()),
            eta_seconds: elapsed
                .filter(|_| position > 0)
                .map(|s| (s * (target - position).max(0) as f64 / position as f64).ceil()),
        }
    }
}

/// The event a projector is failing on.
#[derive(Debug, Serialize)]
pub struct FailingEvent {
    /// Its `events.id`.
    pub id: i64,
    /// Its type, if known.
    pub event_type: Option<String>,
    /// How many times it has failed.
    pub attempts: i32,
}

impl Status {
    /// Whether a projector is parked (`pgfold status` then exits 3).
    pub fn any_failed(&self) -> bool {
        self.projectors
            .iter()
            .any(|p| p.state == State::Failed.as_str())
    }
}

/// Gathers the status. A transaction holding the horizon is reported once it has
/// been open for `stall_after`: a short one is just a write in flight.
/// Each projector's row and lag come from `bookkeeping::report`.
///
/// With `archive`'s policies, what holds archiving back is worked out now;
/// without them (a scrape of `/metrics`), it is what the last pass found.
pub async fn collect<C: Db>(
    client: &C,
    registry: &Registry,
    stall_after: std::time::Duration,
    archive: Option<&crate::config::ArchiveSettings>,
) -> anyhow::Result<Status> {
    if !crate::db::migrate::is_current(client).await? {
        anyhow::bail!("the database is not migrated: run `pgfold migrate`");
    }
    let mut projectors = Vec::new();
    for p in registry.iter() {
        let report = checkpoint::report(client, p.as_ref()).await?;
        let rebuild = checkpoint::rebuild_progress(client, p.as_ref()).await?;
        let fingerprint = checkpoint::stored_fingerprint(client, p.name()).await?;
        let definition_changed = fingerprint.as_ref().is_some_and(|f| *f != p.fingerprint());
        projectors.push(match report {
            None => ProjectorStatus {
                name: p.name().to_string(),
                state: "new".into(),
                position: 0,
                lag_events: 0,
                lag_seconds: 0.0,
                events_applied: 0,
                last_advanced_at: None,
                failing_event: None,
                last_error: None,
                dead_letters: 0,
                replay: None,
                fingerprint,
                definition_changed,
                rebuild,
            },
            Some(r) => ProjectorStatus {
                replay: (r.state == State::Replaying).then(|| {
                    // A batch in flight (applied in parts) has come further than
                    // the checkpoint, which moves when it commits.
                    let (position, in_batch) =
                        r.in_flight.map_or((r.position_id, 0), |(at, events)| {
                            (at.max(r.position_id), events)
                        });
                    ReplayProgress::estimate(
                        position,
                        r.replay_target_id,
                        r.events_applied + in_batch,
                        r.replay_seconds,
                    )
                }),
                name: p.name().to_string(),
                state: r.state.as_str().to_string(),
                position: r.position_id,
                events_applied: r.events_applied,
                last_advanced_at: r.last_advanced_at,
                failing_event: r.failing_event_id.map(|id| FailingEvent {
                    id,
                    event_type: r.failing_event_type,
                    attempts: r.attempts,
                }),
                last_error: r.last_error,
                dead_letters: r.dead_letters,
                lag_events: r.lag_events,
                lag_seconds: r.lag_seconds,
                fingerprint,
                definition_changed,
                rebuild,
            },
        });
    }
    let horizon = feed::horizon(client).await?;
    let horizon_blocked_by = match horizon.blocker {
        Some(tx) => feed::blocker(client, tx)
            .await?
            .filter(|b| b.transaction_age_seconds.unwrap_or(f64::MAX) >= stall_after.as_secs_f64()),
        None => None,
    };
    Ok(Status {
        projectors,
        horizon_blocked_by,
        archive: crate::archive::report(client, archive.map(|a| &a.policy[..])).await?,
    })
}

/// The table printed without `--json`.
pub fn render(status: &Status) -> String {
    let mut rows = vec![[
        "PROJECTOR".to_string(),
        "STATE".into(),
        "POSITION".into(),
        "LAG".into(),
        "LAST ADVANCED".into(),
        "DEAD LETTERS".into(),
        "LAST ERROR".into(),
    ]];
    for p in &status.projectors {
        let error = match (&p.failing_event, &p.last_error) {
            (Some(f), Some(e)) => format!(
                "event {} ({}), attempt {}: {}",
                f.id,
                f.event_type.as_deref().unwrap_or("?"),
                f.attempts,
                e
            ),
            (_, Some(e)) => e.clone(),
            _ => "-".into(),
        };
        rows.push([
            p.name.clone(),
            p.state.clone(),
            p.position.to_string(),
            p.lag_events.to_string(),
            p.last_advanced_at.clone().unwrap_or_else(|| "-".into()),
            p.dead_letters.to_string(),
            error,
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 6 {
                    c.clone()
                } else {
                    format!("{:w$}", c, w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for p in &status.projectors {
        if let Some(r) = &p.replay {
            let percent =
                (r.position.min(r.target) as f64 * 100.0 / r.target.max(1) as f64).floor();
            out.push_str(&format!(
                "\n{} is replaying: {percent}% ({} of {} ids), {} events/s, eta {}\n",
                p.name,
                r.position,
                r.target,
                r.events_per_second.map_or("?".into(), |v| v.to_string()),
                r.eta_seconds.map_or("?".into(), |v| format!("{v}s")),
            ));
        }
    }
    for p in &status.projectors {
        if let Some(r) = &p.rebuild {
            out.push_str(&format!(
                "\n{} is rebuilding beside its live tables ({}): position {}, lag {} events, {} events/s, eta {}; the live tables serve until the swap\n",
                p.name,
                r.reason.as_deref().unwrap_or("rebuild"),
                r.position,
                r.lag_events,
                r.events_per_second.map_or("?".into(), |v| v.to_string()),
                r.eta_seconds.map_or("?".into(), |v| format!("{v}s")),
            ));
        } else if p.definition_changed {
            out.push_str(&format!(
                "\n{}: definition changed since its tables were built ({}); the next `pgfold run` rebuilds it beside them\n",
                p.name,
                p.fingerprint.as_deref().unwrap_or("?"),
            ));
        }
    }
    let a = &status.archive;
    if a.segments > 0 || a.last_pass_at.is_some() {
        out.push_str(&format!(
            "
archive: {} segments, {} events, {} bytes; last pass {}{}
",
            a.segments,
            a.events,
            a.bytes,
            a.last_pass_at.as_deref().unwrap_or("never"),
            a.last_pass_events
                .map(|e| format!(" ({e} events)"))
                .unwrap_or_default(),
        ));
        if let Some(holder) = &a.held_back_by {
            out.push_str(&format!(
                "archiving is held back by {holder}: old events not yet consumed stay in the table\n"
            ));
        }
    }
    if let Some(b) = &status.horizon_blocked_by {
        out.push_str(&format!(
            "\nnew events are held back by the open transaction of backend {} ({}, open {}s): {}\n",
            b.pid,
            b.state
                .as_deref()
                .unwrap_or("state not visible to this role"),
            b.transaction_age_seconds
                .map(|s| format!("{s:.0}"))
                .unwrap_or_else(|| "?".into()),
            b.query_start.as_deref().unwrap_or("?"),
        ));
    }
    out
}
