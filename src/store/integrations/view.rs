//! The integrations as the admin API and the pages show them: one Spot's
//! view, and a page of them through the whole fleet.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use super::{AuthKind, Status};
use crate::store::DbError;
use crate::translate::Activities;

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
