//! Store stage: everything the sidecar keeps in schema `hubspot_sync`: the
//! hand-off (outbox + checkpoint in one transaction), the contact map, the
//! integrations and the dead letters.

pub mod secrets;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};

use crate::translate::PropertyWork;

pub type DbError = tokio_postgres::Error;

const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../sql/migrations/0001_init.sql"))];

/// Opens a SQL connection; the connection task ends when the client is dropped.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Applies the embedded migrations once, serialised by an advisory lock so
/// that two starting sidecars cannot race.
pub async fn migrate(db: &mut Client) -> Result<(), DbError> {
    let tx = db.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(724031001)", &[])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS hubspot_sync;
         CREATE TABLE IF NOT EXISTS hubspot_sync.schema_migrations (
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM hubspot_sync.schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO hubspot_sync.schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "applied migration");
        }
    }
    tx.commit().await
}

pub async fn load_checkpoint(db: &Client, slot: &str) -> Result<Option<u64>, DbError> {
    let row = db
        .query_opt(
            "SELECT lsn FROM hubspot_sync.checkpoint WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| u64::from(r.get::<_, PgLsn>(0))))
}

/// Writes the work of a batch of transactions and the checkpoint at their end
/// LSN in ONE database transaction. Only after it commits may the slot be
/// acknowledged up to `end_lsn`. Returns how many outbox rows it touched.
pub async fn hand_off(
    db: &mut Client,
    slot: &str,
    work: &PropertyWork,
    end_lsn: u64,
) -> Result<u64, DbError> {
    let lsn = PgLsn::from(end_lsn);
    let tx = db.transaction().await?;
    let mut touched = 0;
    if !work.is_empty() {
        let members: Vec<i64> = work.members.iter().copied().collect();
        let groups: Vec<i64> = work.groups.iter().copied().collect();
        let tags: Vec<i64> = work.tags.iter().copied().collect();
        let roles: Vec<i64> = work.custom_roles.iter().copied().collect();
        // Fan-outs are expanded here, against the same snapshot that stores the
        // checkpoint. Spots without a live integration produce no work (G5); a
        // failed one keeps collecting it for its reconnect (SPEC §4.7).
        touched = tx
            .execute(
                "WITH ids AS (
                     SELECT unnest($1::bigint[]) AS id
                     UNION SELECT member_id FROM public.group_members WHERE group_id = ANY($2)
                     UNION SELECT member_id FROM public.member_tags WHERE tag_id = ANY($3)
                     UNION SELECT id FROM public.members WHERE custom_role_id = ANY($4)
                     UNION SELECT id FROM public.members WHERE $5
                 )
                 INSERT INTO hubspot_sync.property_outbox AS o (spot_id, member_id, lsn)
                 SELECT m.spot_id, m.id, $6
                   FROM ids
                   JOIN public.members m ON m.id = ids.id
                   JOIN hubspot_sync.integrations i
                     ON i.spot_id = m.spot_id AND i.status IN ('active', 'failed')
                  -- One lock order for every writer of the outbox: no deadlocks.
                  ORDER BY m.spot_id, m.id
                 ON CONFLICT (spot_id, member_id) DO UPDATE
                    SET version = nextval('hubspot_sync.outbox_version'),
                        lsn = GREATEST(o.lsn, excluded.lsn)",
                &[&members, &groups, &tags, &roles, &work.all_members, &lsn],
            )
            .await?;
    }
    tx.execute(
        "INSERT INTO hubspot_sync.checkpoint (slot_name, lsn, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (slot_name) DO UPDATE SET lsn = GREATEST(hubspot_sync.checkpoint.lsn, excluded.lsn), updated_at = now()",
        &[&slot, &lsn],
    )
    .await?;
    tx.commit().await?;
    Ok(touched)
}

/// An integration as the delivery stage needs it.
#[derive(Clone, Debug)]
pub struct LiveIntegration {
    pub spot_id: i64,
    pub portal_id: i64,
    pub access_token_enc: Vec<u8>,
    pub initialized: bool,
    /// Identifies one activation (connect): initialization runs once per activation.
    pub activation: i64,
}

