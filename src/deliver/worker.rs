//! The worker of one HubSpot portal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use super::{round, DeliverContext, DeliverError};
use crate::hubspot::ratelimit::PortalGate;
use crate::hubspot::{HubSpotError, Portal, BATCH_LIMIT};
use crate::store::{self, AuthKind, LiveIntegration};

/// How long a partial batch waits for more work before the next round: the
/// first change after a quiet spell goes out at once, a steady stream is
/// coalesced into fewer, fuller batches.
const LINGER: Duration = Duration::from_millis(250);
/// Members queued per backfill page, and the backlog under which the next
/// page is queued (so that stream changes never wait behind a whole Spot).
const BACKFILL_PAGE: i64 = 1000;
const BACKFILL_BACKLOG: i64 = 500;
/// OAuth access tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

enum Round {
    /// Work was done; more may be due.
    Full,
    /// A partial batch went out.
    Partial,
    /// Nothing was due.
    Idle,
}

/// An activation: one connect of one Spot.
type Activation = (i64, i64);

pub(super) struct PortalWorker {
    ctx: DeliverContext,
    spots: watch::Receiver<Vec<LiveIntegration>>,
    gate: Arc<PortalGate>,
    failures: u32,
    /// Activations this worker initialized, until the supervisor's view catches up.
    initialized: HashSet<Activation>,
    /// Backfill position per activation (None: complete).
    backfill: HashMap<Activation, Option<i64>>,
    /// Tokens refreshed here, until the supervisor's view catches up.
    tokens: HashMap<Activation, RefreshedTokens>,
    /// A 401 asks for one refresh before the integration is failed.
    force_refresh: bool,
    refreshed_after_401: bool,
    /// A failure clock (`failing_since`) may be running from before this
    /// worker started: the first success clears it.
    clock_may_run: bool,
    /// timeline-v3 templates exist (checked once per worker).
    templates_ready: bool,
}

#[derive(Clone)]
struct RefreshedTokens {
    access: String,
    refresh: String,
    expires_at: DateTime<Utc>,
}

