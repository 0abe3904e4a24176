//! The pages (SPEC §6): the Spot admin's HubSpot tab (`settings`) and the
//! operator overview (`operator`). Server-rendered HTML with one small
//! script; every asset is embedded in the binary, so the pages work with no
//! CDN and no network beyond the sidecar.
//!
//! Sessions are signed cookies (`integrations::signed`): HttpOnly,
//! SameSite=Lax (the return from HubSpot's OAuth page is a cross-site
//! navigation, which Strict would strip), Secure when the public URL is
//! https. Every state-changing request carries the session's CSRF token, in
//! a form field or the `X-CSRF-Token` header.

mod operator;
mod settings;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::integrations::signed::{self, Purpose};

pub use settings::settings_link_path;

/// How long a page session lasts, in seconds.
const SESSION_TTL_SECS: i64 = 8 * 3600;

/// The pages' routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/assets/ui.css", get(css))
        .route("/ui/assets/ui.js", get(js))
        .merge(settings::routes())
        .merge(operator::routes())
}

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for HTML content and attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: the shared head, `body`, and the session's CSRF token where
/// the script finds it.
fn page(status: StatusCode, title: &str, csrf: Option<&str>, body: &str) -> Response {
    let csrf = csrf
        .map(|t| format!("<meta name=\"csrf-token\" content=\"{}\">", esc(t)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title>{csrf}\
         <link rel=\"stylesheet\" href=\"/ui/assets/ui.css\">\
         <script src=\"/ui/assets/ui.js\" defer></script></head>\
         <body><main>{body}</main></body></html>",
        title = esc(title),
    );
    with_page_headers(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
    )
}

/// Headers every page carries: nothing but our own scripts and styles, no
/// framing by other sites, no URL leaking to other origins, no caching of a
/// page that shows a Spot's state.
fn with_page_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; frame-ancestors 'self'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The page HubSpot's OAuth redirect lands on. In a popup it tells the page
/// that opened it and closes; in a full window it returns to `back` (the
/// Spot's settings page, when the browser holds that Spot's session).
pub(super) fn oauth_result(
    status: StatusCode,
    title: &str,
    text: &str,
    back: Option<String>,
) -> Response {
    let ok = status.is_success();
    let (data, link) = match &back {
        Some(b) => (
            format!(" data-return=\"{}\"", esc(b)),
            format!(
                "<p><a href=\"{}\">Back to the HubSpot settings</a></p>",
                esc(b)
            ),
        ),
        None => (String::new(), String::new()),
    };
    page(
        status,
        title,
        None,
        &format!(
            "<div data-oauth-result data-ok=\"{ok}\"{data}><h1>{}</h1><p role=\"status\">{}</p>{link}</div>",
            esc(title),
            esc(text)
        ),
    )
}

/// The settings page of `spot` if the request carries that Spot's session.
pub(super) fn settings_page_of_session(
    state: &AppState,
    headers: &HeaderMap,
    spot: i64,
) -> Option<String> {
    session(state, headers, SessionKind::Spot(spot)).map(|_| settings::page_path(spot))
}

/// A page that says why a request was refused.
fn refusal(status: StatusCode, title: &str, text: &str) -> Response {
    page(
        status,
        title,
        None,
        &format!("<h1>{}</h1><p role=\"alert\">{}</p>", esc(title), esc(text)),
    )
}

/// A 303 to `to` (after a form's POST, so a reload does not repeat it).
fn see_other(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A signed-in page session: whose it is and its CSRF token.
pub(super) struct Session {
    /// The Spot it is bound to (0 for the operator).
    pub spot_id: i64,
    /// What every state-changing request of the session must carry.
    pub csrf: String,
    /// The session's nonce, which its CSRF token is derived from.
    nonce: String,
    /// The admin a settings session belongs to (None for the operator).
    pub holder: Option<signed::Holder>,
}

/// The kinds of session, each in its own cookie: one per Spot (an admin of
/// two Spots keeps both tabs working), one for the operator.
#[derive(Clone, Copy)]
pub(super) enum SessionKind {
    Spot(i64),
    Operator,
}

impl SessionKind {
    fn cookie(self) -> String {
        match self {
            SessionKind::Spot(id) => format!("hubspot_sidecar_spot_{id}"),
            SessionKind::Operator => "hubspot_sidecar_operator".into(),
        }
    }

    fn purpose(self) -> Purpose {
        match self {
            SessionKind::Spot(_) => Purpose::SpotSession,
            SessionKind::Operator => Purpose::OperatorSession,
        }
    }

    fn spot_id(self) -> i64 {
        match self {
            SessionKind::Spot(id) => id,
            SessionKind::Operator => 0,
        }
    }

    /// The signing key: an operator session is signed under the admin token
    /// too, so rotating SIDECAR_ADMIN_TOKEN ends every operator session.
    fn key(self, state: &AppState) -> signed::SigningKeys {
        match self {
            SessionKind::Spot(_) => state.signing.clone(),
            SessionKind::Operator => {
                signed::derive_key(&state.signing, Purpose::OperatorSession, &state.admin_token)
            }
        }
    }
}

/// The session of `kind` the request's cookie carries, if it verifies.
fn session(state: &AppState, headers: &HeaderMap, kind: SessionKind) -> Option<Session> {
    let token = cookie(headers, &kind.cookie())?;
    let verified = signed::verify(&kind.key(state), kind.purpose(), token).ok()?;
    if verified.spot_id != kind.spot_id() {
        return None;
    }
    let holder = match kind {
        // A Spot's session without its admin is not one of ours.
        SessionKind::Spot(_) => Some(signed::Holder::of_nonce(&verified.nonce)?),
        SessionKind::Operator => None,
    };
    Some(Session {
        spot_id: verified.spot_id,
        csrf: signed::derive(&state.signing, Purpose::Csrf, &verified.nonce),
        nonce: verified.nonce.clone(),
        holder,
    })
}

/// The value of cookie `name` in the request.
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for a new session of `kind`; a Spot's session names its admin.
fn start_session(
    state: &AppState,
    kind: SessionKind,
    holder: Option<signed::Holder>,
) -> HeaderValue {
    let issued = match holder {
        Some(h) => signed::issue_held(
            &kind.key(state),
            kind.purpose(),
            kind.spot_id(),
            h,
            SESSION_TTL_SECS,
        ),
        None => signed::issue(
            &kind.key(state),
            kind.purpose(),
            kind.spot_id(),
            SESSION_TTL_SECS,
        ),
    };
    set_cookie(state, kind, &issued.token, SESSION_TTL_SECS)
}

/// `Set-Cookie` that ends the session of `kind`.
pub(super) fn end_session(state: &AppState, kind: SessionKind) -> HeaderValue {
    set_cookie(state, kind, "", 0)
}

/// `; Secure` when browsers reach the sidecar over https (every cookie it sets).
pub(super) fn secure_attribute(state: &AppState) -> &'static str {
    if state.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

fn set_cookie(state: &AppState, kind: SessionKind, value: &str, max_age: i64) -> HeaderValue {
    let secure = secure_attribute(state);
    let cookie = format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        kind.cookie()
    );
    // The value is base64url, digits and dots: always a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether `given` is the session's CSRF token (constant time).
/// (Under any key of the ring: a page loaded before a rotation keeps working.)
fn csrf_ok(state: &AppState, session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| signed::derived_matches(&state.signing, Purpose::Csrf, &session.nonce, g))
}

/// Why a page request is not served.
pub(super) enum Refusal {
    /// No session for this Spot (none, expired, ended, or another Spot's).
    NotThisSpot,
    /// The session's admin is no longer an accepted admin of the Spot.
    NoLongerAdmin,
    /// No operator session: the login form.
    SignIn,
    /// A state-changing request without the session's CSRF token.
    Csrf,
    /// What the admin API would answer.
    Api(super::ApiError),
}

impl Refusal {
    /// The refusal as the page's script reads it: the admin API's JSON error.
    fn api(self) -> super::ApiError {
        let (status, text) = match self {
            Refusal::NotThisSpot => (
                StatusCode::FORBIDDEN,
                "this page's session for the Spot has ended: open the HubSpot tab from MeltingSpot again",
            ),
            Refusal::NoLongerAdmin => (
                StatusCode::FORBIDDEN,
                "you are no longer an admin of this Spot",
            ),
            Refusal::SignIn => (StatusCode::UNAUTHORIZED, "sign in again"),
            Refusal::Csrf => (
                StatusCode::FORBIDDEN,
                "the request lacked this session's security token: reload the page",
            ),
            Refusal::Api(e) => return e,
        };
        super::ApiError(status, text.into())
    }

    /// The refusal as a page, for a form's request: the admin API's answer
    /// (a standby, an unknown Spot) rendered instead of JSON.
    fn page(self) -> Response {
        match self {
            Refusal::Api(super::ApiError(status, text)) => refusal(status, "Not done", &text),
            other => other.into_response(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotThisSpot => refusal(
                StatusCode::FORBIDDEN,
                "You are not signed in to this Spot",
                "Open the HubSpot tab from this Spot's settings in MeltingSpot.",
            ),
            Refusal::NoLongerAdmin => refusal(
                StatusCode::FORBIDDEN,
                "You are no longer an admin of this Spot",
                "Only the Spot's admins manage its HubSpot integration.",
            ),
            Refusal::SignIn => operator::login_page(StatusCode::UNAUTHORIZED, None),
            Refusal::Csrf => refusal(
                StatusCode::FORBIDDEN,
                "Request refused",
                "The request did not carry this session's security token. Reload the page and try again.",
            ),
            Refusal::Api(e) => e.into_response(),
        }
    }
}

/// An HTML fragment: a time, or a dash.
fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| {
        format!(
            "<time datetime=\"{}\">{}</time>",
            t.to_rfc3339(),
            t.format("%Y-%m-%d %H:%M:%S UTC")
        )
    })
    .unwrap_or_else(|| "—".into())
}

/// The status as a Spot admin reads it.
fn status_badge(status: crate::store::Status) -> &'static str {
    use crate::store::Status;
    match status {
        Status::Active => "<span class=\"status status-active\">Active</span>",
        Status::Failed => {
            "<span class=\"status status-failed\"><span class=\"warning\" role=\"img\" \
             aria-label=\"Warning\">⚠</span> Failed</span>"
        }
        Status::Inactive => "<span class=\"status status-inactive\">Inactive</span>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_content_and_attributes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn cookies_are_found_by_name_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; hubspot_sidecar_spot=x.y.z; b=2"),
        );
        assert_eq!(cookie(&h, "hubspot_sidecar_spot"), Some("x.y.z"));
        assert_eq!(cookie(&h, "hubspot_sidecar_operator"), None);
    }
}
