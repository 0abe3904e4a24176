//! The one backoff every retry, postpone and reconnect uses.
//!
//! Exponential from `base`, doubling per consecutive failure up to `cap`, with
//! optional ±`jitter` so that many workers recovering from the same outage do
//! not retry in lockstep. `reset` after a success starts afresh.

use std::time::Duration;

use rand::Rng;

/// An exponential backoff with a cap and optional jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Fraction of the delay added or removed at random (0.2 = ±20%).
    jitter: f64,
    failures: u32,
}

impl Backoff {
    /// Delivery to HubSpot and the database: 1 s, 2 s, 4 s … 30 s, ±20%
    /// (SPEC §4.7).
    pub fn delivery() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30), 0.2)
    }

    /// Reopening the replication stream: 250 ms doubling to 16 s, ±20%.
    pub fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(16), 0.2)
    }

    /// A backoff from `base` doubling up to `cap`, with ±`jitter` (0 to 1).
    pub fn new(base: Duration, cap: Duration, jitter: f64) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            jitter: jitter.clamp(0.0, 1.0),
            failures: 0,
        }
    }

    /// Counts one more failure and returns how long to wait before the next try.
    // Not an iterator: a backoff never ends, and `reset` has no Iterator analogue.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let delay = self.peek();
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The delay `next` would return now, without counting a failure.
    pub fn peek(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(16));
        let delay = self.base.saturating_mul(factor).min(self.cap);
        if self.jitter == 0.0 {
            delay
        } else {
            delay.mul_f64(rand::thread_rng().gen_range(1.0 - self.jitter..=1.0 + self.jitter))
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500), 0.0);
        let delays: Vec<u128> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let mut b = Backoff::delivery();
        for _ in 0..4 {
            b.next();
        }
        for _ in 0..200 {
            let d = b.peek().as_secs_f64();
            assert!((16.0 * 0.8..=16.0 * 1.2).contains(&d), "{d}");
        }
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), 0.0);
        for _ in 0..1000 {
            b.next();
        }
        assert_eq!(b.peek(), Duration::from_secs(30));
    }
}
