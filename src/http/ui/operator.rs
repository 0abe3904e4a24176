//! The operator overview at `/ui`: every Spot with an integration, the
//! replication slot's state, and per Spot its dead letters and audit trail,
//! with the operator's actions (retry, resynchronise, reconcile, disconnect).
//! Signing in takes SIDECAR_ADMIN_TOKEN once and starts a session cookie, so
//! the token is not kept in the browser.

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::{
    end_session, esc, page, see_other, session, start_session, status_badge, when, Refusal,
    Session, SessionKind,
};
use crate::http::{constant_time_eq, require_leader, spot_id, AppState, ListParams};
use crate::integrations::{ChangeSource, IntegrationError};
use crate::reconcile::Report;
use crate::store::{ListQuery, Status};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/spots/{spot_id}", get(spot))
        .route("/ui/spots/{spot_id}/retry", post(retry))
        .route("/ui/spots/{spot_id}/resync", post(resync))
        .route("/ui/spots/{spot_id}/disconnect", post(disconnect))
        .route("/ui/spots/{spot_id}/reconcile", post(reconcile))
        .route(
            "/ui/spots/{spot_id}/suppressions/lift",
            post(lift_suppression),
        )
        .route("/ui/spots/{spot_id}/sessions/end", post(end_sessions))
}

pub(super) fn login_page(status: StatusCode, problem: Option<&str>) -> Response {
    let problem = problem
        .map(|p| format!("<p class=\"problem\" role=\"alert\">{}</p>", esc(p)))
        .unwrap_or_default();
    page(
        status,
        "Sign in · hubspot-sidecar",
        None,
        &format!(
            "<h1>hubspot-sidecar</h1>{problem}<form method=\"post\" action=\"/ui/login\" class=\"login\">\
             <label for=\"token\">Admin token (SIDECAR_ADMIN_TOKEN)</label>\
             <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required autofocus>\
             <button type=\"submit\" class=\"primary\">Sign in</button></form>"
        ),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    if !constant_time_eq(f.token.trim().as_bytes(), state.admin_token.as_bytes()) {
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token."),
        );
    }
    let mut resp = see_other("/ui");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        start_session(&state, SessionKind::Operator, None),
    );
    resp
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = acting(&state, &headers, f.csrf.as_deref(), false) {
        return r.into_response();
    }
    let mut resp = see_other("/ui");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        end_session(&state, SessionKind::Operator),
    );
    resp
}

/// The operator's session, or the login page.
fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Session, Refusal> {
    session(state, headers, SessionKind::Operator).ok_or(Refusal::SignIn)
}

/// The session of a state-changing request: it must carry the CSRF field.
fn acting(
    state: &AppState,
    headers: &HeaderMap,
    csrf: Option<&str>,
    change: bool,
) -> Result<Session, Refusal> {
    let s = signed_in(state, headers)?;
    if !super::csrf_ok(state, &s, csrf) {
        return Err(Refusal::Csrf);
    }
    if change {
        require_leader(state).map_err(Refusal::Api)?;
    }
    Ok(s)
}

fn csrf_field(s: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&s.csrf)
    )
}

fn nav(s: &Session) -> String {
    format!(
        "<nav class=\"top\"><a href=\"/ui\">All Spots</a>\
         <form method=\"post\" action=\"/ui/logout\">{}<button type=\"submit\">Sign out</button></form></nav>",
        csrf_field(s)
    )
}

fn db_error(e: IntegrationError) -> Response {
    super::refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "Not available",
        &format!("{e}"),
    )
}

