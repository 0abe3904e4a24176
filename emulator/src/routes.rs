//! Maps method + path to an endpoint. Hand-written rather than an axum `Router` because HubSpot
//! serves the same operation under several path families (`/crm/v3/...` and date-versioned
//! `/crm/{objects|properties}/YYYY-MM/...`), and unknown routes/methods must still get
//! HubSpot-shaped JSON errors.

use axum::http::{Method, StatusCode};

use crate::errors::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    // OAuth (no bearer token)
    Authorize { portal: Option<u64> },
    Token,
    Introspect,
    Revoke,
    AccessTokenMeta(String),
    RefreshTokenMeta(String),
    RefreshTokenDelete(String),
    // Account
    AccountDetails,
    // Properties
    GroupsCreate,
    GroupsList,
    GroupsRead(String),
    GroupsUpdate(String),
    GroupsArchive(String),
    PropsCreate,
    PropsList,
    PropsRead(String),
    PropsUpdate(String),
    PropsArchive(String),
    PropsBatchCreate,
    PropsBatchRead,
    PropsBatchArchive,
    // Contacts
    ContactsBatchRead,
    ContactsBatchUpdate,
    ContactsBatchCreate,
    ContactsBatchUpsert,
    ContactsSearch,
    ContactsList,
    ContactsCreate,
    ContactsGet(String),
    ContactsUpdate(String),
    ContactsMerge,
    ContactsArchive(String),
    ContactsGdprDelete,
    // App Events v4
    AppEventCreate,
    AppEventBatch,
    // Timeline v3
    TemplatesCreate(String),
    TemplatesList(String),
    TemplatesGet(String, String),
    TemplatesUpdate(String, String),
    TemplatesDelete(String, String),
    TimelineEventCreate,
    TimelineEventBatch,
}

/// How a request is authenticated, limited and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `/oauth/authorize`: browser redirect, no faults, not counted.
    Open,
    /// OAuth token endpoints: client credentials or the token itself; faults apply; counted for
    /// the token's portal; not rate limited.
    OAuth,
    /// Bearer-token API call, subject to the ten-secondly limit.
    Api,
    /// CRM search: bearer token, separate secondly limit, no rate-limit headers.
    Search,
    /// Developer API key (`?hapikey=`), app-level.
    Developer,
}

impl Endpoint {
    pub fn access(&self) -> Access {
        use Endpoint::*;
        match self {
            Authorize { .. } => Access::Open,
            Token
            | Introspect
            | Revoke
            | AccessTokenMeta(_)
            | RefreshTokenMeta(_)
            | RefreshTokenDelete(_) => Access::OAuth,
            ContactsSearch => Access::Search,
            TemplatesCreate(_) | TemplatesList(_) | TemplatesGet(..) | TemplatesUpdate(..)
            | TemplatesDelete(..) => Access::Developer,
            _ => Access::Api,
        }
    }

    /// Stable operation name used in `RequestStats`.
    pub fn op(&self) -> &'static str {
        use Endpoint::*;
        match self {
            Authorize { .. } => "oauth.authorize",
            Token => "oauth.token",
            Introspect | AccessTokenMeta(_) | RefreshTokenMeta(_) => "oauth.introspect",
            Revoke | RefreshTokenDelete(_) => "oauth.revoke",
            AccountDetails => "account.details",
            GroupsCreate => "properties.groups.create",
            GroupsList => "properties.groups.list",
            GroupsRead(_) => "properties.groups.read",
            GroupsUpdate(_) => "properties.groups.update",
            GroupsArchive(_) => "properties.groups.archive",
            PropsCreate => "properties.create",
            PropsList => "properties.list",
            PropsRead(_) => "properties.read",
            PropsUpdate(_) => "properties.update",
            PropsArchive(_) => "properties.archive",
            PropsBatchCreate => "properties.batch_create",
            PropsBatchRead => "properties.batch_read",
            PropsBatchArchive => "properties.batch_archive",
            ContactsBatchRead => "contacts.batch_read",
            ContactsBatchUpdate => "contacts.batch_update",
            ContactsBatchCreate => "contacts.batch_create",
            ContactsBatchUpsert => "contacts.batch_upsert",
            ContactsSearch => "contacts.search",
            ContactsList => "contacts.list",
            ContactsCreate => "contacts.create",
            ContactsGet(_) => "contacts.get",
            ContactsUpdate(_) => "contacts.update",
            ContactsMerge => "contacts.merge",
            ContactsArchive(_) => "contacts.archive",
            ContactsGdprDelete => "contacts.gdpr_delete",
            AppEventCreate => "app_events.create",
            AppEventBatch => "app_events.batch",
            TemplatesCreate(_) => "timeline.templates.create",
            TemplatesList(_) | TemplatesGet(..) => "timeline.templates.list",
            TemplatesUpdate(..) => "timeline.templates.update",
            TemplatesDelete(..) => "timeline.templates.delete",
            TimelineEventCreate => "timeline.events.create",
            TimelineEventBatch => "timeline.events.batch_create",
        }
    }

    /// The app id in a developer (template) path.
    pub fn app_id(&self) -> Option<&str> {
        use Endpoint::*;
        match self {
            TemplatesCreate(a) | TemplatesList(a) => Some(a),
            TemplatesGet(a, _) | TemplatesUpdate(a, _) | TemplatesDelete(a, _) => Some(a),
            _ => None,
        }
    }
}

