//! Integrations: one row per Spot ever connected, and every lifecycle
//! transition (SPEC §4). Each transition that changes what the stream must do
//! also writes the Spot's settings into the stream as a transactional logical
//! message (`translate::SETTINGS_PREFIX`), so that they apply in commit order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::DbError;
use crate::translate::{Activities, ActivitiesPatch, MarkerKey, SpotSettings, SETTINGS_PREFIX};

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

impl LiveIntegration {
    /// The activation its rounds are fenced by.
    pub fn fence(&self) -> super::Fence {
        super::Fence {
            spot_id: self.spot_id,
            portal_id: self.portal_id,
            activation: self.activation,
        }
    }
}

/// An integration as the delivery stage needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveIntegration {
    /// The connected Spot.
    pub spot_id: i64,
    /// HubSpot portal (account) id; one delivery worker runs per portal.
    pub portal_id: i64,
    /// OAuth or static token.
    pub credentials_kind: AuthKind,
    /// Access token, sealed with SIDECAR_SECRET_KEY.
    pub access_token_enc: Vec<u8>,
    /// Refresh token, sealed (OAuth only).
    pub refresh_token_enc: Option<Vec<u8>>,
    /// When the access token expires (OAuth only).
    pub expires_at: Option<DateTime<Utc>>,
    /// The property group and properties exist (`initialized_at` is set).
    pub initialized: bool,
    /// Backfill cursor: the last member id queued, 0 before the first page; None once done.
    pub backfill_after: Option<i64>,
    /// The activation (generation): moved on by every connect and
    /// disconnect. Delivery checks it before each call and each write, so a
    /// round of an older activation can neither call HubSpot nor store record ids.
    pub activation: i64,
    /// When the current OAuth access token was issued (unknown for rows
    /// written before migration 4).
    pub issued_at: Option<DateTime<Utc>>,
}

/// The columns `LiveIntegration` is read from, in `live_integration`'s order.
const LIVE_COLUMNS: &str =
    "spot_id, portal_id, auth_kind, access_token_enc, refresh_token_enc, token_expires_at,
     initialized_at IS NOT NULL,
     CASE WHEN backfill_done_at IS NULL THEN COALESCE(backfill_after, 0) END,
     activation, token_issued_at";

/// An integration delivery serves: `active`, with a portal and a token.
const LIVE_WHERE: &str =
    "status = 'active' AND portal_id IS NOT NULL AND access_token_enc IS NOT NULL";

fn live_integration(r: &tokio_postgres::Row) -> LiveIntegration {
    LiveIntegration {
        spot_id: r.get(0),
        portal_id: r.get(1),
        credentials_kind: if r.get::<_, Option<String>>(2).as_deref() == Some("oauth") {
            AuthKind::OAuth
        } else {
            AuthKind::Token
        },
        access_token_enc: r.get(3),
        refresh_token_enc: r.get(4),
        expires_at: r.get(5),
        initialized: r.get(6),
        backfill_after: r.get(7),
        activation: r.get(8),
        issued_at: r.get(9),
    }
}

/// Reads the `active` integrations that have a portal and a token from
/// `hubspot_sync.integrations` (delivery reads them all at start and,
/// as a safety net, at a slow pace; changes made here reach it at once).
pub async fn active_integrations(db: &super::Conn) -> Result<Vec<LiveIntegration>, DbError> {
    let sql = format!(
        "SELECT {LIVE_COLUMNS} FROM hubspot_sync.integrations WHERE {LIVE_WHERE} ORDER BY spot_id"
    );
    let rows = db.query(&db.prepare_cached(&sql).await?, &[]).await?;
    Ok(rows.iter().map(live_integration).collect())
}

/// One Spot's integration if delivery serves it (after a change made here).
pub async fn active_integration(
    db: &super::Conn,
    spot_id: i64,
) -> Result<Option<LiveIntegration>, DbError> {
    let sql = format!(
        "SELECT {LIVE_COLUMNS} FROM hubspot_sync.integrations WHERE spot_id = $1 AND {LIVE_WHERE}"
    );
    let row = db
        .query_opt(&db.prepare_cached(&sql).await?, &[&spot_id])
        .await?;
    Ok(row.as_ref().map(live_integration))
}

