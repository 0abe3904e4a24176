//! Integrations: one row per Spot ever connected, and every lifecycle
//! transition (SPEC §4). Each transition that changes what the stream must do
//! also writes the Spot's settings into the stream as a transactional logical
//! message (`translate::SETTINGS_PREFIX`), so that they apply in commit order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::DbError;
use crate::translate::{Activities, ActivitiesPatch, MarkerKey, SpotSettings, SETTINGS_PREFIX};

mod delivery;
mod notifications;
mod one_time;
mod view;

pub use delivery::*;
pub use notifications::*;
pub use one_time::*;
pub use view::*;

/// An integration's state (SPEC §4): what the admin API shows and the stream obeys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Never connected, or disconnected: nothing is sent.
    Inactive,
    /// Connected: changes and activities are delivered.
    Active,
    /// HubSpot refused or stayed unreachable: nothing is sent, work is kept.
    Failed,
}

impl Status {
    /// Every status, for metrics that report each.
    pub const ALL: [Status; 3] = [Status::Inactive, Status::Active, Status::Failed];

    /// The name stored in `hubspot_sync.integrations.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Inactive => "inactive",
            Status::Active => "active",
            Status::Failed => "failed",
        }
    }

    /// Reads a stored status; anything unknown counts as `inactive` (sends nothing).
    pub fn parse(s: &str) -> Status {
        match s {
            "active" => Status::Active,
            "failed" => Status::Failed,
            _ => Status::Inactive,
        }
    }
}

/// How the Spot authenticates to HubSpot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    /// OAuth 2 public app: access token + refresh token.
    OAuth,
    /// A service key or private-app token: static, cannot send timeline events.
    Token,
}

impl AuthKind {
    /// The name stored in `hubspot_sync.integrations.auth_kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthKind::OAuth => "oauth",
            AuthKind::Token => "token",
        }
    }

    /// Reads a stored kind.
    pub fn parse(s: &str) -> Option<AuthKind> {
        match s {
            "oauth" => Some(AuthKind::OAuth),
            "token" => Some(AuthKind::Token),
            _ => None,
        }
    }
}

/// Sealed (encrypted) credentials of an activation.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// OAuth tokens or a static token.
    pub kind: AuthKind,
    /// Access token, sealed with SIDECAR_SECRET_KEY.
    pub access_token_enc: Vec<u8>,
    /// Refresh token, sealed (OAuth only).
    pub refresh_token_enc: Option<Vec<u8>>,
    /// When the access token expires (OAuth only).
    pub expires_at: Option<DateTime<Utc>>,
}

/// Puts the Spot's current settings into the stream, in this transaction,
/// as a signed marker with the next settings version (`translate::markers`).
async fn emit_settings(
    tx: &impl GenericClient,
    key: &MarkerKey,
    spot_id: i64,
) -> Result<(), DbError> {
    let Some(row) = tx
        .query_opt(
            "UPDATE hubspot_sync.integrations SET settings_version = settings_version + 1
              WHERE spot_id = $1
          RETURNING settings_version, status, create_contacts, activities",
            &[&spot_id],
        )
        .await?
    else {
        return Ok(());
    };
    let settings = SpotSettings {
        spot_id,
        version: row.get(0),
        status: row.get(1),
        create_contacts: row.get(2),
        activities: serde_json::from_value(row.get(3)).unwrap_or_default(),
    };
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
        &[&SETTINGS_PREFIX, &key.seal(&settings)],
    )
    .await?;
    Ok(())
}

/// Who changed an integration (`integration_events.source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeSource {
    /// The admin API (MeltingSpot's web app on behalf of a Spot admin).
    AdminApi,
    /// The Spot admin's settings page: a session a one-time link started
    /// for this member.
    SettingsPage {
        /// The admin whose session it is.
        member_id: i64,
    },
    /// The operator overview (`/ui`, signed in with the admin token).
    OperatorPage,
    /// HubSpot's OAuth redirect, authenticated by the signed state.
    OAuthCallback,
    /// The delivery stage (a failure).
    Delivery,
    /// The stream (a resync after the slot or the server changed).
    Stream,
}

impl ChangeSource {
    /// The name stored in `integration_events.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeSource::AdminApi => "admin_api",
            ChangeSource::SettingsPage { .. } => "settings_page",
            ChangeSource::OperatorPage => "operator_page",
            ChangeSource::OAuthCallback => "oauth_callback",
            ChangeSource::Delivery => "delivery",
            ChangeSource::Stream => "stream",
        }
    }

    /// The member who made the change, when a person of the Spot did.
    pub fn member_id(self) -> Option<i64> {
        match self {
            ChangeSource::SettingsPage { member_id } => Some(member_id),
            _ => None,
        }
    }
}

