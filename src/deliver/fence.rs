//! Fencing (G4): once a reconnect or disconnect of a Spot returns, no HubSpot
//! call of the Spot's previous activation is made.
//!
//! Two parts, because each alone leaves a gap:
//! - the database says which activation is current
//!   (`store::current_fences`); every call checks it after its rate-limit
//!   wait, right before it goes out, and every write of a round checks it in
//!   the round's transaction (`store::complete`). The calls of many rounds
//!   are checked by one statement that starts after each of them asked
//!   (`shared`), so each check is as fresh as one of its own;
//! - a per-Spot read-write lock in this process orders the two: a call holds
//!   it shared from that check until its answer is in, and the reconnect or
//!   disconnect holds it exclusively while it commits, so it waits for the
//!   one call in flight, and every later check sees the new activation.
//!
//! Only the leader delivers and serves the admin API, so the lock of this
//! process is the only one that matters.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use super::shared::{Coalesced, FenceKey};
use crate::hubspot::{CallFence, FencePass, HubSpotError};
use crate::store::Fence;

/// The per-Spot locks of this process.
#[derive(Clone, Default)]
pub struct Fences {
    by_spot: Arc<Mutex<HashMap<i64, Arc<RwLock<()>>>>>,
}

impl Fences {
    fn lock(&self, spot_id: i64) -> Arc<RwLock<()>> {
        let mut map = self.by_spot.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(spot_id).or_default().clone()
    }

    /// Drops the Spot's lock when nobody holds or waits on it (the Spot is
    /// no longer served), so the map does not grow with every Spot ever seen.
    pub(super) fn forget(&self, spot_id: i64) {
        let mut map = self.by_spot.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&spot_id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&spot_id);
        }
    }

    /// Waits for the Spot's call in flight, and holds off new calls until the
    /// guard is dropped (after the reconnect or disconnect committed).
    pub async fn exclusive(&self, spot_id: i64) -> OwnedRwLockWriteGuard<()> {
        self.lock(spot_id).write_owned().await
    }

    /// The fence a round of `fence`'s activation passes before each call,
    /// checked by `checks` (which also needs this replica's leadership lock
    /// still held).
    pub(super) fn gate(
        &self,
        checks: &Arc<Coalesced<FenceKey, bool>>,
        fence: Fence,
    ) -> Arc<dyn CallFence> {
        Arc::new(Gate {
            lock: self.lock(fence.spot_id),
            checks: checks.clone(),
            fence,
        })
    }
}

struct Gate {
    lock: Arc<RwLock<()>>,
    checks: Arc<Coalesced<FenceKey, bool>>,
    fence: Fence,
}

impl CallFence for Gate {
    fn pass(&self) -> Pin<Box<dyn Future<Output = Result<FencePass, HubSpotError>> + Send + '_>> {
        Box::pin(async move {
            let guard = self.lock.clone().read_owned().await;
            let f = self.fence;
            if self
                .checks
                .ask((f.spot_id, f.portal_id, f.activation))
                .await
                .map_err(|e| HubSpotError::FenceUnchecked(e.to_string()))?
            {
                Ok(FencePass::holding(guard))
            } else {
                Err(HubSpotError::Fenced)
            }
        })
    }
}
