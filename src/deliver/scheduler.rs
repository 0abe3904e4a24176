//! Decides which Spot runs a round next.
//!
//! Cost follows work, not tenants: a connected Spot with nothing due is an
//! entry in a map, with no task, no timer and no query. A Spot gets a round
//! when something says it has work:
//! - a signal from this process (`Wake`): a hand-off wrote rows for it, an
//!   admin action queued some, its integration changed;
//! - its own last round: more is due (`Next::Again`), or it asked to run
//!   again after a wait it chose (a backoff, a linger, rows held by a
//!   hand-off, events put off until their contact exists);
//! - the fleet look: one query for the whole fleet every `FLEET_LOOK` that
//!   finds Spots with rows due that nobody signalled (queued by another
//!   process, put off by the process before a restart).
//!
//! Ready Spots queue in order (first signalled, first run; a Spot with more
//! to do goes to the back), and at most `ROUNDS_IN_FLIGHT` rounds run at
//! once across the fleet, so one large Spot cannot starve the others and a
//! burst over many Spots goes out together.
//!
//! Integrations are read once at start; a change made in this process
//! reaches the scheduler as a signal and is read for that Spot alone; a
//! change made by another process is found by `REREAD_EVERY`'s read of all.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::wake::Signals;
use super::worker::{Next, SpotWorker};
use super::DeliverContext;
use crate::store::{self, LiveIntegration};

/// Rounds in flight at most across the fleet. A round mostly waits for
/// HubSpot (calls of 100-300 ms), holding a database connection only for
/// its statements, so many can be in flight; the bound keeps memory and the
/// database's queue in check when thousands of Spots have work at once.
pub(super) const ROUNDS_IN_FLIGHT: usize = 1024;
/// How often one query looks for due rows of Spots nobody signalled.
const FLEET_LOOK: Duration = Duration::from_secs(5);
/// How often all integrations are read again, for changes another process
/// made (this process's own changes arrive as signals), and work of
/// long-failed integrations is purged.
const REREAD_EVERY: Duration = Duration::from_secs(60);
/// How long a Spot whose round was fenced, while its integration still
/// reads as the same activation, waits before its next round.
const AFTER_STOP: Duration = Duration::from_secs(1);
/// How long a Spot whose round panicked waits before its next one.
const AFTER_PANIC: Duration = Duration::from_secs(5);

/// Where a Spot is between rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Nothing due that this process knows of.
    Idle,
    /// In the queue for a round.
    Ready,
    /// Its round is in flight.
    Running,
    /// Waits until `until` (a timer is set); a signal ends the wait early
    /// only when `signal_ends_it`.
    Waiting {
        until: Instant,
        signal_ends_it: bool,
    },
    /// Held while the stream reads a backlog, until `until` or its end.
    Held { until: Instant },
}

struct Entry {
    /// The integration as last read; None once it is no longer served
    /// (the entry goes when its round in flight ends).
    live: Option<LiveIntegration>,
    /// The worker of the current activation; None while its round runs.
    worker: Option<Box<SpotWorker>>,
    state: State,
    /// Work was signalled while the Spot ran or waited out a wait that a
    /// signal does not end: it runs again when that ends.
    signalled: bool,
}

/// A round's end: the Spot, its worker back, and what it asked for next.
type Finished = (i64, Box<SpotWorker>, Next);

pub(super) struct Scheduler {
    ctx: Arc<DeliverContext>,
    spots: HashMap<i64, Entry>,
    ready: VecDeque<i64>,
    timers: BTreeSet<(Instant, i64)>,
    rounds: JoinSet<Finished>,
    /// The Spot of each round in flight, for a round that panicked.
    round_spots: HashMap<tokio::task::Id, i64>,
}

impl Scheduler {
    pub(super) fn new(ctx: DeliverContext) -> Self {
        Scheduler {
            ctx: Arc::new(ctx),
            spots: HashMap::new(),
            ready: VecDeque::new(),
            timers: BTreeSet::new(),
            rounds: JoinSet::new(),
            round_spots: HashMap::new(),
        }
    }

