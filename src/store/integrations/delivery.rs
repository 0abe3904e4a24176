//! The integrations as delivery reads and writes them: the active ones with
//! their sealed tokens, the fence before every call, initialization, tokens
//! refreshed, each round's outcome, and the backfill's pages.

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::AuthKind;
use crate::store::{Conn, DbError, Fence};

impl LiveIntegration {
    /// The activation its rounds are fenced by.
    pub fn fence(&self) -> Fence {
        Fence {
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
pub async fn active_integrations(db: &Conn) -> Result<Vec<LiveIntegration>, DbError> {
    let sql = format!(
        "SELECT {LIVE_COLUMNS} FROM hubspot_sync.integrations WHERE {LIVE_WHERE} ORDER BY spot_id"
    );
    let rows = db.query(&db.prepare_cached(&sql).await?, &[]).await?;
    Ok(rows.iter().map(live_integration).collect())
}

/// One Spot's integration if delivery serves it (after a change made here).
pub async fn active_integration(
    db: &Conn,
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

/// Which of these `(spot_id, portal_id, activation)` fences are the active
/// activation of their Spot, provided (when given) the leadership lock
/// `(pid, class, key)` is still held by this replica's lock session: the
/// check before every HubSpot call delivery makes. One statement checks the
/// calls of many rounds (`deliver::shared`); the answers come in the order
/// of `fences`.
pub async fn current_fences(
    db: &Conn,
    fences: &[(i64, i64, i64)],
    lock: Option<(i32, i32, i32)>,
) -> Result<Vec<bool>, DbError> {
    let (pid, class, key) = match lock {
        Some((pid, class, key)) => (Some(pid), class, key),
        None => (None, 0, 0),
    };
    let spots: Vec<i64> = fences.iter().map(|f| f.0).collect();
    let portals: Vec<i64> = fences.iter().map(|f| f.1).collect();
    let activations: Vec<i64> = fences.iter().map(|f| f.2).collect();
    let statement = db
        .prepare_cached(
            "SELECT f.i FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
                        WITH ORDINALITY AS f(spot_id, portal_id, activation, i)
               JOIN hubspot_sync.integrations i
                 ON i.spot_id = f.spot_id AND i.portal_id = f.portal_id
                AND i.activation = f.activation AND i.status = 'active'
              WHERE $4::int IS NULL OR EXISTS (
                    SELECT 1 FROM pg_locks
                     WHERE locktype = 'advisory' AND granted AND pid = $4
                       AND classid = $5::int::oid AND objid = $6::int::oid AND objsubid = 2)",
        )
        .await?;
    let rows = db
        .query(
            &statement,
            &[&spots, &portals, &activations, &pid, &class, &key],
        )
        .await?;
    Ok(crate::store::asks_answered(&rows, fences.len()))
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

/// A failure starts the transient-failure clock and keeps the latest error
/// (this activation only). Returns how long the Spot has been failing.
pub async fn record_failure(
    db: &Conn,
    spot_id: i64,
    activation: i64,
    error: &str,
) -> Result<std::time::Duration, DbError> {
    let row = db
        .query_one(
            "WITH u AS (
                 UPDATE hubspot_sync.integrations
                    SET last_error = left($3, 1000), failing_since = COALESCE(failing_since, now()), updated_at = now()
                  WHERE spot_id = $1 AND activation = $2
              RETURNING failing_since)
             SELECT COALESCE(EXTRACT(epoch FROM now() - min(failing_since)), 0)::float8 FROM u",
            &[&spot_id, &activation, &error],
        )
        .await?;
    Ok(std::time::Duration::from_secs_f64(
        row.get::<_, f64>(0).max(0.0),
    ))
}

/// Success clears the transient-failure clock of these `(spot_id,
/// activation)` pairs (that activation only), in one statement for many
/// rounds (`deliver::shared`). Rows are locked in the Spots' order, the
/// hand-off's, so the two never deadlock.
pub async fn record_successes(db: &Conn, activations: &[(i64, i64)]) -> Result<(), DbError> {
    let spots: Vec<i64> = activations.iter().map(|a| a.0).collect();
    let ids: Vec<i64> = activations.iter().map(|a| a.1).collect();
    let statement = db
        .prepare_cached(
            "WITH k AS (
                 SELECT i.spot_id FROM hubspot_sync.integrations i
                   JOIN unnest($1::bigint[], $2::bigint[]) AS a(spot_id, activation)
                     ON i.spot_id = a.spot_id AND i.activation = a.activation
                  ORDER BY i.spot_id
                    FOR NO KEY UPDATE OF i
             )
             UPDATE hubspot_sync.integrations i
                SET last_success_at = now(), failing_since = NULL
               FROM k WHERE i.spot_id = k.spot_id",
        )
        .await?;
    db.execute(&statement, &[&spots, &ids]).await?;
    Ok(())
}

/// Shows a configuration error of this sidecar (a token no key of the ring
/// opens) on the Spot's pages, without running its failure clock: the Spot
/// is not failing, the sidecar is misconfigured.
pub async fn record_config_error(
    db: &Conn,
    spot_id: i64,
    activation: i64,
    error: &str,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.integrations SET last_error = left($3, 1000), updated_at = now()
          WHERE spot_id = $1 AND activation = $2",
        &[&spot_id, &activation, &error],
    )
    .await?;
    Ok(())
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
