//! Integrations: one row per Spot ever connected, and every lifecycle
//! transition (SPEC §4). Each transition that changes what the stream must do
//! also writes the Spot's settings into the stream as a transactional logical
//! message (`translate::SETTINGS_PREFIX`), so that they apply in commit order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::DbError;
use crate::translate::{Activities, ActivitiesPatch, SETTINGS_PREFIX};

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
    /// Identifies one activation (connect): initialization runs once per activation.
    pub activation: i64,
    /// When the current OAuth access token was issued (unknown for rows
    /// written before migration 4).
    pub issued_at: Option<DateTime<Utc>>,
}

/// Reads the `active` integrations that have a portal and a token from `hubspot_sync.integrations`.
pub async fn active_integrations(db: &Client) -> Result<Vec<LiveIntegration>, DbError> {
    let rows = db
        .query(
            "SELECT spot_id, portal_id, auth_kind, access_token_enc, refresh_token_enc, token_expires_at,
                    initialized_at IS NOT NULL,
                    CASE WHEN backfill_done_at IS NULL THEN COALESCE(backfill_after, 0) END,
                    (extract(epoch FROM connected_at) * 1000000)::bigint,
                    token_issued_at
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
            activation: r.get::<_, Option<i64>>(8).unwrap_or(0),
            issued_at: r.get(9),
        })
        .collect())
}

/// The integration as the admin API shows it (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub struct IntegrationView {
    /// The Spot.
    pub spot_id: i64,
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
    /// How the Spot authenticates; not shown, used to refuse activities on a static token.
    #[serde(skip)]
    pub auth_kind: Option<AuthKind>,
}

/// Undelivered work of a Spot, by outbox.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backlog {
    /// Rows in `hubspot_sync.property_outbox`.
    pub properties: i64,
    /// Rows in `hubspot_sync.activity_outbox`.
    pub activities: i64,
}

/// Reads a Spot's integration and backlog counts; `inactive` if it never connected.
pub async fn integration_view(db: &Client, spot_id: i64) -> Result<IntegrationView, DbError> {
    let row = db
        .query_opt(
            "SELECT status, portal_id, create_contacts, activities, last_error, auth_kind,
                    (SELECT count(*) FROM hubspot_sync.property_outbox o WHERE o.spot_id = i.spot_id),
                    (SELECT count(*) FROM hubspot_sync.activity_outbox a WHERE a.spot_id = i.spot_id)
               FROM hubspot_sync.integrations i WHERE spot_id = $1",
            &[&spot_id],
        )
        .await?;
    Ok(match row {
        Some(r) => IntegrationView {
            spot_id,
            status: Status::parse(r.get(0)),
            portal_id: r.get(1),
            create_contacts: r.get(2),
            activities: serde_json::from_value(r.get(3)).unwrap_or_default(),
            last_error: r.get(4),
            auth_kind: r.get::<_, Option<&str>>(5).and_then(AuthKind::parse),
            backlog: Backlog {
                properties: r.get(6),
                activities: r.get(7),
            },
        },
        None => IntegrationView {
            spot_id,
            status: Status::Inactive,
            portal_id: None,
            create_contacts: false,
            activities: Activities::default(),
            last_error: None,
            auth_kind: None,
            backlog: Backlog::default(),
        },
    })
}

/// Every row of `hubspot_sync.integrations` as the admin API shows it, by Spot.
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

/// Whether the Spot exists in `public.spots` (an unknown Spot is a 404).
pub async fn spot_exists(db: &Client, spot_id: i64) -> Result<bool, DbError> {
    Ok(db
        .query_opt("SELECT 1 FROM public.spots WHERE id = $1", &[&spot_id])
        .await?
        .is_some())
}

/// Puts the Spot's current settings into the stream, in this transaction.
async fn emit_settings(tx: &impl GenericClient, spot_id: i64) -> Result<(), DbError> {
    tx.execute(
        "SELECT pg_logical_emit_message(true, $2::text,
                json_build_object('spot_id', spot_id, 'status', status,
                                  'create_contacts', create_contacts, 'activities', activities)::text)
           FROM hubspot_sync.integrations WHERE spot_id = $1",
        &[&spot_id, &SETTINGS_PREFIX],
    )
    .await?;
    Ok(())
}

