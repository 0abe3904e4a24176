//! OAuth 2 of a public app: authorize (auto-approved), code exchange, refresh, metadata,
//! introspection and revocation.
//!
//! Refresh tokens do not rotate by default (`rotate_refresh_tokens` turns it on).
//! With rotation on: refresh tokens ROTATE. Every refresh answer
//! carries a new refresh token and the one used becomes invalid (`BAD_REFRESH_TOKEN`), which is
//! the strictest behaviour a client can meet: a client that persists every returned refresh token
//! works against both behaviours.

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::errors::{ApiError, ApiResult, Reply};
use crate::model::OAuthErrorStyle;
use crate::routes::Endpoint;
use crate::state::{rand_hex, uuid, CodeRec, RefreshRec, State, TokenKind, TokenRec};

/// Scopes granted when the authorize URL names none.
const DEFAULT_SCOPES: [&str; 6] = [
    "oauth",
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.schemas.contacts.read",
    "crm.schemas.contacts.write",
    "timeline",
];

const CODE_TTL_SECS: i64 = 600;

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn user_email() -> &'static str {
    "emulator-user@example.com"
}

fn hub_domain(portal: u64) -> String {
    format!("portal-{portal}.hubspot-emulator.local")
}

/// `GET /oauth/authorize` (and `/oauth/{portalId}/authorize`): checks the client, picks the
/// portal (path portal, else `set_next_grant_portal`, else a new one) and redirects with a code.
pub(crate) fn authorize(
    st: &mut State,
    ep: &Endpoint,
    q: &[(String, String)],
    now: DateTime<Utc>,
) -> ApiResult {
    let bad = |msg: &str| Err(ApiError::validation(msg.to_string()));
    let Some(client_id) = param(q, "client_id") else {
        return bad("Authorization failed: missing client_id");
    };
    if client_id != st.cfg.client_id {
        return bad("Authorization failed because the client_id is invalid");
    }
    let Some(redirect_uri) = param(q, "redirect_uri") else {
        return bad("Authorization failed: missing redirect_uri");
    };
    if !(redirect_uri.starts_with("http://") || redirect_uri.starts_with("https://")) {
        return bad("Authorization failed: redirect_uri must be an http(s) URL");
    }
    let mut scopes: Vec<String> = ["scope", "optional_scope"]
        .iter()
        .filter_map(|k| param(q, k))
        .flat_map(|s| s.split_whitespace())
        .map(String::from)
        .collect();
    if scopes.is_empty() {
        scopes = DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect();
    }
    scopes.dedup();
    let path_portal = match ep {
        Endpoint::Authorize { portal } => portal.filter(|p| st.portals.contains_key(p)),
        _ => None,
    };
    let portal = match path_portal.or(st.next_grant_portal) {
        Some(p) => {
            st.ensure_portal(p);
            p
        }
        None => st.new_portal(),
    };
    let code = format!("emu-code-{}", uuid());
    st.codes.insert(
        code.clone(),
        CodeRec {
            portal,
            redirect_uri: redirect_uri.to_string(),
            scopes,
            expires_at: now + chrono::Duration::seconds(CODE_TTL_SECS),
        },
    );
    // Keep the redirect URI's own query string and fragment; append properly encoded params.
    let (base, fragment) = match redirect_uri.split_once('#') {
        Some((b, f)) => (b, format!("#{f}")),
        None => (redirect_uri, String::new()),
    };
    let mut ser = form_urlencoded::Serializer::new(String::new());
    ser.append_pair("code", &code);
    if let Some(state) = q.iter().find(|(k, _)| k == "state").map(|(_, v)| v) {
        ser.append_pair("state", state);
    }
    let sep = if !base.contains('?') {
        "?"
    } else if base.ends_with('?') || base.ends_with('&') {
        ""
    } else {
        "&"
    };
    Ok(Reply::redirect(format!(
        "{base}{sep}{}{fragment}",
        ser.finish()
    )))
}

