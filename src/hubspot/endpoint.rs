//! Every HubSpot path the sidecar calls, built in one place for the
//! configured API version (`HUBSPOT_API_VERSION`: a date such as `2026-03`,
//! or `v3` for the legacy paths), with the operation name its metrics carry.

/// The API version paths are built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiVersion {
    /// Date-versioned paths, e.g. `/crm/objects/2026-03/contacts`.
    Dated(String),
    /// The legacy `/crm/v3/...` paths.
    V3,
}

/// App Events exist in one date version only (their 2026-03 definitions); a
/// later CRM version still sends them there.
pub const APP_EVENTS_VERSION: &str = "2026-03";

/// The versions that exist for every API the sidecar calls (contacts,
/// properties, account-info, OAuth and App Events), per HubSpot's published
/// definitions; `config` refuses any other.
pub const KNOWN_VERSIONS: [&str; 3] = ["2026-03", "2026-09", "v3"];

impl ApiVersion {
    /// `v3`, or a date version (checked by `config` against `KNOWN_VERSIONS`).
    pub fn parse(v: &str) -> ApiVersion {
        if v == "v3" {
            ApiVersion::V3
        } else {
            ApiVersion::Dated(v.to_string())
        }
    }

    /// The path segment: the date, or `v3`.
    pub fn segment(&self) -> &str {
        match self {
            ApiVersion::Dated(v) => v,
            ApiVersion::V3 => "v3",
        }
    }
}

