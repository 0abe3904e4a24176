//! Bearer-token authentication (the token decides the portal) and scope checks.

use axum::http::{header, HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::errors::{iso, ApiError};
use crate::routes::Endpoint;
use crate::state::{State, TokenKind};

#[derive(Clone, Debug)]
pub(crate) struct Authed {
    pub portal: u64,
    pub kind: TokenKind,
    pub scopes: Vec<String>,
}

/// A refused request, with the portal when the token was recognisable (for accounting).
pub(crate) struct AuthFail {
    pub err: ApiError,
    pub portal: Option<u64>,
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub(crate) fn resolve(
    st: &State,
    headers: &HeaderMap,
    now: DateTime<Utc>,
) -> Result<Authed, AuthFail> {
    let fail = |portal| AuthFail {
        err: ApiError::invalid_auth(),
        portal,
    };
    let token = bearer(headers).ok_or_else(|| fail(None))?;
    let rec = st.tokens.get(token).ok_or_else(|| fail(None))?;
    if rec.revoked || !st.portals.contains_key(&rec.portal) {
        return Err(fail(Some(rec.portal)));
    }
    if let Some(exp) = rec.expires_at {
        if now >= exp {
            let ago = (now - exp).num_seconds().max(0);
            return Err(AuthFail {
                err: ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "EXPIRED_AUTHENTICATION",
                    format!("The OAuth token used to make this call expired {ago} second(s) ago."),
                )
                // OBSERVED key "expire time"; the value format is a GUESS (ISO 8601).
                .with("context", json!({"expire time": [iso(exp)]})),
                portal: Some(rec.portal),
            });
        }
    }
    Ok(Authed {
        portal: rec.portal,
        kind: rec.kind,
        scopes: rec.scopes.clone(),
    })
}

/// HubSpot checks scopes per endpoint; the emulator uses a lenient version of the documented
/// requirements (write scopes imply read). Timeline calls also refuse non-OAuth tokens:
/// "developer API keys and private app access tokens cannot be used ... creating events".
pub(crate) fn check_scopes(a: &Authed, ep: &Endpoint) -> Result<(), ApiError> {
    use Endpoint::*;
    let has = |s: &str| a.scopes.iter().any(|x| x == s);
    const CONTACTS_READ: [&str; 2] = ["crm.objects.contacts.read", "crm.objects.contacts.write"];
    const CONTACTS_WRITE: [&str; 1] = ["crm.objects.contacts.write"];
    const SCHEMA_READ: [&str; 4] = [
        "crm.schemas.contacts.read",
        "crm.schemas.contacts.write",
        "crm.objects.contacts.read",
        "crm.objects.contacts.write",
    ];
    const SCHEMA_WRITE: [&str; 1] = ["crm.schemas.contacts.write"];
    let needed: &[&str] = match ep {
        AppEventCreate | AppEventBatch | TimelineEventCreate | TimelineEventBatch => {
            let timeline = a
                .scopes
                .iter()
                .any(|s| s == "timeline" || s.starts_with("timeline."));
            if a.kind != TokenKind::OAuth || !timeline {
                return Err(ApiError::missing_scopes(&["timeline"]));
            }
            if matches!(ep, TimelineEventCreate | TimelineEventBatch) {
                // Events land on contacts: any contacts scope (lenient).
                &CONTACTS_READ
            } else {
                return Ok(());
            }
        }
        ContactsBatchRead | ContactsSearch | ContactsList | ContactsGet(_) => &CONTACTS_READ,
        ContactsBatchUpdate | ContactsBatchCreate | ContactsBatchUpsert | ContactsCreate
        | ContactsUpdate(_) | ContactsMerge | ContactsArchive(_) | ContactsGdprDelete => {
            &CONTACTS_WRITE
        }
        GroupsList | GroupsRead(_) | PropsList | PropsRead(_) | PropsBatchRead => &SCHEMA_READ,
        GroupsCreate | GroupsUpdate(_) | GroupsArchive(_) | PropsCreate | PropsUpdate(_)
        | PropsArchive(_) | PropsBatchCreate | PropsBatchArchive => &SCHEMA_WRITE,
        _ => return Ok(()),
    };
    if needed.iter().any(|s| has(s)) {
        Ok(())
    } else {
        Err(ApiError::missing_scopes(needed))
    }
}
