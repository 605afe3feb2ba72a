//! Progress of a long catch-up (a replay, or `run --once` far behind): a bar per
//! projector with events/s and an ETA on a terminal; a structured log line every
//! few seconds otherwise (journald, container logs).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log form reports.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bars: Option<MultiProgress>,
    tracked: Mutex<HashMap<String, Tracked>>,
}

struct Tracked {
    started: Instant,
    last_log: Instant,
    /// Progress is measured in event ids: positions follow ids closely, and this
    /// costs no query.
    first_id: i64,
    target_id: i64,
    applied: u64,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Bars when stderr is a terminal and the logs are for humans.
    pub fn new(bars: bool) -> Progress {
        let bars = bars && std::io::stderr().is_terminal();
        Progress {
            bars: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            tracked: Mutex::new(HashMap::new()),
        }
    }

    /// Starts tracking `projector` from event id `from` up to `target`.
    pub fn begin(&self, projector: &str, from: i64, target: i64) {
        if target <= from {
            return;
        }
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new((target - from) as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>16} [{bar:30}] {percent:>3}% {human_pos}/{human_len} ids  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(projector.to_string());
            bar
        });
        let now = Instant::now();
        self.lock().insert(
            projector.to_string(),
            Tracked {
                started: now,
                last_log: now,
                first_id: from,
                target_id: target,
                applied: 0,
                bar,
            },
        );
    }

    /// Records a committed batch.
    pub fn advance(&self, projector: &str, position_id: i64, events: u64) {
        let mut tracked = self.lock();
        let Some(t) = tracked.get_mut(projector) else {
            return;
        };
        t.applied += events;
        let done = (position_id.min(t.target_id) - t.first_id).max(0) as u64;
        let total = (t.target_id - t.first_id) as u64;
        if let Some(bar) = &t.bar {
            bar.set_position(done);
        } else if t.last_log.elapsed() >= LOG_EVERY {
            t.last_log = Instant::now();
            let elapsed = t.started.elapsed().as_secs_f64();
            let rate = t.applied as f64 / elapsed.max(1e-9);
            let fraction = done as f64 / total.max(1) as f64;
            let eta = if fraction > 0.0 {
                elapsed * (1.0 - fraction) / fraction
            } else {
                f64::NAN
            };
            tracing::info!(
                projector,
                percent = (fraction * 100.0).round() as u64,
                position = position_id,
                target = t.target_id,
                events_applied = t.applied,
                events_per_second = rate.round() as u64,
                eta_seconds = eta.round(),
                "catching up"
            );
        }
        if position_id >= t.target_id {
            drop(tracked);
            self.finish(projector);
        }
    }

    pub fn finish(&self, projector: &str) {
        if let Some(t) = self.lock().remove(projector) {
            let elapsed = t.started.elapsed().as_secs_f64();
            if let Some(bar) = t.bar {
                bar.finish_and_clear();
            }
            tracing::info!(
                projector,
                events_applied = t.applied,
                seconds = (elapsed * 10.0).round() / 10.0,
                events_per_second = (t.applied as f64 / elapsed.max(1e-9)).round() as u64,
                "caught up"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }
}