impl PortalWorker {
    pub(super) fn new(
        ctx: DeliverContext,
        gate: Arc<PortalGate>,
        spots: watch::Receiver<Vec<LiveIntegration>>,
    ) -> Self {
        PortalWorker {
            ctx,
            spots,
            gate,
            failures: 0,
            initialized: HashSet::new(),
            backfill: HashMap::new(),
            tokens: HashMap::new(),
            force_refresh: false,
            refreshed_after_401: false,
            clock_may_run: true,
            templates_ready: false,
        }
    }

    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
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
            if spots.is_empty() || self.spots.has_changed().is_err() {
                // Disconnected, failed, or the supervisor is gone.
                break;
            }
            if db.is_closed() {
                match store::connect(&self.ctx.database_url).await {
                    Ok(c) => db = c,
                    Err(e) => {
                        warn!(error = %e, "portal worker cannot reach the database; retrying");
                        tokio::select! {
                            _ = shutdown.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                        continue;
                    }
                }
            }
            let result = {
                // Held for the whole round: a disconnect waits for it, so that
                // no call for a Spot is made after its disconnect commits.
                let gate = self.gate.clone();
                let _round = gate.round.lock().await;
                self.step(&mut db, &spots).await
            };
            match result {
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
                    let pause = self.on_error(&mut db, &spots, e).await;
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

    /// The access token to use for this portal's calls, refreshed when near expiry.
    async fn access_token(
        &mut self,
        db: &tokio_postgres::Client,
        spot: &LiveIntegration,
    ) -> Result<String, DeliverError> {
        let key = (spot.spot_id, spot.activation);
        if spot.credentials_kind == AuthKind::Token {
            return Ok(self.ctx.sealer.open(&spot.access_token_enc)?);
        }
        let current = match self.tokens.get(&key) {
            Some(t) => t.clone(),
            None => RefreshedTokens {
                access: self.ctx.sealer.open(&spot.access_token_enc)?,
                refresh: match &spot.refresh_token_enc {
                    Some(r) => self.ctx.sealer.open(r)?,
                    None => String::new(),
                },
                expires_at: spot.expires_at.unwrap_or_else(Utc::now),
            },
        };
        let due = current.expires_at - REFRESH_MARGIN < Utc::now();
        if !(due || self.force_refresh) {
            return Ok(current.access);
        }
        // Only this worker refreshes this portal's tokens: one refresh in flight.
        let oauth = self.ctx.oauth.as_ref().ok_or(DeliverError::NoOAuthApp)?;
        let result = oauth.refresh(&self.ctx.client, &current.refresh).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.ctx
            .metrics
            .token_refreshes
            .with_label_values(&[label])
            .inc();
        let tokens = result?;
        let refreshed = RefreshedTokens {
            access: tokens.access_token.clone(),
            refresh: tokens.refresh_token.clone(),
            expires_at: tokens.expires_at(),
        };
        // The refresh token may have rotated: store both every time.
        store::store_tokens(
            db,
            spot.spot_id,
            &self.ctx.sealer.seal(&refreshed.access),
            &self.ctx.sealer.seal(&refreshed.refresh),
            refreshed.expires_at,
        )
        .await?;
        if self.force_refresh {
            self.force_refresh = false;
            self.refreshed_after_401 = true;
        }
        info!(spot_id = spot.spot_id, "refreshed the OAuth access token");
        self.tokens.insert(key, refreshed.clone());
        Ok(refreshed.access)
    }

    /// Decides how long to wait after a failure, records it, and fails the
    /// integration when SPEC §4.7 says so.
    async fn on_error(
        &mut self,
        db: &mut tokio_postgres::Client,
        spots: &[LiveIntegration],
        e: DeliverError,
    ) -> Duration {
        let spot_ids: Vec<i64> = spots.iter().map(|s| s.spot_id).collect();
        let m = &self.ctx.metrics;
        let oauth = spots
            .first()
            .is_some_and(|s| s.credentials_kind == AuthKind::OAuth);
        match &e {
            // 429 is flow control, never a failure (the limiter now holds a full window).
            DeliverError::HubSpot(HubSpotError::RateLimited {
                retry_after,
                policy,
            }) => {
                m.delivery_retries
                    .with_label_values(&["rate_limited"])
                    .inc();
                info!(policy, "HubSpot asked us to slow down");
                retry_after.unwrap_or(Duration::from_millis(100))
            }
            // An expired or refused access token earns one refresh first.
            DeliverError::HubSpot(HubSpotError::Auth { status: 401, .. })
                if oauth && !self.refreshed_after_401 =>
            {
                m.delivery_retries.with_label_values(&["auth"]).inc();
                self.force_refresh = true;
                Duration::ZERO
            }
            DeliverError::HubSpot(HubSpotError::Auth { .. })
            | DeliverError::NoOAuthApp
            | DeliverError::Decrypt(_) => {
                self.fail(db, &spot_ids, "auth", &e.to_string()).await;
                Duration::from_secs(1)
            }
            other => {
                self.failures += 1;
                let cause = match other {
                    DeliverError::Db(_) => "database",
                    _ => "hubspot",
                };
                m.delivery_retries.with_label_values(&[cause]).inc();
                // Only HubSpot's failures run the clock towards `failed`.
                if cause == "hubspot" {
                    match store::record_outcome(db, &spot_ids, Some(&other.to_string())).await {
                        Ok(failing_for) if failing_for >= self.ctx.fail_after => {
                            let msg = format!(
                                "HubSpot unreachable for {} s: {other}",
                                failing_for.as_secs()
                            );
                            self.fail(db, &spot_ids, "unreachable", &msg).await;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "could not record the failure"),
                    }
                }
                let base = Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(7));
                let pause = base.min(Duration::from_secs(30));
                let pause = pause.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
                warn!(error = %other, retry_in_ms = pause.as_millis() as u64, "delivery failed");
                pause
            }
        }
    }

    async fn fail(
        &mut self,
        db: &mut tokio_postgres::Client,
        spot_ids: &[i64],
        cause: &str,
        error: &str,
    ) {
        match store::mark_failed(db, spot_ids, error).await {
            Ok(failed) => {
                for spot_id in &failed {
                    warn!(
                        spot_id,
                        cause, error, "integration failed; admins are notified"
                    );
                    self.ctx
                        .metrics
                        .integrations_failed
                        .with_label_values(&[cause])
                        .inc();
                }
                if !failed.is_empty() {
                    self.ctx.notify.notify_one();
                }
            }
            Err(e) => warn!(error = %e, "could not mark the integration failed"),
        }
    }

    /// One unit of work, under the portal's round lock.
    async fn step(
        &mut self,
        db: &mut tokio_postgres::Client,
        spots: &[LiveIntegration],
    ) -> Result<Round, DeliverError> {
        // The supervisor's view may be up to 0.5 s old: a Spot disconnected or
        // failed meanwhile gets nothing.
        let ids: Vec<i64> = spots.iter().map(|s| s.spot_id).collect();
        let active = store::still_active(db, &ids).await?;
        let spots: Vec<&LiveIntegration> = spots
            .iter()
            .filter(|s| active.contains(&s.spot_id))
            .collect();
        let Some(first) = spots.first() else {
            return Ok(Round::Idle);
        };
        let token = self.access_token(db, first).await?;
        let portal = Portal {
            client: self.ctx.client.clone(),
            token,
            limiter: self.gate.limiter.clone(),
        };

        // Initialization, once per activation (SPEC §4.2).
        let uninitialized: Vec<&&LiveIntegration> = spots
            .iter()
            .filter(|s| !s.initialized && !self.initialized.contains(&(s.spot_id, s.activation)))
            .collect();
        if !uninitialized.is_empty() {
            portal.ensure_schema().await?;
            for s in &uninitialized {
                store::mark_initialized(db, s.spot_id, s.activation).await?;
                self.initialized.insert((s.spot_id, s.activation));
            }
            info!(
                spots = uninitialized.len(),
                "property group and properties are in place"
            );
            return Ok(Round::Full);
        }

        // Backfill: queue the next page of a Spot's members when its backlog is short.
        for s in &spots {
            let key = (s.spot_id, s.activation);
            let after = *self.backfill.entry(key).or_insert(s.backfill_after);
            let Some(after) = after else { continue };
            if store::spot_backlog(db, s.spot_id).await? >= BACKFILL_BACKLOG {
                continue;
            }
            let (queued, next_after, done) =
                store::backfill_page(db, s.spot_id, s.activation, after, BACKFILL_PAGE).await?;
            self.ctx.metrics.backfill_queued.inc_by(queued as u64);
            self.backfill.insert(key, (!done).then_some(next_after));
            info!(spot_id = s.spot_id, queued, done, "backfill progress");
            return Ok(Round::Full);
        }
        self.ctx
            .metrics
            .backfills_running
            .set(self.backfill.values().filter(|v| v.is_some()).count() as i64);

        // A round costs at most three calls (read, create, update); wait for room
        // first, so that while the portal is throttled the batch grows instead
        // of the number of calls.
        self.gate.limiter.wait_available(3).await;
        let spot_ids: Vec<i64> = spots.iter().map(|s| s.spot_id).collect();
        let properties = self.property_round(db, &portal, &spot_ids).await?;
        let activities = self.activity_round(db, &portal, &spot_ids).await?;
        Ok(match (properties, activities) {
            (Round::Full, _) | (_, Round::Full) => Round::Full,
            (Round::Partial, _) | (_, Round::Partial) => Round::Partial,
            _ => Round::Idle,
        })
    }

    async fn property_round(
        &mut self,
        db: &mut tokio_postgres::Client,
        portal: &Portal,
        spot_ids: &[i64],
    ) -> Result<Round, DeliverError> {
        let markers = store::due_markers(db, spot_ids, BATCH_LIMIT as i64).await?;
        if markers.is_empty() {
            return Ok(Round::Idle);
        }
        let full = markers.len() == BATCH_LIMIT;
        let span = tracing::debug_span!("delivery_batch", items = markers.len());
        match round::deliver(&self.ctx.metrics, db, portal, &markers)
            .instrument(span)
            .await
        {
            Ok(completions) => {
                store::complete(db, &completions).await?;
                let now = Utc::now();
                for m in &markers {
                    let age = (now - m.enqueued_at).to_std().unwrap_or_default();
                    self.ctx.metrics.delivery_seconds.observe(age.as_secs_f64());
                }
                self.succeeded(db, spot_ids).await?;
                Ok(if full { Round::Full } else { Round::Partial })
            }
            Err(e) => {
                if !matches!(e, DeliverError::HubSpot(HubSpotError::RateLimited { .. })) {
                    store::postpone(db, &markers, self.retry_delay()).await?;
                }
                Err(e)
            }
        }
    }

    async fn activity_round(
        &mut self,
        db: &mut tokio_postgres::Client,
        portal: &Portal,
        spot_ids: &[i64],
    ) -> Result<Round, DeliverError> {
        let due = store::due_activities(db, spot_ids, BATCH_LIMIT as i64).await?;
        if due.is_empty() {
            return Ok(Round::Idle);
        }
        if !self.templates_ready {
            self.ctx.sink.ensure_templates(&self.ctx.client).await?;
            self.templates_ready = true;
        }
        self.gate.limiter.wait_available(2).await;
        let full = due.len() == BATCH_LIMIT;
        let ids: Vec<String> = due.iter().map(|q| q.event_id.clone()).collect();
        let span = tracing::debug_span!("activity_batch", items = due.len());
        match round::deliver_activities(&self.ctx.metrics, db, portal, &self.ctx.sink, due)
            .instrument(span)
            .await
        {
            Ok(done) => {
                store::complete_activities(db, &done).await?;
                self.succeeded(db, spot_ids).await?;
                Ok(if full { Round::Full } else { Round::Partial })
            }
            Err(e) => {
                if !matches!(e, DeliverError::HubSpot(HubSpotError::RateLimited { .. })) {
                    store::postpone_activities(db, &ids, self.retry_delay()).await?;
                }
                Err(e)
            }
        }
    }

    fn retry_delay(&self) -> Duration {
        Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(6))
    }

    /// A success ends a failure streak (and the clock towards `failed`).
    async fn succeeded(
        &mut self,
        db: &tokio_postgres::Client,
        spot_ids: &[i64],
    ) -> Result<(), DeliverError> {
        if self.failures > 0 || self.refreshed_after_401 || self.clock_may_run {
            self.failures = 0;
            self.refreshed_after_401 = false;
            self.clock_may_run = false;
            store::record_outcome(db, spot_ids, None).await?;
        }
        Ok(())
    }
}
