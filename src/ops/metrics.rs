//! Prometheus metrics. Counters and the batch histogram are kept by the projector
//! tasks as they work; the gauges that describe the database (lag, dead letters,
//! state) are read from it at scrape time, so they are right even for projectors
//! that another instance is working.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::status::Status;

/// The label of every per-projector series: `projector="<name>"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectorLabel {
    projector: String,
}

/// `pgfold_projector_state`'s labels: one series per projector and state, 1 for
/// the state it is in and 0 for the others.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    projector: String,
    state: String,
}

/// The daemon's Prometheus registry (names prefixed `pgfold_`), shared by the
/// projector tasks, which count their batches, and `/metrics`, which refreshes the
/// database gauges and renders it.
pub struct Metrics {
    registry: Registry,
    events_applied: Family<ProjectorLabel, Counter>,
    batches: Family<ProjectorLabel, Counter>,
    errors: Family<ProjectorLabel, Counter>,
    batch_seconds: Family<ProjectorLabel, Histogram>,
    lag_events: Family<ProjectorLabel, Gauge>,
    lag_seconds: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    dead_letters: Family<ProjectorLabel, Gauge>,
    state: Family<StateLabels, Gauge>,
    horizon_stall_seconds: Gauge<f64, AtomicU64>,
    replay: ReplayGauges,
    rebuild: RebuildMetrics,
    archive: ArchiveMetrics,
}

/// Rebuilds beside the live projection (`pgfold_rebuild_*`): the counters kept by
/// this instance's build tasks, the gauges read from the database at scrape time
/// (absent while no build is in progress).
#[derive(Default)]
struct RebuildMetrics {
    events_applied: Family<ProjectorLabel, Counter>,
    batch_seconds: Family<ProjectorLabel, Counter<f64, AtomicU64>>,
    swaps: Family<ProjectorLabel, Counter>,
    swap_retries: Family<ProjectorLabel, Counter>,
    swap_lock_seconds: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    position: Family<ProjectorLabel, Gauge>,
    lag_events: Family<ProjectorLabel, Gauge>,
    events_per_second: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    eta_seconds: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    in_progress: Family<ProjectorLabel, Gauge>,
}

impl RebuildMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("rebuild");
        r.register(
            "events_applied",
            "Events applied into build schemas by this instance",
            self.events_applied.clone(),
        );
        r.register(
            "batch_seconds",
            "Time spent in build batches by this instance",
            self.batch_seconds.clone(),
        );
        r.register(
            "swaps",
            "Rebuilt projections swapped in by this instance",
            self.swaps.clone(),
        );
        r.register(
            "swap_retries",
            "Swap attempts given up (lock taken, reader in the way, error) and retried",
            self.swap_retries.clone(),
        );
        r.register(
            "swap_lock_seconds",
            "How long the last swap held its exclusive locks",
            self.swap_lock_seconds.clone(),
        );
        r.register(
            "in_progress",
            "1 while a rebuild of the projector is in progress",
            self.in_progress.clone(),
        );
        r.register(
            "position",
            "A rebuild's position (event id)",
            self.position.clone(),
        );
        r.register(
            "lag_events",
            "Events a rebuild has yet to apply",
            self.lag_events.clone(),
        );
        r.register(
            "events_per_second",
            "Events a rebuild has applied per second since it began",
            self.events_per_second.clone(),
        );
        r.register(
            "eta_seconds",
            "Seconds left in a rebuild at its rate so far",
            self.eta_seconds.clone(),
        );
    }

    fn observe(&self, p: &crate::status::ProjectorStatus) {
        let l = label(&p.name);
        let Some(r) = &p.rebuild else {
            self.in_progress.get_or_create(&l).set(0);
            self.position.remove(&l);
            self.lag_events.remove(&l);
            self.events_per_second.remove(&l);
            self.eta_seconds.remove(&l);
            return;
        };
        self.in_progress.get_or_create(&l).set(1);
        self.position.get_or_create(&l).set(r.position);
        self.lag_events.get_or_create(&l).set(r.lag_events);
        set_or_remove(&self.events_per_second, &l, r.events_per_second);
        set_or_remove(&self.eta_seconds, &l, r.eta_seconds);
    }
}

/// A replay in progress, per projector; absent when none is.
#[derive(Default)]
struct ReplayGauges {
    position: Family<ProjectorLabel, Gauge>,
    target: Family<ProjectorLabel, Gauge>,
    events: Family<ProjectorLabel, Gauge>,
    events_per_second: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    eta_seconds: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
}

