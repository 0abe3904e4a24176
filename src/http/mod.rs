//! HTTP: admin API (SPEC §6), the pages (`ui`), metrics, health.

mod oauth;
pub mod server;
mod throttle;
mod ui;
pub mod webhooks;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::integrations::{IntegrationError, Integrations};
use crate::metrics::Metrics;
use crate::store::{Db, DbError};
use crate::translate::ActivitiesPatch;

use crate::health::Health;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The database (readiness).
    pub db: Db,
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// Liveness and readiness flags.
    pub health: Arc<Health>,
    /// SIDECAR_ADMIN_TOKEN.
    pub admin_token: Arc<str>,
    /// The key ring's signing keys (the OAuth state, the page links and sessions).
    pub signing: crate::integrations::signed::SigningKeys,
    /// SIDECAR_PUBLIC_URL: where browsers reach this sidecar.
    pub public_url: Arc<str>,
    /// SIDECAR_SLOT, for the operator overview.
    pub slot: Arc<str>,
    /// The lifecycle use cases.
    pub integrations: Integrations,
    /// HUBSPOT_CLIENT_SECRET, which signs HubSpot's webhook requests (None: no webhooks).
    pub webhook_secret: Option<Arc<str>>,
    /// Notified when webhook events were stored, for the task that applies them.
    pub webhook_events: Arc<tokio::sync::Notify>,
    /// Wrong admin tokens by client address.
    pub throttle: Arc<throttle::AuthThrottle>,
    /// A connection of its own for `/readyz`, which never waits behind delivery.
    pub health_db: Db,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/spots", get(list_spots))
        .route("/api/spots/{spot_id}/hubspot", get(get_integration))
        .route("/api/spots/{spot_id}/hubspot/connect", post(connect))
        .route(
            "/api/spots/{spot_id}/hubspot/settings",
            patch(patch_settings),
        )
        .route("/api/spots/{spot_id}/hubspot/disconnect", post(disconnect))
        .route(
            "/api/spots/{spot_id}/hubspot/events",
            get(integration_events),
        )
        .route(
            "/api/spots/{spot_id}/hubspot/dead-letters",
            get(dead_letters),
        )
        .route(
            "/api/spots/{spot_id}/hubspot/dead-letters/retry",
            post(retry_dead_letters),
        )
        .route(
            "/api/spots/{spot_id}/hubspot/suppressions",
            get(suppressions),
        )
        .route(
            "/api/spots/{spot_id}/hubspot/suppressions/lift",
            post(lift_suppression),
        )
        .route("/api/spots/{spot_id}/hubspot/conflicts", get(conflicts))
        .route("/api/spots/{spot_id}/hubspot/resync", post(resync))
        .route("/api/spots/{spot_id}/hubspot/ui-link", post(ui_link))
        .route(
            "/api/spots/{spot_id}/hubspot/sessions/end",
            post(end_spot_sessions),
        )
        .route("/api/sessions/end", post(end_all_sessions))
        .route("/api/spots/{spot_id}/hubspot/reconcile", post(reconcile))
        .merge(oauth::routes())
        .merge(ui::routes())
        .merge(webhooks::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_credentials,
        ))
        .with_state(state)
}

/// An error answer: JSON with a message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        tracing::error!(error = %e, "admin API database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable".into(),
        )
    }
}

impl From<IntegrationError> for ApiError {
    fn from(e: IntegrationError) -> Self {
        match e {
            IntegrationError::UnknownSpot(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            IntegrationError::Refused(m) => ApiError(StatusCode::BAD_REQUEST, m),
            IntegrationError::HubSpotUnavailable(m) => ApiError(StatusCode::BAD_GATEWAY, m),
            IntegrationError::Forbidden(m) => ApiError(StatusCode::FORBIDDEN, m),
            IntegrationError::Db(e) => e.into(),
        }
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), state.admin_token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (SIDECAR_ADMIN_TOKEN)".into(),
        ))
    }
}

/// Changes go through the leader only: its per-Spot fences order them with
/// its own HubSpot calls (`deliver::Fences`), which another replica's cannot.
/// The Service sends traffic to the Ready replica, the leader; a request
/// that reaches a standby anyway is told so.
fn require_leader(state: &AppState) -> Result<(), ApiError> {
    if state.health.leader.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica stands by: changes go to the leader (the one whose /readyz answers 200)"
                .into(),
        ))
    }
}

