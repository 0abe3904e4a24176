//! The access tokens of one portal worker's Spots: static tokens as stored,
//! OAuth tokens refreshed shortly before they expire or once after a 401.
//! Only the portal's worker refreshes, so one refresh is in flight at most.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{DeliverContext, DeliverError};
use crate::failpoints::{crash_point, TOKEN_REFRESHED};
use crate::internal_events::TokenRefreshed;
use crate::store::{self, AuthKind, LiveIntegration};

/// OAuth access tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// An activation: one connect of one Spot.
pub(super) type Activation = (i64, i64);

#[derive(Clone)]
struct OAuthTokens {
    access: String,
    refresh: String,
    expires_at: DateTime<Utc>,
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
            return Ok(ctx.sealer.open(&spot.access_token_enc)?);
        }
        let key = (spot.spot_id, spot.activation);
        let current = match self.refreshed.get(&key) {
            Some(t) => t.clone(),
            None => OAuthTokens {
                access: ctx.sealer.open(&spot.access_token_enc)?,
                refresh: match &spot.refresh_token_enc {
                    Some(r) => ctx.sealer.open(r)?,
                    None => String::new(),
                },
                expires_at: spot.expires_at.unwrap_or_else(Utc::now),
            },
        };
        let due = current.expires_at - REFRESH_MARGIN < Utc::now();
        if !(due || self.force_refresh) {
            return Ok(current.access);
        }
        let oauth = ctx.oauth.as_ref().ok_or(DeliverError::NoOAuthApp)?;
        let result = oauth.refresh(&ctx.client, &current.refresh).await;
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
            expires_at: tokens.expires_at(),
        };
        // The refresh token may have rotated: store both every time.
        store::store_tokens(
            &*ctx.db.client().await?,
            spot.spot_id,
            &ctx.sealer.seal(&refreshed.access),
            &ctx.sealer.seal(&refreshed.refresh),
            refreshed.expires_at,
        )
        .await?;
        if self.force_refresh {
            self.force_refresh = false;
            self.refreshed_after_401 = true;
        }
        self.refreshed.insert(key, refreshed.clone());
        Ok(refreshed.access)
    }
}
