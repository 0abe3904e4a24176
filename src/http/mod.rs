//! HTTP: admin API (SPEC §6), metrics, health.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::hubspot::ratelimit::Limiters;
use crate::hubspot::{HubSpotClient, HubSpotError};
use crate::metrics::Metrics;
use crate::store::{self, secrets::Sealer};

/// Liveness and readiness flags that the loops set.
#[derive(Default)]
pub struct Health {
    pub migrated: AtomicBool,
    pub streaming: AtomicBool,
    pub delivering: AtomicBool,
}

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<tokio_postgres::Client>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub admin_token: Arc<str>,
    pub sealer: Sealer,
    pub hubspot: HubSpotClient,
    pub wake: Arc<tokio::sync::Notify>,
    pub limiters: Limiters,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/spots", get(list_spots))
        .route("/api/spots/{spot_id}/hubspot", get(get_integration))
        .route("/api/spots/{spot_id}/hubspot/connect", post(connect))
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
    let db_ok = s.db.simple_query("SELECT 1").await.is_ok();
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
    Ok(Json(store::list_integrations(&s.db).await?).into_response())
}

async fn get_integration(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    Ok(Json(store::integration_view(&s.db, id).await?).into_response())
}

#[derive(Deserialize, Default)]
struct ConnectBody {
    access_token: Option<String>,
}

async fn connect(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Option<Json<ConnectBody>>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = spot_id(&raw)?;
    if !store::spot_exists(&s.db, id).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("spot {id} does not exist"),
        ));
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    let Some(token) = body.access_token.filter(|t| !t.trim().is_empty()) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "send {\"access_token\": \"…\"} (a service key or private-app token); OAuth connect is not available in this version"
                .into(),
        ));
    };
    let token = token.trim().to_string();
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
    s.limiters.portal(portal_id).record_unthrottled().await;
    store::connect_with_token(&s.db, id, portal_id, &s.sealer.seal(&token)).await?;
    tracing::info!(
        spot_id = id,
        portal_id,
        "integration connected with a token"
    );
    s.wake.notify_waiters();
    Ok(Json(store::integration_view(&s.db, id).await?).into_response())
}
