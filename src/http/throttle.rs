//! Failed credentials, throttled per client address: the admin token is
//! the key to every Spot, so guessing it must be slow. After
//! `FAILURES_ALLOWED` wrong tokens (bearer or sign-in) from one address
//! within `WINDOW`, every attempt from it is answered 429 until the window
//! ends. Behind a proxy every client shares the proxy's address: a guesser
//! then locks the others out for a minute at most, which is the price of
//! not trusting a forwarded-for header anyone can write.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens allowed per address and window.
pub const FAILURES_ALLOWED: u32 = 5;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at once; past it, new addresses share one count,
/// so a guesser with many addresses cannot grow the map without bound.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Default)]
pub struct AuthThrottle {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthThrottle {
    /// How long `ip` must wait, if it is throttled now.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let (started, failures) = windows.get(&ip).or_else(|| {
            (windows.len() >= MAX_ADDRESSES)
                .then(|| windows.get(&OVERFLOW))
                .flatten()
        })?;
        let ends = *started + WINDOW;
        (*failures >= FAILURES_ALLOWED && ends > now).then(|| ends - now)
    }

    /// Counts a wrong token from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_ADDRESSES && !windows.contains_key(&ip) {
            windows.retain(|_, (started, _)| *started + WINDOW > now);
        }
        let key = if windows.len() >= MAX_ADDRESSES && !windows.contains_key(&ip) {
            OVERFLOW
        } else {
            ip
        };
        let entry = windows.entry(key).or_insert((now, 0));
        if entry.0 + WINDOW <= now {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// The shared count of addresses past `MAX_ADDRESSES`.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_throttled_after_its_failures_until_the_window_ends() {
        let t = AuthThrottle::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FAILURES_ALLOWED {
            assert_eq!(t.blocked(a, now), None);
            t.failed(a, now);
        }
        assert!(t.blocked(a, now + Duration::from_secs(1)).is_some());
        assert_eq!(t.blocked(b, now), None, "another address is not");
        assert_eq!(t.blocked(a, now + WINDOW), None, "the window ended");
    }
}
