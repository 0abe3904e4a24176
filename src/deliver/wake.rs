//! What tells delivery that a Spot has work, or that its integration
//! changed: the hand-off, the admin API and the integration use cases call
//! these as things happen in this process, and the scheduler takes what
//! gathered since it last looked.
//!
//! Signals are coalesced into sets, not queued one by one: a busy stream
//! hands off tens of times a second, often for the same Spots, and the
//! scheduler needs to know only which Spots, once. Nothing here costs
//! anything per Spot while nothing happens (there is no timer per Spot).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What gathered since the scheduler last looked.
#[derive(Debug, Default)]
pub(super) struct Signals {
    /// Spots work was queued for.
    pub(super) work: HashSet<i64>,
    /// Work was queued for Spots not known one by one (a slot resync).
    pub(super) all_work: bool,
    /// Spots whose integration changed (connected, reconnected, resynced,
    /// disconnected): read again.
    pub(super) changed: HashSet<i64>,
    /// Every integration may have changed: read them all again.
    pub(super) all_changed: bool,
}

impl Signals {
    fn is_empty(&self) -> bool {
        self.work.is_empty() && self.changed.is_empty() && !self.all_work && !self.all_changed
    }
}

#[derive(Default)]
struct Inner {
    pending: Mutex<Signals>,
    /// One stored permit at most: a signal sent while the scheduler is busy
    /// is seen on its next look.
    notify: Notify,
}

/// The handle every stage that queues work or changes an integration holds.
#[derive(Clone, Default)]
pub struct Wake {
    inner: Arc<Inner>,
}

impl Wake {
    fn record(&self, add: impl FnOnce(&mut Signals)) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = pending.is_empty();
        add(&mut pending);
        drop(pending);
        if was_empty {
            self.inner.notify.notify_one();
        }
    }

    /// Work was queued for these Spots.
    pub fn spots(&self, spots: impl IntoIterator<Item = i64>) {
        let mut spots = spots.into_iter().peekable();
        if spots.peek().is_none() {
            return;
        }
        self.record(|s| s.work.extend(spots));
    }

    /// Work was queued for every Spot, and every activation moved on (a
    /// resync of the stream).
    pub fn all(&self) {
        self.record(|s| {
            s.all_work = true;
            s.all_changed = true;
        });
    }

    /// The Spot's integration changed (a connect, a reconnect, a resync, a
    /// disconnect): delivery reads it again at once, and has the Spot look
    /// for work.
    pub fn integration_changed(&self, spot_id: i64) {
        self.record(|s| {
            s.changed.insert(spot_id);
            s.work.insert(spot_id);
        });
    }

    /// Waits until something was signalled since the last `take`.
    pub(super) async fn signalled(&self) {
        self.inner.notify.notified().await;
    }

    /// What gathered since the last call.
    pub(super) fn take(&self) -> Signals {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signals_gather_until_taken_and_none_is_lost() {
        let wake = Wake::default();
        wake.spots([1, 2]);
        wake.spots([2, 3]);
        wake.integration_changed(7);
        // A signal sent before anybody waits is not lost.
        let waited = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(waited, wake.signalled()).await.is_ok());
        let s = wake.take();
        let mut work: Vec<i64> = s.work.into_iter().collect();
        work.sort_unstable();
        assert_eq!(work, vec![1, 2, 3, 7]);
        assert!(s.changed.contains(&7) && !s.all_work && !s.all_changed);
        // Nothing new: nothing to wake for.
        assert!(tokio::time::timeout(waited, wake.signalled())
            .await
            .is_err());
        assert!(wake.take().is_empty());
        wake.all();
        assert!(tokio::time::timeout(waited, wake.signalled()).await.is_ok());
        let s = wake.take();
        assert!(s.all_work && s.all_changed);
    }
}
