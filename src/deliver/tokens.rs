//! The access tokens of one portal worker's Spots: static tokens as stored,
//! OAuth tokens refreshed shortly before they expire or once after a 401,
//! when a round has something to send. Only the Spot's worker refreshes, so
//! one refresh per Spot is in flight at most, and `REFRESHES_IN_FLIGHT` for
//! the fleet.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{DeliverContext, DeliverError};
use crate::failpoints::{crash_point, TOKEN_REFRESHED};
use crate::internal_events::TokenRefreshed;
use crate::store::secrets::TokenSlot;
use crate::store::{self, AuthKind, LiveIntegration};

/// OAuth access tokens are refreshed at most this long before they expire…
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// …and, for short-lived tokens, when a third of their lifetime is left, so
/// that a token is refreshed once per lifetime, never on every call.
fn refresh_margin(issued_at: Option<DateTime<Utc>>, expires_at: DateTime<Utc>) -> chrono::Duration {
    let cap = chrono::Duration::from_std(REFRESH_MARGIN).unwrap_or_default();
    match issued_at {
        Some(issued) if issued < expires_at => cap.min((expires_at - issued) / 3),
        _ => cap,
    }
}

/// Whether a token issued at `issued_at` and expiring at `expires_at` is due
/// for a refresh at `now`.
fn refresh_due(
    issued_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    expires_at - refresh_margin(issued_at, expires_at) <= now
}

/// An activation: one connect of one Spot.
pub(super) type Activation = (i64, i64);

#[derive(Clone)]
struct OAuthTokens {
    access: String,
    refresh: String,
    issued_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    /// Refreshed but not yet stored.
    unsaved: bool,
}

/// Tokens refreshed here, until the supervisor's view of the integrations
/// catches up, and the one-refresh-per-401 rule.
#[derive(Default)]
pub(super) struct TokenCache {
    refreshed: HashMap<Activation, OAuthTokens>,
    /// A 401 asked for a refresh before the next call.
    force_refresh: bool,
    /// The token was refreshed because of a 401 and no success followed yet:
    /// a second 401 fails the integration.
    refreshed_after_401: bool,
}

impl TokenCache {
    /// Asks for a refresh before the next call (a 401).
    pub(super) fn force_refresh(&mut self) {
        self.force_refresh = true;
    }

    /// Whether a 401 already earned its refresh.
    pub(super) fn refreshed_after_401(&self) -> bool {
        self.refreshed_after_401
    }

    /// A call succeeded with the current token. Returns whether a refresh after a 401 was pending.
    pub(super) fn succeeded(&mut self) -> bool {
        std::mem::take(&mut self.refreshed_after_401)
    }

    /// The access token for `spot`'s calls, refreshed when near expiry.
    pub(super) async fn access_token(
        &mut self,
        ctx: &DeliverContext,
        spot: &LiveIntegration,
    ) -> Result<String, DeliverError> {
        if spot.credentials_kind == AuthKind::Token {
            return Ok(ctx
                .sealer
                .open(&spot.access_token_enc, TokenSlot::Access(spot.spot_id))?);
        }
        let key = (spot.spot_id, spot.activation);
        let current = match self.refreshed.get(&key) {
            Some(t) => t.clone(),
            None => OAuthTokens {
                access: ctx
                    .sealer
                    .open(&spot.access_token_enc, TokenSlot::Access(spot.spot_id))?,
                refresh: match &spot.refresh_token_enc {
                    Some(r) => ctx.sealer.open(r, TokenSlot::Refresh(spot.spot_id))?,
                    None => String::new(),
                },
                issued_at: spot.issued_at,
                expires_at: spot.expires_at.unwrap_or_else(Utc::now),
                unsaved: false,
            },
        };
        if current.unsaved {
            // Refreshed here, but the database failed to take it: store it
            // now, before its access token goes out again.
            self.save(ctx, spot.spot_id, key, &current).await?;
        }
        let due = refresh_due(current.issued_at, current.expires_at, Utc::now());
        if !(due || self.force_refresh) {
            return Ok(current.access);
        }
        if self.force_refresh {
            // A 401 earns one refresh, counted when tried, not when it works:
            // a 401 from the refresh itself then fails the Spot.
            self.force_refresh = false;
            self.refreshed_after_401 = true;
        }
        let oauth = ctx.oauth.as_ref().ok_or(DeliverError::NoOAuthApp)?;
        // Few refreshes at once across the fleet: after a restart with
        // thousands of tokens due, they spread out instead of hitting
        // HubSpot's OAuth endpoint together (the permit is never closed).
        let permit = ctx.refreshes.acquire().await.ok();
        let result = oauth.refresh(&ctx.client, &current.refresh).await;
        drop(permit);
        TokenRefreshed {
            spot_id: spot.spot_id,
            ok: result.is_ok(),
        }
        .emit(&ctx.metrics);
        let tokens = result?;
        crash_point(TOKEN_REFRESHED);
        let refreshed = OAuthTokens {
            access: tokens.access_token.clone(),
            refresh: tokens.refresh_token.clone(),
            issued_at: Some(Utc::now()),
            expires_at: tokens.expires_at(),
            unsaved: true,
        };
        let rotated = refreshed.refresh != current.refresh;
        // Kept here first: if the store fails, the next round stores these
        // (a rotated refresh token is never thrown away).
        self.refreshed.insert(key, refreshed.clone());
        if let Err(e) = self.save(ctx, spot.spot_id, key, &refreshed).await {
            if rotated {
                ctx.metrics.refresh_tokens_lost.inc();
                tracing::error!(
                    spot_id = spot.spot_id,
                    error = %e,
                    "HubSpot rotated the refresh token and it could not be stored yet; \
                     it is kept in memory and stored on the next round (lost if the process dies first)"
                );
            }
            return Err(e);
        }
        Ok(refreshed.access)
    }

    /// Stores refreshed tokens (both: the refresh token may have rotated).
    async fn save(
        &mut self,
        ctx: &DeliverContext,
        spot_id: i64,
        key: Activation,
        tokens: &OAuthTokens,
    ) -> Result<(), DeliverError> {
        store::store_tokens(
            &*ctx.db.client().await?,
            spot_id,
            key.1,
            &ctx.sealer.seal(&tokens.access, TokenSlot::Access(spot_id)),
            &ctx.sealer
                .seal(&tokens.refresh, TokenSlot::Refresh(spot_id)),
            tokens.expires_at,
        )
        .await?;
        if let Some(t) = self.refreshed.get_mut(&key) {
            t.unsaved = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).expect("valid time")
    }

    #[test]
    fn a_long_lived_token_is_refreshed_five_minutes_before_expiry() {
        let (issued, expires) = (Some(at(0)), at(1800));
        assert!(!refresh_due(issued, expires, at(1499)));
        assert!(refresh_due(issued, expires, at(1500)));
    }

    #[test]
    fn a_short_lived_token_is_refreshed_once_per_lifetime() {
        // A 4-minute token: refreshed with 80 s left, not on every call.
        let (issued, expires) = (Some(at(0)), at(240));
        assert!(!refresh_due(issued, expires, at(0)));
        assert!(!refresh_due(issued, expires, at(159)));
        assert!(refresh_due(issued, expires, at(160)));
    }

    #[test]
    fn an_unknown_issue_time_keeps_the_five_minute_margin() {
        assert!(refresh_due(None, at(299), at(0)));
        assert!(!refresh_due(None, at(301), at(0)));
    }
}