/// The integration as the admin API shows it (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub struct IntegrationView {
    /// The Spot.
    pub spot_id: i64,
    /// The Spot's name (`spots.name`).
    pub spot_name: Option<String>,
    /// `inactive`, `active` or `failed`.
    pub status: Status,
    /// Connected HubSpot portal, if any.
    pub portal_id: Option<i64>,
    /// Whether members inserted without a contact get one created (SPEC §4.4).
    pub create_contacts: bool,
    /// Activity categories enabled.
    pub activities: Activities,
    /// Last HubSpot error recorded for the integration since it connected, if any.
    pub last_error: Option<String>,
    /// Outbox rows not yet delivered.
    pub backlog: Backlog,
    /// Items HubSpot refused that were not retried (`GET …/dead-letters`).
    pub dead_letters: i64,
    /// The activation's backfill (after a connect or a resync).
    pub backfill: BackfillProgress,
    /// When HubSpot last accepted a call for the Spot.
    pub last_success_at: Option<DateTime<Utc>>,
    /// How the Spot authenticates; not shown, used to refuse activities on a static token.
    #[serde(skip)]
    pub auth_kind: Option<AuthKind>,
}

/// How far the backfill of the current activation is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackfillProgress {
    /// Members are still being queued.
    pub running: bool,
    /// Members of the Spot queued so far (all of them once it is done).
    pub queued: i64,
    /// Members of the Spot when the backfill started (those it queued, once done).
    pub members: i64,
}

/// Undelivered work of a Spot, by outbox.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backlog {
    /// Rows in `hubspot_sync.property_outbox`.
    pub properties: i64,
    /// Rows in `hubspot_sync.activity_outbox`.
    pub activities: i64,
}

/// The columns an `IntegrationView` is read from (`view_row`), for a row
/// `i` of `hubspot_sync.integrations`: the one place the view's counts are
/// written, for one Spot and for a page of them.
const VIEW_COLUMNS: &str =
    "i.spot_id, status, portal_id, create_contacts, activities, last_error, auth_kind,
    (SELECT count(*) FROM hubspot_sync.property_outbox o WHERE o.spot_id = i.spot_id),
    (SELECT count(*) FROM hubspot_sync.activity_outbox a WHERE a.spot_id = i.spot_id),
    (SELECT count(*) FROM hubspot_sync.dead_letters d
      WHERE d.spot_id = i.spot_id AND d.retried_at IS NULL),
    status = 'active' AND backfill_done_at IS NULL,
    backfill_queued,
    backfill_members,
    last_success_at,
    (SELECT name FROM public.spots s WHERE s.id = i.spot_id)";

fn view_row(r: &tokio_postgres::Row) -> IntegrationView {
    IntegrationView {
        spot_id: r.get(0),
        status: Status::parse(r.get(1)),
        portal_id: r.get(2),
        create_contacts: r.get(3),
        activities: serde_json::from_value(r.get(4)).unwrap_or_default(),
        last_error: r.get(5),
        auth_kind: r.get::<_, Option<&str>>(6).and_then(AuthKind::parse),
        backlog: Backlog {
            properties: r.get(7),
            activities: r.get(8),
        },
        dead_letters: r.get(9),
        backfill: BackfillProgress {
            running: r.get(10),
            queued: r.get(11),
            members: r.get(12),
        },
        last_success_at: r.get(13),
        spot_name: r.get(14),
    }
}

/// Reads a Spot's integration and backlog counts; `inactive` if it never connected.
pub async fn integration_view(db: &Client, spot_id: i64) -> Result<IntegrationView, DbError> {
    let sql = format!("SELECT {VIEW_COLUMNS} FROM hubspot_sync.integrations i WHERE spot_id = $1");
    let row = db.query_opt(&sql, &[&spot_id]).await?;
    Ok(match row {
        Some(r) => view_row(&r),
        None => IntegrationView {
            spot_id,
            status: Status::Inactive,
            portal_id: None,
            create_contacts: false,
            activities: Activities::default(),
            last_error: None,
            auth_kind: None,
            backlog: Backlog::default(),
            dead_letters: 0,
            backfill: BackfillProgress::default(),
            last_success_at: None,
            spot_name: None,
        },
    })
}

/// Which integrations a list shows: a status, a search (a Spot id, or a
/// part of its name), and a page.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<Status>,
    /// The Spot with this id, or Spots whose name contains this (any case).
    pub search: Option<String>,
    /// Rows per page.
    pub limit: i64,
    /// Rows skipped.
    pub offset: i64,
}