async fn overview(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Response {
    let s = match signed_in(&state, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let query = match params.query() {
        Ok(q) => q,
        Err(m) => return super::refusal(StatusCode::BAD_REQUEST, "Not a filter", &m),
    };
    let listed = match state.integrations.list(&query).await {
        Ok(l) => l,
        Err(e) => return db_error(e),
    };
    let spots = &listed.spots;
    let m = &state.metrics;
    let slot = format!(
        "<dl class=\"facts\">\
         <div><dt>Replication lag</dt><dd id=\"lag-bytes\">{} bytes</dd></div>\
         <div><dt>Commit to hand-off</dt><dd id=\"lag-seconds\">{:.1} s</dd></div>\
         <div><dt>WAL the slot retains</dt><dd>{} bytes</dd></div>\
         <div><dt>Slot</dt><dd id=\"slot-state\">{} ({})</dd></div>\
         <div><dt>This replica</dt><dd>{}</dd></div></dl>",
        m.replication_lag_bytes.get(),
        m.replication_lag_seconds.get(),
        m.slot_retained_wal_bytes.get(),
        esc(&state.slot),
        if m.slot_active.get() == 1 {
            "streaming"
        } else {
            "not streaming"
        },
        if m.leader.get() == 1 {
            "leader"
        } else {
            "standby"
        },
    );
    let rows: String = spots
        .iter()
        .map(|v| {
            format!(
                "<tr><td><a href=\"/ui/spots/{id}\">Spot {id}</a> {name}</td><td>{badge}</td><td>{portal}</td>\
                 <td>{backlog}</td><td>{dead}</td><td>{last_error}</td><td>{success}</td></tr>",
                id = v.spot_id,
                name = esc(v.spot_name.as_deref().unwrap_or_default()),
                badge = status_badge(v.status),
                portal = v.portal_id.map(|p| p.to_string()).unwrap_or_else(|| "—".into()),
                backlog = v.backlog.properties + v.backlog.activities,
                dead = v.dead_letters,
                last_error = v.last_error.as_deref().map(esc).unwrap_or_else(|| "—".into()),
                success = when(v.last_success_at),
            )
        })
        .collect();
    page(
        StatusCode::OK,
        "Overview · hubspot-sidecar",
        Some(&s.csrf),
        &format!(
            "{nav}<h1>hubspot-sidecar</h1><section aria-labelledby=\"slot-title\">\
             <h2 id=\"slot-title\">Replication</h2>{slot}</section>\
             <section aria-labelledby=\"spots-title\"><h2 id=\"spots-title\">Spots ({n})</h2>\
             {filter}\
             <table id=\"spots\"><thead><tr><th scope=\"col\">Spot</th><th scope=\"col\">Status</th>\
             <th scope=\"col\">Portal</th><th scope=\"col\">Backlog</th><th scope=\"col\">Dead letters</th>\
             <th scope=\"col\">Last error</th><th scope=\"col\">Last success</th></tr></thead>\
             <tbody>{rows}</tbody></table>{pager}</section>",
            nav = nav(&s),
            n = listed.total,
            filter = filter_form(&query),
            pager = pager(&query, listed.total),
        ),
    )
}

/// The overview's filter: a status, a Spot id or part of a name.
fn filter_form(q: &ListQuery) -> String {
    let option = |value: &str, label: &str| {
        let selected = q.status.map(Status::as_str).unwrap_or("all") == value;
        format!(
            "<option value=\"{value}\"{}>{label}</option>",
            if selected { " selected" } else { "" }
        )
    };
    format!(
        "<form method=\"get\" action=\"/ui\" class=\"filter\" role=\"search\">\
         <label>Status <select name=\"status\">{}{}{}{}</select></label> \
         <label>Spot id or name <input type=\"search\" name=\"q\" value=\"{}\"></label> \
         <button type=\"submit\">Show</button></form>",
        option("all", "All"),
        option("failed", "Failed"),
        option("active", "Active"),
        option("inactive", "Inactive"),
        esc(q.search.as_deref().unwrap_or_default()),
    )
}

/// Links to the previous and next pages of the overview, keeping the filter.
fn pager(q: &ListQuery, total: i64) -> String {
    let link = |offset: i64, label: &str, rel: &str| {
        let mut url = url::form_urlencoded::Serializer::new(String::new());
        if let Some(status) = q.status {
            url.append_pair("status", status.as_str());
        }
        if let Some(search) = q.search.as_deref().filter(|s| !s.is_empty()) {
            url.append_pair("q", search);
        }
        url.append_pair("offset", &offset.to_string());
        format!(
            "<a rel=\"{rel}\" href=\"/ui?{}\">{label}</a>",
            esc(&url.finish())
        )
    };
    let mut parts = Vec::new();
    if q.offset > 0 {
        parts.push(link((q.offset - q.limit).max(0), "Previous", "prev"));
    }
    let shown_to = (q.offset + q.limit).min(total);
    parts.push(format!(
        "<span>{} to {shown_to} of {total}</span>",
        if total == 0 { 0 } else { q.offset + 1 }
    ));
    if shown_to < total {
        parts.push(link(q.offset + q.limit, "Next", "next"));
    }
    format!(
        "<nav class=\"pager\" aria-label=\"Pages\">{}</nav>",
        parts.join(" ")
    )
}

/// What an action did, carried by its redirect so that a reload of the page
/// shows it again instead of repeating the action.
#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
    n: Option<u64>,
}

impl DoneQuery {
    fn outcome(&self) -> Option<String> {
        let text = match (self.done.as_deref()?, self.n) {
            ("retried", Some(n)) => format!("{n} dead letter(s) queued again."),
            ("resync", _) => {
                "Resynchronisation started: every member's values are sent again.".into()
            }
            ("disconnected", _) => "Disconnected.".into(),
            ("sessions", _) => "Every settings session of this Spot has ended.".into(),
            ("lifted", _) => "Suppression lifted: the member is written (and created, if creation is on) on its next change.".into(),
            _ => return None,
        };
        Some(format!("<p>{text}</p>"))
    }
}

async fn spot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(done): Query<DoneQuery>,
) -> Response {
    let s = match signed_in(&state, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let id = match spot_id(&raw) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    spot_page(&state, &s, id, done.outcome()).await
}

/// A Spot's page, with `outcome` (what the last action did) on top.
async fn spot_page(state: &AppState, s: &Session, id: i64, outcome: Option<String>) -> Response {
    let ig = &state.integrations;
    let (view, letters, events, name, suppressions, conflicts) = match tokio::try_join!(
        ig.view(id),
        ig.dead_letters(id, None, 50),
        ig.events(id, None, 50),
        ig.spot_name(id),
        ig.suppressions(id, 50),
        ig.conflicts(id, 50),
    ) {
        Ok(all) => all,
        Err(e) => return db_error(e),
    };
    let Some(name) = name else {
        return super::refusal(
            StatusCode::NOT_FOUND,
            "No such Spot",
            &format!("Spot {id} does not exist."),
        );
    };
    let csrf = csrf_field(s);
    let action = |path: &str, label: &str, extra: &str, class: &str| {
        format!(
            "<form method=\"post\" action=\"/ui/spots/{id}/{path}\">{csrf}{extra}\
             <button type=\"submit\" class=\"{class}\">{label}</button></form>"
        )
    };
    let letter_rows: String = letters
        .iter()
        .map(|d| {
            let retry = if d.retried_at.is_some() {
                format!("retried {}", when(d.retried_at))
            } else {
                action(
                    "retry",
                    "Retry",
                    &format!("<input type=\"hidden\" name=\"id\" value=\"{}\">", d.id),
                    "",
                )
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{retry}</td></tr>",
                when(Some(d.created_at)),
                esc(&d.kind),
                d.member_id.map(|m| m.to_string()).unwrap_or_else(|| "—".into()),
                esc(&d.reason),
                esc(&payload_summary(&d.payload)),
            )
        })
        .collect();
    let event_rows: String = events
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                when(Some(e.at)),
                esc(&e.kind),
                match e.member_id {
                    Some(m) => format!("{} (member {m})", esc(&e.source)),
                    None => esc(&e.source),
                },
                esc(&e.changes.to_string()),
                e.detail.as_deref().map(esc).unwrap_or_default(),
            )
        })
        .collect();
    let suppression_rows: String = suppressions
        .iter()
        .map(|x| {
            let lift = format!(
                "<form method=\"post\" action=\"/ui/spots/{id}/suppressions/lift\" \
                 data-confirm=\"Lift the suppression of {email}? Only when the person consented again.\">{csrf}\
                 <input type=\"hidden\" name=\"email\" value=\"{email}\">\
                 <button type=\"submit\">Lift</button></form>",
                email = esc(&x.email),
            );
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{lift}</td></tr>",
                when(Some(x.created_at)),
                esc(&x.email),
                x.contact_id.as_deref().map(esc).unwrap_or_else(|| "—".into()),
                esc(&x.reason),
            )
        })
        .collect();
    let conflict_rows: String = conflicts
        .iter()
        .map(|c| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                when(Some(c.detected_at)),
                c.member_id,
                esc(&c.contact_id),
                c.kept_member_id,
            )
        })
        .collect();
    let active = view.status == Status::Active;
    let mut actions = String::new();
    if active {
        actions.push_str(&action(
            "retry",
            "Retry all dead letters",
            "<input type=\"hidden\" name=\"all\" value=\"true\">",
            "",
        ));
        actions.push_str(&action("resync", "Resynchronise", "", ""));
        actions.push_str(&action("reconcile", "Reconcile", "", ""));
        actions.push_str(&action(
            "reconcile",
            "Reconcile and fix",
            "<input type=\"hidden\" name=\"fix\" value=\"true\">",
            "",
        ));
    }
    actions.push_str(&action("sessions/end", "End settings sessions", "", ""));
    if view.status != Status::Inactive {
        actions.push_str(&format!(
            "<form method=\"post\" action=\"/ui/spots/{id}/disconnect\" data-confirm=\"Disconnect Spot {id} from HubSpot? \
             Its queued changes are dropped.\">{csrf}<button type=\"submit\" class=\"danger\">Disconnect</button></form>"
        ));
    }
    let outcome = outcome
        .map(|o| format!("<section class=\"outcome\" role=\"status\">{o}</section>"))
        .unwrap_or_default();
    page(
        StatusCode::OK,
        &format!("Spot {id} · hubspot-sidecar"),
        Some(&s.csrf),
        &format!(
            "{nav}<h1>Spot {id}: {name}</h1>{outcome}\
             <dl class=\"facts\"><div><dt>Status</dt><dd id=\"status\">{badge}</dd></div>\
             <div><dt>Portal</dt><dd>{portal}</dd></div>\
             <div><dt>Backlog</dt><dd>{props} contacts, {acts} activities</dd></div>\
             <div><dt>Dead letters</dt><dd id=\"dead-letters\">{dead}</dd></div>\
             <div><dt>Last success</dt><dd>{success}</dd></div>\
             <div><dt>Backfill</dt><dd>{backfill}</dd></div>\
             <div><dt>Last error</dt><dd>{last_error}</dd></div></dl>\
             <div class=\"actions\">{actions}</div>\
             <section aria-labelledby=\"dl-title\"><h2 id=\"dl-title\">Dead letters</h2>\
             <table id=\"dead-letter-table\"><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Kind</th>\
             <th scope=\"col\">Member</th><th scope=\"col\">Reason</th><th scope=\"col\">Payload</th><th scope=\"col\"></th></tr></thead>\
             <tbody>{letter_rows}</tbody></table></section>\
             <section aria-labelledby=\"supp-title\"><h2 id=\"supp-title\">Suppressed e-mails</h2>\
             <p>People deleted for privacy in the portal: never created, looked up or sent events again.</p>\
             <table id=\"suppression-table\"><thead><tr><th scope=\"col\">Since</th><th scope=\"col\">E-mail</th>\
             <th scope=\"col\">Contact</th><th scope=\"col\">Reason</th><th scope=\"col\"></th></tr></thead>\
             <tbody>{suppression_rows}</tbody></table></section>\
             <section aria-labelledby=\"conflict-title\"><h2 id=\"conflict-title\">Contact conflicts</h2>\
             <p>Members whose contact was merged into one another member keeps: they have no contact until the records are sorted out in HubSpot.</p>\
             <table id=\"conflict-table\"><thead><tr><th scope=\"col\">Since</th><th scope=\"col\">Member</th>\
             <th scope=\"col\">Merged contact</th><th scope=\"col\">Kept by member</th></tr></thead>\
             <tbody>{conflict_rows}</tbody></table></section>\
             <section aria-labelledby=\"audit-title\"><h2 id=\"audit-title\">Settings audit trail</h2>\
             <table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">What</th><th scope=\"col\">By</th>\
             <th scope=\"col\">Changes</th><th scope=\"col\">Detail</th></tr></thead><tbody>{event_rows}</tbody></table></section>",
            nav = nav(s),
            name = esc(&name),
            badge = status_badge(view.status),
            portal = view.portal_id.map(|p| p.to_string()).unwrap_or_else(|| "—".into()),
            props = view.backlog.properties,
            acts = view.backlog.activities,
            dead = view.dead_letters,
            success = when(view.last_success_at),
            backfill = if view.backfill.running {
                format!("{} of {} members queued", view.backfill.queued, view.backfill.members)
            } else {
                "done".into()
            },
            last_error = view.last_error.as_deref().map(esc).unwrap_or_else(|| "—".into()),
        ),
    )
}

