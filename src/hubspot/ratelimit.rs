//! Per-portal rolling-window limiter.
//!
//! HubSpot counts requests in a rolling 10-second window. A token bucket with
//! burst = limit would allow twice the limit inside one window, so this keeps
//! the send times of the last `limit` requests and waits until the oldest
//! leaves the window. No crate we found implements a strict sliding log.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

pub const WINDOW: Duration = Duration::from_secs(10);

pub struct RateLimiter {
    limit: usize,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub fn new(limit: u32) -> Self {
        RateLimiter {
            limit: limit.max(1) as usize,
            window: WINDOW,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// Drops the send times that have left the window.
    fn forget_old(&self, sent: &mut VecDeque<Instant>, now: Instant) {
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            sent.pop_front();
        }
    }

    /// Waits until one more request fits in the window, then records it.
    /// Returns how long it waited, and the time recorded (see `sent_now`).
    pub async fn acquire(&self) -> (Duration, Instant) {
        let started = Instant::now();
        let mut sent = self.sent.lock().await;
        loop {
            let now = Instant::now();
            self.forget_old(&mut sent, now);
            if sent.len() < self.limit {
                sent.push_back(now);
                return (now.duration_since(started), now);
            }
            let oldest = sent.front().copied().unwrap_or(now);
            // A little margin so that our clock and HubSpot's never disagree at the edge.
            tokio::time::sleep_until(oldest + self.window + Duration::from_millis(5)).await;
        }
    }

    /// The request recorded at `at` by `acquire` leaves only now (it passed
    /// its fence first, which takes a database round trip, longer when many
    /// calls are in flight): its place in the window moves to now, so that
    /// HubSpot, which counts arrivals, never sees more than the limit.
    pub async fn sent_now(&self, at: Instant) {
        let mut sent = self.sent.lock().await;
        if let Some(i) = sent.iter().rposition(|t| *t == at) {
            sent.remove(i);
            sent.push_back(Instant::now());
        }
    }

    /// Waits until `n` more requests would fit in the window, without taking
    /// them: the caller then gathers its batch, which grows while we wait.
    pub async fn wait_available(&self, n: usize) {
        let n = n.min(self.limit);
        loop {
            let wake_at = {
                let mut sent = self.sent.lock().await;
                let now = Instant::now();
                self.forget_old(&mut sent, now);
                if sent.len() + n <= self.limit {
                    return;
                }
                sent[sent.len() + n - self.limit - 1] + self.window + Duration::from_millis(5)
            };
            tokio::time::sleep_until(wake_at).await;
        }
    }

    /// How long a partial batch waits for more work before its next round of
    /// `n` calls. While at most half of the window's budget is used it goes
    /// at once: latency wins while calls are cheap. Past half, the wait grows
    /// with the share used, through the paced interval (window / limit per
    /// call, the rate the budget lasts at) at three quarters, to twice that
    /// when the window is full; so a stream above the budget fills its
    /// batches instead of spending the window in its first seconds and then
    /// stalling.
    pub fn linger(&self, n: usize) -> Duration {
        // Held by a caller waiting for the window to have room: it is full.
        let used = match self.sent.try_lock() {
            Ok(mut sent) => {
                self.forget_old(&mut sent, Instant::now());
                sent.len()
            }
            Err(_) => self.limit,
        };
        linger_for(used, self.limit, n.min(self.limit), self.window)
    }

    /// Records a request that was sent without waiting (one made before the
    /// portal was known), so that the window still counts it.
    pub async fn record_unthrottled(&self) {
        self.sent.lock().await.push_back(Instant::now());
    }

    /// Takes in HubSpot's count of the window (`max - remaining` requests
    /// in the last 10 s, ours included): when HubSpot counts more than we
    /// remember (we restarted, or someone else shares the portal), the
    /// difference is recorded as sent just now. Conservative: those requests
    /// were sent earlier, so they block a little longer than they must.
    pub async fn observe(&self, hubspot_max: u32, hubspot_remaining: u32) {
        let used = hubspot_max.saturating_sub(hubspot_remaining) as usize;
        let mut sent = self.sent.lock().await;
        let now = Instant::now();
        self.forget_old(&mut sent, now);
        if used > sent.len() {
            let missing = (used - sent.len()).min(self.limit);
            // Every entry is at most `now`: appending keeps the log in time order.
            sent.extend(std::iter::repeat_n(now, missing));
        }
    }

    /// Treats the window as full as of `ago` before now, when nothing was
    /// sent here yet: another process of ours (the one before a restart or a
    /// change of leader) was calling the portal then, and its calls still
    /// count in HubSpot's window. Calls wait until that moment has left it.
    pub async fn assume_full_since(&self, ago: Duration) {
        if ago >= self.window {
            return;
        }
        let now = Instant::now();
        let at = now.checked_sub(ago).unwrap_or(now);
        let mut sent = self.sent.lock().await;
        if sent.is_empty() {
            sent.extend(std::iter::repeat_n(at, self.limit));
        }
    }

    /// Pushes every slot to "just used": after a 429 the window is treated as full.
    pub async fn saturate(&self) {
        let mut sent = self.sent.lock().await;
        let now = Instant::now();
        sent.clear();
        sent.extend(std::iter::repeat_n(now, self.limit));
    }
}

/// `RateLimiter::linger` for `used` of `limit` requests in the window.
fn linger_for(used: usize, limit: usize, n: usize, window: Duration) -> Duration {
    let share = used as f64 / limit.max(1) as f64;
    if share <= 0.5 {
        return Duration::ZERO;
    }
    let paced = window.mul_f64(n as f64 / limit.max(1) as f64);
    paced.mul_f64(((share - 0.5) * 4.0).min(2.0))
}

/// The limiters of all portals, created on first use: every part of the
/// process that calls a portal (delivery, the admin API) shares its budget.
#[derive(Clone)]
pub struct Limiters {
    limit: u32,
    by_portal: Arc<std::sync::Mutex<HashMap<i64, Arc<RateLimiter>>>>,
}

impl Limiters {
    /// Limiters allowing `limit` requests per rolling 10 s per portal.
    pub fn new(limit: u32) -> Self {
        Limiters {
            limit,
            by_portal: Default::default(),
        }
    }

