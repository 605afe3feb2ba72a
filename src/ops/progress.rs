//! Progress of a long catch-up (a replay, or `run --once` far behind): a bar per
//! projector with events/s and an ETA on a terminal; a structured `catching up`
//! log line every few seconds otherwise (journald, container logs), and a `caught
//! up` summary either way.
//!
//! Progress moves when a batch commits; set-based catch-ups are cut into ranges of
//! about a second for this (see `worker::pace`). A stream-set catch-up is one
//! range applied in parts of about a second (see `worker::parts`), and moves after
//! each part, before its batch commits. Until the first batch or part is done
//! nothing is measured, and the ETA shows as `?`.
//!
//! On a terminal the bars and the logs share stderr: both go through one
//! [`MultiProgress`] ([`terminal_bars`]), and [`AboveBars`] writes each log line
//! with the bars lifted out of the way, so a log line never lands between two
//! bars or leaves a stale copy of one behind.

use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{HumanCount, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log form reports.
const LOG_EVERY: Duration = Duration::from_secs(5);

static TERMINAL_BARS: OnceLock<MultiProgress> = OnceLock::new();

/// The bars drawn on stderr, one set per process: the progress display adds to
/// it, and the log writer ([`AboveBars`]) prints above it.
pub fn terminal_bars() -> &'static MultiProgress {
    TERMINAL_BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Whether progress is drawn as bars: stderr is a terminal and the logs are for
/// humans.
pub fn bars_wanted(human_logs: bool) -> bool {
    human_logs && std::io::stderr().is_terminal()
}

/// A `tracing_subscriber` writer for stderr that prints each log line above the
/// bars ([`MultiProgress::suspend`]): the bars are cleared, the line written, the
/// bars drawn again below it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AboveBars;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AboveBars {
    type Writer = LineAboveBars;

    fn make_writer(&'a self) -> LineAboveBars {
        LineAboveBars(Vec::new())
    }
}

/// One log event, written out above the bars when the formatter is done with it.
pub struct LineAboveBars(Vec<u8>);

impl Write for LineAboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineAboveBars {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let line = std::mem::take(&mut self.0);
            terminal_bars().suspend(|| {
                let _ = std::io::stderr().lock().write_all(&line);
            });
        }
    }
}

/// The catch-ups in progress, by projector: shared by the projector tasks, each
/// of which [`begin`](Progress::begin)s, [`advance`](Progress::advance)s and
/// finishes its own.
pub struct Progress {
    bars: Option<MultiProgress>,
    tracked: Mutex<HashMap<String, Tracked>>,
}

/// How a tracked piece of work is told: a catch-up (a replay, a rebuild, a
/// `--once` run) or an archive pass, whose lines would be wrong as "catching
/// up".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words {
    /// The periodic log line's message.
    pub doing: &'static str,
    /// The summary's, once done.
    pub done: &'static str,
    /// What the bar counts.
    pub unit: &'static str,
}

impl Words {
    /// A projector catching up.
    pub const CATCH_UP: Words = Words {
        doing: "catching up",
        done: "caught up",
        unit: "ids",
    };
    /// An archive pass moving events out of the table.
    pub const ARCHIVE: Words = Words {
        doing: "archiving",
        done: "archived",
        unit: "ids",
    };
    /// The archived segments fetched and checked before a replay reads them:
    /// counted in events, since segments of several passes need not follow
    /// each other in id order.
    pub const CHECK: Words = Words {
        doing: "checking the archive",
        done: "archive checked",
        unit: "events",
    };
}

struct Tracked {
    words: Words,
    started: Instant,
    /// When the last `catching up` line was logged; `None` before the first.
    last_log: Option<Instant>,
    /// Progress is measured in event ids: positions follow ids closely, and this
    /// costs no query.
    first_id: i64,
    target_id: i64,
    position_id: i64,
    applied: u64,
    /// Consumed by the batch in progress, in the parts done so far
    /// ([`Progress::within_batch`]); counted into `applied` once it commits.
    in_batch: u64,
    /// (when, ids done) after the last few batches, the start included: the ETA
    /// goes by the recent pace, which drifts over a long replay (the machine's
    /// load, the projection's tables growing).
    recent: VecDeque<(Instant, u64)>,
    bar: Option<Bar>,
}

/// Batches the ETA's pace is measured over.
const ETA_WINDOW: usize = 4;