/// CRM (contacts, properties) and account-info versions that exist.
const CRM_VERSIONS: [&str; 3] = ["2025-09", "2026-03", "2026-09"];
/// OAuth's date versions (there is no 2025-09).
const OAUTH_VERSIONS: [&str; 2] = ["2026-03", "2026-09"];
/// App Events' date versions.
const APP_EVENT_VERSIONS: [&str; 1] = ["2026-03"];

/// A date version that HubSpot publishes for the CRM APIs; any other answers 404.
pub(crate) fn is_crm_version(s: &str) -> bool {
    CRM_VERSIONS.contains(&s)
}

fn one(method: &Method, want: Method, ep: Endpoint) -> Result<Endpoint, ApiError> {
    if *method == want {
        Ok(ep)
    } else {
        Err(ApiError::method_not_allowed())
    }
}

pub(crate) fn classify(method: &Method, segs: &[String], path: &str) -> Result<Endpoint, ApiError> {
    use Endpoint::*;
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = |ep| one(method, Method::GET, ep);
    let post = |ep| one(method, Method::POST, ep);
    let oauth_ver = |v: &str| v == "v1" || v == "v3" || OAUTH_VERSIONS.contains(&v);
    let oauth_v3_or_date = |v: &str| v == "v3" || OAUTH_VERSIONS.contains(&v);
    let v3_or_date = |v: &str| v == "v3" || is_crm_version(v);
    match s.as_slice() {
        ["oauth", "authorize"] => get(Authorize { portal: None }),
        ["oauth", p, "authorize"] => match p.parse::<u64>() {
            Ok(id) => get(Authorize { portal: Some(id) }),
            Err(_) => Err(ApiError::route_not_found(path)),
        },
        ["oauth", v, "token"] if oauth_ver(v) => post(Token),
        ["oauth", v, "token", "introspect"] if oauth_v3_or_date(v) => post(Introspect),
        ["oauth", v, "token", "revoke"] if oauth_v3_or_date(v) => post(Revoke),
        ["oauth", "v1", "access-tokens", t] => get(AccessTokenMeta(t.to_string())),
        ["oauth", "v1", "refresh-tokens", t] => match *method {
            Method::GET => Ok(RefreshTokenMeta(t.to_string())),
            Method::DELETE => Ok(RefreshTokenDelete(t.to_string())),
            _ => Err(ApiError::method_not_allowed()),
        },
        ["account-info", v, "details"] if v3_or_date(v) => get(AccountDetails),
        ["crm", "v3", "properties", obj, rest @ ..] => properties(method, obj, rest, path),
        ["crm", "properties", v, obj, rest @ ..] if is_crm_version(v) => {
            properties(method, obj, rest, path)
        }
        ["crm", "v3", "objects", obj, rest @ ..] => objects(method, obj, rest, path),
        ["crm", "objects", v, obj, rest @ ..] if is_crm_version(v) => {
            objects(method, obj, rest, path)
        }
        ["crm", "v3", "timeline", "events"] | ["integrators", "timeline", "v3", "events"] => {
            post(TimelineEventCreate)
        }
        ["crm", "v3", "timeline", "events", "batch", "create"]
        | ["integrators", "timeline", "v3", "events", "batch", "create"] => {
            post(TimelineEventBatch)
        }
        ["crm", "v3", "timeline", app, "event-templates", rest @ ..]
        | ["integrators", "timeline", "v3", app, "event-templates", rest @ ..] => {
            templates(method, app, rest, path)
        }
        // App Events: v4 (documented, until 2027-03-30) and the published date versions.
        ["integrators", "timeline", v, "events"]
            if *v == "v4" || APP_EVENT_VERSIONS.contains(v) =>
        {
            post(AppEventCreate)
        }
        ["integrators", "timeline", v, "events", "batch"]
            if *v == "v4" || APP_EVENT_VERSIONS.contains(v) =>
        {
            post(AppEventBatch)
        }
        _ => Err(ApiError::route_not_found(path)),
    }
}

fn check_object_type(obj: &str) -> Result<(), ApiError> {
    if obj == "contacts" || obj == "contact" || obj == "0-1" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            format!("Unable to infer object type from: {obj} (the emulator models contacts only)"),
        ))
    }
}

