//! HTTP: admin API (SPEC §6), metrics, health.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub mod oauth_state;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::hubspot::oauth::OAuthApp;
use crate::hubspot::ratelimit::Gates;
use crate::hubspot::{HubSpotClient, HubSpotError};
use crate::metrics::Metrics;
use crate::store::{self, secrets::Sealer};

/// Liveness and readiness flags that the loops set.
#[derive(Default)]
pub struct Health {
    pub migrated: AtomicBool,
    pub streaming: AtomicBool,
}

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<store::Db>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub admin_token: Arc<str>,
    pub sealer: Sealer,
    pub hubspot: HubSpotClient,
    pub wake: Arc<tokio::sync::Notify>,
    pub gates: Gates,
    pub oauth: Option<OAuthApp>,
    pub secret_key: [u8; 32],
    /// Transitions run in a transaction on a connection of their own.
    pub database_url: Arc<str>,
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
        .route("/oauth/hubspot/callback", get(oauth_callback))
        .with_state(state)
}

/// An error answer: JSON with a message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<store::DbError> for ApiError {
    fn from(e: store::DbError) -> Self {
        tracing::error!(error = %e, "admin API database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable".into(),
        )
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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
    let db_ok = match s.db.get().await {
        Ok(db) => db.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    let ready = migrated && streaming && db_ok;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"ready": ready, "database": db_ok, "migrations": migrated, "streaming": streaming}),
        ),
    )
}

async fn list_spots(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(store::list_integrations(&*s.db.get().await?).await?).into_response())
}

async fn get_integration(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    Ok(Json(store::integration_view(&*s.db.get().await?, id).await?).into_response())
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
    let id = spot_id(&raw)?;
    if !store::spot_exists(&*s.db.get().await?, id).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("spot {id} does not exist"),
        ));
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    let Some(token) = body.access_token else {
        let Some(app) = &s.oauth else {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "OAuth is not configured: set HUBSPOT_CLIENT_ID and HUBSPOT_CLIENT_SECRET, or send {\"access_token\": \"…\"}".into(),
            ));
        };
        let issued = oauth_state::issue(&s.secret_key, id);
        store::issue_oauth_state(&*s.db.get().await?, &issued.nonce, id, issued.expires_at).await?;
        return Ok(
            Json(json!({"authorize_url": app.authorize_url(&issued.state)})).into_response(),
        );
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "access_token is empty".into(),
        ));
    }
    let portal_id = match s.hubspot.portal_id(&token).await {
        Ok(p) => p,
        Err(HubSpotError::Auth { message, .. }) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("HubSpot refused the token: {message}"),
            ))
        }
        Err(e) => {
            return Err(ApiError(
                StatusCode::BAD_GATEWAY,
                format!("could not reach HubSpot to identify the portal: {e}"),
            ))
        }
    };
    // That call counted against the portal's budget like any other.
    s.gates.portal(portal_id).limiter.record_unthrottled().await;
    // Settings survive a disconnect; activities cannot run on a static token.
    let current = store::integration_view(&*s.db.get().await?, id).await?;
    if current
        .activities
        .as_object()
        .is_some_and(|a| a.values().any(|v| v.as_bool() == Some(true)))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "activity categories are on, and HubSpot refuses timeline events sent with a service key or private-app token: connect through OAuth, or turn the categories off first".into(),
        ));
    }
    // Activities need OAuth (HubSpot refuses timeline calls with static tokens).
    let creds = store::Credentials {
        kind: store::AuthKind::Token,
        access_token_enc: s.sealer.seal(&token),
        refresh_token_enc: None,
        expires_at: None,
    };
    let mut db = store::connect(&s.database_url).await?;
    store::activate(&mut db, id, portal_id, &creds).await?;
    tracing::info!(
        spot_id = id,
        portal_id,
        "integration connected with a token"
    );
    s.wake.notify_waiters();
    Ok(Json(store::integration_view(&*s.db.get().await?, id).await?).into_response())
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{t}</h1><p>{x}</p>\
         <script>if (window.opener) {{ window.opener.postMessage('hubspot-connect-done', '*'); }}</script>\
         </body></html>",
        t = esc(title),
        x = esc(text)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

