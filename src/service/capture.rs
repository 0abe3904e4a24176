//! The stream's loop: reads the slot, folds each change into its
//! transaction's work, hands batches off (outbox and checkpoint in one
//! transaction), acknowledges what was handed off, and wakes delivery for
//! the Spots it wrote for.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

use super::stopped;
use crate::config::Config;
use crate::health::Health;
use crate::internal_events as events;
use crate::metrics::Metrics;
use crate::replication::{self, slot, ConnParams, Decoded, Source, SourceEvent, TxMeta};
use crate::store::{self, Db};
use crate::translate::{self, MarkerKey, Work};

/// How often the slot is checked against the checkpoint while streaming.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(60);
/// Hand off at the latest this long after the first buffered transaction
/// (once no hand-off is in flight; while one is, the next batch grows, so a
/// backlog still goes in large hand-offs). Short, because every commit waits
/// for it on its way to HubSpot: with 50 ms the stream's p99 was 0.401 to
/// 0.427 s, with 5 ms 0.384 and 0.406 s, at the same calls per change
/// (`--shape stream`)…
const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// …or once this many transactions are buffered…
const FLUSH_TXS: usize = 2000;
/// …or once the buffered work holds this many member ids and events. An open
/// transaction that reaches it is handed off ahead of its commit: this bounds
/// memory whatever the size of a transaction (a few MB at this figure).
const FLUSH_ROWS: usize = 50_000;
/// How long an ending stream waits for its hand-off in flight.
const SETTLE_ON_EXIT: Duration = Duration::from_secs(10);
/// A commit read this long after it happened means the stream is reading a
/// backlog (after a restart or an outage, or behind a large transaction).
const CATCHING_UP_AFTER: Duration = Duration::from_secs(1);
/// An idle position is stored and acknowledged at most this often: each
/// store is a small write of its own (which the next keepalive reports),
/// so not at every keepalive, and often enough that the slot follows
/// committed work within seconds (G3).
const IDLE_STORE: Duration = Duration::from_secs(2);

pub(super) struct Capture<'a> {
    pub(super) cfg: &'a Config,
    pub(super) params: ConnParams,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) wake: crate::deliver::Wake,
    /// Set while the commits read are older than CATCHING_UP_AFTER: a backlog
    /// is being read, and delivery holds its batches for the rest of it.
    pub(super) catching_up: watch::Sender<bool>,
    pub(super) oldest_pending: Arc<AtomicI64>,
    /// Checks the settings markers in the stream.
    pub(super) markers: MarkerKey,
    /// The replica identity last seen of each activity table (FULL or not).
    pub(super) identity: std::sync::Mutex<HashMap<&'static str, bool>>,
}

/// Transactions decoded but not yet handed off.
#[derive(Default)]
struct Pending {
    work: Work,
    xids: Vec<u32>,
    end_lsn: u64,
    txs: usize,
    since: Option<Instant>,
    /// Commit time of the first of them (the lag gauge).
    oldest: Option<DateTime<Utc>>,
    /// Commit time of the last of them.
    newest: Option<DateTime<Utc>>,
}

/// The transaction being read, folded into its work change by change.
struct OpenTx {
    meta: TxMeta,
    items: usize,
    work: Work,
}

/// What a hand-off writes.
enum Batch {
    /// Whole transactions and the checkpoint at their end.
    Complete(Pending),
    /// Part of a transaction still being read: rows only, no checkpoint.
    Ahead { work: Work, tx: TxMeta },
}

/// The one hand-off committing while the stream reads on.
struct InFlight<'f> {
    /// What the slot may be acknowledged up to once it commits.
    ack: Option<u64>,
    oldest: Option<DateTime<Utc>>,
    /// Commit time of the last transaction in it.
    newest: Option<DateTime<Utc>>,
    done: Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'f>>,
}