/// A page of integrations, failed first, then by Spot id.
#[derive(Clone, Debug)]
pub struct ListPage {
    /// How many integrations match, on every page.
    pub total: i64,
    /// This page's.
    pub spots: Vec<IntegrationView>,
}

/// A page of integrations in two statements, whatever the fleet's size:
/// the count of those that match, and the page's rows, whose counts are
/// computed for the page's Spots only.
pub async fn list_integrations(db: &Client, q: &ListQuery) -> Result<ListPage, DbError> {
    let status = q.status.map(Status::as_str);
    let search = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let id: Option<i64> = search.and_then(|s| s.parse().ok());
    // The name's search is literal: %, _ and \ in it match themselves.
    let pattern = search.map(|s| {
        format!(
            "%{}%",
            s.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    const MATCHES: &str = "($1::text IS NULL OR i.status = $1)
        AND ($2::text IS NULL OR i.spot_id = $3
             OR EXISTS (SELECT 1 FROM public.spots s WHERE s.id = i.spot_id AND s.name ILIKE $2))";
    let total: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM hubspot_sync.integrations i WHERE {MATCHES}"),
            &[&status, &pattern, &id],
        )
        .await?
        .get(0);
    let rows = db
        .query(
            &format!(
                "SELECT {VIEW_COLUMNS}
                   FROM (SELECT i.spot_id FROM hubspot_sync.integrations i WHERE {MATCHES}
                          ORDER BY i.status = 'failed' DESC, i.spot_id LIMIT $4 OFFSET $5) page
                   JOIN hubspot_sync.integrations i USING (spot_id)
                  ORDER BY i.status = 'failed' DESC, i.spot_id"
            ),
            &[&status, &pattern, &id, &q.limit, &q.offset],
        )
        .await?;
    Ok(ListPage {
        total,
        spots: rows.iter().map(view_row).collect(),
    })
}

/// The Spot's name in `public.spots`, or None if there is no such Spot.
pub async fn spot_name(db: &Client, spot_id: i64) -> Result<Option<String>, DbError> {
    Ok(db
        .query_opt("SELECT name FROM public.spots WHERE id = $1", &[&spot_id])
        .await?
        .map(|r| r.get(0)))
}

/// Whether the Spot exists in `public.spots` (an unknown Spot is a 404).
pub async fn spot_exists(db: &Client, spot_id: i64) -> Result<bool, DbError> {
    Ok(db
        .query_opt("SELECT 1 FROM public.spots WHERE id = $1", &[&spot_id])
        .await?
        .is_some())
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
    /// The Spot admin's settings page (a session a one-time link started).
    SettingsPage,
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
            ChangeSource::SettingsPage => "settings_page",
            ChangeSource::OperatorPage => "operator_page",
            ChangeSource::OAuthCallback => "oauth_callback",
            ChangeSource::Delivery => "delivery",
            ChangeSource::Stream => "stream",
        }
    }
}