/// An access and a refresh token for `portal`, as an install of the app
/// with the default scopes would get them (fleets seeded in bulk).
pub(crate) fn grant(st: &mut State, portal: u64, now: DateTime<Utc>) -> (String, String) {
    let scopes = DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect();
    let reply = issue(st, portal, scopes, now, None);
    let field = |k: &str| {
        reply
            .body
            .as_ref()
            .and_then(|b| b.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    (field("access_token"), field("refresh_token"))
}

/// The portal an OAuth-endpoint request concerns, known before handling it (faults, stats).
pub(crate) fn portal_hint(st: &State, ep: &Endpoint, body: &[u8]) -> Option<u64> {
    match ep {
        Endpoint::Token => {
            let f = form(body);
            match f.get("grant_type").map(String::as_str) {
                Some("authorization_code") => f
                    .get("code")
                    .and_then(|c| st.codes.get(c))
                    .map(|c| c.portal),
                Some("refresh_token") => f
                    .get("refresh_token")
                    .and_then(|t| st.refresh_tokens.get(t))
                    .map(|r| r.portal),
                _ => None,
            }
        }
        Endpoint::Introspect | Endpoint::Revoke => {
            let f = form(body);
            let t = token_param(&f)?;
            st.tokens
                .get(t)
                .map(|r| r.portal)
                .or_else(|| st.refresh_tokens.get(t).map(|r| r.portal))
        }
        Endpoint::AccessTokenMeta(t) => st.tokens.get(t).map(|r| r.portal),
        Endpoint::RefreshTokenMeta(t) | Endpoint::RefreshTokenDelete(t) => {
            st.refresh_tokens.get(t).map(|r| r.portal)
        }
        _ => None,
    }
}

fn token_param(f: &HashMap<String, String>) -> Option<&str> {
    ["token", "refresh_token", "access_token"]
        .iter()
        .find_map(|k| f.get(*k))
        .map(String::as_str)
        .filter(|t| !t.is_empty())
}

pub(crate) fn handle(st: &mut State, ep: &Endpoint, body: &[u8], now: DateTime<Utc>) -> ApiResult {
    match ep {
        Endpoint::Token => {
            let style = st.cfg.oauth_error_style;
            token(st, &form(body), now).map_err(|e| restyle(e, style))
        }
        Endpoint::Introspect => introspect(st, &form(body), now),
        Endpoint::Revoke => revoke(st, &form(body)),
        Endpoint::AccessTokenMeta(t) => access_meta(st, t, now),
        Endpoint::RefreshTokenMeta(t) => refresh_meta(st, t),
        Endpoint::RefreshTokenDelete(t) => match st.refresh_tokens.get_mut(t) {
            Some(r) if !r.revoked => {
                r.revoked = true;
                Ok(Reply::empty(StatusCode::NO_CONTENT))
            }
            _ => Err(ApiError::not_found("Refresh token not found")),
        },
        _ => Err(ApiError::route_not_found(ep.op())),
    }
}

// GUESS: the `status` values BAD_CLIENT_ID / BAD_CLIENT_SECRET / BAD_REDIRECT_URI /
// BAD_GRANT_TYPE are modelled on HubSpot's documented BAD_REFRESH_TOKEN / EXPIRED_AUTH_CODE.
fn check_client(st: &State, f: &HashMap<String, String>) -> Result<(), ApiError> {
    if f.get("client_id") != Some(&st.cfg.client_id) {
        return Err(ApiError::oauth(
            "invalid_client",
            "BAD_CLIENT_ID",
            "missing or invalid client_id",
        ));
    }
    if f.get("client_secret") != Some(&st.cfg.client_secret) {
        return Err(ApiError::oauth(
            "invalid_client",
            "BAD_CLIENT_SECRET",
            "missing or invalid client_secret",
        ));
    }
    Ok(())
}

fn token(st: &mut State, f: &HashMap<String, String>, now: DateTime<Utc>) -> ApiResult {
    match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            check_client(st, f)?;
            let code = f.get("code").map(String::as_str).unwrap_or("");
            let expired = |d: &str| ApiError::oauth("invalid_grant", "EXPIRED_AUTH_CODE", d);
            let Some(rec) = st.codes.get(code) else {
                return Err(expired("auth code not found, already used or expired"));
            };
            if rec.expires_at <= now {
                st.codes.remove(code);
                return Err(expired("auth code is expired"));
            }
            if f.get("redirect_uri") != Some(&rec.redirect_uri) {
                return Err(ApiError::oauth(
                    "invalid_grant",
                    "BAD_REDIRECT_URI",
                    "redirect_uri does not match the one used to get the auth code",
                ));
            }
            let Some(rec) = st.codes.remove(code) else {
                return Err(expired("auth code not found"));
            };
            if !st.portals.contains_key(&rec.portal) {
                return Err(expired("the portal of this auth code no longer exists"));
            }
            Ok(issue(st, rec.portal, rec.scopes, now, None))
        }
        Some("refresh_token") => {
            check_client(st, f)?;
            let rt = f.get("refresh_token").map(String::as_str).unwrap_or("");
            let bad = || {
                ApiError::oauth(
                    "invalid_grant",
                    "BAD_REFRESH_TOKEN",
                    "missing or unknown refresh token",
                )
            };
            let rotate = st.cfg.rotate_refresh_tokens;
            let (portal, scopes) = match st.refresh_tokens.get_mut(rt) {
                Some(r) if !r.revoked => {
                    // Rotation: the used refresh token dies now.
                    if rotate {
                        r.revoked = true;
                    }
                    (r.portal, r.scopes.clone())
                }
                _ => return Err(bad()),
            };
            if !st.portals.contains_key(&portal) {
                return Err(bad());
            }
            // Without rotation the answer carries the refresh token that was used.
            let keep = (!rotate).then(|| rt.to_string());
            Ok(issue(st, portal, scopes, now, keep))
        }
        _ => Err(ApiError::oauth(
            "unsupported_grant_type",
            "BAD_GRANT_TYPE",
            "grant_type must be authorization_code or refresh_token",
        )),
    }
}

