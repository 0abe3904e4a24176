//! What `reconcile` reads and queues: a Spot's matched contacts on one
//! portal, paged by member, and a delivery again of chosen members that
//! writes every value, not only those the contact map believes changed.

use tokio_postgres::Client;

use super::DbError;

/// A member the contact map ties to a HubSpot contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchedContact {
    /// `members.id`.
    pub member_id: i64,
    /// HubSpot record id of the contact.
    pub contact_id: String,
    /// E-mail the contact was looked up or written under.
    pub email: String,
}

/// How many of the Spot's members have a contact on this portal.
pub async fn count_matched_contacts(
    db: &Client,
    spot_id: i64,
    portal_id: i64,
) -> Result<i64, DbError> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM hubspot_sync.contact_map
              WHERE spot_id = $1 AND portal_id = $2 AND contact_id IS NOT NULL",
            &[&spot_id, &portal_id],
        )
        .await?
        .get(0))
}

/// The Spot's members with a contact on this portal, by member id, up to
/// `limit` after `after_member` (keyset pages stay stable while rows change).
pub async fn matched_contacts(
    db: &Client,
    spot_id: i64,
    portal_id: i64,
    after_member: i64,
    limit: i64,
) -> Result<Vec<MatchedContact>, DbError> {
    let rows = db
        .query(
            "SELECT member_id, contact_id, email FROM hubspot_sync.contact_map
              WHERE spot_id = $1 AND portal_id = $2 AND contact_id IS NOT NULL
                AND member_id > $3
              ORDER BY member_id LIMIT $4",
            &[&spot_id, &portal_id, &after_member, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| MatchedContact {
            member_id: r.get(0),
            contact_id: r.get(1),
            email: r.get(2),
        })
        .collect())
}

/// Queues these members for delivery again, in one transaction: `drifted`
/// rows marked `rewrite`, so delivery writes every value instead of
/// skipping those the contact map believes HubSpot holds; `missing` (HubSpot
/// no longer has their contact under that id: deleted or merged) the same
/// way, so that delivery finds out which and follows it. Only members still in the Spot, and only while
/// the integration is active on this portal. Returns how many were queued.
pub async fn queue_for_delivery(
    db: &mut Client,
    spot_id: i64,
    portal_id: i64,
    drifted: &[i64],
    missing: &[i64],
) -> Result<u64, DbError> {
    if drifted.is_empty() && missing.is_empty() {
        return Ok(0);
    }
    let tx = db.transaction().await?;
    // The integration first (the lock order of every outbox writer): a
    // disconnect or reconnect cannot commit between the check and the writes.
    let active = tx
        .query_opt(
            "SELECT 1 FROM hubspot_sync.integrations
              WHERE spot_id = $1 AND portal_id = $2 AND status = 'active' FOR SHARE",
            &[&spot_id, &portal_id],
        )
        .await?
        .is_some();
    if !active {
        return Ok(0);
    }
    // A missing contact keeps its record id: delivery's write is answered
    // OBJECT_NOT_FOUND and reads the id back, so a merged contact is
    // followed to the merged record and a deleted one is forgotten and its
    // e-mail looked up again (`deliver::plan::settle_updates`). Forgetting
    // it here would lose a merge: the merged-away e-mail no longer matches.
    let all: Vec<i64> = drifted.iter().chain(missing).copied().collect();
    let queued = super::portal_changes::queue_rewrites(&tx, spot_id, &all).await?;
    tx.commit().await?;
    Ok(queued)
}
