//! Rolling-window rate limits and request accounting.
//!
//! HubSpot's burst limit is a *rolling* window (`TEN_SECONDLY_ROLLING`): a request is admitted
//! when fewer than `max` requests were admitted during the `window` before it. Refused requests
//! (429) do not occupy the window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;

use crate::errors::ApiError;
use crate::model::RequestStats;
use crate::state::uuid;

/// Admits a request at `now` if the window has room; returns how many are in the window then.
pub(crate) fn admit(
    q: &mut VecDeque<Instant>,
    now: Instant,
    window: Duration,
    max: u32,
) -> Option<u32> {
    while let Some(&front) = q.front() {
        if now.duration_since(front) >= window {
            q.pop_front();
        } else {
            break;
        }
    }
    if q.len() >= max as usize {
        return None;
    }
    q.push_back(now);
    Some(q.len() as u32)
}

pub(crate) fn record(stats: &mut RequestStats, op: &str, status: u16) {
    stats.total += 1;
    *stats
        .by_operation
        .entry(op.to_string())
        .or_default()
        .entry(status)
        .or_default() += 1;
    if status == 429 {
        stats.rate_limited += 1;
    }
}

/// 429 for the per-portal burst limit (documented body shape).
pub(crate) fn ten_secondly_error() -> ApiError {
    rate_error(
        "You have reached your ten_secondly_rolling limit.",
        "TEN_SECONDLY_ROLLING",
    )
}

/// 429 for the CRM search limit (message from HubSpot's Node SDK retry logic).
pub(crate) fn secondly_error() -> ApiError {
    rate_error("You have reached your secondly limit.", "SECONDLY")
}

fn rate_error(message: &str, policy: &str) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        body: json!({
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "policyName": policy,
            "requestId": uuid(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_window() {
        let mut q = VecDeque::new();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert_eq!(admit(&mut q, t0, w, 2), Some(1));
        assert_eq!(admit(&mut q, t0, w, 2), Some(2));
        assert_eq!(admit(&mut q, t0 + Duration::from_secs(5), w, 2), None);
        assert_eq!(admit(&mut q, t0 + Duration::from_secs(10), w, 2), Some(1));
    }
}
