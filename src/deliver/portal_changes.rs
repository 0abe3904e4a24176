//! What the sidecar does when HubSpot changes a portal under it: the rule
//! for who keeps a merged contact, and the task that applies the webhook
//! events the HTTP endpoint stored (`store::portal_changes`).
//!
//! Merges are also followed without webhooks, by the delivery round that
//! meets a merged record id (`round.rs`); both use `keeper`.

use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::Wake;
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::store::portal_changes::{self, Applied, Mapped};
use crate::store::Db;

/// Events applied per transaction: one. Each event locks contact-map rows
/// in the order every writer does (Spot, then member); two events in one
/// transaction could lock them out of that order against a completing
/// round, and webhook events are few.
const APPLY_BATCH: i64 = 1;

/// Which member of one Spot keeps a merged record when more than one is
/// mapped to the records merged: the member already on the new record (a
/// mapping is never displaced); else the one on the primary record (HubSpot
/// keeps the primary's e-mail and values); else the lowest member id. The
/// others are reported as conflicts, never written to the same record.
pub(crate) fn keeper(members: &[Mapped], primary: Option<&str>, new: &str) -> Option<i64> {
    let lowest = |pick: &dyn Fn(&Mapped) -> bool| {
        members
            .iter()
            .filter(|m| pick(m))
            .map(|m| m.member_id)
            .min()
    };
    lowest(&|m| m.contact_id == new)
        .or_else(|| primary.and_then(|p| lowest(&|m| m.contact_id == p)))
        .or_else(|| lowest(&|_| true))
}

/// Applies stored webhook events: once at the start of a term (events a
/// crash left), then whenever the endpoint stores some (`applied` is
/// notified). Costs nothing while no event comes.
pub async fn apply_webhook_events(
    db: Db,
    metrics: Arc<Metrics>,
    wake: Wake,
    stored: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::reconnect();
    loop {
        match apply_all(&db, &metrics, &wake).await {
            Ok(()) => backoff.reset(),
            Err(e) => {
                let pause = backoff.next();
                warn!(error = %e, retry_in_ms = pause.as_millis() as u64,
                      "applying HubSpot webhook events failed; they stay stored and are applied again");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = stored.notified() => {}
        }
    }
}

/// Applies every pending event, a batch per transaction, then prunes.
async fn apply_all(db: &Db, metrics: &Metrics, wake: &Wake) -> Result<(), crate::store::DbError> {
    let mut any = false;
    loop {
        let mut client = db.client().await?;
        let Some(applied) = portal_changes::apply_pending(&mut client, APPLY_BATCH, keeper).await?
        else {
            break;
        };
        any = true;
        count(metrics, &applied);
        wake.spots(applied.queued_spots.iter().copied());
    }
    if any {
        let pruned = portal_changes::prune_applied(&*db.client().await?).await?;
        if pruned > 0 {
            info!(
                pruned,
                "forgot webhook events applied more than two days ago"
            );
        }
    }
    Ok(())
}

fn count(metrics: &Metrics, a: &Applied) {
    metrics
        .contacts_remapped
        .with_label_values(&["webhook"])
        .inc_by(a.remapped);
    metrics
        .contacts_forgotten
        .with_label_values(&["webhook"])
        .inc_by(a.forgotten);
    metrics.contact_conflicts.inc_by(a.conflicts);
    metrics
        .suppressions
        .with_label_values(&["recorded"])
        .inc_by(a.suppressed);
    info!(
        events = a.events,
        remapped = a.remapped,
        forgotten = a.forgotten,
        conflicts = a.conflicts,
        suppressed = a.suppressed,
        "applied HubSpot webhook events"
    );
    if a.conflicts > 0 {
        warn!(
            conflicts = a.conflicts,
            "a merge left members of a Spot on one contact: the others keep none (operator page, Contact conflicts)"
        );
    }
    if a.privacy_unknown > 0 {
        warn!(
            count = a.privacy_unknown,
            "HubSpot deleted a contact for privacy that no member was mapped to: its e-mail is unknown, so nothing is suppressed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(member_id: i64, contact: &str) -> Mapped {
        Mapped {
            spot_id: 1,
            member_id,
            contact_id: contact.into(),
        }
    }

    #[test]
    fn the_member_on_the_merged_record_keeps_it_then_the_primarys() {
        assert_eq!(keeper(&[on(5, "2"), on(7, "9")], Some("1"), "9"), Some(7));
        assert_eq!(keeper(&[on(5, "2"), on(7, "1")], Some("1"), "9"), Some(7));
        assert_eq!(keeper(&[on(8, "2"), on(5, "3")], Some("1"), "9"), Some(5));
        assert_eq!(keeper(&[], Some("1"), "9"), None);
    }
}