pub async fn active_integrations(db: &Client) -> Result<Vec<LiveIntegration>, DbError> {
    let rows = db
        .query(
            "SELECT spot_id, portal_id, access_token_enc, initialized_at IS NOT NULL,
                    (extract(epoch FROM connected_at) * 1000000)::bigint
               FROM hubspot_sync.integrations
              WHERE status = 'active' AND portal_id IS NOT NULL AND access_token_enc IS NOT NULL
              ORDER BY spot_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LiveIntegration {
            spot_id: r.get(0),
            portal_id: r.get(1),
            access_token_enc: r.get(2),
            initialized: r.get(3),
            activation: r.get::<_, Option<i64>>(4).unwrap_or(0),
        })
        .collect())
}

/// The integration as the admin API shows it (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub struct IntegrationView {
    pub spot_id: i64,
    pub status: String,
    pub portal_id: Option<i64>,
    pub create_contacts: bool,
    pub activities: serde_json::Value,
    pub last_error: Option<String>,
    pub backlog: Backlog,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Backlog {
    pub properties: i64,
    pub activities: i64,
}

pub async fn integration_view(db: &Client, spot_id: i64) -> Result<IntegrationView, DbError> {
    let row = db
        .query_opt(
            "SELECT status, portal_id, create_contacts, activities, last_error,
                    (SELECT count(*) FROM hubspot_sync.property_outbox o WHERE o.spot_id = i.spot_id)
               FROM hubspot_sync.integrations i WHERE spot_id = $1",
            &[&spot_id],
        )
        .await?;
    Ok(match row {
        Some(r) => IntegrationView {
            spot_id,
            status: r.get(0),
            portal_id: r.get(1),
            create_contacts: r.get(2),
            activities: r.get(3),
            last_error: r.get(4),
            backlog: Backlog {
                properties: r.get(5),
                activities: 0,
            },
        },
        None => IntegrationView {
            spot_id,
            status: "inactive".into(),
            portal_id: None,
            create_contacts: false,
            activities: serde_json::json!({
                "members": false, "lives": false, "discussions": false, "collections": false, "courses": false
            }),
            last_error: None,
            backlog: Backlog::default(),
        },
    })
}

pub async fn list_integrations(db: &Client) -> Result<Vec<IntegrationView>, DbError> {
    let rows = db
        .query(
            "SELECT spot_id FROM hubspot_sync.integrations ORDER BY spot_id",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(integration_view(db, r.get(0)).await?);
    }
    Ok(out)
}

/// Activates a Spot with a static token (service key or private-app token).
/// Initialization runs again on every activation.
pub async fn connect_with_token(
    db: &Client,
    spot_id: i64,
    portal_id: i64,
    token_enc: &[u8],
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hubspot_sync.integrations
             (spot_id, status, portal_id, auth_kind, access_token_enc, refresh_token_enc, token_expires_at,
              initialized_at, last_error, failing_since, connected_at, updated_at)
         VALUES ($1, 'active', $2, 'token', $3, NULL, NULL, NULL, NULL, NULL, now(), now())
         ON CONFLICT (spot_id) DO UPDATE SET
              status = 'active', portal_id = $2, auth_kind = 'token', access_token_enc = $3,
              refresh_token_enc = NULL, token_expires_at = NULL, initialized_at = NULL,
              last_error = NULL, failing_since = NULL, connected_at = now(), updated_at = now()",
        &[&spot_id, &portal_id, &token_enc],
    )
    .await?;
    Ok(())
}

pub async fn spot_exists(db: &Client, spot_id: i64) -> Result<bool, DbError> {
    Ok(db
        .query_opt("SELECT 1 FROM public.spots WHERE id = $1", &[&spot_id])
        .await?
        .is_some())
}

pub async fn mark_initialized(db: &Client, spot_id: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.integrations SET initialized_at = now(), updated_at = now() WHERE spot_id = $1",
        &[&spot_id],
    )
    .await?;
    Ok(())
}

pub async fn record_outcome(
    db: &Client,
    spot_ids: &[i64],
    error: Option<&str>,
) -> Result<(), DbError> {
    match error {
        None => {
            db.execute(
                "UPDATE hubspot_sync.integrations
                    SET last_success_at = now(), failing_since = NULL
                  WHERE spot_id = ANY($1) AND (failing_since IS NOT NULL OR last_success_at IS NULL
                        OR last_success_at < now() - interval '1 second')",
                &[&spot_ids],
            )
            .await?
        }
        Some(e) => {
            db.execute(
                "UPDATE hubspot_sync.integrations
                    SET last_error = $2, failing_since = COALESCE(failing_since, now()), updated_at = now()
                  WHERE spot_id = ANY($1)",
                &[&spot_ids, &e],
            )
            .await?
        }
    };
    Ok(())
}