/// Rewords a token endpoint refusal in the configured style.
fn restyle(mut e: ApiError, style: OAuthErrorStyle) -> ApiError {
    let Some(obj) = e.body.as_object_mut() else {
        return e;
    };
    if !obj.contains_key("error") {
        return e;
    }
    match style {
        OAuthErrorStyle::OAuth2 => {}
        OAuthErrorStyle::StatusOnly => {
            obj.remove("error");
            obj.remove("error_description");
        }
        OAuthErrorStyle::InvalidRequest => {
            obj.insert("error".into(), json!("invalid_request"));
            obj.remove("error_description");
        }
    }
    e
}

fn issue(
    st: &mut State,
    portal: u64,
    scopes: Vec<String>,
    now: DateTime<Utc>,
    refresh: Option<String>,
) -> Reply {
    // Every OAuth grant (code exchange, refresh, `Emulator::grant_oauth_tokens`) is an install
    // of the public app: the portal gets webhooks from now on.
    if let Some(p) = st.portals.get_mut(&portal) {
        p.app_installed = true;
    }
    let ttl = st.cfg.token_ttl;
    let access = format!("emu-at-na1-{}", rand_hex(48));
    let refresh = refresh.unwrap_or_else(|| format!("na1-{}", uuid()));
    let far = now + chrono::Duration::days(3650);
    let expires_at = chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(far);
    st.tokens.insert(
        access.clone(),
        TokenRec {
            portal,
            kind: TokenKind::OAuth,
            scopes: scopes.clone(),
            expires_at: Some(expires_at),
            revoked: false,
        },
    );
    st.refresh_tokens.insert(
        refresh.clone(),
        RefreshRec {
            portal,
            scopes: scopes.clone(),
            revoked: false,
        },
    );
    let mut answer = json!({
        "token_type": "bearer",
        "token_use": "access_token",
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": ttl.as_secs(),
        "hub_id": portal,
        "scopes": scopes,
    });
    if st.cfg.omit_hub_id {
        if let Some(obj) = answer.as_object_mut() {
            obj.remove("hub_id");
        }
    }
    Reply::ok(answer)
}

fn live_access<'a>(st: &'a State, t: &str, now: DateTime<Utc>) -> Option<&'a TokenRec> {
    st.tokens.get(t).filter(|r| {
        r.kind == TokenKind::OAuth && !r.revoked && r.expires_at.is_some_and(|e| e > now)
    })
}

