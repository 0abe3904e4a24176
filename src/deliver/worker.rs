//! What one round of one Spot's activation does: with the Spot's own token,
//! within the portal's shared rate limit; initialization and backfill first,
//! then property changes and activities. A failed round is classified by
//! `policy` and carried out here, for this Spot only: another Spot on the
//! same portal has its own state, token and failures. The worker is only
//! state between rounds; `scheduler` decides when its next round runs.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{info, warn, Instrument};

use super::policy::{self, Disposition};
use super::tokens::TokenCache;
use super::{round, DeliverContext, DeliverError};
use crate::backoff::Backoff;
use crate::hubspot::ratelimit::RateLimiter;
use crate::hubspot::{Portal, BATCH_LIMIT};
use crate::internal_events::{DeliveryRetried, FailCause, IntegrationFailed, RetryCause};
use crate::store::{self, AuthKind, Fence, LiveIntegration, Marker};

/// How long delivery lags the hand-offs at most while the stream reads a
/// backlog (it goes on as soon as the stream has read it). A longer catch-up
/// is delivered this far behind the stream.
const HOLD_WHILE_CATCHING_UP: Duration = Duration::from_secs(30);
/// Calls a round usually makes (a batch update, and a batch read for
/// contacts not yet mapped): what the linger paces for.
const ROUND_CALLS: usize = 2;
/// How long a round that found its due rows held by another transaction
/// waits before it looks again (a hand-off holds them until it commits,
/// usually milliseconds), doubling while they stay held (a hand-off of
/// every member, a disconnect of a large backlog, an idle transaction) up
/// to LOCKED_RETRY_MAX, so a long lock costs a few rounds a second.
const LOCKED_RETRY: Duration = Duration::from_millis(20);
const LOCKED_RETRY_MAX: Duration = Duration::from_millis(500);
/// Batches of 100 a round sends at once when that many rows are due. One
/// batch at a time, a large Spot was bound by the round trip (a lookup and
/// an update of 150 ms each): 30,000 members, half matched, took 2.4x what
/// the budget of 100 calls per 10 s allows; 4 at once, 1.36x; 8, 1.13-1.17x
/// (`--shape activation --members 30000`).
const BATCHES_IN_FLIGHT: usize = 8;
/// Members queued per backfill page, and the backlog under which the next
/// page is queued (so that stream changes never wait behind a whole Spot).
const BACKFILL_PAGE: i64 = 1000;
/// How long a worker waits after a 401 before it refreshes and tries again.
const REFRESH_PAUSE: Duration = Duration::from_millis(250);
const BACKFILL_BACKLOG: i64 = 500;

/// What the scheduler does with the Spot after a round.
#[derive(Debug, PartialEq)]
pub(super) enum Next {
    /// More is due now: the Spot queues for another round.
    Again,
    /// Nothing more is due that this process knows of: the next round runs
    /// when work is signalled for the Spot (or the fleet look finds some).
    Idle,
    /// The next round runs after `wait`; a signal for the Spot ends the
    /// wait early only when `signal_ends_it` (new work must not end a
    /// backoff, or an outage would be hammered once per change).
    After {
        /// How long.
        wait: Duration,
        /// Whether new work for the Spot ends the wait.
        signal_ends_it: bool,
    },
    /// Held while the stream reads a backlog: after `wait`, or as soon as
    /// the stream has read it.
    Held(Duration),
    /// This activation's work ends (reconnected, disconnected or failed).
    Stop,
}

enum Round {
    /// Work was done; more may be due.
    Full,
    /// A partial batch went out.
    Partial,
    /// Nothing was due.
    Idle,
    /// What was due was held by another transaction (a hand-off about to
    /// commit): look again shortly.
    Locked,
    /// The stream is reading a backlog: the batch waits this long for the
    /// rest of it.
    Held(Duration),
}

/// The rows a failed round had taken, to be postponed by the backoff's delay.
enum Taken {
    Nothing,
    Markers(Vec<Marker>),
    Activities(Vec<String>),
}

/// A failed round: the error, and the rows it had taken.
struct RoundError {
    error: DeliverError,
    taken: Taken,
}

impl<E: Into<DeliverError>> From<E> for RoundError {
    fn from(e: E) -> Self {
        RoundError {
            error: e.into(),
            taken: Taken::Nothing,
        }
    }
}

