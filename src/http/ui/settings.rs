//! The Spot admin's page: the seed's HubSpot tab on the Integrations page.
//! MeltingSpot's web app asks the admin API for a link
//! (`POST /api/spots/{id}/hubspot/ui-link`) and sends the admin to it; the
//! link is accepted once and starts a session bound to that Spot only.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{esc, page, refusal, see_other, session, start_session, Refusal, Session, SessionKind};
use crate::http::{require_leader, spot_id, ApiError, AppState, SettingsBody};
use crate::integrations::{ChangeSource, IntegrationError};
use crate::store::{IntegrationView, Status};

/// The path a settings link opens (the admin API prefixes the public URL).
pub fn settings_link_path(token: &str) -> String {
    format!(
        "/settings/open?link={}",
        url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
    )
}

pub(super) fn page_path(spot: i64) -> String {
    format!("/settings/spots/{spot}")
}

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/settings/open", get(open))
        .route("/settings/spots/{spot_id}", get(show))
        .route("/settings/spots/{spot_id}/status", get(status))
        .route("/settings/spots/{spot_id}/connect", post(connect))
        .route("/settings/spots/{spot_id}/settings", post(change))
        .route("/settings/spots/{spot_id}/disconnect", post(disconnect))
        .route("/settings/spots/{spot_id}/signout", post(sign_out))
}

#[derive(Deserialize)]
struct OpenQuery {
    link: Option<String>,
}

/// Opens a settings link: accepted once, it starts the Spot's session.
async fn open(State(state): State<AppState>, Query(q): Query<OpenQuery>) -> Response {
    let Some(link) = q.link else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "This link is incomplete",
            "Open the HubSpot tab from your Spot's settings again.",
        );
    };
    match state
        .integrations
        .open_settings_link(&state.signing, &link)
        .await
    {
        Ok((spot, holder)) => {
            let mut resp = see_other(&page_path(spot));
            resp.headers_mut().insert(
                header::SET_COOKIE,
                start_session(&state, SessionKind::Spot(spot), Some(holder)),
            );
            resp
        }
        Err(e) => refusal(
            StatusCode::FORBIDDEN,
            "This link cannot be used",
            &format!("{e} Open the HubSpot tab from your Spot's settings again to get a new one."),
        ),
    }
}

/// The session for the Spot in the path, or the refusal to answer: no
/// session, another Spot's, one an operator ended, or one whose admin is no
/// longer an accepted admin of the Spot (checked on every request, so a
/// removed admin is refused at once).
async fn spot_session(
    state: &AppState,
    headers: &HeaderMap,
    raw: &str,
) -> Result<Session, Refusal> {
    let id = spot_id(raw).map_err(Refusal::Api)?;
    let s = session(state, headers, SessionKind::Spot(id)).ok_or(Refusal::NotThisSpot)?;
    let holder = s.holder.ok_or(Refusal::NotThisSpot)?;
    match state.integrations.check_holder(id, holder).await {
        Ok(()) => Ok(s),
        Err(IntegrationError::Forbidden(_)) => Err(Refusal::NoLongerAdmin),
        Err(IntegrationError::Refused(_)) => Err(Refusal::NotThisSpot),
        Err(e) => Err(Refusal::Api(e.into())),
    }
}

/// The same, for a state-changing request: it must carry the CSRF header.
async fn acting_session(
    state: &AppState,
    headers: &HeaderMap,
    raw: &str,
) -> Result<Session, Refusal> {
    let s = spot_session(state, headers, raw).await?;
    let given = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    if !super::csrf_ok(state, &s, given) {
        return Err(Refusal::Csrf);
    }
    require_leader(state).map_err(Refusal::Api)?;
    Ok(s)
}

/// Who made a change through this session, for the audit trail.
fn source(s: &Session) -> ChangeSource {
    ChangeSource::SettingsPage {
        member_id: s.holder.map_or(0, |h| h.member_id),
    }
}

/// Signs out: the session's cookie is cleared (the page shows it ended).
async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let id = match spot_id(&raw) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    // Only with the session's CSRF token: a foreign page cannot sign anyone out.
    if let Some(s) = session(&state, &headers, SessionKind::Spot(id)) {
        let given = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if !super::csrf_ok(&state, &s, given) {
            return Refusal::Csrf.api().into_response();
        }
    }
    let mut resp = Json(json!({"signed_out": true})).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        super::end_session(&state, SessionKind::Spot(id)),
    );
    resp
}