/// Connect or reconnect: the Spot becomes `active` with these credentials;
/// initialization and the backfill run again; settings are kept (SPEC §9).
pub async fn activate(
    db: &mut Client,
    spot_id: i64,
    portal_id: i64,
    creds: &Credentials,
) -> Result<(), DbError> {
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO hubspot_sync.integrations
             (spot_id, status, portal_id, auth_kind, access_token_enc, refresh_token_enc, token_expires_at,
              token_issued_at, initialized_at, backfill_after, backfill_done_at, last_error,
              failing_since, failed_at, connected_at, updated_at)
         VALUES ($1, 'active', $2, $3, $4, $5, $6, now(), NULL, 0, NULL, NULL, NULL, NULL, now(), now())
         ON CONFLICT (spot_id) DO UPDATE SET
              status = 'active', portal_id = $2, auth_kind = $3, access_token_enc = $4,
              refresh_token_enc = $5, token_expires_at = $6, token_issued_at = now(), initialized_at = NULL,
              backfill_after = 0, backfill_done_at = NULL, last_error = NULL,
              failing_since = NULL, failed_at = NULL, connected_at = now(), updated_at = now()",
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
    // A new activation may be another portal: record ids and written values
    // of the old one mean nothing there, and the backfill rewrites everything.
    tx.execute(
        "DELETE FROM hubspot_sync.contact_map WHERE spot_id = $1",
        &[&spot_id],
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
    emit_settings(&tx, spot_id).await?;
    Ok(tx.commit().await?)
}

/// Changes settings (creating an inactive row for a Spot never connected).
pub async fn update_settings(
    db: &mut Client,
    spot_id: i64,
    create_contacts: Option<bool>,
    activities: &ActivitiesPatch,
) -> Result<(), DbError> {
    // Only the categories the patch names change (jsonb `||` keeps the rest).
    let activities = serde_json::to_value(activities).unwrap_or_default();
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO hubspot_sync.integrations (spot_id) VALUES ($1) ON CONFLICT (spot_id) DO NOTHING",
        &[&spot_id],
    )
    .await?;
    tx.execute(
        "UPDATE hubspot_sync.integrations
            SET create_contacts = COALESCE($2, create_contacts),
                activities = activities || COALESCE($3, '{}'::jsonb),
                updated_at = now()
          WHERE spot_id = $1",
        &[&spot_id, &create_contacts, &activities],
    )
    .await?;
    emit_settings(&tx, spot_id).await?;
    Ok(tx.commit().await?)
}

/// Disconnect: `inactive`, the backlog dropped, the tokens erased. Returns the
/// sealed refresh token (or static token) that was erased, for revocation.
pub async fn deactivate(db: &mut Client, spot_id: i64) -> Result<Option<Vec<u8>>, DbError> {
    let tx = db.transaction().await?;
    let old = tx
        .query_opt(
            "SELECT refresh_token_enc FROM hubspot_sync.integrations WHERE spot_id = $1 FOR UPDATE",
            &[&spot_id],
        )
        .await?;
    let Some(old) = old else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE hubspot_sync.integrations
            SET status = 'inactive', access_token_enc = NULL, refresh_token_enc = NULL,
                token_expires_at = NULL, failing_since = NULL, updated_at = now()
          WHERE spot_id = $1",
        &[&spot_id],
    )
    .await?;
    tx.execute(
        "DELETE FROM hubspot_sync.property_outbox WHERE spot_id = $1",
        &[&spot_id],
    )
    .await?;
    emit_settings(&tx, spot_id).await?;
    tx.commit().await?;
    Ok(old.get(0))
}

/// Enters `failed` for the Spots that are still active, and queues one in-app
/// and one e-mail notification for each admin of each, once per incident.
/// Returns the Spots that entered `failed` now.
pub async fn mark_failed(
    db: &mut Client,
    spot_ids: &[i64],
    error: &str,
) -> Result<Vec<i64>, DbError> {
    let tx = db.transaction().await?;
    let failed: Vec<i64> = tx
        .query(
            "UPDATE hubspot_sync.integrations
                SET status = 'failed', failed_at = now(), last_error = $2, updated_at = now()
              WHERE spot_id = ANY($1) AND status = 'active'
          RETURNING spot_id",
            &[&spot_ids, &error],
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
        for spot in &failed {
            emit_settings(&tx, *spot).await?;
        }
    }
    tx.commit().await?;
    Ok(failed)
}

/// The SQL that identifies one activation (see `LiveIntegration::activation`).
const ACTIVATION: &str = "(extract(epoch FROM connected_at) * 1000000)::bigint";

