//! Deliver stage: one worker per HubSpot portal drains the outbox of the
//! portal's active Spots: it initializes and backfills each activation,
//! resolves e-mails to record ids, creates contacts where contact creation
//! asks for it, writes only the changed properties in batches of 100 within
//! the portal's rate limit, retries what is transient, dead-letters what
//! HubSpot rejects (G8), and moves an integration to `failed` when HubSpot
//! refuses its credentials or stays unreachable (SPEC §4.7). Outbox rows are
//! deleted only after HubSpot has accepted the write.

pub mod mailer;
mod plan;
pub(crate) use plan::derive;
pub mod policy;
mod round;
mod tokens;
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
use worker::PortalWorker;

/// The lock a portal's delivery round holds, so that a disconnect can wait
/// for the round in flight and no call for the Spot follows its commit.
#[derive(Clone, Default)]
pub struct RoundLocks {
    by_portal: Arc<std::sync::Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>>,
}

impl RoundLocks {
    /// Waits until no round of the portal is in flight and holds it off
    /// until the guard is dropped.
    pub async fn wait_for_round(&self, portal_id: i64) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.by_portal.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(portal_id).or_default().clone()
        };
        lock.lock_owned().await
    }
}

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
    pub rounds: RoundLocks,
    pub fail_after: Duration,
    pub failed_retention: Duration,
    /// Signalled by the hand-off when new work was stored.
    pub wake: Arc<Notify>,
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
}

/// How often the supervisor compares its workers with the integrations.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
/// How often work of long-failed integrations is purged (retention is in days).
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Starts and stops portal workers as integrations come and go, until shutdown.
pub async fn supervise(
    ctx: DeliverContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DeliverError> {
    let mut last_purge: Option<std::time::Instant> = None;
    let mut workers: HashMap<i64, (watch::Sender<Vec<LiveIntegration>>, JoinHandle<()>)> =
        HashMap::new();
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
        let mut by_portal: HashMap<i64, Vec<LiveIntegration>> = HashMap::new();
        for i in live {
            by_portal.entry(i.portal_id).or_default().push(i);
        }
        workers.retain(|portal, (tx, handle)| {
            let keep = by_portal.contains_key(portal) && !handle.is_finished();
            if !keep {
                let _ = tx.send(Vec::new());
            }
            keep
        });
        for (portal, spots) in by_portal {
            match workers.get(&portal) {
                Some((tx, _)) => {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != spots;
                        if changed {
                            *cur = spots.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(spots);
                    let worker = PortalWorker::new(ctx.clone(), portal, rx);
                    let span = tracing::info_span!("portal_worker", portal);
                    let handle = tokio::spawn(worker.run(shutdown.clone()).instrument(span));
                    workers.insert(portal, (tx, handle));
                }
            }
        }
        if let Ok(n) = store::backlog_size(&db).await {
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
        let _ = tx.send(Vec::new());
        let _ = handle.await;
    }
    info!("delivery stopped");
    Ok(())
}