    /// Drops the portal's limiter when nothing holds it and its window is
    /// empty (no Spot is served on it any more), so the map does not grow
    /// with every portal ever seen; a later call starts from an empty
    /// window, which is what HubSpot counts by then too.
    pub fn forget_if_unused(&self, portal_id: i64) {
        let mut map = self.by_portal.lock().unwrap_or_else(|e| e.into_inner());
        let unused = map.get(&portal_id).is_some_and(|l| {
            Arc::strong_count(l) == 1
                && l.sent.try_lock().is_ok_and(|mut sent| {
                    l.forget_old(&mut sent, Instant::now());
                    sent.is_empty()
                })
        });
        if unused {
            map.remove(&portal_id);
        }
    }

    /// The portal's limiter.
    pub fn portal(&self, portal_id: i64) -> Arc<RateLimiter> {
        let mut map = self.by_portal.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(portal_id)
            .or_insert_with(|| Arc::new(RateLimiter::new(self.limit)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_left_late_holds_its_place_from_when_it_left() {
        // Two calls a window; the first is recorded, then leaves 3 s later
        // (its fence took that long): its place is taken until 13 s, so the
        // call after the next one waits for that, not for 10 s.
        let rl = RateLimiter::new(2);
        let started = Instant::now();
        let (_, first) = rl.acquire().await;
        rl.acquire().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        rl.sent_now(first).await;
        rl.acquire().await;
        rl.acquire().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(13) && waited < Duration::from_secs(14),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_process_waits_for_the_previous_ones_window() {
        // The previous process last called 4 s ago: its calls leave the window in 6 s.
        let rl = RateLimiter::new(10);
        tokio::time::advance(Duration::from_secs(20)).await;
        rl.assume_full_since(Duration::from_secs(4)).await;
        let started = Instant::now();
        rl.acquire().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(6) && waited < Duration::from_secs(7),
            "{waited:?}"
        );
        // Longer ago than the window: nothing to wait for.
        let rl = RateLimiter::new(10);
        rl.assume_full_since(WINDOW).await;
        let started = Instant::now();
        rl.acquire().await;
        assert!(started.elapsed() < Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn what_hubspot_counts_beyond_our_memory_is_waited_for() {
        let rl = RateLimiter::new(10);
        // A new process: HubSpot says 8 of its 110 were used in this window.
        rl.observe(110, 102).await;
        let started = Instant::now();
        for _ in 0..2 {
            rl.acquire().await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(10),
            "2 of 10 left"
        );
        rl.acquire().await;
        assert!(started.elapsed() >= WINDOW, "the 11th waits for the window");
        // What we already count is not counted twice.
        let rl = RateLimiter::new(10);
        rl.acquire().await;
        rl.observe(110, 109).await;
        let started = Instant::now();
        for _ in 0..9 {
            rl.acquire().await;
        }
        assert!(started.elapsed() < Duration::from_millis(10));
    }

    #[test]
    fn the_linger_is_nothing_while_the_budget_is_ample_and_paces_when_it_is_tight() {
        let w = WINDOW;
        assert_eq!(linger_for(0, 100, 2, w), Duration::ZERO);
        assert_eq!(linger_for(50, 100, 2, w), Duration::ZERO);
        // Three quarters used: the paced interval, 2 calls at 100 ms each.
        assert_eq!(linger_for(75, 100, 2, w), Duration::from_millis(200));
        assert_eq!(linger_for(100, 100, 2, w), Duration::from_millis(400));
        assert!(linger_for(60, 100, 2, w) < linger_for(90, 100, 2, w));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_in_any_window() {
        let rl = RateLimiter::new(5);
        let mut times = Vec::new();
        for _ in 0..17 {
            rl.acquire().await;
            times.push(Instant::now());
        }
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .filter(|u| u.duration_since(*t) < WINDOW)
                .count();
            assert!(in_window <= 5, "{in_window} requests within 10 s");
        }
        // 17 requests at 5 per window need three full windows of waiting.
        assert!(times[16].duration_since(times[0]) >= WINDOW * 3);
    }
}