async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let s = match spot_session(&state, &headers, &raw).await {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let view = match state.integrations.view(s.spot_id).await {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // The view names the Spot once it has an integration row; before its
    // first connect, ask for the name.
    let name = match view.spot_name.clone() {
        Some(name) => name,
        None => state
            .integrations
            .spot_name(s.spot_id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("Spot {}", s.spot_id)),
    };
    page(
        StatusCode::OK,
        &format!("HubSpot · {name}"),
        Some(&s.csrf),
        &render(&name, &view),
    )
}

/// What the page polls: it reloads when the status changed and updates the counts.
async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<IntegrationView>, ApiError> {
    let s = spot_session(&state, &headers, &raw)
        .await
        .map_err(Refusal::api)?;
    Ok(Json(state.integrations.view(s.spot_id).await?))
}

/// Starts OAuth: the page opens the answer's URL in a window (or, when a
/// popup is blocked, goes there itself) and HubSpot's redirect comes back.
async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let s = acting_session(&state, &headers, &raw)
        .await
        .map_err(Refusal::api)?;
    let url = state
        .integrations
        .start_oauth(&state.signing, s.spot_id)
        .await?;
    Ok(Json(json!({"authorize_url": url})).into_response())
}

/// A switch: one setting at a time, applied at once.
async fn change(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Json<SettingsBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<IntegrationView>, ApiError> {
    let s = acting_session(&state, &headers, &raw)
        .await
        .map_err(Refusal::api)?;
    let Json(body) =
        body.map_err(|_| ApiError(StatusCode::BAD_REQUEST, "the request is malformed".into()))?;
    let view = state
        .integrations
        .change_settings(s.spot_id, body.create_contacts, body.activities, source(&s))
        .await?;
    Ok(Json(view))
}

async fn disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<IntegrationView>, ApiError> {
    let s = acting_session(&state, &headers, &raw)
        .await
        .map_err(Refusal::api)?;
    let view = state.integrations.disconnect(s.spot_id, source(&s)).await?;
    Ok(Json(view))
}

/// The seed's categories: the switch's label and the activities it sends.
const CATEGORIES: [(&str, &str, &[&str]); 5] = [
    (
        "members",
        "Members",
        &[
            "Joined the Spot: when a new member joins your Spot",
            "Requested to join the Spot: when a member requests to join your Spot (in the case of a private Spot)",
            "Left the Spot: when a member leaves your Spot",
        ],
    ),
    (
        "lives",
        "Lives",
        &[
            "Registered to a live: when a member registers for a live event",
            "Attended a live: when a member participates in a live event",
            "Watched a replay: when a member watches a replay",
        ],
    ),
    (
        "discussions",
        "Discussions",
        &[
            "Voted on a topic: when a member votes on a topic",
            "Created a topic: when a member creates a topic",
        ],
    ),
    (
        "collections",
        "Collections",
        &[
            "Opened a page: when a member opens a page-type document",
            "Opened a link: when a member opens a link document",
        ],
    ),
    (
        "courses",
        "Courses",
        &[
            "Started a course: when a member starts a course",
            "Completed a course: when a member completes a course",
        ],
    ),
];

fn switch(id: &str, label: &str, on: bool, enabled: bool, describe: &str) -> String {
    format!(
        "<div class=\"switch-row\"><input type=\"checkbox\" role=\"switch\" id=\"{id}\" \
         data-setting=\"{id}\" aria-describedby=\"{id}-hint\"{checked}{disabled}>\
         <label for=\"{id}\">{label}</label></div><div class=\"hint\" id=\"{id}-hint\">{describe}</div>",
        checked = if on { " checked" } else { "" },
        disabled = if enabled { "" } else { " disabled" },
    )
}

/// A failure in a Spot admin's words, from the error delivery recorded
/// (`HubSpotError`'s text).
fn plain_failure(last_error: &str) -> &'static str {
    let has = |needle: &str| last_error.contains(needle);
    if has("MISSING_SCOPES") || has("(403 ") {
        "HubSpot refuses a permission the integration needs: the authorization lacks a scope."
    } else if has("authorization refused") {
        "HubSpot no longer accepts this connection: the app was uninstalled from the HubSpot \
         account, or its access was revoked there."
    } else if has("rate limited") || has("transient failure") {
        "HubSpot could not be reached, or kept turning calls away, for too long."
    } else {
        "HubSpot refused the integration's calls."
    }
}

