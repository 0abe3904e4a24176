//! `POST /webhooks/hubspot`: HubSpot telling the sidecar that contacts of a
//! portal were merged, deleted, deleted for privacy or restored (README,
//! "Merges, deletions and privacy deletions").
//!
//! A request is checked (size, then v3 signature and age) before anything
//! in it is read; its events are stored before the answer, and applied by
//! `deliver::portal_changes` after it, so HubSpot gets its answer fast and a
//! crash in between loses nothing.

use std::sync::atomic::Ordering;

use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::failpoints::{crash_point, WEBHOOK_ACCEPTED};
use crate::hubspot::webhooks::{self, Parsed, PortalEvent};
use crate::store::portal_changes;

/// The path HubSpot calls: `SIDECAR_PUBLIC_URL` + this is the app's target URL.
pub const PATH: &str = "/webhooks/hubspot";

/// The largest body read. HubSpot sends fewer than 100 events a request, a
/// few hundred bytes each; 1 MiB leaves room for ten times that, and keeps
/// what an unauthenticated caller can make the sidecar hold small.
pub const MAX_BODY: usize = 1024 * 1024;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route(PATH, post(receive))
}

fn answer(state: &AppState, outcome: &str, status: StatusCode, message: &str) -> Response {
    state
        .metrics
        .webhook_requests
        .with_label_values(&[outcome])
        .inc();
    (status, Json(json!({ "error": message }))).into_response()
}

async fn receive(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(secret) = state.webhook_secret.clone() else {
        return answer(
            &state,
            "not_configured",
            StatusCode::NOT_FOUND,
            "webhooks need HUBSPOT_CLIENT_SECRET (the OAuth app's client secret) to verify signatures",
        );
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return answer(
            &state,
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            "body over 1 MiB",
        );
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return answer(
            &state,
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            "body over 1 MiB",
        );
    };
    // Signed over the URL HubSpot called: the public one, not what a proxy passed on.
    let url = match uri.query() {
        Some(q) => format!("{}{PATH}?{q}", state.public_url),
        None => format!("{}{PATH}", state.public_url),
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(refusal) = webhooks::verify_v3(
        &secret,
        "POST",
        &url,
        &body,
        header(webhooks::TIMESTAMP_HEADER),
        header(webhooks::SIGNATURE_HEADER),
        chrono::Utc::now().timestamp_millis(),
    ) {
        tracing::warn!(
            outcome = refusal.label(),
            "refused a webhook request: its signature or timestamp does not hold"
        );
        return answer(
            &state,
            refusal.label(),
            StatusCode::UNAUTHORIZED,
            "signature (X-HubSpot-Signature-v3) missing, wrong, or older than 5 minutes",
        );
    }
    // HubSpot retries what a standby refuses; the leader applies.
    if !state.health.leader.load(Ordering::Relaxed) {
        return answer(
            &state,
            "standby",
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica stands by",
        );
    }
    let parsed = match webhooks::parse_batch(&body) {
        Ok(p) => p,
        Err(e) => return answer(&state, "malformed", StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match store(&state, parsed).await {
        Ok(()) => {
            crash_point(WEBHOOK_ACCEPTED);
            state.webhook_events.notify_one();
            state
                .metrics
                .webhook_requests
                .with_label_values(&["accepted"])
                .inc();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store webhook events; HubSpot retries the batch");
            answer(
                &state,
                "database",
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable",
            )
        }
    }
}

/// Stores the events of served portals, and counts every event.
async fn store(state: &AppState, parsed: Vec<Parsed>) -> Result<(), crate::store::DbError> {
    let count = |kind: &str, outcome: &str| {
        state
            .metrics
            .webhook_events
            .with_label_values(&[kind, outcome])
            .inc()
    };
    let mut events: Vec<PortalEvent> = Vec::new();
    for p in parsed {
        match p {
            Parsed::Event(e) => events.push(e),
            // Another subscription of the app: answered, not acted on.
            Parsed::Other(subscription) => {
                tracing::debug!(%subscription, "a webhook event the sidecar does not act on");
                count("other", "not_handled")
            }
        }
    }
    if events.is_empty() {
        return Ok(());
    }
    let db = state.db.client().await?;
    let mut portals: Vec<i64> = events.iter().map(|e| e.portal_id).collect();
    portals.sort_unstable();
    portals.dedup();
    let served = portal_changes::served_portals(&db, &portals).await?;
    let (kept, ignored): (Vec<&PortalEvent>, Vec<&PortalEvent>) =
        events.iter().partition(|e| served.contains(&e.portal_id));
    for e in &ignored {
        count(e.change.kind(), "ignored_portal");
    }
    let new = portal_changes::accept_events(&db, &kept).await?;
    for e in &kept {
        let outcome = if new.contains(&e.dedup_key) {
            "accepted"
        } else {
            "repeated"
        };
        count(e.change.kind(), outcome);
    }
    Ok(())
}