fn properties(method: &Method, obj: &str, rest: &[&str], path: &str) -> Result<Endpoint, ApiError> {
    use Endpoint::*;
    check_object_type(obj)?;
    let m = method.clone();
    let r = match (rest, m) {
        ([], Method::GET) => PropsList,
        ([], Method::POST) => PropsCreate,
        (["groups"], Method::GET) => GroupsList,
        (["groups"], Method::POST) => GroupsCreate,
        (["groups", n], Method::GET) => GroupsRead(n.to_string()),
        (["groups", n], Method::PATCH) => GroupsUpdate(n.to_string()),
        (["groups", n], Method::DELETE) => GroupsArchive(n.to_string()),
        (["batch", "create"], Method::POST) => PropsBatchCreate,
        (["batch", "read"], Method::POST) => PropsBatchRead,
        (["batch", "archive"], Method::POST) => PropsBatchArchive,
        ([n], Method::GET) if *n != "batch" => PropsRead(n.to_string()),
        ([n], Method::PATCH) => PropsUpdate(n.to_string()),
        ([n], Method::DELETE) => PropsArchive(n.to_string()),
        ([] | ["groups"] | ["groups", _] | ["batch", _] | [_], _) => {
            return Err(ApiError::method_not_allowed())
        }
        _ => return Err(ApiError::route_not_found(path)),
    };
    Ok(r)
}

fn objects(method: &Method, obj: &str, rest: &[&str], path: &str) -> Result<Endpoint, ApiError> {
    use Endpoint::*;
    check_object_type(obj)?;
    let r = match (rest, method.clone()) {
        ([], Method::GET) => ContactsList,
        ([], Method::POST) => ContactsCreate,
        (["batch", "read"], Method::POST) => ContactsBatchRead,
        (["batch", "update"], Method::POST) => ContactsBatchUpdate,
        (["batch", "create"], Method::POST) => ContactsBatchCreate,
        (["batch", "upsert"], Method::POST) => ContactsBatchUpsert,
        (["search"], Method::POST) => ContactsSearch,
        (["merge"], Method::POST) => ContactsMerge,
        (["gdpr-delete"], Method::POST) => ContactsGdprDelete,
        ([id], Method::GET) => ContactsGet(id.to_string()),
        ([id], Method::PATCH) => ContactsUpdate(id.to_string()),
        ([id], Method::DELETE) => ContactsArchive(id.to_string()),
        ([] | ["batch", _] | [_], _) => return Err(ApiError::method_not_allowed()),
        _ => return Err(ApiError::route_not_found(path)),
    };
    Ok(r)
}

fn templates(method: &Method, app: &str, rest: &[&str], path: &str) -> Result<Endpoint, ApiError> {
    use Endpoint::*;
    let a = app.to_string();
    let r = match (rest, method.clone()) {
        ([], Method::GET) => TemplatesList(a),
        ([], Method::POST) => TemplatesCreate(a),
        ([id], Method::GET) => TemplatesGet(a, id.to_string()),
        ([id], Method::PUT) => TemplatesUpdate(a, id.to_string()),
        ([id], Method::DELETE) => TemplatesDelete(a, id.to_string()),
        ([] | [_], _) => return Err(ApiError::method_not_allowed()),
        _ => return Err(ApiError::route_not_found(path)),
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(m: Method, p: &str) -> Result<Endpoint, ApiError> {
        let segs: Vec<String> = p
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        classify(&m, &segs, p)
    }

    #[test]
    fn both_path_families() {
        assert_eq!(
            c(Method::POST, "/crm/v3/objects/contacts/batch/read").ok(),
            Some(Endpoint::ContactsBatchRead)
        );
        assert_eq!(
            c(Method::POST, "/crm/objects/2026-03/contacts/batch/read").ok(),
            Some(Endpoint::ContactsBatchRead)
        );
        assert_eq!(
            c(Method::GET, "/crm/properties/2026-09/contacts/groups").ok(),
            Some(Endpoint::GroupsList)
        );
        assert_eq!(
            c(Method::POST, "/oauth/2026-03/token/introspect").ok(),
            Some(Endpoint::Introspect)
        );
        assert!(c(Method::POST, "/crm/objects/v9/contacts/batch/read").is_err());
        assert_eq!(
            c(Method::POST, "/crm/objects/2026-03/contacts/merge").ok(),
            Some(Endpoint::ContactsMerge)
        );
        assert_eq!(
            c(Method::POST, "/crm/v3/objects/contacts/gdpr-delete").ok(),
            Some(Endpoint::ContactsGdprDelete)
        );
        assert_eq!(
            c(Method::DELETE, "/crm/v3/objects/contacts/5001").ok(),
            Some(Endpoint::ContactsArchive("5001".into()))
        );
        assert!(c(Method::GET, "/crm/v3/objects/contacts/batch/read").is_err());
        assert_eq!(
            c(Method::GET, "/crm/v3/properties/contacts/meltingspot_bio").ok(),
            Some(Endpoint::PropsRead("meltingspot_bio".into()))
        );
    }
}
