//! What a delivery error means (SPEC §4.7), as one pure function: the
//! worker carries the disposition out (sleep, refresh, fail the Spot, or
//! back off and run the failure clock), and this file says which.

use std::time::Duration;

use super::DeliverError;
use crate::hubspot::HubSpotError;
use crate::internal_events::{FailCause, RetryCause};
use crate::store::AuthKind;

/// How long to wait after a 429 that named no Retry-After (the limiter
/// already treats the window as spent).
const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// What to do about a failed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// 429: wait this long; never a failure, rows are not postponed.
    FlowControl(Duration),
    /// 401 on an OAuth token not yet refreshed for it: refresh once, retry at once.
    Refresh,
    /// The credentials are refused or unusable: the Spot fails now.
    Fail(FailCause),
    /// Transient: back off, postpone the rows, and (HubSpot only) run the
    /// clock towards `failed`.
    Retry(RetryCause),
    /// Our properties are missing in HubSpot: ensure the schema again, then retry.
    Reinitialize,
    /// The Spot was reconnected or disconnected: this activation's worker stops.
    Stop,
}

/// Classifies `error` for a Spot authenticated by `auth`; `refreshed` says
/// whether its token was already refreshed after a 401.
pub fn classify(error: &DeliverError, auth: AuthKind, refreshed: bool) -> Disposition {
    match error {
        DeliverError::HubSpot(HubSpotError::RateLimited { retry_after, .. }) => {
            Disposition::FlowControl(retry_after.unwrap_or(RATE_LIMIT_PAUSE))
        }
        DeliverError::HubSpot(HubSpotError::Auth { status: 401, .. })
            if auth == AuthKind::OAuth && !refreshed =>
        {
            Disposition::Refresh
        }
        DeliverError::HubSpot(HubSpotError::Auth { .. }) | DeliverError::NoOAuthApp => {
            Disposition::Fail(FailCause::Auth)
        }
        // The sidecar's own keys, not the Spot's credentials: never a
        // failure of the Spot, never a mail to its admins.
        DeliverError::Decrypt(_) => Disposition::Retry(RetryCause::Configuration),
        DeliverError::Superseded | DeliverError::HubSpot(HubSpotError::Fenced) => Disposition::Stop,
        DeliverError::Db(_) | DeliverError::HubSpot(HubSpotError::FenceUnchecked(_)) => {
            Disposition::Retry(RetryCause::Database)
        }
        DeliverError::HubSpot(HubSpotError::SchemaMissing(_)) => Disposition::Reinitialize,
        DeliverError::HubSpot(HubSpotError::Rejected { .. } | HubSpotError::Transient(_)) => {
            Disposition::Retry(RetryCause::HubSpot)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DbError;

    fn auth(status: u16) -> DeliverError {
        DeliverError::HubSpot(HubSpotError::Auth {
            status,
            category: "EXPIRED_AUTHENTICATION".into(),
            message: "expired".into(),
        })
    }

    #[test]
    fn a_429_is_flow_control_with_its_retry_after() {
        let e = DeliverError::HubSpot(HubSpotError::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
            policy: "TEN_SECONDLY_ROLLING".into(),
        });
        assert_eq!(
            classify(&e, AuthKind::Token, false),
            Disposition::FlowControl(Duration::from_secs(2))
        );
        let e = DeliverError::HubSpot(HubSpotError::RateLimited {
            retry_after: None,
            policy: String::new(),
        });
        assert_eq!(
            classify(&e, AuthKind::OAuth, true),
            Disposition::FlowControl(RATE_LIMIT_PAUSE)
        );
    }

    #[test]
    fn a_401_earns_one_refresh_for_oauth_only() {
        assert_eq!(
            classify(&auth(401), AuthKind::OAuth, false),
            Disposition::Refresh
        );
        assert_eq!(
            classify(&auth(401), AuthKind::OAuth, true),
            Disposition::Fail(FailCause::Auth)
        );
        assert_eq!(
            classify(&auth(401), AuthKind::Token, false),
            Disposition::Fail(FailCause::Auth)
        );
    }

    #[test]
    fn a_403_and_unusable_credentials_fail_at_once() {
        assert_eq!(
            classify(&auth(403), AuthKind::OAuth, false),
            Disposition::Fail(FailCause::Auth)
        );
        assert_eq!(
            classify(&DeliverError::NoOAuthApp, AuthKind::OAuth, false),
            Disposition::Fail(FailCause::Auth)
        );
    }

    #[test]
    fn a_deleted_property_reinitializes_instead_of_dead_lettering() {
        let e = DeliverError::HubSpot(HubSpotError::SchemaMissing("meltingspot_bio".into()));
        assert_eq!(
            classify(&e, AuthKind::Token, false),
            Disposition::Reinitialize
        );
    }

    #[test]
    fn transient_failures_retry_and_only_hubspot_runs_the_clock() {
        let e = DeliverError::HubSpot(HubSpotError::Transient("HTTP 503".into()));
        assert_eq!(
            classify(&e, AuthKind::OAuth, false),
            Disposition::Retry(RetryCause::HubSpot)
        );
        let e = DeliverError::Db(DbError::Unavailable("pool timed out".into()));
        assert_eq!(
            classify(&e, AuthKind::OAuth, false),
            Disposition::Retry(RetryCause::Database)
        );
    }
}