/// Appends to the Spot's audit trail, in this transaction.
async fn record_event(
    tx: &impl GenericClient,
    spot_id: i64,
    kind: &str,
    source: ChangeSource,
    changes: serde_json::Value,
    detail: Option<&str>,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO hubspot_sync.integration_events (spot_id, kind, source, changes, detail)
         VALUES ($1, $2, $3, $4, $5)",
        &[&spot_id, &kind, &source.as_str(), &changes, &detail],
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
            "SELECT id, kind, source, changes, detail, created_at FROM hubspot_sync.integration_events
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
                SET status = 'failed', failed_at = now(), last_error = $3, updated_at = now()
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

/// Whether this activation of the Spot is the active one and (when given)
/// the leadership lock `(pid, class, key)` is still held by this replica's
/// lock session: the check before every HubSpot call delivery makes.
pub async fn is_current_led(
    db: &super::Conn,
    spot_id: i64,
    portal_id: i64,
    activation: i64,
    lock: Option<(i32, i32, i32)>,
) -> Result<bool, DbError> {
    let (pid, class, key) = match lock {
        Some((pid, class, key)) => (Some(pid), class, key),
        None => (None, 0, 0),
    };
    let statement = db
        .prepare_cached(
            "SELECT 1 FROM hubspot_sync.integrations
              WHERE spot_id = $1 AND portal_id = $2 AND activation = $3 AND status = 'active'
                AND ($4::int IS NULL OR EXISTS (
                     SELECT 1 FROM pg_locks
                      WHERE locktype = 'advisory' AND granted AND pid = $4
                        AND classid = $5::int::oid AND objid = $6::int::oid AND objsubid = 2))",
        )
        .await?;
    Ok(db
        .query_opt(
            &statement,
            &[&spot_id, &portal_id, &activation, &pid, &class, &key],
        )
        .await?
        .is_some())
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

/// Marks this activation initialized (a newer activation is left alone).
pub async fn mark_initialized(db: &Client, spot_id: i64, activation: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.integrations SET initialized_at = now(), updated_at = now()
          WHERE spot_id = $1 AND activation = $2",
        &[&spot_id, &activation],
    )
    .await?;
    Ok(())
}

/// Stores refreshed OAuth tokens (the refresh token may have rotated), for
/// this activation only: a reconnect meanwhile keeps its own tokens.
pub async fn store_tokens(
    db: &Client,
    spot_id: i64,
    activation: i64,
    access_enc: &[u8],
    refresh_enc: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.integrations
            SET access_token_enc = $3, refresh_token_enc = $4, token_expires_at = $5,
                token_issued_at = now(), updated_at = now()
          WHERE spot_id = $1 AND activation = $2 AND status = 'active'",
        &[
            &spot_id,
            &activation,
            &access_enc,
            &refresh_enc,
            &expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// Portals this Spot's integrations called less than one rate window ago
/// (by the last success or failure recorded), with how long ago: a new
/// process counts the previous one's calls before making its own.
pub async fn recently_called_portals(db: &Client) -> Result<Vec<(i64, f64)>, DbError> {
    let rows = db
        .query(
            "SELECT portal_id,
                    EXTRACT(epoch FROM now() - max(GREATEST(last_success_at, updated_at)))::float8
               FROM hubspot_sync.integrations
              WHERE status IN ('active', 'failed') AND portal_id IS NOT NULL
              GROUP BY portal_id
             HAVING max(GREATEST(last_success_at, updated_at)) > now() - interval '10 seconds'",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Success clears the transient-failure clock; a failure starts it and keeps
/// the latest error (this activation only). Returns how long the Spot has
/// been failing.
pub async fn record_outcome(
    db: &super::Conn,
    spot_id: i64,
    activation: i64,
    error: Option<&str>,
) -> Result<std::time::Duration, DbError> {
    match error {
        None => {
            let statement = db
                .prepare_cached(
                    "UPDATE hubspot_sync.integrations SET last_success_at = now(), failing_since = NULL
                      WHERE spot_id = $1 AND activation = $2",
                )
                .await?;
            db.execute(&statement, &[&spot_id, &activation]).await?;
            Ok(std::time::Duration::ZERO)
        }
        Some(e) => {
            let row = db
                .query_one(
                    "WITH u AS (
                         UPDATE hubspot_sync.integrations
                            SET last_error = $3, failing_since = COALESCE(failing_since, now()), updated_at = now()
                          WHERE spot_id = $1 AND activation = $2
                      RETURNING failing_since)
                     SELECT COALESCE(EXTRACT(epoch FROM now() - min(failing_since)), 0)::float8 FROM u",
                    &[&spot_id, &activation, &e],
                )
                .await?;
            Ok(std::time::Duration::from_secs_f64(
                row.get::<_, f64>(0).max(0.0),
            ))
        }
    }
}

/// Queues the next page of the Spot's members for the backfill (keyset on
/// member id). Rows already queued by the stream are left alone. Returns the
/// members in the page, the position after it, and whether the backfill is complete.
pub async fn backfill_page(
    db: &Client,
    spot_id: i64,
    activation: i64,
    after: i64,
    page: i64,
) -> Result<(i64, i64, bool), DbError> {
    let row = db
        .query_one(
            // Under the integration's share lock, for this activation only:
            // a disconnect committing meanwhile waits, then drops what this
            // queued; or it committed first, and this queues nothing.
            "WITH live AS (
                 SELECT 1 FROM hubspot_sync.integrations
                  WHERE spot_id = $1 AND status = 'active' AND activation = $4
                    FOR SHARE
             ), page AS (
                 SELECT id FROM public.members
                  WHERE spot_id = $1 AND id > $2 AND EXISTS (SELECT 1 FROM live)
                  ORDER BY id LIMIT $3
             ), queued AS (
                 INSERT INTO hubspot_sync.property_outbox (spot_id, member_id, lsn)
                 SELECT $1, id, '0/0' FROM page ORDER BY id
                 ON CONFLICT (spot_id, member_id) DO NOTHING
             )
             SELECT count(*), max(id) FROM page",
            &[&spot_id, &after, &page, &activation],
        )
        .await?;
    let n: i64 = row.get(0);
    let last: Option<i64> = row.get(1);
    let done = n < page;
    // Once done, the members are those it queued (some joined or left
    // while it ran).
    db.execute(
        "UPDATE hubspot_sync.integrations
            SET backfill_after = $2, backfill_done_at = CASE WHEN $3 THEN now() END,
                backfill_queued = backfill_queued + $5,
                backfill_members = CASE WHEN $3 THEN backfill_queued + $5
                                        ELSE greatest(backfill_members, backfill_queued + $5) END
          WHERE spot_id = $1 AND status = 'active' AND activation = $4",
        &[&spot_id, &last.unwrap_or(after), &done, &activation, &n],
    )
    .await?;
    Ok((n, last.unwrap_or(after), done))
}

/// Drops retained work of failed Spots older than the retention (SPEC §4.7).
pub async fn purge_expired_backlog(
    db: &Client,
    retention: std::time::Duration,
) -> Result<u64, DbError> {
    let secs = retention.as_secs_f64();
    let mut n = 0;
    for table in ["property_outbox", "activity_outbox"] {
        n += db
            .execute(
                &format!(
                    "DELETE FROM hubspot_sync.{table} o
                      USING hubspot_sync.integrations i
                      WHERE i.spot_id = o.spot_id AND i.status = 'failed'
                        AND o.enqueued_at < now() - make_interval(secs => $1)"
                ),
                &[&secs],
            )
            .await?;
    }
    Ok(n)
}

/// Remembers an issued single-use token's nonce (an OAuth state, a settings link).
pub async fn issue_one_time(
    db: &Client,
    purpose: &str,
    nonce: &str,
    spot_id: i64,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hubspot_sync.one_time_tokens (purpose, nonce, spot_id, expires_at)
         VALUES ($1, $2, $3, $4)",
        &[&purpose, &nonce, &spot_id, &expires_at],
    )
    .await?;
    db.execute(
        "DELETE FROM hubspot_sync.one_time_tokens WHERE expires_at < now() - interval '1 day'",
        &[],
    )
    .await?;
    Ok(())
}

/// Accepts a single-use nonce of `purpose` once: returns its Spot, or None
/// if unknown, used or expired.
pub async fn consume_one_time(
    db: &Client,
    purpose: &str,
    nonce: &str,
) -> Result<Option<i64>, DbError> {
    Ok(db
        .query_opt(
            "UPDATE hubspot_sync.one_time_tokens SET used_at = now()
              WHERE purpose = $1 AND nonce = $2 AND used_at IS NULL AND expires_at > now()
          RETURNING spot_id",
            &[&purpose, &nonce],
        )
        .await?
        .map(|r| r.get(0)))
}

/// An e-mail notification waiting to be sent.
#[derive(Clone, Debug)]
pub struct PendingEmail {
    /// `hubspot_sync.notifications` row id.
    pub id: i64,
    /// The admin's e-mail address (`members.email`).
    pub to: String,
    /// Notification payload (`spot_name`, `error`, the admin's name and e-mail).
    pub payload: serde_json::Value,
}

/// Reads up to `limit` undelivered `email` rows of `hubspot_sync.notifications`, oldest first.
pub async fn pending_emails(db: &Client, limit: i64) -> Result<Vec<PendingEmail>, DbError> {
    let rows = db
        .query(
            "SELECT n.id, m.email, n.payload FROM hubspot_sync.notifications n
               JOIN public.members m ON m.id = n.member_id
              WHERE n.channel = 'email' AND n.delivered_at IS NULL AND n.rejected_at IS NULL
              ORDER BY n.id LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PendingEmail {
            id: r.get(0),
            to: r.get(1),
            payload: r.get(2),
        })
        .collect())
}

/// Marks a `hubspot_sync.notifications` row delivered, so it is not mailed again.
pub async fn mark_delivered(db: &Client, id: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.notifications SET delivered_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Marks a failure e-mail the SMTP server refused for good, with the reason;
/// it is never sent again.
pub async fn mark_rejected(db: &Client, id: i64, reason: &str) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.notifications SET rejected_at = now(), rejected_reason = $2 WHERE id = $1",
        &[&id, &reason],
    )
    .await?;
    Ok(())
}