fn expires_in(r: &TokenRec, now: DateTime<Utc>) -> i64 {
    r.expires_at
        .map(|e| (e - now).num_seconds().max(0))
        .unwrap_or(0)
}

fn access_meta(st: &State, t: &str, now: DateTime<Utc>) -> ApiResult {
    // GUESS: HubSpot's exact answer for an unknown/expired token here; 404 OBJECT_NOT_FOUND.
    let r = live_access(st, t, now)
        .ok_or_else(|| ApiError::not_found("The access token is invalid, expired or revoked"))?;
    Ok(Reply::ok(json!({
        "token": t,
        "user": user_email(),
        "hub_domain": hub_domain(r.portal),
        "scopes": r.scopes,
        "scope_to_scope_group_pks": [],
        "trial_scopes": [],
        "trial_scope_to_scope_group_pks": [],
        "hub_id": r.portal,
        "app_id": st.cfg.app_id,
        "expires_in": expires_in(r, now),
        "user_id": 1,
        "token_type": "access",
    })))
}

fn refresh_meta(st: &State, t: &str) -> ApiResult {
    let r = st
        .refresh_tokens
        .get(t)
        .filter(|r| !r.revoked)
        .ok_or_else(|| ApiError::not_found("The refresh token is invalid or revoked"))?;
    Ok(Reply::ok(json!({
        "token": t,
        "user": user_email(),
        "hub_domain": hub_domain(r.portal),
        "scopes": r.scopes,
        "hub_id": r.portal,
        "client_id": st.cfg.client_id,
        "user_id": 1,
        "token_type": "refresh",
    })))
}

fn introspect(st: &State, f: &HashMap<String, String>, now: DateTime<Utc>) -> ApiResult {
    check_client(st, f)?;
    let Some(t) = token_param(f) else {
        return Err(ApiError::oauth(
            "invalid_request",
            "BAD_REQUEST",
            "token is required",
        ));
    };
    let hint = f.get("token_type_hint").map(String::as_str);
    let common = |portal: u64, scopes: &[String], token_use: &str| -> Value {
        json!({
            "active": true,
            "hub_id": portal,
            "user_id": 1,
            "client_id": st.cfg.client_id,
            "app_id": st.cfg.app_id,
            "user": user_email(),
            "hub_domain": hub_domain(portal),
            "scopes": scopes,
            "token_use": token_use,
            "token_type": "bearer",
            "is_private_distribution": false,
        })
    };
    let as_access = || {
        live_access(st, t, now).map(|r| {
            let mut v = common(r.portal, &r.scopes, "access_token");
            v["expires_in"] = json!(expires_in(r, now));
            v
        })
    };
    let as_refresh = || {
        st.refresh_tokens
            .get(t)
            .filter(|r| !r.revoked)
            .map(|r| common(r.portal, &r.scopes, "refresh_token"))
    };
    let found = if hint == Some("refresh_token") {
        as_refresh().or_else(as_access)
    } else {
        as_access().or_else(as_refresh)
    };
    Ok(Reply::ok(found.unwrap_or_else(|| json!({"active": false}))))
}

/// RFC 7009 style: 200 whatever the token (unknown tokens are not an error).
fn revoke(st: &mut State, f: &HashMap<String, String>) -> ApiResult {
    check_client(st, f)?;
    if let Some(t) = token_param(f) {
        if let Some(r) = st.refresh_tokens.get_mut(t) {
            r.revoked = true;
        }
        if let Some(r) = st.tokens.get_mut(t) {
            if r.kind == TokenKind::OAuth {
                r.revoked = true;
            }
        }
    }
    Ok(Reply::empty(StatusCode::OK))
}

/// `GET /account-info/v3/details`: how a service-key client learns its portal id.
pub(crate) fn account_details(_st: &State, ctx: &Ctx) -> ApiResult {
    Ok(Reply::ok(json!({
        "portalId": ctx.portal,
        "accountType": "STANDARD",
        "timeZone": "Etc/UTC",
        "companyCurrency": "EUR",
        "additionalCurrencies": [],
        "utcOffset": "+00:00",
        "utcOffsetMilliseconds": 0,
        "uiDomain": "app.hubspot.com",
        "dataHostingLocation": "na1",
    })))
}
