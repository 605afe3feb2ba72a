//! Small utilities shared across modules: retry backoff and one-line error text.

use std::time::Duration;

/// Error messages from parsers sometimes span lines; the CLI promises one.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The largest delay the next call may return.
    pub fn peek(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.peek();
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter keeps restarted instances from reconnecting in lockstep.
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(millis / 2 + rand::random_range(0..=millis / 2))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[7] >= Duration::from_secs(1), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