/// Appends to the Spot's audit trail, in this transaction.
pub(crate) async fn record_event(
    tx: &impl GenericClient,
    spot_id: i64,
    kind: &str,
    source: ChangeSource,
    changes: serde_json::Value,
    detail: Option<&str>,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO hubspot_sync.integration_events (spot_id, kind, source, changes, detail, member_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &spot_id,
            &kind,
            &source.as_str(),
            &changes,
            &detail,
            &source.member_id(),
        ],
    )
    .await?;
    Ok(())
}

/// `{"from": a, "to": b}`, the shape of every change in the audit trail.
fn change<T: Serialize>(from: T, to: T) -> serde_json::Value {
    serde_json::json!({ "from": from, "to": to })
}

/// One entry of a Spot's audit trail (`GET /api/spots/{id}/hubspot/events`).
#[derive(Clone, Debug, Serialize)]
pub struct IntegrationEvent {
    /// Increasing id (pages go backwards from `before`).
    pub id: i64,
    /// `connected`, `settings_changed`, `disconnected` or `failed`.
    pub kind: String,
    /// `admin_api`, `oauth_callback` or `delivery`.
    pub source: String,
    /// What changed, each as `{"from": …, "to": …}`.
    pub changes: serde_json::Value,
    /// The error of a failure.
    pub detail: Option<String>,
    /// The member whose settings session made the change.
    pub member_id: Option<i64>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// The Spot's audit trail, newest first, up to `limit` entries older than `before`.
pub async fn integration_events(
    db: &Client,
    spot_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<IntegrationEvent>, DbError> {
    let rows = db
        .query(
            "SELECT id, kind, source, changes, detail, created_at, member_id FROM hubspot_sync.integration_events
              WHERE spot_id = $1 AND id < COALESCE($2, 9223372036854775807)
              ORDER BY id DESC LIMIT $3",
            &[&spot_id, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| IntegrationEvent {
            id: r.get(0),
            kind: r.get(1),
            source: r.get(2),
            changes: r.get(3),
            detail: r.get(4),
            member_id: r.get(6),
            at: r.get(5),
        })
        .collect())
}

/// What a connect replaced.
#[derive(Debug, Default)]
pub struct Replaced {
    /// The previous activation's refresh token (sealed): to be revoked at
    /// HubSpot unless it is the new one (sealing is randomised, so only the
    /// caller, who can open it, can tell).
    pub refresh_token_enc: Option<Vec<u8>>,
}

/// Connect or reconnect: the Spot becomes `active` with these credentials
/// under a new activation; initialization and the backfill run again;
/// settings are kept (SPEC §9).
pub async fn activate(
    db: &mut Client,
    key: &MarkerKey,
    spot_id: i64,
    portal_id: i64,
    creds: &Credentials,
    source: ChangeSource,
) -> Result<Replaced, DbError> {
    let tx = db.transaction().await?;
    let before = tx
        .query_opt(
            "SELECT status, portal_id, auth_kind, refresh_token_enc FROM hubspot_sync.integrations
              WHERE spot_id = $1 FOR UPDATE",
            &[&spot_id],
        )
        .await?;
    tx.execute(
        "INSERT INTO hubspot_sync.integrations
             (spot_id, status, portal_id, auth_kind, access_token_enc, refresh_token_enc, token_expires_at,
              token_issued_at, initialized_at, backfill_after, backfill_done_at, last_error,
              failing_since, failed_at, connected_at, updated_at, activation,
              backfill_members, backfill_queued)
         VALUES ($1, 'active', $2, $3, $4, $5, $6, now(), NULL, 0, NULL, NULL, NULL, NULL, now(), now(), 1,
                 (SELECT count(*) FROM public.members WHERE spot_id = $1), 0)
         ON CONFLICT (spot_id) DO UPDATE SET
              activation = hubspot_sync.integrations.activation + 1,
              status = 'active', portal_id = $2, auth_kind = $3, access_token_enc = $4,
              refresh_token_enc = $5, token_expires_at = $6, token_issued_at = now(), initialized_at = NULL,
              backfill_after = 0, backfill_done_at = NULL, last_error = NULL,
              failing_since = NULL, failed_at = NULL, connected_at = now(), updated_at = now(),
              backfill_members = excluded.backfill_members, backfill_queued = 0",
        &[
            &spot_id,
            &portal_id,
            &creds.kind.as_str(),
            &creds.access_token_enc,
            &creds.refresh_token_enc,
            &creds.expires_at,
        ],
    )
    .await?;
    // The backfill of the new activation writes every value again. Record
    // ids of another portal mean nothing on this one; those of this portal
    // (a reconnect to the same one) are kept, so its members are not looked
    // up again (a contact deleted meanwhile is answered as missing, and the
    // member's next change looks its e-mail up).
    tx.execute(
        "DELETE FROM hubspot_sync.contact_map WHERE spot_id = $1 AND portal_id <> $2",
        &[&spot_id, &portal_id],
    )
    .await?;
    tx.execute(
        "UPDATE hubspot_sync.contact_map SET written = '{}' WHERE spot_id = $1 AND portal_id = $2",
        &[&spot_id, &portal_id],
    )
    .await?;
    if creds.kind == AuthKind::Token {
        // Static tokens cannot send timeline events (SPEC §9).
        tx.execute(
            "DELETE FROM hubspot_sync.activity_outbox WHERE spot_id = $1",
            &[&spot_id],
        )
        .await?;
    }
    emit_settings(&tx, key, spot_id).await?;
    let (old_status, old_portal, old_kind, old_refresh): (
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<Vec<u8>>,
    ) = match &before {
        Some(r) => (r.get(0), r.get(1), r.get(2), r.get(3)),
        None => (None, None, None, None),
    };
    record_event(
        &tx,
        spot_id,
        "connected",
        source,
        serde_json::json!({
            "status": change(old_status.as_deref().unwrap_or("inactive"), "active"),
            "portal_id": change(old_portal, Some(portal_id)),
            "auth_kind": change(old_kind.as_deref(), Some(creds.kind.as_str())),
        }),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(Replaced {
        refresh_token_enc: old_refresh,
    })
}

/// Changes settings (creating an inactive row for a Spot never connected),
/// and records what changed in the audit trail.
pub async fn update_settings(
    db: &mut Client,
    key: &MarkerKey,
    spot_id: i64,
    create_contacts: Option<bool>,
    patch: &ActivitiesPatch,
    source: ChangeSource,
) -> Result<(), DbError> {
    // Only the categories the patch names change (jsonb `||` keeps the rest).
    let activities = serde_json::to_value(patch).unwrap_or_default();
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO hubspot_sync.integrations (spot_id) VALUES ($1) ON CONFLICT (spot_id) DO NOTHING",
        &[&spot_id],
    )
    .await?;
    let before = tx
        .query_one(
            "SELECT create_contacts, activities FROM hubspot_sync.integrations
              WHERE spot_id = $1 FOR UPDATE",
            &[&spot_id],
        )
        .await?;
    let after = tx
        .query_one(
            "UPDATE hubspot_sync.integrations
                SET create_contacts = COALESCE($2, create_contacts),
                    activities = activities || COALESCE($3, '{}'::jsonb),
                    updated_at = now()
              WHERE spot_id = $1
          RETURNING create_contacts, activities",
            &[&spot_id, &create_contacts, &activities],
        )
        .await?;
    emit_settings(&tx, key, spot_id).await?;
    let mut changes = serde_json::Map::new();
    let (was, now): (bool, bool) = (before.get(0), after.get(0));
    if was != now {
        changes.insert("create_contacts".into(), change(was, now));
    }
    let was: Activities = serde_json::from_value(before.get(1)).unwrap_or_default();
    let now: Activities = serde_json::from_value(after.get(1)).unwrap_or_default();
    for ((name, was), (_, now)) in was.named().into_iter().zip(now.named()) {
        if was != now {
            changes.insert(format!("activities.{name}"), change(was, now));
        }
    }
    if !changes.is_empty() {
        record_event(
            &tx,
            spot_id,
            "settings_changed",
            source,
            changes.into(),
            None,
        )
        .await?;
    }
    Ok(tx.commit().await?)
}

/// Disconnect: `inactive` under a new activation, both backlogs dropped, the
/// tokens erased, in one transaction. Returns the sealed refresh token that
/// was erased, for revocation.
pub async fn deactivate(
    db: &mut Client,
    key: &MarkerKey,
    spot_id: i64,
    source: ChangeSource,
) -> Result<Option<Vec<u8>>, DbError> {
    let tx = db.transaction().await?;
    let old = tx
        .query_opt(
            "SELECT refresh_token_enc, status, portal_id FROM hubspot_sync.integrations
              WHERE spot_id = $1 FOR UPDATE",
            &[&spot_id],
        )
        .await?;
    let Some(old) = old else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE hubspot_sync.integrations
            SET status = 'inactive', access_token_enc = NULL, refresh_token_enc = NULL,
                token_expires_at = NULL, failing_since = NULL, activation = activation + 1,
                updated_at = now()
          WHERE spot_id = $1",
        &[&spot_id],
    )
    .await?;
    // Nothing queued before the disconnect may reach a later connection,
    // possibly to another portal: neither changes nor events.
    for table in ["property_outbox", "activity_outbox"] {
        tx.execute(
            &format!("DELETE FROM hubspot_sync.{table} WHERE spot_id = $1"),
            &[&spot_id],
        )
        .await?;
    }
    emit_settings(&tx, key, spot_id).await?;
    let (was, portal): (String, Option<i64>) = (old.get(1), old.get(2));
    record_event(
        &tx,
        spot_id,
        "disconnected",
        source,
        serde_json::json!({
            "status": change(was.as_str(), "inactive"),
            "portal_id": change(portal, None),
        }),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(old.get(0))
}

/// Enters `failed` if this activation is still the active one, and queues
/// one in-app and one e-mail notification for each of the Spot's admins,
/// once per incident. Returns whether the Spot entered `failed` now.
pub async fn mark_failed(
    db: &mut Client,
    key: &MarkerKey,
    spot_id: i64,
    activation: i64,
    error: &str,
) -> Result<bool, DbError> {
    let tx = db.transaction().await?;
    let failed: Vec<i64> = tx
        .query(
            "UPDATE hubspot_sync.integrations
                SET status = 'failed', failed_at = now(), last_error = left($3, 1000), updated_at = now()
              WHERE spot_id = $1 AND activation = $2 AND status = 'active'
          RETURNING spot_id",
            &[&spot_id, &activation, &error],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !failed.is_empty() {
        tx.execute(
            "INSERT INTO hubspot_sync.notifications (spot_id, member_id, channel, kind, payload)
             SELECT m.spot_id, m.id, c.channel, 'hubspot_integration_failed',
                    json_build_object('spot_name', s.name, 'error', $2::text,
                                      'email', m.email, 'first_name', m.first_name)
               FROM public.members m
               JOIN public.spots s ON s.id = m.spot_id
              CROSS JOIN (VALUES ('in_app'), ('email')) c(channel)
              WHERE m.spot_id = ANY($1) AND m.role = 'admin' AND m.status = 'accepted'",
            &[&failed, &error],
        )
        .await?;
        emit_settings(&tx, key, spot_id).await?;
        record_event(
            &tx,
            spot_id,
            "failed",
            ChangeSource::Delivery,
            serde_json::json!({ "status": change("active", "failed") }),
            Some(error),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(!failed.is_empty())
}

/// Which Spots a backfill restart covers, and who asked for it.
pub(super) enum Restart<'a> {
    /// A resync of the stream (`cause`): every active or failed Spot.
    All { cause: &'a str },
    /// An operator's resync of one active Spot.
    Spot(i64),
}

/// Backfills again under a new activation (rounds in flight are fenced),
/// forgetting what was written so that every value is sent again (record
/// ids are kept: no lookups), and says so in the audit trail. Returns the Spots.
pub(super) async fn restart_backfills(
    tx: &impl GenericClient,
    restart: Restart<'_>,
) -> Result<Vec<i64>, DbError> {
    let (only, statuses, source, detail): (Option<i64>, &[&str], _, &str) = match restart {
        Restart::All { cause } => (None, &["active", "failed"], ChangeSource::Stream, cause),
        Restart::Spot(spot) => (Some(spot), &["active"], ChangeSource::AdminApi, "requested"),
    };
    let spots: Vec<i64> = tx
        .query(
            "UPDATE hubspot_sync.integrations
                SET activation = activation + 1, backfill_after = 0, backfill_done_at = NULL,
                    backfill_queued = 0,
                    backfill_members = (SELECT count(*) FROM public.members m
                                         WHERE m.spot_id = hubspot_sync.integrations.spot_id),
                    updated_at = now()
              WHERE status = ANY($1) AND ($2::bigint IS NULL OR spot_id = $2)
          RETURNING spot_id",
            &[&statuses, &only],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.execute(
        "UPDATE hubspot_sync.contact_map SET written = '{}' WHERE spot_id = ANY($1)",
        &[&spots],
    )
    .await?;
    for &spot in &spots {
        record_event(
            tx,
            spot,
            "resync",
            source,
            serde_json::json!({}),
            Some(detail),
        )
        .await?;
    }
    Ok(spots)
}

/// An operator's resync of one active Spot (`Restart::Spot`), also where
/// HubSpot was changed behind the sidecar's back. Returns false when the
/// Spot is not active.
pub async fn restart_backfill(db: &mut Client, spot_id: i64) -> Result<bool, DbError> {
    let tx = db.transaction().await?;
    let restarted = !restart_backfills(&tx, Restart::Spot(spot_id))
        .await?
        .is_empty();
    tx.commit().await?;
    Ok(restarted)
}
