//! How often a caught-up projector starts a batch under a steady flow of writes.
//!
//! A live batch costs the database (whose CPU the writers share) about the same
//! whether it carries 20 events or 100: a transaction, a lock, a checkpoint, a few
//! index probes, and the start-up of the fold statement. At a moderate rate one
//! batch per [`BASE`] keeps the read models fresh well within 20 ms. When the log
//! grows faster than [`BRISK`], the fixed cost of a batch every 10 ms is what the
//! writers pay for pgfold (measured with `cargo bench -- --only write`: B rose
//! from 0.75–0.79× to 0.83× the bare table with 20 ms between batches), so the
//! pause grows with the rate, up to [`MOST`] at twice that rate. The projection
//! then lags by one pause more at most, and only while writes arrive that fast.
//!
//! The rate is that of the log, in event ids, whatever the projector consumes:
//! the batch costs the same for a projector that filters most events out.

use std::time::{Duration, Instant};

/// Between batch starts at moderate rates.
pub const BASE: Duration = Duration::from_millis(10);

/// Never longer between batch starts, however fast the log grows.
const MOST: Duration = Duration::from_millis(20);

/// Events per second from which the pause grows (in proportion to the rate).
const BRISK: f64 = 2_500.0;

/// Weight of the newest batch in the smoothed rate: a burst of one batch does
/// not lengthen the pause, a flow that lasts a few batches does.
const NEWEST: f64 = 0.25;

#[derive(Debug, Default)]
pub struct Cadence {
    /// Where the previous live batch started, and the event id it reached.
    last: Option<(Instant, i64)>,
    /// Smoothed rate of the log, event ids per second.
    rate: f64,
}

impl Cadence {
    /// A live batch started at `started` reached event id `reached`: how long
    /// after its start the next one should start.
    pub fn next(&mut self, started: Instant, reached: i64) -> Duration {
        if let Some((at, from)) = self.last {
            let secs = started.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let rate = (reached - from).max(0) as f64 / secs;
                self.rate += NEWEST * (rate - self.rate);
            }
        }
        self.last = Some((started, reached));
        BASE.mul_f64((self.rate / BRISK).clamp(1.0, MOST.as_secs_f64() / BASE.as_secs_f64()))
    }

    /// The flow paused (a look found nothing): the next batch starts a new
    /// measurement, so that the first batch after a pause is not held back.
    pub fn paused(&mut self) {
        *self = Cadence::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `batches` batches `every` apart from `start` and event id `from`,
    /// each reaching `per_batch` ids further; returns the last pause.
    fn steady(
        cadence: &mut Cadence,
        (start, from): (Instant, i64),
        batches: u32,
        every: Duration,
        per_batch: i64,
    ) -> Duration {
        let mut pause = Duration::ZERO;
        for i in 0..batches {
            pause = cadence.next(start + every * i, from + per_batch * i64::from(i));
        }
        pause
    }

    #[test]
    fn moderate_rates_keep_the_base_pause() {
        let mut cadence = Cadence::default();
        // 2,000 events/s: 20 per 10 ms.
        assert_eq!(
            steady(&mut cadence, (Instant::now(), 0), 50, BASE, 20),
            BASE
        );
    }

    #[test]
    fn fast_flows_lengthen_the_pause_in_proportion_up_to_the_most() {
        let mut cadence = Cadence::default();
        // 3,750 events/s (75 every 20 ms): 1.5 times BRISK.
        let pause = steady(&mut cadence, (Instant::now(), 0), 100, 2 * BASE, 75);
        assert!(
            (pause.as_secs_f64() - 0.015).abs() < 0.0005,
            "1.5 x BRISK gives 15 ms, got {pause:?}"
        );
        let mut cadence = Cadence::default();
        // 20,000 events/s.
        assert_eq!(
            steady(&mut cadence, (Instant::now(), 0), 100, BASE, 200),
            MOST
        );
    }

    #[test]
    fn one_large_batch_does_not_lengthen_the_pause_but_a_lasting_flow_does() {
        let mut cadence = Cadence::default();
        let start = Instant::now();
        // 2,000 events/s for a while, then one batch of 36 ids in 10 ms
        // (3,600/s): the smoothed rate stays below BRISK.
        steady(&mut cadence, (start, 0), 20, BASE, 20);
        assert_eq!(cadence.next(start + BASE * 20, 19 * 20 + 36), BASE);
        // 4,000 events/s that lasts lengthens it.
        let pause = steady(&mut cadence, (start + BASE * 21, 416), 20, BASE, 40);
        assert!(pause > BASE, "a lasting 4,000/s lengthens it: {pause:?}");
    }

    #[test]
    fn a_pause_in_the_flow_starts_afresh() {
        let mut cadence = Cadence::default();
        assert_eq!(
            steady(&mut cadence, (Instant::now(), 0), 100, BASE, 200),
            MOST
        );
        cadence.paused();
        let start = Instant::now();
        assert_eq!(cadence.next(start, 1_000_000), BASE);
    }
}