/// A due outbox row.
#[derive(Clone, Debug)]
pub struct Marker {
    pub spot_id: i64,
    pub member_id: i64,
    pub version: i64,
}

pub async fn due_markers(
    db: &Client,
    spot_ids: &[i64],
    limit: i64,
) -> Result<Vec<Marker>, DbError> {
    let rows = db
        .query(
            "SELECT spot_id, member_id, version FROM hubspot_sync.property_outbox
              WHERE spot_id = ANY($1) AND next_attempt_at <= now()
              ORDER BY next_attempt_at, version LIMIT $2",
            &[&spot_ids, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Marker {
            spot_id: r.get(0),
            member_id: r.get(1),
            version: r.get(2),
        })
        .collect())
}

pub async fn backlog_size(db: &Client) -> Result<i64, DbError> {
    Ok(db
        .query_one("SELECT count(*) FROM hubspot_sync.property_outbox", &[])
        .await?
        .get(0))
}

/// A member's source values, read at delivery time.
#[derive(Clone, Debug)]
pub struct MemberRecord {
    pub spot_id: i64,
    pub member_id: i64,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub status: String,
    pub role: String,
    pub custom_role: Option<String>,
    pub invited_at: Option<DateTime<Utc>>,
    pub registered_at: Option<DateTime<Utc>>,
    pub groups: Vec<String>,
    pub tags: Vec<String>,
    pub headline: Option<String>,
    pub bio: Option<String>,
}

pub async fn member_records(db: &Client, member_ids: &[i64]) -> Result<Vec<MemberRecord>, DbError> {
    let rows = db
        .query(
            "SELECT m.spot_id, m.id, m.email, m.first_name, m.last_name, m.status, m.role, cr.name,
                    m.invited_at, m.registered_at, m.headline, m.bio,
                    ARRAY(SELECT g.name FROM public.group_members gm JOIN public.groups g ON g.id = gm.group_id
                           WHERE gm.member_id = m.id),
                    ARRAY(SELECT t.name FROM public.member_tags mt JOIN public.tags t ON t.id = mt.tag_id
                           WHERE mt.member_id = m.id)
               FROM public.members m
               LEFT JOIN public.custom_roles cr ON cr.id = m.custom_role_id
              WHERE m.id = ANY($1)",
            &[&member_ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| MemberRecord {
            spot_id: r.get(0),
            member_id: r.get(1),
            email: r.get(2),
            first_name: r.get(3),
            last_name: r.get(4),
            status: r.get(5),
            role: r.get(6),
            custom_role: r.get(7),
            invited_at: r.get(8),
            registered_at: r.get(9),
            headline: r.get(10),
            bio: r.get(11),
            groups: r.get(12),
            tags: r.get(13),
        })
        .collect())
}

/// What is known of a member's contact.
#[derive(Clone, Debug, Default)]
pub struct ContactState {
    pub email: String,
    pub contact_id: Option<String>,
    pub written: HashMap<String, String>,
}

pub async fn contact_states(
    db: &Client,
    keys: &[(i64, i64)],
) -> Result<HashMap<(i64, i64), ContactState>, DbError> {
    let spots: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let members: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let rows = db
        .query(
            "SELECT c.spot_id, c.member_id, c.email, c.contact_id, c.written
               FROM hubspot_sync.contact_map c
               JOIN unnest($1::bigint[], $2::bigint[]) k(spot_id, member_id)
                 ON k.spot_id = c.spot_id AND k.member_id = c.member_id",
            &[&spots, &members],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let written: serde_json::Value = r.get(4);
            let written = serde_json::from_value(written).unwrap_or_default();
            (
                (r.get(0), r.get(1)),
                ContactState {
                    email: r.get(2),
                    contact_id: r.get(3),
                    written,
                },
            )
        })
        .collect())
}

/// The result of delivering one member's marker.
#[derive(Clone, Debug)]
pub enum Completion {
    /// Written (or nothing to write): remember the contact and the values now in HubSpot.
    Written {
        marker: Marker,
        email: String,
        contact_id: String,
        written: HashMap<String, String>,
    },
    /// The member has no contact, or no longer exists: nothing is written.
    NoContact {
        marker: Marker,
        email: Option<String>,
    },
    /// HubSpot rejected the write: dead-letter it; the next change writes again.
    DeadLetter {
        marker: Marker,
        email: String,
        contact_id: Option<String>,
        payload: serde_json::Value,
        reason: String,
    },
}

