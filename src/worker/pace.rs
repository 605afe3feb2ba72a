//! How far a set-based batch reaches while catching up.
//!
//! One statement over the whole backlog is the fastest way to fold it, but it
//! commits nothing (and so shows no progress) until the very end: an hour of "0 %"
//! on a 100 M-event log. So a catch-up is cut into ranges that each take about
//! [`TARGET`]: the first is modest, each one measured, and the next sized to the
//! measured rate, never beyond `daemon.set_batch_size`. A second per range keeps
//! the fixed cost of a batch (a transaction, planning, two index probes for its
//! end) to a few percent. Live batches are smaller than the size and unaffected.

use std::time::Duration;

/// What each range of a catch-up should take.
pub const TARGET: Duration = Duration::from_millis(750);

/// The first range of a catch-up, in event ids, before anything is measured.
const FIRST: u32 = 20_000;

/// Never below this: tiny ranges are all fixed cost.
const SMALLEST: u32 = 10_000;

/// One measurement may double the size, or shrink it to a quarter: what a range
/// costs depends on what it holds (a range of events the projector filters out
/// is nearly free), so the size feels its way up rather than leaping to a rate
/// one cheap range suggested (measured: a leap of eight made a range take 2 s);
/// and one slow range on a busy machine should not undo the rest.
const MOST_GROWTH: f64 = 2.0;
const MOST_SHRINK: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct Pace {
    limit: u32,
    max: u32,
}

impl Pace {
    pub fn new(max: u32) -> Pace {
        Pace {
            limit: FIRST.min(max),
            max,
        }
    }

    /// The size of the next range, in event ids.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A range cut at the current size spanned `ids` event ids and took `took`:
    /// size the next one to take [`TARGET`] at that rate.
    pub fn measured(&mut self, ids: i64, took: Duration) {
        if ids <= 0 {
            return;
        }
        let rate = ids as f64 / took.as_secs_f64().max(0.001);
        let current = f64::from(self.limit);
        let next = (rate * TARGET.as_secs_f64())
            .clamp(current * MOST_SHRINK, current * MOST_GROWTH)
            .clamp(f64::from(SMALLEST.min(self.max)), f64::from(self.max));
        self.limit = next as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_the_next_range_to_the_measured_rate() {
        let mut pace = Pace::new(10_000_000);
        assert_eq!(pace.limit(), FIRST);
        // 20,000 ids in 0.5 s: 40,000 ids/s, so 30,000 ids for a range.
        pace.measured(20_000, Duration::from_millis(500));
        assert_eq!(pace.limit(), 30_000);
        // Slower now: 20,000 ids/s.
        pace.measured(30_000, Duration::from_millis(1500));
        assert_eq!(pace.limit(), 15_000);
    }

    #[test]
    fn grows_and_shrinks_in_bounded_steps_within_the_configured_size() {
        let mut pace = Pace::new(1_000_000);
        pace.measured(20_000, Duration::from_millis(1));
        assert_eq!(pace.limit(), 40_000, "at most twofold");
        for _ in 0..5 {
            pace.measured(i64::from(pace.limit()), Duration::from_millis(10));
        }
        assert_eq!(pace.limit(), 1_000_000, "never beyond set_batch_size");
        pace.measured(1_000_000, Duration::from_secs(1000));
        assert_eq!(pace.limit(), 250_000, "at most to a quarter");
        let mut small = Pace::new(700);
        assert_eq!(small.limit(), 700);
        small.measured(700, Duration::from_secs(10));
        assert_eq!(
            small.limit(),
            700,
            "a configured size below the floor holds"
        );
    }
}