/// A dead letter's payload in one line: its e-mail, contact, or event type.
fn payload_summary(p: &serde_json::Value) -> String {
    let pick = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let parts: Vec<String> = [
        pick("email"),
        pick("contact_id").map(|c| format!("contact {c}")),
        pick("event_type").or_else(|| pick("type")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        let mut s = p.to_string();
        if s.len() > 120 {
            let cut = (0..=120)
                .rev()
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(0);
            s.truncate(cut);
            s.push('…');
        }
        s
    } else {
        parts.join(", ")
    }
}

/// What an action shows: a redirect to the Spot's page that names what was
/// done (a reload repeats nothing), or a result to show at once.
enum Done {
    /// `?done=…` on the Spot's page.
    Redirect(String),
    /// HTML above the Spot's page (a reconcile report).
    Show(String),
}

/// Runs an operator action on the Spot in the path (a session, its CSRF
/// token, the leader), then shows the Spot's page with what it did. A
/// refusal is shown at once: it changed nothing, so a reload is harmless.
async fn act<Fut>(
    state: AppState,
    headers: &HeaderMap,
    raw: &str,
    csrf: Option<&str>,
    action: impl FnOnce(AppState, i64) -> Fut,
) -> Response
where
    Fut: std::future::Future<Output = Result<Done, IntegrationError>>,
{
    let s = match acting(&state, headers, csrf, true) {
        Ok(s) => s,
        Err(r) => return r.page(),
    };
    let id = match spot_id(raw) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let outcome = match action(state.clone(), id).await {
        Ok(Done::Redirect(query)) => return see_other(&format!("/ui/spots/{id}?{query}")),
        Ok(Done::Show(html)) => html,
        Err(e) => format!(
            "<p class=\"problem\" role=\"alert\">{}</p>",
            esc(&e.to_string())
        ),
    };
    spot_page(&state, &s, id, Some(outcome)).await
}

#[derive(Deserialize)]
struct RetryForm {
    csrf: Option<String>,
    id: Option<i64>,
    all: Option<String>,
}

async fn retry(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<RetryForm>,
) -> Response {
    let only = match (f.all.is_some(), f.id) {
        (true, _) => None,
        (false, Some(one)) => Some(one),
        (false, None) => {
            return super::refusal(
                StatusCode::BAD_REQUEST,
                "Nothing to retry",
                "Choose a dead letter, or all of them.",
            )
        }
    };
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            let n = st.integrations.retry_dead_letters(id, only).await?;
            Ok(Done::Redirect(format!("done=retried&n={n}")))
        },
    )
    .await
}

