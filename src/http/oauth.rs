//! The OAuth round trip in the admin's browser: `start` (the URL a connect
//! hands out) binds the authorization to the browser that opens it, with a
//! cookie; HubSpot's redirect to `callback` completes it only with that
//! cookie. Every text the callback page shows is ours: nothing HubSpot (or
//! whoever forged the redirect) put in the query reaches the page.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::{require_leader, ui, AppState};
use crate::integrations::IntegrationError;

/// The cookie that carries the binding from `start` to `callback`.
const BINDING_COOKIE: &str = "hubspot_sidecar_oauth";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/oauth/hubspot/start", get(start))
        .route("/oauth/hubspot/callback", get(callback))
}

/// `Set-Cookie` for the binding, sent back only to the OAuth paths, for
/// the 10 minutes the state is valid (or, with `value` empty, cleared).
/// SameSite=Lax: HubSpot's redirect is a top-level navigation, which carries it.
fn binding_cookie(state: &AppState, value: &str, max_age: i64) -> HeaderValue {
    let secure = ui::secure_attribute(state);
    let cookie = format!(
        "{BINDING_COOKIE}={value}; Path=/oauth/hubspot; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    ui::oauth_result(status, title, text, None)
}

#[derive(Deserialize)]
struct StartQuery {
    ticket: Option<String>,
}

/// `GET /oauth/hubspot/start?ticket=…`: opens the ticket once and sends the
/// browser on to HubSpot, keeping the binding as a cookie.
async fn start(State(s): State<AppState>, Query(q): Query<StartQuery>) -> Response {
    if require_leader(&s).is_err() {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "HubSpot was not connected yet",
            "This replica of the sidecar stands by. Start the connection again in a moment.",
        );
    }
    let Some(ticket) = q.ticket else {
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "The link is incomplete. Start the connection again from the Spot's HubSpot settings.",
        );
    };
    match s
        .integrations
        .open_oauth_ticket(&s.signing, &ticket)
        .await
    {
        Ok((authorize_url, binding)) => {
            let mut resp = StatusCode::FOUND.into_response();
            let headers = resp.headers_mut();
            if let Ok(location) = HeaderValue::from_str(&authorize_url) {
                headers.insert(header::LOCATION, location);
            }
            headers.insert(
                header::SET_COOKIE,
                binding_cookie(&s, &binding, crate::integrations::signed::STATE_TTL_SECS),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(IntegrationError::Refused(_)) => page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "This link was already used or has expired. Start the connection again from the Spot's HubSpot settings.",
        ),
        Err(e) => {
            tracing::error!(error = %e, "could not start the OAuth connection");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "HubSpot was not connected",
                "Please try again.",
            )
        }
    }
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /oauth/hubspot/callback`: the state authenticates the request, the
/// binding cookie the browser.
async fn callback(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    if require_leader(&s).is_err() {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "HubSpot was not connected yet",
            "This replica of the sidecar stands by. Start the connection again in a moment.",
        );
    }
    if let Some(e) = q.error {
        // Logged (cut, scrubbed), never shown: the query is anyone's to write.
        let code: String = e.chars().take(64).collect();
        tracing::info!(
            error = %crate::internal_events::scrub_personal(&code),
            "HubSpot did not authorize the connection"
        );
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "HubSpot did not authorize the connection (it was declined or failed). Start it again from the Spot's HubSpot settings.",
        );
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "The request lacks code or state.",
        );
    };
    let binding = ui::cookie(&headers, BINDING_COOKIE);
    let mut resp = match s
        .integrations
        .complete_oauth(&s.signing, &code, &state, binding)
        .await
    {
        Ok(spot) => ui::oauth_result(
            StatusCode::OK,
            "HubSpot is connected",
            "You can close this window and return to MeltingSpot.",
            ui::settings_page_of_session(&s, &headers, spot),
        ),
        Err(IntegrationError::Forbidden(m)) => page(StatusCode::FORBIDDEN, "HubSpot was not connected", &m),
        Err(IntegrationError::Refused(_)) => page(
            StatusCode::BAD_REQUEST,
            "HubSpot was not connected",
            "This connection was already completed or has expired. Start it again from the Spot's HubSpot settings.",
        ),
        Err(IntegrationError::HubSpotUnavailable(_)) => page(
            StatusCode::BAD_GATEWAY,
            "HubSpot was not connected",
            "HubSpot could not be reached to finish the connection. Start it again in a moment.",
        ),
        Err(e) => {
            tracing::error!(error = %e, "could not complete the OAuth connection");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "HubSpot was not connected",
                "Please try again.",
            )
        }
    };
    if binding.is_some() {
        resp.headers_mut()
            .insert(header::SET_COOKIE, binding_cookie(&s, "", 0));
    }
    resp
}