impl Capture<'_> {
    /// Logs and counts what translating noticed about its input, and forgets it.
    fn observe(&self, work: &mut Work) {
        for rejected in std::mem::take(&mut work.rejected_markers) {
            events::SettingsMarkerRejected {
                spot_id: rejected.spot_id,
                reason: rejected.reason,
            }
            .emit(&self.metrics);
        }
        if work.undecidable_status_changes > 0 {
            self.metrics
                .activities_unknown
                .with_label_values(&["members"])
                .inc_by(std::mem::take(&mut work.undecidable_status_changes));
        }
        let mut seen = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        for (table, full) in std::mem::take(&mut work.identity_full) {
            // Once per change of state: FULL is what the first sight assumes.
            if seen.insert(table, full).unwrap_or(true) != full {
                events::ReplicaIdentityChanged { table, full }.emit(&self.metrics);
            }
        }
    }

    /// Checks the slot against the checkpoint (`replication::slot`): creates
    /// it on a first start, and recreates it and resynchronises every Spot
    /// when a range of the WAL can no longer be read.
    async fn check_slot(&self, db: &Db) -> anyhow::Result<()> {
        let mut client = db.client().await?;
        let name = &self.cfg.slot;
        let (state, checkpoint, server) = self.slot_facts(&client).await?;
        match slot::verdict(checkpoint.as_ref(), &server, state.as_ref()) {
            None => {
                if state.is_none() {
                    slot::create(&client, name).await?;
                    info!(slot = %name, "created replication slot");
                }
                let known = checkpoint.as_ref().is_some_and(|c| {
                    c.system_id.as_deref() == Some(&server.system_id)
                        && c.timeline == Some(server.timeline)
                });
                if checkpoint.is_some() && !known {
                    let confirmed = state.as_ref().and_then(|s| s.confirmed);
                    store::record_server(
                        &client,
                        name,
                        &server.system_id,
                        server.timeline,
                        confirmed,
                    )
                    .await?;
                }
            }
            Some(cause) => {
                let lsn = slot::recreate(&client, name).await?;
                let spots = store::resync_all(
                    &mut client,
                    name,
                    lsn,
                    &server.system_id,
                    server.timeline,
                    cause.as_str(),
                )
                .await?;
                events::Resynced {
                    cause,
                    spots: spots.len(),
                }
                .emit(&self.metrics);
                self.wake.all();
            }
        }
        Ok(())
    }

    /// What the slot checks compare: the slot, the checkpoint, the server.
    /// The slot is read before the checkpoint: a leader still winding down
    /// stores its checkpoint before it acknowledges, so in this order the
    /// checkpoint read is never older than the slot read.
    async fn slot_facts(
        &self,
        client: &tokio_postgres::Client,
    ) -> anyhow::Result<(
        Option<slot::SlotState>,
        Option<store::CheckpointRow>,
        slot::ServerIdentity,
    )> {
        let state = slot::slot_state(client, &self.cfg.slot).await?;
        let checkpoint = store::checkpoint_row(client, &self.cfg.slot).await?;
        let server = slot::server_identity(client).await?;
        Ok((state, checkpoint, server))
    }

    /// The minute's check while streaming: an error when the slot needs healing.
    async fn inspect_slot(&self, db: &Db) -> anyhow::Result<()> {
        let client = db.client().await?;
        let (state, checkpoint, server) = self.slot_facts(&client).await?;
        match slot::verdict(checkpoint.as_ref(), &server, state.as_ref()) {
            None => Ok(()),
            Some(cause) => Err(anyhow::anyhow!(
                "the replication slot needs a resync ({})",
                cause.as_str()
            )),
        }
    }

    /// Stores an idle position as the checkpoint (before it is acknowledged).
    async fn store_idle(&self, db: &Db, lsn: u64) -> anyhow::Result<()> {
        let client = db.client().await?;
        store::advance_checkpoint(&client, &self.cfg.slot, lsn).await?;
        Ok(())
    }

    /// Streams until shutdown (Ok) or a failure (Err; the caller resumes).
    pub(super) async fn stream(
        &self,
        db: &Db,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        self.check_slot(db).await?;
        let (start, stream_settings) = {
            let mut client = db.client().await?;
            store::load_resume_point(&mut client, &self.cfg.slot).await?
        };
        // Settings as of the checkpoint: the stream re-applies later changes in order.
        let mut settings = Arc::new(stream_settings);
        let mut source = Source::start(
            &self.params,
            &self.cfg.slot,
            &self.cfg.publication,
            start,
            self.cfg.stream_max_message,
        )
        .await
        .context("starting replication")
        .map_err(|e| crate::tls::with_advice(e, self.cfg.database.tls.mode))?;
        self.health.streaming.store(true, Ordering::Relaxed);
        info!(start_lsn = %replication::lsn_to_string(start), slot = %self.cfg.slot, "streaming");
        let mut pending = Pending::default();
        let mut open: Option<OpenTx> = None;
        let mut inflight: Option<InFlight<'_>> = None;
        let mut idle = IdlePosition::new(start);
        let mut inspect = tokio::time::interval(SLOT_CHECK_EVERY);
        inspect.tick().await;
        let result: anyhow::Result<()> = loop {
            // The lag gauge: the oldest commit not yet handed off, including
            // one still being read (a large transaction keeps it growing).
            let oldest = inflight
                .as_ref()
                .and_then(|f| f.oldest)
                .or(pending.oldest)
                .or(open.as_ref().map(|o| o.meta.commit_time));
            self.oldest_pending.store(
                oldest.map_or(0, |t| t.timestamp_micros()),
                Ordering::Relaxed,
            );
            // A lingering batch goes once nothing else is committing.
            let deadline = pending
                .since
                .filter(|_| inflight.is_none())
                .map(|t| t + FLUSH_AFTER);
            // An idle position is stored once nothing is pending or in flight.
            let idle_deadline = idle
                .deadline()
                .filter(|_| pending.txs == 0 && inflight.is_none());
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => {
                    // Finish the hand-offs of whole transactions and acknowledge
                    // them before leaving; an open one is read again on restart.
                    let r = async {
                        self.launch(db, &source, Batch::Complete(std::mem::take(&mut pending)), &mut inflight).await?;
                        self.settle(&source, &mut inflight).await
                    };
                    break r.await;
                }
                done = committed(&mut inflight) => {
                    // Finished either way: a completed future is never polled again.
                    let finished = inflight.take();
                    if let Err(e) = done {
                        break Err(e);
                    }
                    if let Some(f) = finished {
                        self.handed_off(&source, &f);
                    }
                }
                _ = inspect.tick() => {
                    // A slot invalidated or dropped while streaming ends the
                    // stream here; the reconnect heals it (`check_slot`).
                    if let Err(e) = self.inspect_slot(db).await {
                        break Err(e);
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    let batch = Batch::Complete(std::mem::take(&mut pending));
                    if let Err(e) = self.launch(db, &source, batch, &mut inflight).await { break Err(e) }
                }
                _ = sleep_until_opt(idle_deadline) => {
                    // Nothing open or in flight: everything before the idle position
                    // is done, so idle or unpublished tables never hold WAL (G3).
                    // Stored first, then acknowledged, so that the checkpoint is
                    // never behind the slot.
                    if pending.txs == 0 && inflight.is_none() {
                        if let Some(lsn) = idle.take() {
                            if let Err(e) = self.store_idle(db, lsn).await {
                                break Err(e);
                            }
                            self.acknowledge(&source, Some(lsn));
                        }
                    }
                }
                ev = source.next() => match ev {
                    Ok(Some(SourceEvent::Tx(Decoded::Begin(meta)))) => {
                        self.note_backlog(&source, meta.commit_time);
                        open = Some(OpenTx { meta, items: 0, work: Work::default() });
                        self.metrics.transaction_rows_in_flight.set(0);
                    }
                    Ok(Some(SourceEvent::Tx(Decoded::Item(item)))) => {
                        let Some(tx) = open.as_mut() else {
                            break Err(anyhow::anyhow!("a change outside a transaction"));
                        };
                        translate::translate_item(&mut settings, &self.markers, &tx.meta, tx.items, &item, &mut tx.work);
                        tx.items += 1;
                        self.metrics.row_changes.inc();
                        self.metrics.transaction_rows_in_flight.inc();
                        if pending.work.size() + tx.work.size() >= FLUSH_ROWS {
                            // Whole transactions first, so that the checkpoint
                            // moves in order; then this one's rows so far.
                            let before = Batch::Complete(std::mem::take(&mut pending));
                            if let Err(e) = self.launch(db, &source, before, &mut inflight).await { break Err(e) }
                            self.note_backlog(&source, tx.meta.commit_time);
                            self.observe(&mut tx.work);
                            let ahead = Batch::Ahead { work: tx.work.take_rows(), tx: tx.meta };
                            if let Err(e) = self.launch(db, &source, ahead, &mut inflight).await { break Err(e) }
                        }
                    }
                    Ok(Some(SourceEvent::Tx(Decoded::Commit { end_lsn }))) => {
                        let Some(mut tx) = open.take() else {
                            break Err(anyhow::anyhow!("a Commit without its Begin"));
                        };
                        self.metrics.transactions.inc();
                        self.metrics.transaction_rows_in_flight.set(0);
                        self.observe(&mut tx.work);
                        if pending.since.is_none() {
                            pending.since = Some(Instant::now());
                            pending.oldest = Some(tx.meta.commit_time);
                        }
                        // The server time is fresh now (the change before the Commit carried it).
                        self.note_backlog(&source, tx.meta.commit_time);
                        pending.newest = Some(tx.meta.commit_time);
                        pending.work.merge(tx.work);
                        pending.xids.push(tx.meta.xid);
                        pending.end_lsn = end_lsn;
                        pending.txs += 1;
                        if pending.txs >= FLUSH_TXS || pending.work.size() >= FLUSH_ROWS {
                            let batch = Batch::Complete(std::mem::take(&mut pending));
                            if let Err(e) = self.launch(db, &source, batch, &mut inflight).await { break Err(e) }
                        }
                    }
                    Ok(Some(SourceEvent::Idle { wal_end })) => {
                        if pending.txs == 0 && inflight.is_none() {
                            // Everything read is handed off, and nothing more is coming.
                            self.set_catching_up(false);
                            idle.offer(wal_end);
                        }
                    }
                    Ok(None) => break Err(anyhow::anyhow!("replication stream ended")),
                    Err(e) => break Err(e.into()),
                }
            }
        };
        // A hand-off still in flight after an error is finished (bounded)
        // rather than dropped, so that its commit cannot land after the next
        // stream has read the checkpoint; acknowledged if it committed.
        if inflight.is_some() {
            // (A timeout drops it: its transaction rolls back, or commits
            // unacknowledged, which a restart replays harmlessly.)
            match tokio::time::timeout(SETTLE_ON_EXIT, self.settle(&source, &mut inflight)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "the hand-off in flight failed as the stream ended")
                }
                Err(_) => debug!("the hand-off in flight did not finish as the stream ended"),
            }
            drop(inflight);
        }
        self.metrics.transaction_rows_in_flight.set(0);
        self.oldest_pending.store(0, Ordering::Relaxed);
        self.set_catching_up(false);
        self.health.streaming.store(false, Ordering::Relaxed);
        source.shutdown().await;
        result
    }

    /// Whether the stream reads a backlog: a commit read more than a moment
    /// after it happened (after a restart or an outage, or far into a large
    /// transaction). Delivery then holds its batches for the rest of it.
    fn note_backlog(&self, source: &Source, commit_time: DateTime<Utc>) {
        self.set_catching_up(source.behind(commit_time) > CATCHING_UP_AFTER);
    }

    /// Tells delivery, only when it changes (a held worker waits for that).
    fn set_catching_up(&self, on: bool) {
        let changed = self
            .catching_up
            .send_if_modified(|was| std::mem::replace(was, on) != on);
        if changed && on {
            info!("reading a backlog: delivery waits for it to be read");
        } else if changed {
            info!("the stream has caught up");
        }
    }

    /// Starts a hand-off, once the one in flight has committed: one at a
    /// time, in stream order, while the stream reads the next batch.
    async fn launch<'f>(
        &'f self,
        db: &'f Db,
        source: &Source,
        batch: Batch,
        inflight: &mut Option<InFlight<'f>>,
    ) -> anyhow::Result<()> {
        self.settle(source, inflight).await?;
        let (ack, oldest, newest) = match &batch {
            Batch::Complete(p) if p.txs == 0 => return Ok(()),
            Batch::Complete(p) => (Some(p.end_lsn), p.oldest, p.newest),
            Batch::Ahead { tx, .. } => (None, Some(tx.commit_time), None),
        };
        *inflight = Some(InFlight {
            ack,
            oldest,
            newest,
            done: Box::pin(self.hand_off(db, batch)),
        });
        Ok(())
    }

    /// Waits for the hand-off in flight, then acknowledges what it made durable.
    async fn settle(
        &self,
        source: &Source,
        inflight: &mut Option<InFlight<'_>>,
    ) -> anyhow::Result<()> {
        // Taken first: whether it commits or fails, it is never polled again.
        if let Some(mut f) = inflight.take() {
            f.done.as_mut().await?;
            self.handed_off(source, &f);
        }
        Ok(())
    }

    /// A hand-off committed: acknowledge it, and once what it carried was
    /// committed just now, the stream has caught up. (Only lowered here, after
    /// the commit, so that delivery never starts on a backlog still being
    /// handed off; the server time may be a later keepalive's.)
    fn handed_off(&self, source: &Source, f: &InFlight<'_>) {
        self.acknowledge(source, f.ack);
        if f.newest
            .is_some_and(|t| source.behind(t) <= CATCHING_UP_AFTER)
        {
            self.set_catching_up(false);
        }
    }

    /// Durable: only now may the slot release the WAL before `lsn`.
    fn acknowledge(&self, source: &Source, lsn: Option<u64>) {
        if let Some(lsn) = lsn {
            source.ack(lsn);
            self.metrics.acked_lsn.set(lsn as i64);
        }
    }

    async fn hand_off(&self, db: &Db, batch: Batch) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut client = db.client().await?;
        // The Spots it queued for, for the wake below.
        let queued = match &batch {
            Batch::Complete(p) => {
                let span = tracing::debug_span!("hand_off", txs = p.txs, end_lsn = %replication::lsn_to_string(p.end_lsn));
                let queued = store::hand_off(
                    &mut client,
                    &self.cfg.slot,
                    &p.work,
                    &p.xids,
                    p.end_lsn,
                    &self.metrics,
                )
                .instrument(span)
                .await
                .context("hand-off to hubspot_sync")?;
                // The window the crash tests aim at: committed, not yet acknowledged.
                crate::failpoints::crash_point(crate::failpoints::HANDOFF_COMMITTED);
                debug!(slot = %self.cfg.slot, txs = p.txs, members = p.work.members.len(), touched = queued.touched, "handed off");
                queued
            }
            Batch::Ahead { work, tx } => {
                let queued =
                    store::hand_off_ahead(&mut client, work, tx.xid, tx.commit_lsn, &self.metrics)
                        .await
                        .context("hand-off ahead of a large transaction's commit")?;
                crate::failpoints::crash_point(crate::failpoints::HANDOFF_AHEAD_COMMITTED);
                debug!(
                    xid = tx.xid,
                    members = work.members.len(),
                    activities = work.activities.len(),
                    touched = queued.touched,
                    "handed off ahead of the commit"
                );
                queued
            }
        };
        self.metrics
            .handoff_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.handoffs.inc();
        // The workers of the Spots it wrote rows for.
        self.wake.spots(queued.spots);
        Ok(())
    }
}