/// The page's body for the Spot `name` in the state `view`.
fn render(name: &str, view: &IntegrationView) -> String {
    let status = match view.status {
        Status::Active => "active",
        Status::Failed => "failed",
        Status::Inactive => "inactive",
    };
    let problem = if view.status == Status::Failed {
        let detail = view
            .last_error
            .as_deref()
            .map(|e| {
                format!(
                    "<details><summary>What HubSpot answered</summary><p><code>{}</code></p></details>",
                    esc(e)
                )
            })
            .unwrap_or_default();
        format!(
            "<p class=\"problem\" role=\"alert\">The connection to HubSpot stopped working. {} \
             Reconnect HubSpot to repair it; the changes made meanwhile are kept and sent after.</p>{detail}",
            plain_failure(view.last_error.as_deref().unwrap_or_default())
        )
    } else {
        String::new()
    };
    let mut buttons = String::new();
    match view.status {
        Status::Inactive => buttons.push_str(
            "<button type=\"button\" class=\"primary\" data-action=\"connect\">Connect to HubSpot</button>",
        ),
        Status::Failed => buttons.push_str(
            "<button type=\"button\" class=\"primary\" data-action=\"connect\">Reconnect HubSpot</button>",
        ),
        Status::Active => {}
    }
    if view.status != Status::Inactive {
        buttons.push_str(
            "<button type=\"button\" class=\"danger\" data-action=\"disconnect\">Disconnect HubSpot</button>",
        );
    }
    buttons.push_str("<button type=\"button\" data-action=\"sign-out\">Sign out</button>");
    let portal = view
        .portal_id
        .filter(|_| view.status != Status::Inactive)
        .map(|p| p.to_string())
        .unwrap_or_else(|| "—".into());
    let backfill = if view.backfill.running {
        format!(
            "<div><dt>First synchronisation</dt><dd id=\"backfill\">{} of {} members</dd></div>",
            view.backfill.queued, view.backfill.members
        )
    } else {
        String::new()
    };
    let active = view.status == Status::Active;
    let closed_hint = match view.status {
        Status::Active => "",
        Status::Failed => "<p class=\"hint\">Reconnect HubSpot to change these options.</p>",
        Status::Inactive => "<p class=\"hint\">Connect to HubSpot to change these options.</p>",
    };
    let categories: String = CATEGORIES
        .iter()
        .zip(view.activities.named())
        .map(|((id, label, items), (_, on))| {
            let list: String = items
                .iter()
                .map(|i| match i.split_once(": ") {
                    Some((name, when)) => format!("<li><em>{}</em>: {}</li>", esc(name), esc(when)),
                    None => format!("<li>{}</li>", esc(i)),
                })
                .collect();
            switch(id, label, on, active, &format!("<ul>{list}</ul>"))
        })
        .collect();
    format!(
        "<header class=\"tab\"><p class=\"crumbs\">{name} · Settings · Integrations</p>\
         <h1>HubSpot</h1></header>\
         <section id=\"integration\" data-status=\"{status}\" data-backfill=\"{running}\" \
         aria-labelledby=\"status-title\">\
         <h2 id=\"status-title\">Integration</h2>\
         <p class=\"status-line\">Status: <span id=\"status\">{badge}</span></p>{problem}\
         <dl class=\"facts\">\
         <div><dt>HubSpot portal</dt><dd id=\"portal\">{portal}</dd></div>\
         <div><dt>Waiting to be sent</dt><dd id=\"backlog\">{backlog}</dd></div>\
         <div><dt>Refused by HubSpot</dt><dd id=\"dead-letters\">{dead}</dd></div>{backfill}</dl>\
         <div class=\"actions\">{buttons}</div>\
         <p id=\"message\" role=\"status\" aria-live=\"polite\"></p></section>\
         <section aria-labelledby=\"contacts-title\"><h2 id=\"contacts-title\">Contacts</h2>{closed_hint}{create}</section>\
         <section aria-labelledby=\"activities-title\"><h2 id=\"activities-title\">Activities in the contact's timeline</h2>\
         {categories}</section>\
         <dialog id=\"confirm-disconnect\" aria-labelledby=\"confirm-title\" aria-describedby=\"confirm-text\">\
         <h2 id=\"confirm-title\">Disconnect HubSpot?</h2>\
         <p id=\"confirm-text\">The integration becomes inactive: no more contacts are created or edited \
         and no activities are sent. Changes waiting to be sent are dropped.</p>\
         <div class=\"actions\"><button type=\"button\" data-action=\"cancel\" autofocus>Cancel</button>\
         <button type=\"button\" class=\"danger\" data-action=\"confirm-disconnect\">Confirm</button></div></dialog>",
        name = esc(name),
        running = view.backfill.running,
        badge = super::status_badge(view.status),
        backlog = view.backlog.properties + view.backlog.activities,
        dead = view.dead_letters,
        create = switch(
            "create_contacts",
            "Create contacts",
            view.create_contacts,
            active,
            "When a new member joins the Spot and HubSpot has no contact with their e-mail \
             address, a contact is created. Existing members get none.",
        ),
    )
}