/// Marks this activation initialized (a newer activation is left alone).
pub async fn mark_initialized(db: &Client, spot_id: i64, activation: i64) -> Result<(), DbError> {
    db.execute(
        &format!(
            "UPDATE hubspot_sync.integrations SET initialized_at = now(), updated_at = now()
              WHERE spot_id = $1 AND {ACTIVATION} = $2"
        ),
        &[&spot_id, &activation],
    )
    .await?;
    Ok(())
}

/// Stores refreshed OAuth tokens (the refresh token may have rotated).
pub async fn store_tokens(
    db: &Client,
    spot_id: i64,
    access_enc: &[u8],
    refresh_enc: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.integrations
            SET access_token_enc = $2, refresh_token_enc = $3, token_expires_at = $4,
                token_issued_at = now(), updated_at = now()
          WHERE spot_id = $1 AND status = 'active'",
        &[&spot_id, &access_enc, &refresh_enc, &expires_at],
    )
    .await?;
    Ok(())
}

/// Success clears the transient-failure clock; a failure starts it and keeps
/// the latest error. Returns how long the Spots have been failing, at most.
pub async fn record_outcome(
    db: &Client,
    spot_ids: &[i64],
    error: Option<&str>,
) -> Result<std::time::Duration, DbError> {
    match error {
        None => {
            db.execute(
                "UPDATE hubspot_sync.integrations SET last_success_at = now(), failing_since = NULL
                  WHERE spot_id = ANY($1)",
                &[&spot_ids],
            )
            .await?;
            Ok(std::time::Duration::ZERO)
        }
        Some(e) => {
            let row = db
                .query_one(
                    "WITH u AS (
                         UPDATE hubspot_sync.integrations
                            SET last_error = $2, failing_since = COALESCE(failing_since, now()), updated_at = now()
                          WHERE spot_id = ANY($1)
                      RETURNING failing_since)
                     SELECT COALESCE(EXTRACT(epoch FROM now() - min(failing_since)), 0)::float8 FROM u",
                    &[&spot_ids, &e],
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
            "WITH page AS (
                 SELECT id FROM public.members WHERE spot_id = $1 AND id > $2 ORDER BY id LIMIT $3
             ), queued AS (
                 INSERT INTO hubspot_sync.property_outbox (spot_id, member_id, lsn)
                 SELECT $1, id, '0/0' FROM page ORDER BY id
                 ON CONFLICT (spot_id, member_id) DO NOTHING
             )
             SELECT count(*), max(id) FROM page",
            &[&spot_id, &after, &page],
        )
        .await?;
    let n: i64 = row.get(0);
    let last: Option<i64> = row.get(1);
    let done = n < page;
    db.execute(
        &format!(
            "UPDATE hubspot_sync.integrations
                SET backfill_after = $2, backfill_done_at = CASE WHEN $3 THEN now() END
              WHERE spot_id = $1 AND status = 'active' AND {ACTIVATION} = $4"
        ),
        &[&spot_id, &last.unwrap_or(after), &done, &activation],
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

/// Remembers an issued OAuth state nonce.
pub async fn issue_oauth_state(
    db: &Client,
    nonce: &str,
    spot_id: i64,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hubspot_sync.oauth_states (nonce, spot_id, expires_at) VALUES ($1, $2, $3)",
        &[&nonce, &spot_id, &expires_at],
    )
    .await?;
    db.execute(
        "DELETE FROM hubspot_sync.oauth_states WHERE expires_at < now() - interval '1 day'",
        &[],
    )
    .await?;
    Ok(())
}

/// Accepts a state nonce once: returns its Spot, or None if unknown, used or expired.
pub async fn consume_oauth_state(db: &Client, nonce: &str) -> Result<Option<i64>, DbError> {
    Ok(db
        .query_opt(
            "UPDATE hubspot_sync.oauth_states SET used_at = now()
              WHERE nonce = $1 AND used_at IS NULL AND expires_at > now()
          RETURNING spot_id",
            &[&nonce],
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

/// Which of these Spots are active right now.
pub async fn still_active(db: &Client, spot_ids: &[i64]) -> Result<Vec<i64>, DbError> {
    Ok(db
        .query(
            "SELECT spot_id FROM hubspot_sync.integrations WHERE spot_id = ANY($1) AND status = 'active'",
            &[&spot_ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