async fn resync(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            st.integrations.resync(id).await?;
            Ok(Done::Redirect("done=resync".into()))
        },
    )
    .await
}

async fn disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            st.integrations
                .disconnect(id, ChangeSource::OperatorPage)
                .await?;
            Ok(Done::Redirect("done=disconnected".into()))
        },
    )
    .await
}

async fn end_sessions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            st.integrations
                .end_sessions(Some(id), ChangeSource::OperatorPage)
                .await?;
            Ok(Done::Redirect("done=sessions".into()))
        },
    )
    .await
}

#[derive(Deserialize)]
struct LiftForm {
    csrf: Option<String>,
    email: String,
}

async fn lift_suppression(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<LiftForm>,
) -> Response {
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            if st
                .integrations
                .lift_suppression(id, &f.email, ChangeSource::OperatorPage)
                .await?
            {
                Ok(Done::Redirect("done=lifted".into()))
            } else {
                Ok(Done::Show(
                    "<p class=\"problem\" role=\"alert\">No such suppression (already lifted?).</p>".into(),
                ))
            }
        },
    )
    .await
}

#[derive(Deserialize)]
struct ReconcileForm {
    csrf: Option<String>,
    fix: Option<String>,
}

async fn reconcile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(f): Form<ReconcileForm>,
) -> Response {
    let fix = f.fix.is_some();
    act(
        state,
        &headers,
        &raw,
        f.csrf.as_deref(),
        |st, id| async move {
            let report = st.integrations.reconcile(id, fix, |_| {}).await?;
            Ok(Done::Show(render_report(&report)))
        },
    )
    .await
}

/// A reconcile report: the summary, and the drift as a table.
fn render_report(r: &Report) -> String {
    let summary = crate::reconcile::summary(r);
    if r.drift.is_empty() {
        return format!(
            "<h2>Reconcile</h2><p id=\"reconcile-summary\">{}</p>",
            esc(&summary)
        );
    }
    let rows: String = r
        .drift
        .iter()
        .map(|d| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&format!("{} ({})", d.contact_id, d.email)),
                esc(&d.property),
                esc(d.hubspot.as_deref().unwrap_or("(empty)")),
                esc(&d.database),
            )
        })
        .collect();
    format!(
        "<h2>Reconcile</h2><p id=\"reconcile-summary\">{}</p><table id=\"drift\"><thead><tr>\
         <th scope=\"col\">Contact</th><th scope=\"col\">Property</th><th scope=\"col\">HubSpot</th>\
         <th scope=\"col\">Database</th></tr></thead><tbody>{rows}</tbody></table>",
        esc(&summary)
    )
}