/// Throttles wrong admin tokens per client address (`throttle.rs`): on the
/// admin API's bearer check and the operator sign-in, the two places the
/// token is tried. Counted, and logged with the address, never the token.
async fn guard_credentials(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let surface = if path.starts_with("/api/") {
        "bearer"
    } else if path == "/ui/login" && req.method() == axum::http::Method::POST {
        "login"
    } else {
        return next.run(req).await;
    };
    let Some(ip) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return next.run(req).await;
    };
    let now = std::time::Instant::now();
    if let Some(wait) = s.throttle.blocked(ip, now) {
        s.metrics
            .auth_failures
            .with_label_values(&[surface, "throttled"])
            .inc();
        let secs = wait.as_secs().max(1);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            Json(json!({"error": format!("too many wrong admin tokens from this address: try again in {secs} s")})),
        )
            .into_response();
    }
    let resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        s.throttle.failed(ip, now);
        s.metrics
            .auth_failures
            .with_label_values(&[surface, "refused"])
            .inc();
        tracing::warn!(client = %ip, surface, "a wrong admin token was tried");
    }
    resp
}

pub(crate) use crate::integrations::signed::constant_time_eq;

fn spot_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("spot id {raw:?} is not a positive integer"),
        )
    })
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let migrated = s.health.migrated.load(Ordering::Relaxed);
    let streaming = s.health.streaming.load(Ordering::Relaxed);
    // Its own connection, and a deadline: a probe never waits behind delivery.
    let db_ok = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        match s.health_db.client().await {
            Ok(db) => db.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap_or(false);
    let leader = s.health.leader.load(Ordering::Relaxed);
    let ready = leader && migrated && streaming && db_ok;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"ready": ready, "leader": leader, "database": db_ok, "migrations": migrated, "streaming": streaming}),
        ),
    )
}

/// `GET /api/spots`: a page of the Spots with an integration.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// `inactive`, `active` or `failed`.
    pub status: Option<String>,
    /// A Spot id, or a part of its name.
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl ListParams {
    /// The store's query; a status that is not one is refused.
    pub(crate) fn query(&self) -> Result<crate::store::ListQuery, String> {
        let status = match self.status.as_deref().map(str::trim) {
            None | Some("") | Some("all") => None,
            Some(s) => Some(
                crate::store::Status::ALL
                    .into_iter()
                    .find(|st| st.as_str() == s)
                    .ok_or_else(|| {
                        format!("status must be inactive, active or failed, not {s:?}")
                    })?,
            ),
        };
        Ok(crate::store::ListQuery {
            status,
            search: self.q.clone(),
            limit: self.limit.unwrap_or(PAGE).clamp(1, PAGE_MAX),
            offset: self.offset.unwrap_or(0).max(0),
        })
    }
}

/// A page of the Spots with an integration, failed first, then by id
/// (`?status=&q=&limit=50&offset=0`); the number of all that match is in
/// `X-Total-Count`.
async fn list_spots(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let query = params
        .query()
        .map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    let page = s.integrations.list(&query).await?;
    let mut response = Json(page.spots).into_response();
    response
        .headers_mut()
        .insert("x-total-count", header::HeaderValue::from(page.total));
    Ok(response)
}

async fn get_integration(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    Ok(Json(s.integrations.view(id).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConnectBody {
    access_token: Option<String>,
}

/// `POST connect`: `{}` starts the OAuth flow; `{"access_token": …}` connects at once.
async fn connect(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Option<Json<ConnectBody>>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    let body = body.map(|b| b.0).unwrap_or_default();
    Ok(match body.access_token {
        None => {
            let url = s.integrations.start_oauth(&s.signing, id).await?;
            Json(json!({"authorize_url": url})).into_response()
        }
        Some(token) => Json(s.integrations.connect_with_token(id, &token).await?).into_response(),
    })
}

/// `{"member_id": N}`: the admin the settings link is for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UiLinkBody {
    member_id: i64,
}

/// `POST …/sessions/end`: ends every settings session of the Spot.
async fn end_spot_sessions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    s.integrations
        .end_sessions(Some(id), crate::integrations::ChangeSource::AdminApi)
        .await?;
    Ok(Json(json!({"spot_id": id, "sessions_ended": true})).into_response())
}

/// `POST /api/sessions/end`: ends every settings session of every Spot,
/// without rotating any key.
async fn end_all_sessions(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    s.integrations
        .end_sessions(None, crate::integrations::ChangeSource::AdminApi)
        .await?;
    Ok(Json(json!({"sessions_ended": true})).into_response())
}

/// `POST ui-link`: a link that opens the Spot's settings page once, within
/// 10 minutes, with a session for that Spot only.
async fn ui_link(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Option<Json<UiLinkBody>>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let Some(Json(UiLinkBody { member_id })) = body else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "send {\"member_id\": N}: the Spot admin the link and its session are for".into(),
        ));
    };
    let token = s
        .integrations
        .issue_settings_link(&s.signing, id, member_id)
        .await?;
    let url = format!("{}{}", s.public_url, ui::settings_link_path(&token));
    Ok(
        Json(json!({"url": url, "expires_in": crate::integrations::signed::STATE_TTL_SECS}))
            .into_response(),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReconcileBody {
    #[serde(default)]
    fix: bool,
}

/// `POST reconcile`: newline-delimited JSON, `{"progress": …}` after every
/// page of contacts, then `{"report": …}` or `{"error": "…"}`.
async fn reconcile(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Option<Json<ReconcileBody>>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    let fix = body.map(|Json(b)| b.fix).unwrap_or_default();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let line = |v: serde_json::Value| format!("{v}\n");
    let run = tokio::spawn(async move {
        s.integrations
            .reconcile(id, fix, move |p| {
                let _ = tx.send(line(json!({ "progress": p })));
            })
            .await
    });
    // The last line: the report, or why there is none (a panic included).
    let last = tokio::spawn(async move {
        match run.await {
            Ok(Ok(report)) => json!({ "report": report }),
            Ok(Err(e)) => json!({ "error": e.to_string() }),
            Err(e) => {
                tracing::error!(error = %e, spot_id = id, "reconcile stopped");
                json!({ "error": format!("the reconcile stopped: {e}") })
            }
        }
    });
    let progress =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|l| (l, rx)) });
    let end = futures_util::stream::once(async move {
        last.await
            .map(line)
            .unwrap_or_else(|e| line(json!({ "error": e.to_string() })))
    });
    let lines = futures_util::StreamExt::map(futures_util::StreamExt::chain(progress, end), |l| {
        Ok::<_, std::convert::Infallible>(l)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    create_contacts: Option<bool>,
    #[serde(default)]
    activities: ActivitiesPatch,
}

async fn patch_settings(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Json<SettingsBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let view = s
        .integrations
        .change_settings(
            id,
            body.create_contacts,
            body.activities,
            crate::integrations::ChangeSource::AdminApi,
        )
        .await?;
    Ok(Json(view).into_response())
}

async fn disconnect(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    Ok(Json(
        s.integrations
            .disconnect(id, crate::integrations::ChangeSource::AdminApi)
            .await?,
    )
    .into_response())
}

/// Paging of the audit trail and the dead letters: newest first, `before` an id.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

/// Entries per page, by default and at most.
const PAGE: i64 = 50;
const PAGE_MAX: i64 = 500;

impl PageQuery {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(PAGE).clamp(1, PAGE_MAX)
    }
}