pub(super) struct SpotWorker {
    ctx: Arc<DeliverContext>,
    /// The activation this worker serves.
    pub(super) activation: i64,
    portal_id: i64,
    limiter: Arc<RateLimiter>,
    backoff: Backoff,
    /// Rounds in a row that found their rows held (see LOCKED_RETRY).
    held_rounds: u32,
    /// The soonest an event the last round put off comes due.
    put_off: Option<Duration>,
    tokens: TokenCache,
    /// This worker initialized the activation, before the supervisor's view caught up.
    initialized: bool,
    /// Backfill position, once read (inner None: complete).
    backfill: Option<Option<i64>>,
    /// A failure clock (`failing_since`) may be running from before this
    /// worker started: the first success clears it.
    clock_may_run: bool,
    /// timeline-v3 templates exist (checked once per worker).
    templates_ready: bool,
    /// HubSpot said one of our properties does not exist: ensure the schema
    /// again before the next write.
    schema_stale: bool,
    /// The schema was recreated for that and no write succeeded since.
    schema_recreated: bool,
}

impl SpotWorker {
    pub(super) fn new(ctx: Arc<DeliverContext>, spot: &LiveIntegration) -> Self {
        let limiter = ctx.limiters.portal(spot.portal_id);
        SpotWorker {
            ctx,
            activation: spot.activation,
            portal_id: spot.portal_id,
            limiter,
            backoff: Backoff::delivery(),
            held_rounds: 0,
            put_off: None,
            tokens: TokenCache::default(),
            initialized: false,
            backfill: None,
            clock_may_run: true,
            templates_ready: false,
            schema_stale: false,
            schema_recreated: false,
        }
    }

    /// The portal this activation delivers to.
    pub(super) fn portal_id(&self) -> i64 {
        self.portal_id
    }

    /// Whether this worker knows its backfill still has members to queue.
    fn backfill_queueing(&self) -> bool {
        matches!(self.backfill, Some(Some(_)))
    }

    /// Whether the backfill is still queueing members, once a round read it.
    pub(super) fn backfill_known(&self) -> Option<bool> {
        self.backfill.map(|after| after.is_some())
    }

    /// One round for `spot` (this worker's activation), and when the next
    /// one should run.
    pub(super) async fn round(&mut self, spot: &LiveIntegration) -> Next {
        // Every call of the round passes the fence (see `fence`).
        let result = self.step(spot).await;
        if !matches!(result, Ok(Round::Locked)) {
            self.held_rounds = 0;
        }
        match result {
            Ok(Round::Full) => Next::Again,
            // A partial batch: what arrives while it was out signals the
            // Spot; the next one gathers what arrives while the portal's
            // budget says to wait (nothing while it is ample).
            Ok(Round::Partial) => {
                let linger = self.limiter.linger(ROUND_CALLS);
                if !linger.is_zero() {
                    Next::After {
                        wait: linger,
                        signal_ends_it: false,
                    }
                } else if self.backfill_queueing() {
                    // The backfill's next page is queued by the next round
                    // (this one drained the backlog below its mark); nothing
                    // else would signal it. Without this, a resync with an
                    // ample budget stopped at 3,000 of 5,000 members.
                    Next::Again
                } else {
                    self.idle()
                }
            }
            // Held for the backlog: until the stream has read it, at most
            // HOLD_WHILE_CATCHING_UP.
            Ok(Round::Held(wait)) => Next::Held(wait),
            // Held by another transaction: a moment, or new work.
            Ok(Round::Locked) => {
                let pause = LOCKED_RETRY
                    .saturating_mul(1 << self.held_rounds.min(5))
                    .min(LOCKED_RETRY_MAX);
                self.held_rounds = self.held_rounds.saturating_add(1);
                Next::After {
                    wait: pause,
                    signal_ends_it: true,
                }
            }
            Ok(Round::Idle) => self.idle(),
            Err(e) => match self.on_error(spot, e).await {
                Some(pause) => Next::After {
                    wait: pause,
                    signal_ends_it: false,
                },
                None => Next::Stop,
            },
        }
    }

    /// Nothing more is due now; rows this worker put off (an event waiting
    /// for its contact's creation) come due later, and nobody else would
    /// signal them.
    fn idle(&mut self) -> Next {
        match self.put_off.take() {
            Some(wait) => Next::After {
                wait,
                signal_ends_it: true,
            },
            None => Next::Idle,
        }
    }