/// Resolves when the hand-off in flight commits (never, when there is none).
async fn committed(inflight: &mut Option<InFlight<'_>>) -> anyhow::Result<()> {
    match inflight {
        Some(f) => f.done.as_mut().await,
        None => std::future::pending().await,
    }
}

/// An idle position (nothing pending before it) waiting to be stored and
/// acknowledged: at once after a quiet spell, then at most every IDLE_STORE.
struct IdlePosition {
    stored: u64,
    last_store: Option<Instant>,
    due: Option<u64>,
}

impl IdlePosition {
    fn new(start: u64) -> Self {
        IdlePosition {
            stored: start,
            last_store: None,
            due: None,
        }
    }

    /// A keepalive reported `lsn` with nothing pending.
    fn offer(&mut self, lsn: u64) {
        if lsn > self.stored {
            self.due = Some(self.due.map_or(lsn, |d| d.max(lsn)));
        }
    }

    /// When the position due may be stored.
    fn deadline(&self) -> Option<Instant> {
        self.due?;
        Some(
            self.last_store
                .map_or_else(Instant::now, |t| t + IDLE_STORE),
        )
    }

    /// The position to store now.
    fn take(&mut self) -> Option<u64> {
        let lsn = self.due.take()?;
        self.stored = lsn;
        self.last_store = Some(Instant::now());
        Some(lsn)
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