/// A value not known yet is left out rather than shown as 0.
fn set_or_remove(
    family: &Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    l: &ProjectorLabel,
    v: Option<f64>,
) {
    match v {
        Some(v) => {
            family.get_or_create(l).set(v);
        }
        None => {
            family.remove(l);
        }
    }
}

impl ReplayGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "replay_position",
            "A replaying projector's position (event id)",
            self.position.clone(),
        );
        registry.register(
            "replay_target",
            "The event id a replaying projector rebuilds up to",
            self.target.clone(),
        );
        registry.register(
            "replay_events",
            "Events applied since the replay began",
            self.events.clone(),
        );
        registry.register(
            "replay_events_per_second",
            "Events applied per second since the replay began",
            self.events_per_second.clone(),
        );
        registry.register(
            "replay_eta_seconds",
            "Seconds left in the replay at its rate so far",
            self.eta_seconds.clone(),
        );
    }

    fn observe(&self, p: &crate::status::ProjectorStatus) {
        let l = label(&p.name);
        let Some(r) = &p.replay else {
            self.position.remove(&l);
            self.target.remove(&l);
            self.events.remove(&l);
            self.events_per_second.remove(&l);
            self.eta_seconds.remove(&l);
            return;
        };
        self.position.get_or_create(&l).set(r.position);
        self.target.get_or_create(&l).set(r.target);
        self.events.get_or_create(&l).set(p.events_applied);
        set_or_remove(&self.events_per_second, &l, r.events_per_second);
        set_or_remove(&self.eta_seconds, &l, r.eta_seconds);
    }
}

/// `pgfold_archive_*`: what the archive holds (from the database, at each
/// scrape) and this instance's passes.
#[derive(Default)]
struct ArchiveMetrics {
    segments: Gauge,
    events: Gauge,
    bytes: Gauge,
    last_pass_age_seconds: Gauge<f64, AtomicU64>,
    passes: Counter,
    pass_failures: Counter,
    events_moved: Counter,
    bytes_moved: Counter,
}

impl ArchiveMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "archive_segments",
            "Segments recorded in the archive",
            self.segments.clone(),
        );
        registry.register(
            "archive_events",
            "Events held in archive segments",
            self.events.clone(),
        );
        registry.register(
            "archive_bytes",
            "Size of the archive's segments",
            self.bytes.clone(),
        );
        registry.register(
            "archive_last_pass_age_seconds",
            "Time since the last archive pass ended (-1: never)",
            self.last_pass_age_seconds.clone(),
        );
        registry.register(
            "archive_passes",
            "Archive passes this instance completed",
            self.passes.clone(),
        );
        registry.register(
            "archive_pass_failures",
            "Archive passes this instance started that failed (nothing deleted)",
            self.pass_failures.clone(),
        );
        registry.register(
            "archive_events_moved",
            "Events this instance moved from the table to the archive",
            self.events_moved.clone(),
        );
        registry.register(
            "archive_bytes_moved",
            "Bytes of segments this instance wrote",
            self.bytes_moved.clone(),
        );
    }

    fn observe(&self, a: &crate::archive::Report) {
        self.segments.set(a.segments);
        self.events.set(a.events);
        self.bytes.set(a.bytes);
        self.last_pass_age_seconds
            .set(a.last_pass_age_seconds.unwrap_or(-1.0));
    }
}

