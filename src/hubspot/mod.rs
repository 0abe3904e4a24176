//! HubSpot stage: the REST client and what the sidecar does with it.
//!
//! - `endpoint`: every path, for the configured API version;
//! - `transport`: the client, authentication, and the error classification;
//! - `contacts`, `properties`, `oauth`, `timeline`: one file per API;
//! - `ratelimit`: the per-portal rolling-window limiter;
//! - `webhooks`: the v3 signature and the contact changes HubSpot announces.

pub mod contacts;
pub mod endpoint;
pub mod oauth;
pub mod properties;
pub mod ratelimit;
pub mod timeline;
pub mod transport;
pub mod webhooks;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

pub use contacts::CreateResult;
pub use endpoint::Endpoint;
use ratelimit::RateLimiter;
pub use transport::{ApiError, Auth, HubSpotClient, HubSpotError};

/// HubSpot's limit on inputs per batch call.
pub const BATCH_LIMIT: usize = 100;

/// Held while a call is in flight; dropped when its answer is in.
pub struct FencePass(#[allow(dead_code)] Box<dyn Send>);

impl FencePass {
    /// A pass that holds `guard` until the call's answer is in.
    pub fn holding<G: Send + 'static>(guard: G) -> FencePass {
        FencePass(Box::new(guard))
    }
}

/// What a call waits for after the rate limiter granted it: whether the
/// caller may still make it (for delivery: the Spot's activation is still
/// the current one). The pass it returns is held until the answer is in, so
/// a reconnect or disconnect can wait for the call in flight and no call of
/// the old activation starts after it.
pub trait CallFence: Send + Sync {
    /// `Ok` with a pass to make the call; `Err(Fenced)` when it must not be made.
    fn pass(&self) -> Pin<Box<dyn Future<Output = Result<FencePass, HubSpotError>> + Send + '_>>;
}

/// One portal as one Spot's activation sees it: its token, its share of
/// HubSpot's rate limit, and the fence every call passes.
pub struct Portal {
    pub client: HubSpotClient,
    pub token: String,
    pub limiter: Arc<RateLimiter>,
    /// None for calls outside delivery (tests, tools).
    pub fence: Option<Arc<dyn CallFence>>,
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
        let (waited, slot) = self.limiter.acquire().await;
        if !waited.is_zero() {
            self.client
                .metrics
                .rate_limit_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
        // Checked after the wait, right before the call: a rate-limit wait can
        // be long, and a reconnect may have happened during it.
        let _pass = match &self.fence {
            Some(fence) => {
                let pass = fence.pass().await?;
                self.limiter.sent_now(slot).await;
                Some(pass)
            }
            None => None,
        };
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
