//! What HubSpot tells the sidecar about its portals, kept and applied:
//! webhook events (stored before the answer, applied after it), privacy
//! suppressions, and contact conflicts after merges. The rules that decide
//! (who keeps a merged contact) are in `crate::deliver::portal_changes`.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::DbError;
use crate::hubspot::webhooks::{ContactChange, PortalEvent};

/// The portals among `portals` an active integration is connected to: the
/// only ones whose events are kept.
pub async fn served_portals(db: &Client, portals: &[i64]) -> Result<HashSet<i64>, DbError> {
    Ok(db
        .query(
            "SELECT DISTINCT portal_id FROM hubspot_sync.integrations
              WHERE status = 'active' AND portal_id = ANY($1)",
            &[&portals],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Stores events to apply; a repeat of an event already stored (a retried
/// batch, or HubSpot sending it twice) is not stored again. Returns the
/// dedup keys that were new.
pub async fn accept_events(
    db: &Client,
    events: &[&PortalEvent],
) -> Result<HashSet<String>, DbError> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let keys: Vec<&str> = events.iter().map(|e| e.dedup_key.as_str()).collect();
    let portals: Vec<i64> = events.iter().map(|e| e.portal_id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.change.kind()).collect();
    let objects: Vec<&str> = events.iter().map(|e| e.change.object_id()).collect();
    let at: Vec<DateTime<Utc>> = events
        .iter()
        .map(|e| DateTime::from_timestamp_millis(e.occurred_at_ms).unwrap_or_else(Utc::now))
        .collect();
    let raw: Vec<&serde_json::Value> = events.iter().map(|e| &e.raw).collect();
    Ok(db
        .query(
            "INSERT INTO hubspot_sync.webhook_events (dedup_key, portal_id, kind, object_id, occurred_at, event)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
             ON CONFLICT (dedup_key) DO NOTHING
             RETURNING dedup_key",
            &[&keys, &portals, &kinds, &objects, &at, &raw],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A stored event not applied yet.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    /// Its row.
    pub id: i64,
    /// The portal it is about.
    pub portal_id: i64,
    /// None when the stored event cannot be read back (it is then dropped).
    pub change: Option<ContactChange>,
}

/// What applying events changed, for delivery and the counters.
#[derive(Debug, Default)]
pub struct Applied {
    /// Events applied.
    pub events: usize,
    /// Spots with rows queued (to wake).
    pub queued_spots: HashSet<i64>,
    /// Members moved to a merged record.
    pub remapped: u64,
    /// Members whose contact was forgotten (deleted).
    pub forgotten: u64,
    /// Members left without a contact because another member keeps it.
    pub conflicts: u64,
    /// Suppressions recorded.
    pub suppressed: u64,
    /// Privacy deletions of a contact no member was ever mapped to: no
    /// e-mail to suppress (HubSpot does not send it).
    pub privacy_unknown: u64,
}

/// A member mapped to a record id on a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The member's Spot.
    pub spot_id: i64,
    /// The member.
    pub member_id: i64,
    /// The record it is mapped to.
    pub contact_id: String,
}

/// Applies up to `limit` stored events, oldest occurrence first, in one
/// transaction; `decide` picks, per Spot, the member that keeps a merged
/// record. Returns what changed, or None when nothing was pending.
pub async fn apply_pending(
    db: &mut Client,
    limit: i64,
    decide: impl Fn(&[Mapped], Option<&str>, &str) -> Option<i64>,
) -> Result<Option<Applied>, DbError> {
    let tx = db.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, portal_id, kind, event FROM hubspot_sync.webhook_events
              WHERE applied_at IS NULL
              ORDER BY occurred_at, id LIMIT $1
                FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let pending: Vec<PendingEvent> = rows
        .iter()
        .map(|r| PendingEvent {
            id: r.get(0),
            portal_id: r.get(1),
            change: ContactChange::from_stored(r.get(2), &r.get(3)),
        })
        .collect();
    let mut applied = Applied::default();
    for event in &pending {
        let Some(change) = &event.change else {
            continue;
        };
        applied.events += 1;
        apply(&tx, event.portal_id, change, &decide, &mut applied).await?;
    }
    let ids: Vec<i64> = pending.iter().map(|e| e.id).collect();
    tx.execute(
        "UPDATE hubspot_sync.webhook_events SET applied_at = now() WHERE id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(applied))
}

/// Forgets applied events after the two days HubSpot may still repeat them in.
pub async fn prune_applied(db: &Client) -> Result<u64, DbError> {
    Ok(db
        .execute(
            "DELETE FROM hubspot_sync.webhook_events
              WHERE applied_at IS NOT NULL AND applied_at < now() - interval '2 days'",
            &[],
        )
        .await?)
}

async fn apply(
    tx: &impl GenericClient,
    portal: i64,
    change: &ContactChange,
    decide: &impl Fn(&[Mapped], Option<&str>, &str) -> Option<i64>,
    applied: &mut Applied,
) -> Result<(), DbError> {
    match change {
        ContactChange::Merge {
            primary,
            merged,
            new,
        } => {
            let mut ids: Vec<&str> = merged.iter().map(String::as_str).collect();
            ids.extend(primary.as_deref());
            ids.push(new);
            let mapped = lock_mapped(tx, portal, &ids).await?;
            let mut by_spot: BTreeMap<i64, Vec<Mapped>> = BTreeMap::new();
            for m in mapped {
                by_spot.entry(m.spot_id).or_default().push(m);
            }
            for (spot, members) in by_spot {
                let keeper = decide(&members, primary.as_deref(), new);
                let mut moved = Vec::new();
                for m in &members {
                    if Some(m.member_id) == keeper {
                        if m.contact_id != *new {
                            moved.push(m.member_id);
                        }
                    } else if let Some(kept) = keeper {
                        record_conflict(tx, spot, portal, m, new, kept).await?;
                        applied.conflicts += 1;
                    }
                }
                if !moved.is_empty() {
                    remap(tx, spot, portal, &moved, new).await?;
                    applied.remapped += moved.len() as u64;
                    if queue_rewrites(tx, spot, &moved).await? > 0 {
                        applied.queued_spots.insert(spot);
                    }
                }
            }
        }
        ContactChange::Deletion(id) => {
            applied.forgotten += forget(tx, portal, id).await?;
        }
        ContactChange::PrivacyDeletion(id) => {
            let suppressed = tx
                .execute(
                    "INSERT INTO hubspot_sync.suppressions (portal_id, email, contact_id, reason)
                     SELECT DISTINCT $1::bigint, c.email, $2::text, 'privacy_deletion'
                       FROM hubspot_sync.contact_map c
                      WHERE c.portal_id = $1 AND (c.contact_id = $2 OR c.former_contact_id = $2)
                     ON CONFLICT (portal_id, email) DO NOTHING",
                    &[&portal, id],
                )
                .await?;
            let known = tx
                .query_opt(
                    "SELECT 1 FROM hubspot_sync.contact_map
                      WHERE portal_id = $1 AND (contact_id = $2 OR former_contact_id = $2) LIMIT 1",
                    &[&portal, id],
                )
                .await?
                .is_some();
            if !known {
                applied.privacy_unknown += 1;
            }
            applied.suppressed += suppressed;
            applied.forgotten += forget(tx, portal, id).await?;
        }
        ContactChange::Restore(id) => {
            let rows = tx
                .query(
                    "SELECT c.spot_id, c.member_id FROM hubspot_sync.contact_map c
                       JOIN hubspot_sync.integrations i
                         ON i.spot_id = c.spot_id AND i.portal_id = c.portal_id AND i.status = 'active'
                      WHERE c.portal_id = $1 AND c.former_contact_id = $2 AND c.contact_id IS NULL
                      ORDER BY c.spot_id, c.member_id",
                    &[&portal, id],
                )
                .await?;
            let mut by_spot: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for r in rows {
                by_spot.entry(r.get(0)).or_default().push(r.get(1));
            }
            for (spot, members) in by_spot {
                if queue_rewrites(tx, spot, &members).await? > 0 {
                    applied.queued_spots.insert(spot);
                }
            }
        }
    }
    Ok(())
}

/// The members of active Spots mapped to any of `ids` on the portal, locked
/// in the order every writer of the contact map locks (Spot, then member).
async fn lock_mapped(
    tx: &impl GenericClient,
    portal: i64,
    ids: &[&str],
) -> Result<Vec<Mapped>, DbError> {
    Ok(tx
        .query(
            "SELECT c.spot_id, c.member_id, c.contact_id FROM hubspot_sync.contact_map c
              WHERE c.portal_id = $1 AND c.contact_id = ANY($2)
                AND EXISTS (SELECT 1 FROM hubspot_sync.integrations i
                             WHERE i.spot_id = c.spot_id AND i.portal_id = c.portal_id
                               AND i.status = 'active')
              ORDER BY c.spot_id, c.member_id
                FOR UPDATE OF c",
            &[&portal, &ids],
        )
        .await?
        .iter()
        .map(|r| Mapped {
            spot_id: r.get(0),
            member_id: r.get(1),
            contact_id: r.get(2),
        })
        .collect())
}

/// Moves members to the merged record; nothing is taken as written there
/// (it holds the primary's values, which may be another member's).
async fn remap(
    tx: &impl GenericClient,
    spot: i64,
    portal: i64,
    members: &[i64],
    new: &str,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE hubspot_sync.contact_map
            SET former_contact_id = contact_id, contact_id = $4, written = '{}', updated_at = now()
          WHERE spot_id = $1 AND portal_id = $2 AND member_id = ANY($3)",
        &[&spot, &portal, &members, &new],
    )
    .await?;
    Ok(())
}

/// Forgets a deleted record for every member mapped to it on the portal;
/// the record id is kept as the former one (a privacy deletion or a
/// restore announced later still finds the members).
async fn forget(tx: &impl GenericClient, portal: i64, id: &str) -> Result<u64, DbError> {
    Ok(tx
        .execute(
            "WITH k AS (
                 SELECT spot_id, member_id FROM hubspot_sync.contact_map
                  WHERE portal_id = $1 AND contact_id = $2
                  ORDER BY spot_id, member_id
                    FOR UPDATE
             )
             UPDATE hubspot_sync.contact_map c
                SET former_contact_id = c.contact_id, contact_id = NULL, written = '{}', updated_at = now()
               FROM k
              WHERE c.spot_id = k.spot_id AND c.portal_id = $1 AND c.member_id = k.member_id",
            &[&portal, &id],
        )
        .await?)
}

/// Leaves a member without the contact another member keeps, and says so.
async fn record_conflict(
    tx: &impl GenericClient,
    spot: i64,
    portal: i64,
    member: &Mapped,
    contact: &str,
    kept: i64,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE hubspot_sync.contact_map
            SET former_contact_id = contact_id, contact_id = NULL, written = '{}', updated_at = now()
          WHERE spot_id = $1 AND portal_id = $2 AND member_id = $3",
        &[&spot, &portal, &member.member_id],
    )
    .await?;
    insert_conflict(tx, spot, portal, member.member_id, contact, kept).await
}

/// Records (or renews) a member's conflict over `contact` with `kept`.
pub(crate) async fn insert_conflict(
    tx: &impl GenericClient,
    spot: i64,
    portal: i64,
    member: i64,
    contact: &str,
    kept: i64,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO hubspot_sync.contact_conflicts (spot_id, portal_id, member_id, contact_id, kept_member_id)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (spot_id, portal_id, member_id) DO UPDATE
            SET contact_id = excluded.contact_id, kept_member_id = excluded.kept_member_id,
                detected_at = now()",
        &[&spot, &portal, &member, &contact, &kept],
    )
    .await?;
    Ok(())
}

/// Queues members of an active Spot to be written again in full (no
/// creation): `reconcile --fix`, a merge, a restore. Returns the rows queued.
pub(crate) async fn queue_rewrites(
    tx: &impl GenericClient,
    spot_id: i64,
    member_ids: &[i64],
) -> Result<u64, DbError> {
    Ok(tx
        .execute(
            "INSERT INTO hubspot_sync.property_outbox AS o (spot_id, member_id, lsn, create_contact, rewrite)
             SELECT m.spot_id, m.id, '0/0', false, true
               FROM public.members m
              WHERE m.spot_id = $1 AND m.id = ANY($2)
              -- One lock order for every writer of the outbox: no deadlocks.
              ORDER BY m.spot_id, m.id
             ON CONFLICT (spot_id, member_id) DO UPDATE
                SET version = nextval('hubspot_sync.outbox_version'), next_attempt_at = now(),
                    rewrite = true",
            &[&spot_id, &member_ids],
        )
        .await?)
}

/// The members of a Spot mapped to these record ids on its portal, by record id.
pub async fn members_on_contacts(
    db: &super::Conn,
    spot_id: i64,
    portal_id: i64,
    contact_ids: &[String],
) -> Result<HashMap<String, i64>, DbError> {
    Ok(db
        .query(
            "SELECT contact_id, member_id FROM hubspot_sync.contact_map
              WHERE portal_id = $2 AND contact_id = ANY($3) AND spot_id = $1",
            &[&spot_id, &portal_id, &contact_ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The e-mails among `emails` suppressed on the portal.
pub async fn suppressed_among(
    db: &super::Conn,
    portal_id: i64,
    emails: &[String],
) -> Result<HashSet<String>, DbError> {
    if emails.is_empty() {
        return Ok(HashSet::new());
    }
    let statement = db
        .prepare_cached(
            "SELECT email FROM hubspot_sync.suppressions WHERE portal_id = $1 AND email = ANY($2)",
        )
        .await?;
    Ok(db
        .query(&statement, &[&portal_id, &emails])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A suppressed e-mail, as the operator page and the admin API show it.
#[derive(Debug, Clone, Serialize)]
pub struct Suppression {
    /// The suppressed e-mail (normalized).
    pub email: String,
    /// The record HubSpot deleted for privacy.
    pub contact_id: Option<String>,
    /// Why (`privacy_deletion`).
    pub reason: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// The suppressions of the Spot's portal (its current one), newest first.
pub async fn suppressions_of_spot(
    db: &Client,
    spot_id: i64,
    limit: i64,
) -> Result<Vec<Suppression>, DbError> {
    Ok(db
        .query(
            "SELECT s.email, s.contact_id, s.reason, s.created_at
               FROM hubspot_sync.suppressions s
               JOIN hubspot_sync.integrations i ON i.portal_id = s.portal_id
              WHERE i.spot_id = $1
              ORDER BY s.created_at DESC, s.email LIMIT $2",
            &[&spot_id, &limit],
        )
        .await?
        .iter()
        .map(|r| Suppression {
            email: r.get(0),
            contact_id: r.get(1),
            reason: r.get(2),
            created_at: r.get(3),
        })
        .collect())
}

/// Lifts a suppression on the Spot's portal, with an entry in the Spot's
/// audit trail. Returns false when there was none.
pub async fn lift_suppression(
    db: &mut Client,
    spot_id: i64,
    email: &str,
    source: super::ChangeSource,
) -> Result<bool, DbError> {
    let tx = db.transaction().await?;
    let lifted = tx
        .query_opt(
            "DELETE FROM hubspot_sync.suppressions s
              USING hubspot_sync.integrations i
              WHERE i.spot_id = $1 AND s.portal_id = i.portal_id AND s.email = $2
             RETURNING s.portal_id",
            &[&spot_id, &email],
        )
        .await?;
    let Some(row) = lifted else {
        return Ok(false);
    };
    let portal: i64 = row.get(0);
    super::integrations::record_event(
        &tx,
        spot_id,
        "suppression_lifted",
        source,
        serde_json::json!({"portal_id": portal}),
        Some(email),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A member left without a contact after a merge, as the operator page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    /// The member left without a contact.
    pub member_id: i64,
    /// The merged record another member keeps.
    pub contact_id: String,
    /// The member that keeps it.
    pub kept_member_id: i64,
    /// When the merge was met.
    pub detected_at: DateTime<Utc>,
}

/// The Spot's conflicts that still hold (the member has no contact on the
/// Spot's portal), newest first.
pub async fn conflicts_of_spot(
    db: &Client,
    spot_id: i64,
    limit: i64,
) -> Result<Vec<Conflict>, DbError> {
    Ok(db
        .query(
            "SELECT k.member_id, k.contact_id, k.kept_member_id, k.detected_at
               FROM hubspot_sync.contact_conflicts k
               JOIN hubspot_sync.integrations i ON i.spot_id = k.spot_id AND i.portal_id = k.portal_id
               JOIN hubspot_sync.contact_map c
                 ON c.spot_id = k.spot_id AND c.portal_id = k.portal_id AND c.member_id = k.member_id
              WHERE k.spot_id = $1 AND c.contact_id IS NULL
              ORDER BY k.detected_at DESC, k.member_id LIMIT $2",
            &[&spot_id, &limit],
        )
        .await?
        .iter()
        .map(|r| Conflict {
            member_id: r.get(0),
            contact_id: r.get(1),
            kept_member_id: r.get(2),
            detected_at: r.get(3),
        })
        .collect())
}
