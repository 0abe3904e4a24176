//! HubSpot stage: the REST client and what the sidecar does with it.
//!
//! - `endpoint`: every path, for the configured API version;
//! - `transport`: the client, authentication, and the error classification;
//! - `contacts`, `properties`, `oauth`, `timeline`: one file per API;
//! - `ratelimit`: the per-portal rolling-window limiter.

pub mod contacts;
pub mod endpoint;
pub mod oauth;
pub mod properties;
pub mod ratelimit;
pub mod timeline;
pub mod transport;

use std::sync::Arc;

use serde_json::Value;

pub use contacts::CreateResult;
pub use endpoint::Endpoint;
use ratelimit::RateLimiter;
pub use transport::{ApiError, Auth, HubSpotClient, HubSpotError};

/// HubSpot's limit on inputs per batch call.
pub const BATCH_LIMIT: usize = 100;

/// One portal: its token and its share of HubSpot's rate limit.
pub struct Portal {
    pub client: HubSpotClient,
    pub token: String,
    pub limiter: Arc<RateLimiter>,
}

impl Portal {
    /// Counts one extra call made to isolate rejected inputs of a batch.
    pub(crate) fn split_call(&self, operation: &'static str) {
        self.client
            .metrics
            .batch_split_calls
            .with_label_values(&[operation])
            .inc();
    }

    /// One call with the portal's token, within its rate limit.
    pub(crate) async fn call(
        &self,
        endpoint: &Endpoint<'_>,
        method: reqwest::Method,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HubSpotError> {
        let waited = self.limiter.acquire().await;
        if !waited.is_zero() {
            self.client
                .metrics
                .rate_limit_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
        let result = self
            .client
            .send_observed(
                endpoint,
                Auth::Bearer(&self.token),
                method,
                body,
                Some(&self.limiter),
            )
            .await;
        if let Err(HubSpotError::RateLimited { .. }) = &result {
            // Someone else shares the portal's budget: treat the window as spent.
            self.limiter.saturate().await;
        }
        result
    }
}