/// A bar, and the text after its counts (rate and ETA, or the summary). The text
/// is drawn from here by the style, so that a draw never shows a new position
/// with the previous estimate.
struct Bar {
    bar: ProgressBar,
    status: Arc<Mutex<String>>,
}

impl Bar {
    fn update(&self, done: u64, status: String) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        self.bar.set_position(done);
    }
}

/// What is known of a catch-up after some batches.
struct Estimate {
    fraction: f64,
    events_per_second: f64,
    /// `None` until a batch has moved the position.
    eta_seconds: Option<f64>,
}

impl Tracked {
    fn done(&self) -> u64 {
        (self.position_id.min(self.target_id) - self.first_id).max(0) as u64
    }

    fn estimate(&self) -> Estimate {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-6);
        let total = (self.target_id - self.first_id).max(1) as f64;
        let done = self.done();
        let eta_seconds = match (self.recent.front(), self.recent.back()) {
            (Some(&(from, from_done)), Some(&(to, to_done))) if to_done > from_done => {
                let pace = (to_done - from_done) as f64 / (to - from).as_secs_f64().max(1e-6);
                Some((total - done as f64).max(0.0) / pace)
            }
            _ => None,
        };
        Estimate {
            fraction: done as f64 / total,
            events_per_second: (self.applied + self.in_batch) as f64 / elapsed,
            eta_seconds,
        }
    }
}

/// `42s`, `3m 05s`, `2h 10m`: short, and exact enough for an estimate.
fn eta(seconds: f64) -> String {
    let s = seconds.ceil().max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

const BAR_WIDTH: usize = 30;

fn bar_style(status: Arc<Mutex<String>>, unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:>16}} [{{bar:{BAR_WIDTH}}}] {{percent:>3}}% {{human_pos}}/{{human_len}} {unit}  {{status}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "status",
        move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&status.lock().unwrap_or_else(|e| e.into_inner()));
        },
    )
    .progress_chars("=> ")
}

impl Progress {
    /// Bars (on [`terminal_bars`]) when `bars` and stderr is a terminal; log lines
    /// otherwise.
    pub fn new(bars: bool) -> Progress {
        Progress {
            bars: bars_wanted(bars).then(|| terminal_bars().clone()),
            tracked: Mutex::new(HashMap::new()),
        }
    }

    /// Starts tracking `projector` from event id `from` up to `target`.
    pub fn begin(&self, projector: &str, from: i64, target: i64) {
        self.begin_as(projector, from, target, Words::CATCH_UP);
    }

    /// [`Progress::begin`] for work told in `words`.
    pub fn begin_as(&self, projector: &str, from: i64, target: i64, words: Words) {
        if target <= from {
            return;
        }
        let bar = self.bars.as_ref().map(|m| {
            let status = Arc::new(Mutex::new("? events/s  eta ?".to_string()));
            let bar = m.add(ProgressBar::new((target - from) as u64));
            bar.set_style(bar_style(status.clone(), words.unit));
            bar.set_prefix(projector.to_string());
            Bar { bar, status }
        });
        let mut tracked = self.lock();
        if let Some(old) = tracked.remove(projector) {
            if let Some(old) = old.bar {
                old.bar.finish_and_clear();
            }
        }
        let now = Instant::now();
        tracked.insert(
            projector.to_string(),
            Tracked {
                words,
                started: now,
                recent: VecDeque::from([(now, 0)]),
                last_log: None,
                first_id: from,
                target_id: target,
                position_id: from,
                applied: 0,
                in_batch: 0,
                bar,
            },
        );
    }

    /// Records a committed batch.
    pub fn advance(&self, projector: &str, position_id: i64, events: u64) {
        self.moved(projector, position_id, |t| {
            t.applied += events;
            t.in_batch = 0;
        });
    }

    /// What a worker calls after each part of a batch applied in parts: shows
    /// it as progress of `label`, and as a sign of life, since such a batch can
    /// run for minutes before it commits.
    pub fn reporter(
        self: &Arc<Progress>,
        liveness: &Arc<super::Liveness>,
        label: &str,
    ) -> Arc<dyn Fn(i64, u64) + Send + Sync> {
        self.reporting(liveness, label, Progress::within_batch)
    }

