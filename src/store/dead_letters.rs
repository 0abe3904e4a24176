//! Dead letters as the operator sees them (G8): what HubSpot refused, with
//! its reason, paged; and a retry that queues the item again.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use super::DbError;

/// One row of `hubspot_sync.dead_letters`.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// Increasing id (pages go backwards from `before`).
    pub id: i64,
    /// The member it was for.
    pub member_id: Option<i64>,
    /// `contact_properties` or `activity`.
    pub kind: String,
    /// HubSpot's reason.
    pub reason: String,
    /// What was to be written (e-mail, contact id, properties; or the event).
    pub payload: serde_json::Value,
    /// When HubSpot refused it.
    pub created_at: DateTime<Utc>,
    /// When an operator queued it again, if ever.
    pub retried_at: Option<DateTime<Utc>>,
}

/// The Spot's dead letters, newest first, up to `limit` older than `before`.
pub async fn dead_letters(
    db: &Client,
    spot_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DeadLetter>, DbError> {
    let rows = db
        .query(
            "SELECT id, member_id, kind, reason, payload, created_at, retried_at
               FROM hubspot_sync.dead_letters
              WHERE spot_id = $1 AND id < COALESCE($2, 9223372036854775807)
              ORDER BY id DESC LIMIT $3",
            &[&spot_id, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            member_id: r.get(1),
            kind: r.get(2),
            reason: r.get(3),
            payload: r.get(4),
            created_at: r.get(5),
            retried_at: r.get(6),
        })
        .collect())
}

/// Queues the Spot's dead letters (one, or all not yet retried) again and
/// marks them retried, in one transaction: a contact write is recomputed
/// from current values at delivery, an event is sent again with its own id
/// (so HubSpot never shows it twice). Returns how many were queued.
pub async fn retry_dead_letters(
    db: &mut Client,
    spot_id: i64,
    only: Option<i64>,
) -> Result<u64, DbError> {
    let tx = db.transaction().await?;
    // The integration first (the lock order of every outbox writer): a
    // disconnect cannot commit between the check and the inserts.
    let active = tx
        .query_opt(
            "SELECT 1 FROM hubspot_sync.integrations
              WHERE spot_id = $1 AND status = 'active' FOR SHARE",
            &[&spot_id],
        )
        .await?
        .is_some();
    if !active {
        return Ok(0);
    }
    let ids: Vec<i64> = tx
        .query(
            "SELECT id FROM hubspot_sync.dead_letters
              WHERE spot_id = $1 AND retried_at IS NULL AND ($2::bigint IS NULL OR id = $2)
              ORDER BY id FOR UPDATE",
            &[&spot_id, &only],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute(
        "INSERT INTO hubspot_sync.property_outbox AS o (spot_id, member_id, lsn, create_contact)
         SELECT DISTINCT ON (d.member_id) d.spot_id, d.member_id, '0/0',
                COALESCE((d.payload ->> 'create')::bool, false)
           FROM hubspot_sync.dead_letters d
          WHERE d.id = ANY($1) AND d.kind = 'contact_properties' AND d.member_id IS NOT NULL
          -- A member refused both as a creation and as an update is created.
          ORDER BY d.member_id, COALESCE((d.payload ->> 'create')::bool, false) DESC
         ON CONFLICT (spot_id, member_id) DO UPDATE
            SET version = nextval('hubspot_sync.outbox_version'), next_attempt_at = now(),
                create_contact = o.create_contact OR excluded.create_contact",
        &[&ids],
    )
    .await?;
    tx.execute(
        "INSERT INTO hubspot_sync.activity_outbox
             (event_id, spot_id, member_id, activity, occurred_at, spot_name, title, url)
         SELECT d.payload ->> 'event_id', d.spot_id, d.member_id, d.payload ->> 'activity',
                (d.payload ->> 'occurred_at')::timestamptz, s.name,
                COALESCE(d.payload ->> 'title', s.name), d.payload ->> 'url'
           FROM hubspot_sync.dead_letters d JOIN public.spots s ON s.id = d.spot_id
          WHERE d.id = ANY($1) AND d.kind = 'activity' AND d.member_id IS NOT NULL
         ON CONFLICT (event_id) DO NOTHING",
        &[&ids],
    )
    .await?;
    tx.execute(
        "UPDATE hubspot_sync.dead_letters SET retried_at = now() WHERE id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.commit().await?;
    Ok(ids.len() as u64)
}