    /// The portal handle for this round's calls, with the Spot's token:
    /// made only once a round has something to send, so that a Spot with
    /// nothing due never refreshes its token.
    async fn portal(&mut self, spot: &LiveIntegration) -> Result<Portal, DeliverError> {
        let token = self.tokens.access_token(&self.ctx, spot).await?;
        Ok(Portal {
            client: self.ctx.client.clone(),
            token,
            limiter: self.limiter.clone(),
            fence: Some(self.ctx.fences.gate(&self.ctx.shared.fences, spot.fence())),
        })
    }

    /// Carries out what `policy` says about a failed round; returns how long
    /// to wait before the next one, or None when this activation's work ends.
    async fn on_error(&mut self, spot: &LiveIntegration, failed: RoundError) -> Option<Duration> {
        let fence = spot.fence();
        let e = failed.error;
        Some(
            match policy::classify(&e, spot.credentials_kind, self.tokens.refreshed_after_401()) {
                Disposition::Stop => {
                    info!(
                        "the Spot was reconnected or disconnected; this activation's worker stops"
                    );
                    return None;
                }
                Disposition::FlowControl(wait) => {
                    DeliveryRetried {
                        cause: RetryCause::RateLimited,
                        error: &e,
                        retry_in: wait,
                    }
                    .emit(&self.ctx.metrics);
                    wait
                }
                // A short pause: a 401 that a refresh cannot fix must not become
                // a hot loop of refreshes.
                Disposition::Refresh => {
                    DeliveryRetried {
                        cause: RetryCause::Auth,
                        error: &e,
                        retry_in: REFRESH_PAUSE,
                    }
                    .emit(&self.ctx.metrics);
                    self.tokens.force_refresh();
                    REFRESH_PAUSE
                }
                // Once: recreate the schema. Missing again right after that, it
                // is HubSpot refusing our properties: back off and run the clock
                // like any other failure, so the Spot cannot stall unnoticed.
                Disposition::Reinitialize if !self.schema_recreated => {
                    let pause = self.backoff.next();
                    warn!(error = %e, "a MeltingSpot property is missing in HubSpot; recreating the schema");
                    self.schema_stale = true;
                    self.schema_recreated = true;
                    pause
                }
                Disposition::Reinitialize => {
                    self.retry(RetryCause::HubSpot, fence, failed.taken, &e)
                        .await
                }
                Disposition::Fail(cause) => {
                    self.fail(fence, cause, &e.to_string()).await;
                    Duration::from_secs(1)
                }
                Disposition::Retry(cause) => self.retry(cause, fence, failed.taken, &e).await,
            },
        )
    }

    /// Backs off, postpones the rows the round had taken by the same delay,
    /// and (HubSpot's failures only) runs the clock towards `failed`.
    async fn retry(
        &mut self,
        cause: RetryCause,
        fence: Fence,
        taken: Taken,
        e: &DeliverError,
    ) -> Duration {
        let pause = self.backoff.next();
        // The rows come due when the worker wakes: one clock for both.
        if let Err(pe) = self.postpone(taken, pause).await {
            warn!(error = %pe, "could not postpone the failed rows");
        }
        DeliveryRetried {
            cause,
            error: e,
            retry_in: pause,
        }
        .emit(&self.ctx.metrics);
        match cause {
            RetryCause::HubSpot => self.run_failure_clock(fence, e).await,
            RetryCause::Configuration => {
                if let Ok(c) = self.ctx.db.client().await {
                    let text = format!("Configuration of this sidecar, not HubSpot: {e}");
                    if let Err(de) =
                        store::record_config_error(&c, fence.spot_id, fence.activation, &text).await
                    {
                        warn!(error = %de, "could not record the configuration error");
                    }
                }
            }
            _ => {}
        }
        pause
    }

    async fn postpone(&self, taken: Taken, pause: Duration) -> Result<(), DeliverError> {
        match taken {
            Taken::Nothing => {}
            Taken::Markers(markers) => {
                store::postpone(&*self.ctx.db.client().await?, &markers, pause).await?
            }
            Taken::Activities(ids) => {
                store::postpone_activities(&*self.ctx.db.client().await?, &ids, pause).await?
            }
        }
        Ok(())
    }