/// `GET /oauth/hubspot/callback`: the state authenticates the request.
async fn oauth_callback(State(s): State<AppState>, Query(q): Query<CallbackQuery>) -> Response {
    if let Some(e) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            &format!("{e}: {detail}"),
        );
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "The request lacks code or state.",
        );
    };
    let verified = match oauth_state::verify(&s.secret_key, &state) {
        Ok(v) => v,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                "HubSpot was not connected",
                &e.to_string(),
            )
        }
    };
    let consumed = match s.db.get().await {
        Ok(db) => store::consume_oauth_state(&db, &verified.nonce).await,
        Err(e) => Err(e),
    };
    match consumed {
        Ok(Some(spot)) if spot == verified.spot_id => {}
        Ok(_) => return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "This authorization link was already used or has expired; start the connection again.",
        ),
        Err(e) => {
            tracing::error!(error = %e, "OAuth callback database error");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "HubSpot was not connected",
                "Please try again.",
            );
        }
    }
    let Some(app) = &s.oauth else {
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "OAuth is not configured.",
        );
    };
    let tokens = match app.exchange_code(&s.hubspot, &code).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "OAuth code exchange failed");
            return page(
                StatusCode::BAD_GATEWAY,
                "HubSpot was not connected",
                &e.to_string(),
            );
        }
    };
    let Some(portal_id) = tokens.hub_id else {
        return page(
            StatusCode::BAD_GATEWAY,
            "HubSpot was not connected",
            "HubSpot did not say which portal was authorized.",
        );
    };
    let creds = store::Credentials {
        kind: store::AuthKind::OAuth,
        access_token_enc: s.sealer.seal(&tokens.access_token),
        refresh_token_enc: Some(s.sealer.seal(&tokens.refresh_token)),
        expires_at: Some(tokens.expires_at()),
    };
    let activated = async {
        let mut db = store::connect(&s.database_url).await?;
        store::activate(&mut db, verified.spot_id, portal_id, &creds).await
    }
    .await;
    if let Err(e) = activated {
        tracing::error!(error = %e, "could not store the OAuth connection");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "HubSpot was not connected",
            "Please try again.",
        );
    }
    tracing::info!(
        spot_id = verified.spot_id,
        portal_id,
        "integration connected through OAuth"
    );
    s.wake.notify_waiters();
    page(
        StatusCode::OK,
        "HubSpot is connected",
        "You can close this window and return to MeltingSpot.",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    create_contacts: Option<bool>,
    activities: Option<serde_json::Map<String, serde_json::Value>>,
}

const CATEGORIES: [&str; 5] = ["members", "lives", "discussions", "collections", "courses"];

async fn patch_settings(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Json<SettingsBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if !store::spot_exists(&*s.db.get().await?, id).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("spot {id} does not exist"),
        ));
    }
    if let Some(acts) = &body.activities {
        for (k, v) in acts {
            if !CATEGORIES.contains(&k.as_str()) {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown activity category {k:?}; use {}",
                        CATEGORIES.join(", ")
                    ),
                ));
            }
            if !v.is_boolean() {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("activities.{k} must be true or false"),
                ));
            }
        }
        let enabling = acts.values().any(|v| v.as_bool() == Some(true));
        let current = store::integration_view(&*s.db.get().await?, id).await?;
        if enabling && current.auth_kind.as_deref() == Some("token") {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "activities need an OAuth connection: HubSpot refuses timeline events sent with a service key or private-app token; reconnect through OAuth first".into(),
            ));
        }
    }
    let activities = body.activities.map(serde_json::Value::Object);
    let mut db = store::connect(&s.database_url).await?;
    store::update_settings(&mut db, id, body.create_contacts, activities.as_ref()).await?;
    Ok(Json(store::integration_view(&*s.db.get().await?, id).await?).into_response())
}

async fn disconnect(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    let view = store::integration_view(&*s.db.get().await?, id).await?;
    if view.status == "inactive" {
        return Ok(Json(view).into_response());
    }
    let mut db = store::connect(&s.database_url).await?;
    // Wait for the portal's delivery round in flight: after this commit, nothing
    // is sent for the Spot.
    let gate = view.portal_id.map(|p| s.gates.portal(p));
    let round = match &gate {
        Some(g) => Some(g.round.lock().await),
        None => None,
    };
    let erased = store::deactivate(&mut db, id).await?;
    drop(round);
    tracing::info!(spot_id = id, "integration disconnected");
    // Revoke the refresh token at HubSpot, best effort, after the commit.
    if let (Some(app), Some(sealed)) = (s.oauth.clone(), erased) {
        let client = s.hubspot.clone();
        let sealer = s.sealer.clone();
        tokio::spawn(async move {
            if let Ok(token) = sealer.open(&sealed) {
                if let Err(e) = app.revoke(&client, &token).await {
                    tracing::warn!(error = %e, "could not revoke the refresh token (it is erased here anyway)");
                }
            }
        });
    }
    Ok(Json(store::integration_view(&*s.db.get().await?, id).await?).into_response())
}
