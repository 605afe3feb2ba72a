//! What operators see of a running daemon: Prometheus metrics, the HTTP health and
//! metrics endpoints (and `/wait`, for applications), and systemd's readiness and
//! watchdog notifications.

pub mod http;
pub mod metrics;
pub mod progress;
pub mod systemd;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Each projector task's last sign of life. A task that has not come round its
/// loop for `stale_after` is wedged (stuck in a call that never returns), which is
/// what `/healthz` and the systemd watchdog exist to catch.
#[derive(Debug)]
pub struct Liveness {
    beats: Mutex<HashMap<String, Instant>>,
    stale_after: Duration,
}

impl Liveness {
    /// No tasks yet: each is watched from its first [`beat`](Liveness::beat), and is
    /// stale once `stale_after` passes without another.
    pub fn new(stale_after: Duration) -> Liveness {
        Liveness {
            beats: Mutex::new(HashMap::new()),
            stale_after,
        }
    }

    /// `task` is alive now; called once per turn of its loop.
    pub fn beat(&self, task: &str) {
        // A poisoned lock only means another task panicked mid-insert; the map is
        // still usable.
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.insert(task.to_string(), Instant::now());
    }

    /// The task has ended on purpose (caught up with --once, parked): stop expecting it.
    pub fn retire(&self, task: &str) {
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.remove(task);
    }

    /// Names of the tasks that have gone quiet.
    pub fn stale(&self) -> Vec<String> {
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats
            .iter()
            .filter(|(_, at)| at.elapsed() > self.stale_after)
            .map(|(name, _)| name.clone())
            .collect()
    }
}
