//! Deliver stage: `scheduler` gives a connected Spot a round when it has
//! work; the Spot's worker (one per activation) drains its outbox with the
//! Spot's own token, sharing the portal's rate limit
//! with the other Spots of the portal: it initializes and backfills the activation,
//! resolves e-mails to record ids, creates contacts where contact creation
//! asks for it, writes only the changed properties in batches of 100 within
//! the portal's rate limit, retries what is transient, dead-letters what
//! HubSpot rejects (G8), and moves an integration to `failed` when HubSpot
//! refuses its credentials or stays unreachable (SPEC §4.7). Outbox rows are
//! deleted only after HubSpot has accepted the write.

mod fence;
pub mod mailer;
mod plan;
pub mod portal_changes;
pub(crate) use plan::derive;
pub mod policy;
mod round;
mod scheduler;
mod shared;
mod tokens;
mod wake;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::hubspot::oauth::OAuthApp;
use crate::hubspot::ratelimit::Limiters;
use crate::hubspot::timeline::ActivitySink;
use crate::hubspot::{HubSpotClient, HubSpotError};
use crate::metrics::Metrics;
use crate::store::secrets::Sealer;
use crate::store::{self, Db};
use crate::translate::MarkerKey;

pub use fence::Fences;
pub use shared::Shared;
pub use wake::Wake;

/// What every worker shares.
#[derive(Clone)]
pub struct DeliverContext {
    pub db: Db,
    pub client: HubSpotClient,
    pub oauth: Option<OAuthApp>,
    /// How timeline events reach HubSpot (HUBSPOT_ACTIVITY_API).
    pub sink: ActivitySink,
    pub sealer: Sealer,
    pub metrics: Arc<Metrics>,
    pub limiters: Limiters,
    /// Fences each call and write to the activation it belongs to.
    pub fences: Fences,
    /// The statements rounds share (`shared`), on `db`; their fence checks
    /// need this replica's leadership lock held, so no call is made once it
    /// is gone.
    pub shared: Arc<Shared>,
    /// Signs the settings markers a failure writes.
    pub markers: MarkerKey,
    pub fail_after: Duration,
    pub failed_retention: Duration,
    /// Signalled by the hand-off when new work was stored for a Spot.
    pub wake: Wake,
    /// The stream is reading a backlog: more work for every Spot is coming,
    /// so delivery waits for it (calls stay at the minimum).
    pub catching_up: tokio::sync::watch::Receiver<bool>,
    /// Signalled when an integration failed and notifications wait.
    pub notify: Arc<Notify>,
    /// OAuth refreshes in flight across all Spots (`REFRESHES_IN_FLIGHT`).
    pub refreshes: Arc<tokio::sync::Semaphore>,
}

/// OAuth token refreshes in flight at most, across the fleet.
pub const REFRESHES_IN_FLIGHT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("database: {0}")]
    Db(#[from] store::DbError),
    #[error("HubSpot: {0}")]
    HubSpot(#[from] HubSpotError),
    #[error(transparent)]
    Decrypt(#[from] store::secrets::DecryptError),
    #[error("OAuth is not configured (HUBSPOT_CLIENT_ID / HUBSPOT_CLIENT_SECRET), so the token cannot be refreshed")]
    NoOAuthApp,
    /// The Spot was reconnected or disconnected: this activation's work ends.
    #[error("the integration was reconnected or disconnected; this activation's round ends")]
    Superseded,
}

/// The limiter of a new process starts empty, while HubSpot still counts
/// the calls the previous process (before a kill -9, a restart, a change of
/// leader) made in the last 10 s: without this, the first calls after a
/// restart go out blind and can pass the budget. Best effort: without the
/// database, HubSpot's rate-limit headers correct the count after one call.
async fn count_the_previous_process(ctx: &DeliverContext) {
    let recent = match ctx.db.client().await {
        Ok(db) => store::recently_called_portals(&db).await,
        Err(e) => Err(e),
    };
    match recent {
        Ok(recent) => {
            for (portal_id, ago) in recent {
                let ago = std::time::Duration::from_secs_f64(ago.max(0.0));
                ctx.limiters.portal(portal_id).assume_full_since(ago).await;
                info!(
                    portal_id,
                    seconds_ago = ago.as_secs_f64(),
                    "the portal was called moments ago by the previous process: \
                     its calls wait until those have left HubSpot's 10 s window"
                );
            }
        }
        Err(e) => warn!(error = %e, "could not read when portals were last called"),
    }
}

/// Delivers for every connected Spot until shutdown (see `scheduler`): a
/// round for a Spot when it has work, a new worker for each activation (a
/// reconnect has nothing cached; the old activation is fenced meanwhile).
pub async fn supervise(
    ctx: DeliverContext,
    shutdown: watch::Receiver<bool>,
) -> Result<(), DeliverError> {
    count_the_previous_process(&ctx).await;
    scheduler::Scheduler::new(ctx).run(shutdown).await;
    Ok(())
}