/// A page of a Spot's `items` under `key`, newest first, with `next_before`:
/// the id the next page starts below (the oldest of a full page).
fn paged<T: serde::Serialize>(
    spot: i64,
    key: &str,
    items: Vec<T>,
    id_of: impl Fn(&T) -> i64,
    limit: i64,
) -> Response {
    let next = items
        .last()
        .map(&id_of)
        .filter(|_| items.len() as i64 == limit);
    let mut body = json!({"spot_id": spot, "next_before": next});
    body[key] = serde_json::to_value(items).unwrap_or_default();
    Json(body).into_response()
}

async fn integration_events(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let events = s.integrations.events(id, q.before, q.limit()).await?;
    Ok(paged(id, "events", events, |e| e.id, q.limit()))
}

async fn dead_letters(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let letters = s.integrations.dead_letters(id, q.before, q.limit()).await?;
    Ok(paged(id, "dead_letters", letters, |d| d.id, q.limit()))
}

/// `GET …/suppressions`: the e-mails suppressed on the Spot's portal (at most 500).
async fn suppressions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let list = s.integrations.suppressions(id, 500).await?;
    Ok(Json(json!({"spot_id": id, "suppressions": list})).into_response())
}

/// `{"email": "…"}`: the person consented again.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiftBody {
    email: String,
}

/// `POST …/suppressions/lift`: lifts one suppression, audited.
async fn lift_suppression(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Json(body): Json<LiftBody>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    if s.integrations
        .lift_suppression(id, &body.email, crate::integrations::ChangeSource::AdminApi)
        .await?
    {
        Ok(Json(json!({"spot_id": id, "lifted": true})).into_response())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            "no suppression of that e-mail on the Spot's portal".into(),
        ))
    }
}

/// `GET …/conflicts`: members left without a contact by a merge (at most 500).
async fn conflicts(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let list = s.integrations.conflicts(id, 500).await?;
    Ok(Json(json!({"spot_id": id, "conflicts": list})).into_response())
}

/// `{"id": N}` retries one dead letter, `{"all": true}` every one not yet retried.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    id: Option<i64>,
    #[serde(default)]
    all: bool,
}

async fn retry_dead_letters(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Option<Json<RetryBody>>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    let only = match body.map(|Json(b)| b) {
        Some(RetryBody {
            id: Some(one),
            all: false,
        }) => Some(one),
        Some(RetryBody {
            id: None,
            all: true,
        }) => None,
        _ => return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "send {\"id\": <dead letter id>} to retry one, or {\"all\": true} to retry every one"
                .into(),
        )),
    };
    let retried = s.integrations.retry_dead_letters(id, only).await?;
    Ok(Json(json!({"spot_id": id, "retried": retried})).into_response())
}

async fn resync(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_leader(&s)?;
    let id = spot_id(&raw)?;
    Ok(Json(s.integrations.resync(id).await?).into_response())
}