    /// Runs until `shutdown`, then lets the rounds in flight finish.
    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // Signals sent before the first read are covered by it.
        let _ = self.ctx.wake.take();
        while !self.reread_all(true).await {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.look_for_due_work().await;
        let mut catching_up = self.ctx.catching_up.clone();
        // The stream's end drops the sender: nothing more to wait for then.
        let mut stream_gone = false;
        let mut fleet_look = tokio::time::interval_at(Instant::now() + FLEET_LOOK, FLEET_LOOK);
        fleet_look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reread = tokio::time::interval_at(Instant::now() + REREAD_EVERY, REREAD_EVERY);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.purge().await;
        loop {
            self.start_ready();
            let next_timer = self.timers.first().map(|(at, _)| *at);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.ctx.wake.signalled() => {
                    let signals = self.ctx.wake.take();
                    self.on_signals(signals).await;
                }
                Some(done) = self.rounds.join_next_with_id(), if !self.rounds.is_empty() => {
                    match done {
                        Ok((id, finished)) => {
                            self.round_spots.remove(&id);
                            self.finished(finished).await;
                        }
                        Err(e) => self.panicked(e),
                    }
                }
                _ = sleep_until(next_timer), if next_timer.is_some() => self.timers_due(),
                changed = catching_up.changed(), if !stream_gone => {
                    if changed.is_err() {
                        stream_gone = true;
                        self.release_held();
                    } else if !*catching_up.borrow_and_update() {
                        self.release_held();
                    }
                }
                _ = fleet_look.tick() => self.look_for_due_work().await,
                _ = reread.tick() => {
                    self.reread_all(false).await;
                    self.purge().await;
                }
            }
        }
        while let Some(done) = self.rounds.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "a delivery round failed while stopping");
            }
        }
        info!("delivery stopped");
    }

    /// Starts rounds for ready Spots while the fleet's bound allows.
    fn start_ready(&mut self) {
        self.start_rounds();
        self.ctx
            .metrics
            .delivery_rounds_in_flight
            .set(self.rounds.len() as i64);
    }

    fn start_rounds(&mut self) {
        while self.rounds.len() < ROUNDS_IN_FLIGHT {
            let Some(spot_id) = self.ready.pop_front() else {
                return;
            };
            let Some(entry) = self.spots.get_mut(&spot_id) else {
                continue;
            };
            if entry.state != State::Ready {
                continue;
            }
            let (Some(live), Some(mut worker)) = (entry.live.clone(), entry.worker.take()) else {
                // Waiting for its integration to be read again: out of the
                // queue, so a later signal or read queues it anew.
                entry.state = State::Idle;
                continue;
            };
            entry.state = State::Running;
            entry.signalled = false;
            let span = tracing::info_span!(
                "spot_round",
                spot_id,
                activation = live.activation,
                portal = live.portal_id
            );
            let handle = self.rounds.spawn(
                async move {
                    let next = worker.round(&live).await;
                    (spot_id, worker, next)
                }
                .instrument(span),
            );
            self.round_spots.insert(handle.id(), spot_id);
        }
    }

    /// Queues the Spot for a round (once).
    fn make_ready(&mut self, spot_id: i64) {
        let Some(entry) = self.spots.get_mut(&spot_id) else {
            return;
        };
        match entry.state {
            State::Ready | State::Running => return,
            State::Waiting { until, .. } | State::Held { until } => {
                self.timers.remove(&(until, spot_id));
            }
            State::Idle => {}
        }
        entry.state = State::Ready;
        self.ready.push_back(spot_id);
    }

    /// Work was signalled for the Spot.
    fn signal(&mut self, spot_id: i64) {
        let Some(entry) = self.spots.get_mut(&spot_id) else {
            return;
        };
        match entry.state {
            State::Idle
            | State::Waiting {
                signal_ends_it: true,
                ..
            } => self.make_ready(spot_id),
            State::Ready => {}
            State::Running | State::Waiting { .. } | State::Held { .. } => entry.signalled = true,
        }
    }

    fn wait(&mut self, spot_id: i64, state: State) {
        let (State::Waiting { until, .. } | State::Held { until }) = state else {
            return;
        };
        if let Some(entry) = self.spots.get_mut(&spot_id) {
            entry.state = state;
            self.timers.insert((until, spot_id));
        }
    }

    async fn on_signals(&mut self, signals: Signals) {
        if signals.all_changed {
            self.reread_all(false).await;
        } else {
            for spot_id in signals.changed {
                self.reread(spot_id).await;
            }
        }
        if signals.all_work {
            let all: Vec<i64> = self.spots.keys().copied().collect();
            all.into_iter().for_each(|s| self.signal(s));
        } else {
            signals.work.into_iter().for_each(|s| self.signal(s));
        }
    }

    /// A round ended: the Spot goes where its worker asked.
    async fn finished(&mut self, (spot_id, worker, next): Finished) {
        let Some(entry) = self.spots.get_mut(&spot_id) else {
            return;
        };
        let Some(live) = &entry.live else {
            // No longer served (disconnected, failed): it goes now.
            self.forget(spot_id);
            return;
        };
        if live.activation != worker.activation {
            // Reconnected or resynced while the round ran: the new
            // activation starts afresh.
            entry.worker = Some(Box::new(SpotWorker::new(self.ctx.clone(), live)));
            entry.state = State::Idle;
            self.make_ready(spot_id);
            return;
        }
        entry.worker = Some(worker);
        entry.state = State::Idle;
        let signalled = std::mem::take(&mut entry.signalled);
        let now = Instant::now();
        match next {
            Next::Again => self.make_ready(spot_id),
            Next::Idle if signalled => self.make_ready(spot_id),
            Next::Idle => {}
            Next::After {
                signal_ends_it: true,
                ..
            } if signalled => self.make_ready(spot_id),
            Next::After {
                wait,
                signal_ends_it,
            } => {
                if let Some(entry) = self.spots.get_mut(&spot_id) {
                    // Remembered: the wait cannot be ended, but what was
                    // signalled is looked at when it is over.
                    entry.signalled = signalled;
                }
                self.wait(
                    spot_id,
                    State::Waiting {
                        until: now + wait,
                        signal_ends_it,
                    },
                );
            }
            Next::Held(_) if !*self.ctx.catching_up.borrow() => self.make_ready(spot_id),
            Next::Held(wait) => self.wait(spot_id, State::Held { until: now + wait }),
            // Failed or superseded: read the integration again (a new
            // activation gets a new worker; a failed one is no longer served).
            Next::Stop => {
                let stopped = self
                    .spots
                    .get_mut(&spot_id)
                    .and_then(|entry| entry.live.take())
                    .map(|l| l.activation);
                self.reread(spot_id).await;
                // Still the same activation (the round was fenced while the
                // row says active, as when leadership is being lost): a
                // moment before it tries again, never a hot loop.
                let same = self
                    .spots
                    .get(&spot_id)
                    .and_then(|e| e.live.as_ref())
                    .map(|l| l.activation);
                if same.is_some() && same == stopped {
                    if let Some(entry) = self.spots.get_mut(&spot_id) {
                        entry.state = State::Idle;
                    }
                    self.wait(
                        spot_id,
                        State::Waiting {
                            until: now + AFTER_STOP,
                            signal_ends_it: false,
                        },
                    );
                }
            }
        }
    }

    fn panicked(&mut self, error: tokio::task::JoinError) {
        let Some(spot_id) = self.round_spots.remove(&error.id()) else {
            return;
        };
        tracing::error!(spot_id, error = %error, "a delivery round panicked; the Spot starts afresh shortly");
        let Some(entry) = self.spots.get_mut(&spot_id) else {
            return;
        };
        match &entry.live {
            Some(live) => {
                entry.worker = Some(Box::new(SpotWorker::new(self.ctx.clone(), live)));
                entry.state = State::Idle;
                self.wait(
                    spot_id,
                    State::Waiting {
                        until: Instant::now() + AFTER_PANIC,
                        signal_ends_it: false,
                    },
                );
            }
            None => self.forget(spot_id),
        }
    }

    fn timers_due(&mut self) {
        let now = Instant::now();
        while let Some(&(at, spot_id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(entry) = self.spots.get_mut(&spot_id) {
                if matches!(entry.state, State::Waiting { until, .. } | State::Held { until } if until == at)
                {
                    entry.state = State::Idle;
                    self.make_ready(spot_id);
                }
            }
        }
    }

    /// The stream has read its backlog: held Spots go now.
    fn release_held(&mut self) {
        let held: Vec<i64> = self
            .spots
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Held { .. }))
            .map(|(s, _)| *s)
            .collect();
        held.into_iter().for_each(|s| self.make_ready(s));
    }

    /// Takes in the integration as read: a new or changed activation gets a
    /// new worker and a round; None means it is no longer served.
    fn apply(&mut self, spot_id: i64, live: Option<LiveIntegration>, at_start: bool) {
        let Some(live) = live else {
            match self.spots.get_mut(&spot_id) {
                Some(entry) if entry.state == State::Running => entry.live = None,
                Some(_) => self.forget(spot_id),
                None => {}
            }
            return;
        };
        // At start only Spots with initialization or backfill to do run;
        // the fleet look that follows finds the ones with rows due.
        let needs_round = !at_start || !live.initialized || live.backfill_after.is_some();
        match self.spots.get_mut(&spot_id) {
            Some(entry) => {
                let same = entry.live.as_ref().map(|l| l.activation) == Some(live.activation);
                let running = entry.state == State::Running;
                if !same && !running {
                    entry.worker = Some(Box::new(SpotWorker::new(self.ctx.clone(), &live)));
                }
                entry.live = Some(live);
                if !same && !running {
                    self.make_ready(spot_id);
                }
            }
            None => {
                let worker = Box::new(SpotWorker::new(self.ctx.clone(), &live));
                self.spots.insert(
                    spot_id,
                    Entry {
                        live: Some(live),
                        worker: Some(worker),
                        state: State::Idle,
                        signalled: false,
                    },
                );
                if needs_round {
                    self.make_ready(spot_id);
                }
            }
        }
    }

    /// Drops a Spot that is no longer served, and what only it used.
    fn forget(&mut self, spot_id: i64) {
        let Some(entry) = self.spots.remove(&spot_id) else {
            return;
        };
        if let State::Waiting { until, .. } | State::Held { until } = entry.state {
            self.timers.remove(&(until, spot_id));
        }
        let portal = entry.worker.as_ref().map(|w| w.portal_id());
        drop(entry);
        self.ctx.fences.forget(spot_id);
        if let Some(portal) = portal {
            self.ctx.limiters.forget_if_unused(portal);
        }
    }

    /// Reads one Spot's integration again (after a change made here).
    async fn reread(&mut self, spot_id: i64) {
        let read = match self.ctx.db.client().await {
            Ok(db) => store::active_integration(&db, spot_id).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(live) => self.apply(spot_id, live, false),
            // The slow read of all catches up with it.
            Err(e) => warn!(spot_id, error = %e, "could not read the changed integration"),
        }
    }

    /// Reads every integration delivery serves; false when the database
    /// could not be read.
    async fn reread_all(&mut self, at_start: bool) -> bool {
        let read = match self.ctx.db.client().await {
            Ok(db) => store::active_integrations(&db).await,
            Err(e) => Err(e),
        };
        let live = match read {
            Ok(live) => live,
            Err(e) => {
                warn!(error = %e, "delivery cannot read the integrations; retrying");
                return false;
            }
        };
        let served: HashSet<i64> = live.iter().map(|l| l.spot_id).collect();
        for l in live {
            let spot_id = l.spot_id;
            let unchanged = self
                .spots
                .get(&spot_id)
                .and_then(|e| e.live.as_ref())
                .is_some_and(|cur| *cur == l);
            if !unchanged {
                self.apply(spot_id, Some(l), at_start);
            }
        }
        let gone: Vec<i64> = self
            .spots
            .keys()
            .filter(|s| !served.contains(s))
            .copied()
            .collect();
        for spot_id in gone {
            self.apply(spot_id, None, at_start);
        }
        if at_start {
            info!(spots = self.spots.len(), "delivery serves these Spots");
        }
        self.update_gauges();
        true
    }

    /// The fleet look: Spots with rows due that nobody signalled.
    async fn look_for_due_work(&mut self) {
        let db = match self.ctx.db.client().await {
            Ok(db) => db,
            Err(e) => {
                warn!(error = %e, "delivery cannot look for due work; retrying later");
                return;
            }
        };
        match store::spots_with_due_work(&db).await {
            Ok(spots) => spots.into_iter().for_each(|s| self.signal(s)),
            Err(e) => warn!(error = %e, "delivery cannot look for due work; retrying later"),
        }
        self.update_gauges();
        if let Ok(n) = store::backlog_estimate(&db).await {
            self.ctx
                .metrics
                .backlog_items
                .with_label_values(&["properties"])
                .set(n);
        }
    }

    /// Drops work of integrations failed for longer than the retention.
    async fn purge(&self) {
        let purged = match self.ctx.db.client().await {
            Ok(db) => store::purge_expired_backlog(&db, self.ctx.failed_retention).await,
            Err(e) => Err(e),
        };
        match purged {
            Ok(0) => {}
            Ok(n) => warn!(
                rows = n,
                "dropped work of failed integrations older than SIDECAR_FAILED_RETENTION"
            ),
            Err(e) => warn!(error = %e, "could not purge expired backlog"),
        }
    }

    /// Sets the fleet's gauges: after a read of every integration and on the
    /// fleet look, never per Spot changed (a pass over the map: done per
    /// Spot, a read of all that drops thousands would cost their square).
    fn update_gauges(&self) {
        let backfilling = self
            .spots
            .values()
            .filter(|e| match (&e.worker, &e.live) {
                (Some(w), _) if w.backfill_known().is_some() => w.backfill_known() == Some(true),
                (_, Some(l)) => l.backfill_after.is_some(),
                _ => false,
            })
            .count();
        self.ctx.metrics.backfills_running.set(backfilling as i64);
        self.ctx.metrics.delivery_spots.set(self.spots.len() as i64);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