fn label(projector: &str) -> ProjectorLabel {
    ProjectorLabel {
        projector: projector.to_string(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric registered, with no series yet: a projector's series appear
    /// at its first batch or the first scrape that sees it.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgfold");
        let events_applied = Family::<ProjectorLabel, Counter>::default();
        let batches = Family::<ProjectorLabel, Counter>::default();
        let errors = Family::<ProjectorLabel, Counter>::default();
        let batch_seconds = Family::<ProjectorLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let lag_events = Family::<ProjectorLabel, Gauge>::default();
        let lag_seconds = Family::<ProjectorLabel, Gauge<f64, AtomicU64>>::default();
        let dead_letters = Family::<ProjectorLabel, Gauge>::default();
        let state = Family::<StateLabels, Gauge>::default();
        let horizon_stall_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "events_applied",
            "Events applied by this instance, per projector",
            events_applied.clone(),
        );
        registry.register(
            "batches",
            "Batches committed by this instance",
            batches.clone(),
        );
        registry.register(
            "errors",
            "Failed batch attempts (database errors and rejected events)",
            errors.clone(),
        );
        registry.register(
            "batch_duration_seconds",
            "Time to read, apply and commit one batch",
            batch_seconds.clone(),
        );
        registry.register(
            "lag_events",
            "Committed events the projector consumes and has not applied",
            lag_events.clone(),
        );
        registry.register(
            "lag_seconds",
            "Age (by occurred_at) of the oldest event not yet applied; 0 when caught up",
            lag_seconds.clone(),
        );
        registry.register(
            "dead_letters",
            "Events skipped after failing",
            dead_letters.clone(),
        );
        registry.register(
            "projector_state",
            "1 for the projector's current state (running, replaying, failed, new)",
            state.clone(),
        );
        registry.register(
            "horizon_stall_seconds",
            "How long an open transaction has kept new events from being read",
            horizon_stall_seconds.clone(),
        );
        let replay = ReplayGauges::default();
        replay.register(&mut registry);
        let rebuild = RebuildMetrics::default();
        rebuild.register(&mut registry);
        let archive = ArchiveMetrics::default();
        archive.register(&mut registry);
        Metrics {
            registry,
            events_applied,
            batches,
            errors,
            batch_seconds,
            lag_events,
            lag_seconds,
            dead_letters,
            state,
            horizon_stall_seconds,
            replay,
            rebuild,
            archive,
        }
    }

    /// An archive pass of `pgfold run` (`archive.interval`) ended: with the
    /// events and bytes it moved, or failed.
    pub fn archive_pass(&self, moved: Option<(u64, u64)>) {
        match moved {
            Some((events, bytes)) => {
                self.archive.passes.inc();
                self.archive.events_moved.inc_by(events);
                self.archive.bytes_moved.inc_by(bytes);
            }
            None => {
                self.archive.pass_failures.inc();
            }
        }
    }

    /// A build batch committed (`src/rebuild`).
    pub fn rebuild_batch(&self, projector: &str, events: u64, seconds: f64) {
        let l = label(projector);
        self.rebuild.events_applied.get_or_create(&l).inc_by(events);
        self.rebuild.batch_seconds.get_or_create(&l).inc_by(seconds);
    }

    /// A rebuilt projection was swapped in, holding its exclusive locks `seconds`.
    pub fn rebuild_swapped(&self, projector: &str, seconds: f64) {
        let l = label(projector);
        self.rebuild.swaps.get_or_create(&l).inc();
        self.rebuild
            .swap_lock_seconds
            .get_or_create(&l)
            .set(seconds);
    }

    /// A swap attempt gave up (lock taken, reader in the way, error) and will be
    /// tried again.
    pub fn rebuild_swap_retried(&self, projector: &str) {
        self.rebuild
            .swap_retries
            .get_or_create(&label(projector))
            .inc();
    }

    /// A batch of `events` committed for `projector` in `seconds` (read, apply and
    /// commit); `events` may be 0 when only the checkpoint moved.
    pub fn batch_applied(&self, projector: &str, events: u64, seconds: f64) {
        let l = label(projector);
        self.events_applied.get_or_create(&l).inc_by(events);
        self.batches.get_or_create(&l).inc();
        self.batch_seconds.get_or_create(&l).observe(seconds);
    }

    /// A batch attempt for `projector` failed (a database error or a rejected
    /// event) and will be retried or narrowed.
    pub fn batch_failed(&self, projector: &str) {
        self.errors.get_or_create(&label(projector)).inc();
    }

    /// How long, in seconds, an open transaction has kept newer events from being
    /// read; 0 once nothing is in the way.
    pub fn horizon_stalled_for(&self, seconds: f64) {
        self.horizon_stall_seconds.set(seconds);
    }

    /// Copies what the database says about each projector into the gauges.
    pub fn observe(&self, status: &Status) {
        self.archive.observe(&status.archive);
        for p in &status.projectors {
            let l = label(&p.name);
            // Counters are exported at 0 before their first increment, so that
            // rate() and increase() (dashboards, alerts) count a projector's first
            // error instead of starting from it.
            self.events_applied.get_or_create(&l).inc_by(0);
            self.batches.get_or_create(&l).inc_by(0);
            self.errors.get_or_create(&l).inc_by(0);
            self.lag_events.get_or_create(&l).set(p.lag_events);
            self.lag_seconds.get_or_create(&l).set(p.lag_seconds);
            self.dead_letters.get_or_create(&l).set(p.dead_letters);
            self.replay.observe(p);
            self.rebuild.observe(p);
            for state in ["running", "replaying", "failed", "new"] {
                let labels = StateLabels {
                    projector: p.name.clone(),
                    state: state.to_string(),
                };
                self.state
                    .get_or_create(&labels)
                    .set(i64::from(p.state == state));
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}
