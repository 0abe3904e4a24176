//! Deliver stage: one worker per active Spot (per activation) drains the
//! Spot's outbox with the Spot's own token, sharing the portal's rate limit
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
pub(crate) use plan::derive;
pub mod policy;
mod round;
mod tokens;
mod wake;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::hubspot::oauth::OAuthApp;
use crate::hubspot::ratelimit::Limiters;
use crate::hubspot::timeline::ActivitySink;
use crate::hubspot::{HubSpotClient, HubSpotError};
use crate::metrics::Metrics;
use crate::store::secrets::Sealer;
use crate::store::{self, Db, LiveIntegration};
use crate::translate::MarkerKey;
use worker::SpotWorker;

pub use fence::Fences;
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
    /// Signs the settings markers a failure writes.
    pub markers: MarkerKey,
    /// This replica's leadership lock: no call is made once it is gone.
    pub leader: Option<crate::leader::LeaderLock>,
    pub fail_after: Duration,
    pub failed_retention: Duration,
    /// Signalled by the hand-off when new work was stored for a Spot.
    pub wake: Wake,
    /// The stream is reading a backlog: more work for every Spot is coming,
    /// so delivery waits for it (calls stay at the minimum).
    pub catching_up: tokio::sync::watch::Receiver<bool>,
    /// Signalled when an integration failed and notifications wait.
    pub notify: Arc<Notify>,
}

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

/// A running worker: what it is told of its integration (None: stop), and its task.
type Worker = (watch::Sender<Option<LiveIntegration>>, JoinHandle<()>);

/// How often the supervisor compares its workers with the integrations.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
/// How often work of long-failed integrations is purged (retention is in days).
const PURGE_EVERY: Duration = Duration::from_secs(60);

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

/// Starts and stops a worker per Spot activation as integrations come and
/// go, until shutdown. A reconnect is a new activation, so a new worker with
/// nothing cached; the old one is told to stop and is fenced meanwhile.
pub async fn supervise(
    ctx: DeliverContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DeliverError> {
    let mut last_purge: Option<std::time::Instant> = None;
    let mut workers: HashMap<(i64, i64), Worker> = HashMap::new();
    count_the_previous_process(&ctx).await;
    loop {
        // Survive a database restart: keep the workers, reconnect, try again.
        let db = match ctx.db.client().await {
            Ok(db) => db,
            Err(e) => {
                warn!(error = %e, "delivery supervisor cannot reach the database; retrying");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
                }
                continue;
            }
        };
        let live = match store::active_integrations(&db).await {
            Ok(live) => live,
            Err(e) => {
                warn!(error = %e, "delivery supervisor lost the database; retrying");
                drop(db);
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
                }
                continue;
            }
        };
        let by_activation: HashMap<(i64, i64), LiveIntegration> = live
            .into_iter()
            .map(|i| ((i.spot_id, i.activation), i))
            .collect();
        ctx.metrics.backfills_running.set(
            by_activation
                .values()
                .filter(|i| i.backfill_after.is_some())
                .count() as i64,
        );
        workers.retain(|key, (tx, handle)| {
            let keep = by_activation.contains_key(key) && !handle.is_finished();
            if !keep {
                let _ = tx.send(None);
            }
            keep
        });
        for (key, spot) in by_activation {
            let spot = Some(spot);
            match workers.get(&key) {
                Some((tx, _)) => {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != spot;
                        if changed {
                            cur.clone_from(&spot);
                        }
                        changed
                    });
                }
                None => {
                    let (spot_id, activation) = key;
                    let portal = spot.as_ref().map_or(0, |s| s.portal_id);
                    let (tx, rx) = watch::channel(spot);
                    let worker = SpotWorker::new(ctx.clone(), spot_id, portal, rx);
                    let span = tracing::info_span!("spot_worker", spot_id, activation, portal);
                    let handle = tokio::spawn(worker.run(shutdown.clone()).instrument(span));
                    workers.insert(key, (tx, handle));
                }
            }
        }
        if let Ok(n) = store::backlog_estimate(&db).await {
            ctx.metrics
                .backlog_items
                .with_label_values(&["properties"])
                .set(n);
        }
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            last_purge = Some(std::time::Instant::now());
            match store::purge_expired_backlog(&db, ctx.failed_retention).await {
                Ok(0) => {}
                Ok(n) => warn!(
                    rows = n,
                    "dropped work of failed integrations older than SIDECAR_FAILED_RETENTION"
                ),
                Err(e) => warn!(error = %e, "could not purge expired backlog"),
            }
        }
        drop(db);
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
    }
    for (_, (tx, handle)) in workers {
        let _ = tx.send(None);
        let _ = handle.await;
    }
    info!("delivery stopped");
    Ok(())
}
