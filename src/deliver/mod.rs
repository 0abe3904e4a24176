//! Deliver stage: one worker per HubSpot portal drains the outbox of the
//! portal's Spots: it resolves e-mails to record ids, writes only the changed
//! properties in batches of 100 within the portal's rate limit, retries what
//! is transient and dead-letters what HubSpot rejects (G8). Outbox rows are
//! deleted only after HubSpot has accepted the write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::hubspot::properties::{derive, normalize_email};
use crate::hubspot::ratelimit::{Limiters, RateLimiter};
use crate::hubspot::{HubSpotClient, HubSpotError, Portal, BATCH_LIMIT};
use crate::metrics::Metrics;
use crate::store::secrets::Sealer;
use crate::store::{self, Completion, LiveIntegration, Marker};

/// What every worker shares.
#[derive(Clone)]
pub struct DeliverContext {
    pub database_url: String,
    pub client: HubSpotClient,
    pub sealer: Sealer,
    pub metrics: Arc<Metrics>,
    pub limiters: Limiters,
    /// Signalled by the hand-off when new work was stored.
    pub wake: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("database: {0}")]
    Db(#[from] store::DbError),
    #[error("HubSpot: {0}")]
    HubSpot(#[from] HubSpotError),
    #[error(transparent)]
    Decrypt(#[from] store::secrets::DecryptError),
}

/// Starts and stops portal workers as integrations come and go, until shutdown.
pub async fn supervise(
    ctx: DeliverContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DeliverError> {
    let db = store::connect(&ctx.database_url).await?;
    let mut workers: HashMap<i64, (watch::Sender<Vec<LiveIntegration>>, JoinHandle<()>)> =
        HashMap::new();
    loop {
        let live = store::active_integrations(&db).await?;
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
                        let changed = cur
                            .iter()
                            .map(|i| (i.spot_id, i.initialized, &i.access_token_enc))
                            .ne(spots
                                .iter()
                                .map(|i| (i.spot_id, i.initialized, &i.access_token_enc)));
                        if changed {
                            *cur = spots.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(spots);
                    let worker = PortalWorker::new(ctx.clone(), ctx.limiters.portal(portal), rx);
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
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    for (_, (tx, handle)) in workers {
        let _ = tx.send(Vec::new());
        let _ = handle.await;
    }
    Ok(())
}

struct PortalWorker {
    ctx: DeliverContext,
    spots: watch::Receiver<Vec<LiveIntegration>>,
    limiter: Arc<RateLimiter>,
    failures: u32,
    /// Activations this worker has initialized, until the supervisor's view catches up.
    initialized: HashSet<(i64, i64)>,
}

/// How long a partial batch waits for more work before the next round: the
/// first change after a quiet spell goes out at once, a steady stream is
/// coalesced into fewer, fuller batches.
const LINGER: Duration = Duration::from_millis(250);

enum Round {
    /// A full batch went out; more may be due.
    Full,
    /// A partial batch went out.
    Partial,
    /// Nothing was due.
    Idle,
}

/// A contact write waiting for the batch update: marker index, record id,
/// the changed properties, and every derived value (remembered on success).
type PendingUpdate = (
    usize,
    String,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
);

/// How one input of a batch update ended.
enum ItemResult {
    Ok,
    Missing,
    Rejected(String, String),
}

impl PortalWorker {
    fn new(
        ctx: DeliverContext,
        limiter: Arc<RateLimiter>,
        spots: watch::Receiver<Vec<LiveIntegration>>,
    ) -> Self {
        PortalWorker {
            ctx,
            spots,
            limiter,
            failures: 0,
            initialized: HashSet::new(),
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut db = match store::connect(&self.ctx.database_url).await {
            Ok(db) => db,
            Err(e) => {
                warn!(error = %e, "portal worker could not connect to the database");
                return;
            }
        };
        info!("portal worker started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let spots = self.spots.borrow_and_update().clone();
            if spots.is_empty() {
                break;
            }
            match self.step(&mut db, &spots).await {
                Ok(Round::Full) => {}
                // A partial batch: let the next one gather what arrives meanwhile.
                Ok(Round::Partial) => tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(LINGER) => {}
                },
                // Idle: new work or a settings change ends the wait early.
                Ok(Round::Idle) => tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = self.spots.changed() => {}
                    _ = self.ctx.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                },
                // Backing off: new work must not end the wait, or an outage would
                // be hammered once per change.
                Err(e) => {
                    let pause = self.on_error(&db, &spots, e).await;
                    tokio::select! {
                        _ = shutdown.changed() => {}
                        _ = self.spots.changed() => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        info!("portal worker stopped");
    }

    fn portal(&self, spots: &[LiveIntegration]) -> Result<Portal, DeliverError> {
        let token = self.ctx.sealer.open(&spots[0].access_token_enc)?;
        Ok(Portal {
            client: self.ctx.client.clone(),
            token,
            limiter: self.limiter.clone(),
        })
    }

    /// Decides how long to wait after a failure, and records it.
    async fn on_error(
        &mut self,
        db: &tokio_postgres::Client,
        spots: &[LiveIntegration],
        e: DeliverError,
    ) -> Duration {
        let spot_ids: Vec<i64> = spots.iter().map(|s| s.spot_id).collect();
        match &e {
            DeliverError::HubSpot(HubSpotError::RateLimited {
                retry_after,
                policy,
            }) => {
                self.ctx
                    .metrics
                    .delivery_retries
                    .with_label_values(&["rate_limited"])
                    .inc();
                info!(policy, "HubSpot asked us to slow down");
                // The limiter now holds a full window; honour Retry-After when given.
                retry_after.unwrap_or(Duration::from_millis(100))
            }
            other => {
                self.failures += 1;
                let cause = match other {
                    DeliverError::HubSpot(HubSpotError::Auth { .. }) => "auth",
                    DeliverError::HubSpot(_) => "hubspot",
                    DeliverError::Db(_) => "database",
                    DeliverError::Decrypt(_) => "decrypt",
                };
                self.ctx
                    .metrics
                    .delivery_retries
                    .with_label_values(&[cause])
                    .inc();
                let _ = store::record_outcome(db, &spot_ids, Some(&other.to_string())).await;
                let base = Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(7));
                let pause = base.min(Duration::from_secs(30));
                let jitter = rand::thread_rng().gen_range(0.8..1.2);
                let pause = pause.mul_f64(jitter);
                warn!(error = %other, retry_in_ms = pause.as_millis() as u64, "delivery failed");
                pause
            }
        }
    }

    /// One unit of work.
    async fn step(
        &mut self,
        db: &mut tokio_postgres::Client,
        spots: &[LiveIntegration],
    ) -> Result<Round, DeliverError> {
        let portal = self.portal(spots)?;
        let uninitialized: Vec<&LiveIntegration> = spots
            .iter()
            .filter(|s| !s.initialized && !self.initialized.contains(&(s.spot_id, s.activation)))
            .collect();
        if !uninitialized.is_empty() {
            portal.ensure_schema().await?;
            for s in &uninitialized {
                store::mark_initialized(db, s.spot_id).await?;
                self.initialized.insert((s.spot_id, s.activation));
            }
            info!(
                spots = uninitialized.len(),
                "property group and properties are in place"
            );
            return Ok(Round::Full);
        }
        // A round costs at most two calls (read, update); wait for room first, so
        // that while the portal is throttled the batch grows instead of the call count.
        self.limiter.wait_available(2).await;
        let spot_ids: Vec<i64> = spots.iter().map(|s| s.spot_id).collect();
        let markers = store::due_markers(db, &spot_ids, BATCH_LIMIT as i64).await?;
        if markers.is_empty() {
            return Ok(Round::Idle);
        }
        let round = if markers.len() == BATCH_LIMIT {
            Round::Full
        } else {
            Round::Partial
        };
        let span = tracing::debug_span!("delivery_batch", items = markers.len());
        let done = self.deliver(db, &portal, &markers).instrument(span).await;
        match done {
            Ok(completions) => {
                store::complete(db, &completions).await?;
                if self.failures > 0 {
                    self.failures = 0;
                    store::record_outcome(db, &spot_ids, None).await?;
                }
                Ok(round)
            }
            Err(e) => {
                if !matches!(e, DeliverError::HubSpot(HubSpotError::RateLimited { .. })) {
                    let delay =
                        Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(7));
                    store::postpone(db, &markers, delay.min(Duration::from_secs(30))).await?;
                }
                Err(e)
            }
        }
    }

    async fn deliver(
        &self,
        db: &tokio_postgres::Client,
        portal: &Portal,
        markers: &[Marker],
    ) -> Result<Vec<Completion>, DeliverError> {
        let m = &self.ctx.metrics;
        let member_ids: Vec<i64> = markers.iter().map(|m| m.member_id).collect();
        let records: HashMap<i64, store::MemberRecord> = store::member_records(db, &member_ids)
            .await?
            .into_iter()
            .map(|r| (r.member_id, r))
            .collect();
        let keys: Vec<(i64, i64)> = markers.iter().map(|m| (m.spot_id, m.member_id)).collect();
        let states = store::contact_states(db, &keys).await?;

        // Resolve e-mails we do not know yet, or that changed, in one batch read.
        let mut lookups: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for mk in markers {
            let Some(rec) = records.get(&mk.member_id) else {
                continue;
            };
            let email = normalize_email(&rec.email);
            let known = states
                .get(&(mk.spot_id, mk.member_id))
                .is_some_and(|s| s.contact_id.is_some() && s.email == email);
            if !known && seen.insert(email.clone()) {
                lookups.push(email);
            }
        }
        let found = if lookups.is_empty() {
            HashMap::new()
        } else {
            portal.read_contacts_by_email(&lookups).await?
        };

        let mut completions = Vec::with_capacity(markers.len());
        let mut updates: Vec<PendingUpdate> = Vec::new();
        for (i, mk) in markers.iter().enumerate() {
            // A marker whose member is gone, or belongs to another Spot, writes nothing (G4).
            let Some(rec) = records
                .get(&mk.member_id)
                .filter(|r| r.spot_id == mk.spot_id)
            else {
                completions.push(Completion::NoContact {
                    marker: mk.clone(),
                    email: None,
                });
                continue;
            };
            let email = normalize_email(&rec.email);
            let state = states.get(&(mk.spot_id, mk.member_id));
            let contact_id = match state
                .filter(|s| s.email == email)
                .and_then(|s| s.contact_id.clone())
            {
                Some(id) => Some(id),
                None => found.get(&email).cloned(),
            };
            let Some(contact_id) = contact_id else {
                m.members_without_contact.inc();
                completions.push(Completion::NoContact {
                    marker: mk.clone(),
                    email: Some(email),
                });
                continue;
            };
            let (desired, truncated) = derive(rec);
            m.values_truncated.inc_by(truncated as u64);
            // What HubSpot holds for this very contact; anything else starts from nothing.
            let written: BTreeMap<String, String> = state
                .filter(|s| {
                    s.email == email && s.contact_id.as_deref() == Some(contact_id.as_str())
                })
                .map(|s| s.written.clone().into_iter().collect())
                .unwrap_or_default();
            let diff: BTreeMap<String, String> = desired
                .iter()
                .filter(|(k, v)| written.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if diff.is_empty() {
                completions.push(Completion::Written {
                    marker: mk.clone(),
                    email,
                    contact_id,
                    written: desired.into_iter().collect(),
                });
            } else {
                updates.push((i, contact_id, diff, desired));
            }
        }

        let inputs: Vec<(String, BTreeMap<String, String>)> = updates
            .iter()
            .map(|(_, id, diff, _)| (id.clone(), diff.clone()))
            .collect();
        let results = update_isolating_rejects(portal, inputs).await?;
        for ((i, contact_id, diff, desired), result) in updates.into_iter().zip(results) {
            let mk = &markers[i];
            let email = records
                .get(&mk.member_id)
                .map(|r| normalize_email(&r.email))
                .unwrap_or_default();
            completions.push(match result {
                ItemResult::Ok => {
                    m.contacts_written.inc();
                    Completion::Written {
                        marker: mk.clone(),
                        email,
                        contact_id,
                        written: desired.into_iter().collect(),
                    }
                }
                // The contact was deleted or merged: forget it; the next change resolves the e-mail again.
                ItemResult::Missing => Completion::NoContact {
                    marker: mk.clone(),
                    email: Some(email),
                },
                ItemResult::Rejected(category, reason) => {
                    m.dead_letters.with_label_values(&[&reason_label(&category)]).inc();
                    warn!(member_id = mk.member_id, %category, "HubSpot rejected a contact write; dead-lettered");
                    Completion::DeadLetter {
                        marker: mk.clone(),
                        payload: serde_json::json!({"contact_id": contact_id, "email": email, "properties": diff}),
                        email,
                        contact_id: Some(contact_id),
                        reason,
                    }
                }
            });
        }
        Ok(completions)
    }
}

/// Labels stay a small fixed set: HubSpot's category, never free text.
fn reason_label(category: &str) -> String {
    match category {
        "VALIDATION_ERROR"
        | "INVALID_EMAIL"
        | "INVALID_OPTION"
        | "PROPERTY_DOESNT_EXIST"
        | "CONFLICT"
        | "OBJECT_NOT_FOUND" => category.to_string(),
        _ => "other".to_string(),
    }
}

/// Batch update; when HubSpot rejects the batch, the inputs it names (or, when
/// it names none, halves of the batch) are retried apart until each bad input
/// stands alone and can be dead-lettered without holding back the others.
async fn update_isolating_rejects(
    portal: &Portal,
    inputs: Vec<(String, BTreeMap<String, String>)>,
) -> Result<Vec<ItemResult>, HubSpotError> {
    let mut results: Vec<Option<ItemResult>> = (0..inputs.len()).map(|_| None).collect();
    let mut pending: Vec<Vec<usize>> = if inputs.is_empty() {
        Vec::new()
    } else {
        vec![(0..inputs.len()).collect()]
    };
    while let Some(group) = pending.pop() {
        let batch: Vec<_> = group.iter().map(|&i| inputs[i].clone()).collect();
        match portal.update_contacts(&batch).await {
            Ok(outcome) => {
                for &i in &group {
                    results[i] = Some(if outcome.missing.contains(&inputs[i].0) {
                        ItemResult::Missing
                    } else {
                        ItemResult::Ok
                    });
                }
            }
            Err(HubSpotError::Rejected { error, .. }) if group.len() == 1 => {
                let reason = if error.message.is_empty() {
                    error.category.clone()
                } else {
                    error.message.clone()
                };
                results[group[0]] = Some(ItemResult::Rejected(error.category.clone(), reason));
            }
            Err(HubSpotError::Rejected { error, .. }) => {
                let named = named_ids(&error);
                let (bad, good): (Vec<usize>, Vec<usize>) =
                    group.iter().partition(|&&i| named.contains(&inputs[i].0));
                if !bad.is_empty() && bad.len() < group.len() {
                    pending.extend(bad.into_iter().map(|i| vec![i]));
                    pending.push(good);
                } else {
                    let (a, b) = group.split_at(group.len() / 2);
                    pending.push(a.to_vec());
                    pending.push(b.to_vec());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(ItemResult::Ok))
        .collect())
}

/// Record ids a 400 body names in `context.ids`/`context.id`, at the top or per error.
fn named_ids(error: &crate::hubspot::ApiError) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut collect = |ctx: Option<&serde_json::Value>| {
        for key in ["ids", "id"] {
            if let Some(arr) = ctx.and_then(|c| c.get(key)).and_then(|v| v.as_array()) {
                out.extend(arr.iter().filter_map(|v| v.as_str().map(str::to_string)));
            }
        }
    };
    collect(error.context.as_ref());
    for e in &error.errors {
        collect(e.get("context"));
    }
    out
}