    async fn run_failure_clock(&mut self, fence: Fence, e: &DeliverError) {
        let recorded = match self.ctx.db.client().await {
            Ok(c) => {
                store::record_failure(&c, fence.spot_id, fence.activation, &e.to_string()).await
            }
            Err(de) => Err(de),
        };
        match recorded {
            Ok(failing_for) if failing_for >= self.ctx.fail_after => {
                let msg = format!("HubSpot unreachable for {} s: {e}", failing_for.as_secs());
                self.fail(fence, FailCause::Unreachable, &msg).await;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not record the failure"),
        }
    }

    async fn fail(&mut self, fence: Fence, cause: FailCause, error: &str) {
        let marked = match self.ctx.db.client().await {
            Ok(mut c) => {
                store::mark_failed(
                    &mut c,
                    &self.ctx.markers,
                    fence.spot_id,
                    fence.activation,
                    error,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match marked {
            Ok(true) => {
                IntegrationFailed {
                    spot_id: fence.spot_id,
                    cause,
                    error,
                }
                .emit(&self.ctx.metrics);
                self.ctx.notify.notify_one();
            }
            // Another activation took over meanwhile: it is not this one's to fail.
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not mark the integration failed"),
        }
    }

    /// One unit of work for the Spot.
    async fn step(&mut self, spot: &LiveIntegration) -> Result<Round, RoundError> {
        // No look at the integration first: the scheduler's view may be a
        // moment old, but every call passes the fence (`fence`), every
        // write checks the activation in its own transaction (completion,
        // backfill page, initialization), and a round's take is harmless.
        // A Spot disconnected, failed or reconnected meanwhile gets nothing.
        // Initialization, once per activation (SPEC §4.2).
        let uninitialized = !spot.initialized && !self.initialized;
        if uninitialized || self.schema_stale {
            self.portal(spot).await?.ensure_schema().await?;
            self.schema_stale = false;
            if uninitialized {
                let client = self.ctx.db.client().await?;
                store::mark_initialized(&client, spot.spot_id, spot.activation).await?;
                self.initialized = true;
                info!("property group and properties are in place");
            }
            return Ok(Round::Full);
        }

        // Backfill: queue the next page of the Spot's members when its backlog is short.
        let after = *self.backfill.get_or_insert(spot.backfill_after);
        if let Some(after) = after {
            let client = self.ctx.db.client().await?;
            if store::spot_backlog_below(&client, spot.spot_id, BACKFILL_BACKLOG).await? {
                let (queued, next_after, done) = store::backfill_page(
                    &client,
                    spot.spot_id,
                    spot.activation,
                    after,
                    BACKFILL_PAGE,
                )
                .await?;
                self.ctx.metrics.backfill_queued.inc_by(queued as u64);
                self.backfill = Some((!done).then_some(next_after));
                info!(queued, done, "backfill progress");
                return Ok(Round::Full);
            }
        }

        // A round costs at most three calls (read, create, update); wait for room
        // first, so that while the portal is throttled the batch grows instead
        // of the number of calls.
        self.limiter.wait_available(3).await;
        let properties = self.property_round(spot).await?;
        // Static tokens cannot send timeline events (SPEC §9).
        let activities = if spot.credentials_kind == AuthKind::OAuth {
            self.activity_round(spot).await?
        } else {
            Round::Idle
        };
        // What is due now first, then rows held by a hand-off, then the
        // backlog's hold; a partial batch waits for a signal.
        Ok(match (properties, activities) {
            (Round::Full, _) | (_, Round::Full) => Round::Full,
            (Round::Locked, _) | (_, Round::Locked) => Round::Locked,
            (Round::Held(wait), _) | (_, Round::Held(wait)) => Round::Held(wait),
            (Round::Partial, _) | (_, Round::Partial) => Round::Partial,
            _ => Round::Idle,
        })
    }

    async fn property_round(&mut self, spot: &LiveIntegration) -> Result<Round, RoundError> {
        let fence = spot.fence();
        // While the stream reads a backlog, delivery lags it by up to
        // HOLD_WHILE_CATCHING_UP, full batches too: a member changed again
        // later in the backlog is written once, batches are full, and the
        // hand-offs the backlog waits for do not compete with delivery for
        // the database (measured over 50 Spots: held 5 s, 1.10x the minimum
        // calls and 0.52x the raw stream's speed; held 30 s, 1.00x and 0.95x).
        // A held round only looks: taking rows it does not send would make
        // the backlog's hand-offs give them new versions.
        if *self.ctx.catching_up.borrow() {
            let waited = store::next_batch_wait(
                &*self.ctx.db.client().await?,
                fence.spot_id,
                BATCH_LIMIT as i64,
            )
            .await?;
            match waited {
                None => return Ok(Round::Idle),
                Some(waited) if waited < HOLD_WHILE_CATCHING_UP => {
                    return Ok(Round::Held(HOLD_WHILE_CATCHING_UP - waited))
                }
                Some(_) => {}
            }
        }
        let (markers, locked) = self
            .ctx
            .shared
            .take
            .ask((fence.spot_id, (BATCH_LIMIT * BATCHES_IN_FLIGHT) as i64))
            .await?;
        if markers.is_empty() {
            return Ok(if locked > 0 {
                Round::Locked
            } else {
                Round::Idle
            });
        }
        let full = markers.len() == BATCH_LIMIT * BATCHES_IN_FLIGHT;
        let portal = match self.portal(spot).await {
            Ok(portal) => portal,
            Err(error) => {
                return Err(RoundError {
                    error,
                    taken: Taken::Markers(markers),
                })
            }
        };
        // A deep backlog goes out as several batches at once, each of
        // distinct members (one take), each completed on its own; the
        // portal's limiter still spaces every call within its budget.
        let delivered = futures_util::future::join_all(markers.chunks(BATCH_LIMIT).map(|batch| {
            let span = tracing::debug_span!("delivery_batch", items = batch.len());
            round::deliver_properties(&self.ctx, &portal, fence, batch).instrument(span)
        }))
        .await;
        let mut failed: Option<(DeliverError, Vec<Marker>)> = None;
        for (batch, result) in markers.chunks(BATCH_LIMIT).zip(delivered) {
            if let Err(error) = result {
                // The first error decides; every failed batch's rows are put off.
                let (_, rows) = failed.get_or_insert_with(|| (error, Vec::new()));
                rows.extend_from_slice(batch);
            }
        }
        if let Some((error, rows)) = failed {
            return Err(RoundError {
                error,
                taken: Taken::Markers(rows),
            });
        }
        let now = Utc::now();
        for m in &markers {
            let age = (now - m.enqueued_at).to_std().unwrap_or_default();
            self.ctx.metrics.delivery_seconds.observe(age.as_secs_f64());
        }
        self.succeeded(fence).await?;
        Ok(if full {
            Round::Full
        } else if locked > 0 {
            // Rows left because a hand-off held them: a moment, then them.
            Round::Locked
        } else {
            Round::Partial
        })
    }

    async fn activity_round(&mut self, spot: &LiveIntegration) -> Result<Round, RoundError> {
        let fence = spot.fence();
        let due = self
            .ctx
            .shared
            .activities
            .ask((fence.spot_id, BATCH_LIMIT as i64))
            .await?;
        if due.is_empty() {
            return Ok(Round::Idle);
        }
        if !self.templates_ready {
            self.ctx.sink.ensure_templates(&self.ctx.client).await?;
            self.templates_ready = true;
        }
        self.limiter.wait_available(2).await;
        let full = due.len() == BATCH_LIMIT;
        let ids: Vec<String> = due.iter().map(|q| q.event_id.clone()).collect();
        let span = tracing::debug_span!("activity_batch", items = due.len());
        let delivered = match self.portal(spot).await {
            Ok(portal) => {
                round::deliver_activities(&self.ctx, &portal, fence, due)
                    .instrument(span)
                    .await
            }
            Err(e) => Err(e),
        };
        match delivered {
            Ok(put_off) => self.put_off = put_off,
            Err(error) => {
                return Err(RoundError {
                    error,
                    taken: Taken::Activities(ids),
                })
            }
        }
        self.succeeded(fence).await?;
        Ok(if full { Round::Full } else { Round::Partial })
    }

    /// A success ends a failure streak (and the clock towards `failed`).
    async fn succeeded(&mut self, fence: Fence) -> Result<(), DeliverError> {
        let after_401 = self.tokens.succeeded();
        self.schema_recreated = false;
        if self.backoff.failures() > 0 || after_401 || self.clock_may_run {
            self.backoff.reset();
            self.clock_may_run = false;
            self.ctx
                .shared
                .successes
                .ask((fence.spot_id, fence.activation))
                .await?;
        }
        Ok(())
    }
}