impl Completion {
    fn key(&self) -> (i64, i64) {
        let m = match self {
            Completion::Written { marker, .. }
            | Completion::NoContact { marker, .. }
            | Completion::DeadLetter { marker, .. } => marker,
        };
        (m.spot_id, m.member_id)
    }
}

/// Records completions and deletes their outbox rows, unless a newer change
/// arrived meanwhile (the version moved on), in one transaction.
pub async fn complete(db: &mut Client, done: &[Completion]) -> Result<(), DbError> {
    let mut done: Vec<&Completion> = done.iter().collect();
    // Same lock order as the hand-off, so the two never deadlock.
    done.sort_by_key(|c| c.key());
    let tx = db.transaction().await?;
    for c in done {
        let marker = match c {
            Completion::Written {
                marker,
                email,
                contact_id,
                written,
            } => {
                let written = serde_json::to_value(written).unwrap_or_default();
                tx.execute(
                    "INSERT INTO hubspot_sync.contact_map (spot_id, member_id, email, contact_id, written, updated_at)
                     VALUES ($1, $2, $3, $4, $5, now())
                     ON CONFLICT (spot_id, member_id) DO UPDATE
                        SET email = $3, contact_id = $4, written = $5, updated_at = now()",
                    &[&marker.spot_id, &marker.member_id, email, contact_id, &written],
                )
                .await?;
                marker
            }
            Completion::NoContact { marker, email } => {
                match email {
                    Some(email) => tx
                        .execute(
                            "INSERT INTO hubspot_sync.contact_map (spot_id, member_id, email, contact_id, written)
                             VALUES ($1, $2, $3, NULL, '{}')
                             ON CONFLICT (spot_id, member_id) DO UPDATE
                                SET email = $3, contact_id = NULL, written = '{}', updated_at = now()",
                            &[&marker.spot_id, &marker.member_id, email],
                        )
                        .await?,
                    None => tx
                        .execute(
                            "DELETE FROM hubspot_sync.contact_map WHERE spot_id = $1 AND member_id = $2",
                            &[&marker.spot_id, &marker.member_id],
                        )
                        .await?,
                };
                marker
            }
            Completion::DeadLetter {
                marker,
                email,
                contact_id,
                payload,
                reason,
            } => {
                tx.execute(
                    "INSERT INTO hubspot_sync.dead_letters (spot_id, member_id, kind, payload, reason)
                     VALUES ($1, $2, 'contact_properties', $3, $4)",
                    &[&marker.spot_id, &marker.member_id, payload, reason],
                )
                .await?;
                // Keep the mapping but forget what was written, so the next
                // change sends every property again.
                tx.execute(
                    "INSERT INTO hubspot_sync.contact_map (spot_id, member_id, email, contact_id, written)
                     VALUES ($1, $2, $3, $4, '{}')
                     ON CONFLICT (spot_id, member_id) DO UPDATE SET email = $3, contact_id = $4, written = '{}'",
                    &[&marker.spot_id, &marker.member_id, email, contact_id],
                )
                .await?;
                marker
            }
        };
        tx.execute(
            "DELETE FROM hubspot_sync.property_outbox WHERE spot_id = $1 AND member_id = $2 AND version = $3",
            &[&marker.spot_id, &marker.member_id, &marker.version],
        )
        .await?;
    }
    tx.commit().await
}

/// Pushes markers back after a transient failure.
pub async fn postpone(
    db: &Client,
    markers: &[Marker],
    delay: std::time::Duration,
) -> Result<(), DbError> {
    let spots: Vec<i64> = markers.iter().map(|m| m.spot_id).collect();
    let members: Vec<i64> = markers.iter().map(|m| m.member_id).collect();
    let secs = delay.as_secs_f64();
    db.execute(
        "WITH k AS (
             SELECT o.spot_id, o.member_id
               FROM hubspot_sync.property_outbox o
               JOIN unnest($1::bigint[], $2::bigint[]) u(spot_id, member_id)
                 ON o.spot_id = u.spot_id AND o.member_id = u.member_id
              ORDER BY o.spot_id, o.member_id
                FOR UPDATE OF o
         )
         UPDATE hubspot_sync.property_outbox o
            SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $3)
           FROM k
          WHERE o.spot_id = k.spot_id AND o.member_id = k.member_id",
        &[&spots, &members, &secs],
    )
    .await?;
    Ok(())
}