/// One HubSpot endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// The portal a token belongs to.
    AccountDetails,
    /// Contacts by e-mail (`idProperty`).
    ContactsBatchRead,
    /// Contacts created with `objectWriteTraceId`s.
    ContactsBatchCreate,
    /// Contacts updated by record id.
    ContactsBatchUpdate,
    /// One contact property group.
    PropertyGroup(&'a str),
    /// Contact property groups (create).
    PropertyGroups,
    /// Contact properties by name.
    PropertiesBatchRead,
    /// Contact properties created.
    PropertiesBatchCreate,
    /// One contact property (update).
    Property(&'a str),
    /// OAuth token grant (code and refresh).
    OAuthToken,
    /// OAuth refresh-token revocation.
    OAuthRevoke,
    /// App Events, a batch.
    AppEventsBatch,
    /// timeline-v3 event templates of an app (list).
    TimelineTemplates {
        /// The app.
        app_id: &'a str,
    },
    /// timeline-v3 event templates of an app (create).
    TimelineTemplateCreate {
        /// The app.
        app_id: &'a str,
    },
    /// One timeline-v3 event template.
    TimelineTemplate {
        /// The app.
        app_id: &'a str,
        /// The template.
        template_id: &'a str,
    },
    /// timeline-v3 events, a batch.
    TimelineEventsBatch,
}

impl Endpoint<'_> {
    /// The operation name of `hubspot_requests_total{operation}`.
    pub fn operation(&self) -> &'static str {
        match self {
            Endpoint::AccountDetails => "account.details",
            Endpoint::ContactsBatchRead => "contacts.batch_read",
            Endpoint::ContactsBatchCreate => "contacts.batch_create",
            Endpoint::ContactsBatchUpdate => "contacts.batch_update",
            Endpoint::PropertyGroup(_) => "properties.groups.read",
            Endpoint::PropertyGroups => "properties.groups.create",
            Endpoint::PropertiesBatchRead => "properties.batch_read",
            Endpoint::PropertiesBatchCreate => "properties.batch_create",
            Endpoint::Property(_) => "properties.update",
            Endpoint::OAuthToken => "oauth.token",
            Endpoint::OAuthRevoke => "oauth.revoke",
            Endpoint::AppEventsBatch => "app_events.batch",
            Endpoint::TimelineTemplates { .. } => "timeline.templates.list",
            Endpoint::TimelineTemplateCreate { .. } => "timeline.templates.create",
            Endpoint::TimelineTemplate { .. } => "timeline.templates.update",
            Endpoint::TimelineEventsBatch => "timeline.events.batch_create",
        }
    }

    /// The path (after the API base) for `version`.
    pub fn path(&self, version: &ApiVersion) -> String {
        let crm = |kind: &str, rest: &str| match version {
            ApiVersion::Dated(v) => format!("/crm/{kind}/{v}/contacts{rest}"),
            ApiVersion::V3 => format!("/crm/v3/{kind}/contacts{rest}"),
        };
        match self {
            Endpoint::AccountDetails => match version {
                ApiVersion::Dated(v) => format!("/account-info/{v}/details"),
                ApiVersion::V3 => "/account-info/v3/details".into(),
            },
            Endpoint::ContactsBatchRead => crm("objects", "/batch/read"),
            Endpoint::ContactsBatchCreate => crm("objects", "/batch/create"),
            Endpoint::ContactsBatchUpdate => crm("objects", "/batch/update"),
            Endpoint::PropertyGroup(name) => crm("properties", &format!("/groups/{name}")),
            Endpoint::PropertyGroups => crm("properties", "/groups"),
            Endpoint::PropertiesBatchRead => crm("properties", "/batch/read"),
            Endpoint::PropertiesBatchCreate => crm("properties", "/batch/create"),
            Endpoint::Property(name) => crm("properties", &format!("/{name}")),
            // OAuth v1 is deprecated from 2027-02-16: the legacy mode uses v3.
            Endpoint::OAuthToken => format!("/oauth/{}/token", version.segment()),
            Endpoint::OAuthRevoke => format!("/oauth/{}/token/revoke", version.segment()),
            // App Events: the date version where it exists; v4 (supported until
            // 2027-03-30) only for the legacy mode.
            Endpoint::AppEventsBatch => match version {
                ApiVersion::Dated(_) => {
                    format!("/integrators/timeline/{APP_EVENTS_VERSION}/events/batch")
                }
                ApiVersion::V3 => "/integrators/timeline/v4/events/batch".into(),
            },
            // timeline v3 has no date-versioned path.
            Endpoint::TimelineTemplates { app_id }
            | Endpoint::TimelineTemplateCreate { app_id } => {
                format!("/integrators/timeline/v3/{app_id}/event-templates")
            }
            Endpoint::TimelineTemplate {
                app_id,
                template_id,
            } => format!("/integrators/timeline/v3/{app_id}/event-templates/{template_id}"),
            Endpoint::TimelineEventsBatch => "/integrators/timeline/v3/events/batch/create".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_paths_follow_the_version() {
        let dated = ApiVersion::parse("2026-03");
        assert_eq!(
            Endpoint::ContactsBatchUpdate.path(&dated),
            "/crm/objects/2026-03/contacts/batch/update"
        );
        assert_eq!(
            Endpoint::ContactsBatchUpdate.path(&ApiVersion::V3),
            "/crm/v3/objects/contacts/batch/update"
        );
        assert_eq!(
            Endpoint::PropertyGroup("meltingspot").path(&dated),
            "/crm/properties/2026-03/contacts/groups/meltingspot"
        );
        assert_eq!(
            Endpoint::AccountDetails.path(&dated),
            "/account-info/2026-03/details"
        );
    }

    #[test]
    fn oauth_paths_follow_the_version() {
        let dated = ApiVersion::parse("2026-09");
        assert_eq!(Endpoint::OAuthToken.path(&dated), "/oauth/2026-09/token");
        assert_eq!(
            Endpoint::OAuthToken.path(&ApiVersion::V3),
            "/oauth/v3/token"
        );
        assert_eq!(
            Endpoint::OAuthRevoke.path(&ApiVersion::V3),
            "/oauth/v3/token/revoke"
        );
    }

    #[test]
    fn timeline_paths_follow_the_published_definitions() {
        let dated = ApiVersion::parse("2026-03");
        assert_eq!(
            Endpoint::TimelineTemplate {
                app_id: "42",
                template_id: "7"
            }
            .path(&dated),
            "/integrators/timeline/v3/42/event-templates/7"
        );
        assert_eq!(
            Endpoint::AppEventsBatch.path(&dated),
            "/integrators/timeline/2026-03/events/batch"
        );
        assert_eq!(
            Endpoint::AppEventsBatch.path(&ApiVersion::parse("2026-09")),
            "/integrators/timeline/2026-03/events/batch",
            "App Events have no 2026-09 version"
        );
        assert_eq!(
            Endpoint::AppEventsBatch.path(&ApiVersion::V3),
            "/integrators/timeline/v4/events/batch"
        );
    }
}