    /// What a worker calls after each archived segment it applied: counted for
    /// good, like a committed batch ([`Progress::advance`]), and a sign of life.
    pub fn segment_reporter(
        self: &Arc<Progress>,
        liveness: &Arc<super::Liveness>,
        label: &str,
    ) -> Arc<dyn Fn(i64, u64) + Send + Sync> {
        self.reporting(liveness, label, Progress::advance)
    }

    fn reporting(
        self: &Arc<Progress>,
        liveness: &Arc<super::Liveness>,
        label: &str,
        record: fn(&Progress, &str, i64, u64),
    ) -> Arc<dyn Fn(i64, u64) + Send + Sync> {
        let (progress, liveness, label) = (self.clone(), liveness.clone(), label.to_string());
        Arc::new(move |position, events| {
            liveness.beat(&label);
            record(&progress, &label, position, events);
        })
    }

    /// Records a part of a batch applied in parts (see `worker::parts`): the batch
    /// has come to `position_id` (short of its end), having consumed `events` so
    /// far. The batch's [`advance`](Progress::advance) then counts them for good.
    pub fn within_batch(&self, projector: &str, position_id: i64, events: u64) {
        self.moved(projector, position_id, |t| t.in_batch = events);
    }

    /// Counts events with `count`, then shows `projector` at `position_id`: its
    /// bar, or a `catching up` line when one is due; finished once it has reached
    /// its target.
    fn moved(&self, projector: &str, position_id: i64, count: impl FnOnce(&mut Tracked)) {
        let mut tracked = self.lock();
        let Some(t) = tracked.get_mut(projector) else {
            return;
        };
        count(t);
        t.position_id = t.position_id.max(position_id);
        let done = t.done();
        t.recent.push_back((Instant::now(), done));
        if t.recent.len() > ETA_WINDOW {
            t.recent.pop_front();
        }
        let estimate = t.estimate();
        if let Some(bar) = &t.bar {
            bar.update(
                t.done(),
                format!(
                    "{} events/s  eta {}",
                    HumanCount(estimate.events_per_second.round() as u64),
                    estimate.eta_seconds.map_or_else(|| "?".to_string(), eta)
                ),
            );
        } else if estimate.eta_seconds.is_some()
            && t.last_log.is_none_or(|at| at.elapsed() >= LOG_EVERY)
        {
            // The first line as soon as something is known, then every LOG_EVERY.
            t.last_log = Some(Instant::now());
            tracing::info!(
                projector,
                percent = (estimate.fraction * 100.0).floor() as u64,
                position = t.position_id,
                // Not `target`: the JSON logs use that key for the module.
                target_position = t.target_id,
                events_applied = t.applied + t.in_batch,
                events_per_second = estimate.events_per_second.round() as u64,
                eta_seconds = estimate.eta_seconds.map(f64::ceil),
                "{}",
                t.words.doing
            );
        }
        if t.position_id >= t.target_id {
            drop(tracked);
            self.finish(projector);
        }
    }

    /// The projector has caught up: its bar goes to 100 % with a summary, and a
    /// `caught up` line is logged.
    pub fn finish(&self, projector: &str) {
        let Some(t) = self.lock().remove(projector) else {
            return;
        };
        let elapsed = t.started.elapsed().as_secs_f64();
        let rate = (t.applied as f64 / elapsed.max(1e-6)).round() as u64;
        if let (Some(bar), Some(bars)) = (&t.bar, &self.bars) {
            // The bar leaves the live area and its last state, at 100 % with a
            // summary, is printed above the others: a finished bar kept in the
            // live area is lost when the bars are next cleared for a log line.
            let total = HumanCount(bar.bar.length().unwrap_or(0));
            bar.bar.finish_and_clear();
            bars.remove(&bar.bar);
            let _ = bars.println(format!(
                "{projector:>16} [{}] 100% {total}/{total} {}  {}: {} events in {elapsed:.1} s, {} events/s",
                "=".repeat(BAR_WIDTH),
                t.words.unit,
                t.words.done,
                HumanCount(t.applied),
                HumanCount(rate)
            ));
        }
        tracing::info!(
            projector,
            position = t.position_id,
            events_applied = t.applied,
            seconds = (elapsed * 10.0).round() / 10.0,
            events_per_second = rate,
            "{}",
            t.words.done
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn eta_is_short() {
        assert_eq!(super::eta(0.2), "1s");
        assert_eq!(super::eta(59.0), "59s");
        assert_eq!(super::eta(185.0), "3m 05s");
        assert_eq!(super::eta(7800.0), "2h 10m");
    }
}
