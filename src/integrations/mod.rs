//! The integration use cases a Spot admin drives (SPEC §4): connect with a
//! token, start and complete OAuth, change settings, disconnect. Each rule of
//! the lifecycle is written here once; the HTTP handlers only parse the
//! request and turn the outcome into an answer.

use tracing::{info, warn};

use crate::deliver::{Fences, Wake};
use crate::hubspot::oauth::{OAuthApp, Tokens};
use crate::hubspot::ratelimit::Limiters;
use crate::hubspot::{HubSpotClient, HubSpotError};
use crate::store::{
    self,
    secrets::{Sealer, TokenSlot},
    AuthKind, Credentials, Db, DbError, IntegrationEvent, IntegrationView,
};
use crate::translate::{ActivitiesPatch, MarkerKey};

pub mod signed;

use signed::Purpose;

pub use crate::store::{ChangeSource, Status};

/// Why a use case did not happen; each maps to one HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    /// The Spot does not exist in MeltingSpot's database.
    #[error("spot {0} does not exist")]
    UnknownSpot(i64),
    /// The request cannot be carried out as asked; the text says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// HubSpot could not be reached or answered unexpectedly.
    #[error("{0}")]
    HubSpotUnavailable(String),
    /// The request comes from someone it is not for (an OAuth callback in
    /// another browser than the one that started it).
    #[error("{0}")]
    Forbidden(String),
    /// Our database failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// HubSpot refuses timeline events sent with static tokens (SPEC §9): the
/// one rule that ties activities to OAuth, for connect and settings alike.
fn activities_need_oauth(
    kind: Option<AuthKind>,
    activities_on: bool,
) -> Result<(), IntegrationError> {
    if activities_on && kind == Some(AuthKind::Token) {
        return Err(IntegrationError::Refused(
            "activities need an OAuth connection: HubSpot refuses timeline events sent with a \
             service key or private-app token; connect through OAuth, or turn the activity \
             categories off first"
                .into(),
        ));
    }
    Ok(())
}

/// What the use cases share.
#[derive(Clone)]
pub struct Integrations {
    /// The database.
    pub db: Db,
    /// Seals tokens at rest.
    pub sealer: Sealer,
    /// HubSpot's REST client.
    pub hubspot: HubSpotClient,
    /// The OAuth app, when configured.
    pub oauth: Option<OAuthApp>,
    /// Per-portal rate limiters, shared with delivery.
    pub limiters: Limiters,
    /// Per-Spot call fences: a connect or disconnect waits for the call in
    /// flight, and no call of the old activation follows it.
    pub fences: Fences,
    /// Signs the settings markers every change writes into the stream.
    pub markers: MarkerKey,
    /// Tells delivery when an integration changed or work was queued.
    pub wake: Wake,
}

impl Integrations {
    /// The integration as the admin API shows it.
    pub async fn view(&self, spot_id: i64) -> Result<IntegrationView, IntegrationError> {
        Ok(store::integration_view(&*self.db.client().await?, spot_id).await?)
    }

    /// The Spot's audit trail, newest first (`before`: an event id, for the next page).
    pub async fn events(
        &self,
        spot_id: i64,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<IntegrationEvent>, IntegrationError> {
        Ok(store::integration_events(&*self.db.client().await?, spot_id, before, limit).await?)
    }

    /// The Spot's dead letters, newest first (`before`: an id, for the next page).
    pub async fn dead_letters(
        &self,
        spot_id: i64,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<store::DeadLetter>, IntegrationError> {
        Ok(store::dead_letters(&*self.db.client().await?, spot_id, before, limit).await?)
    }

    /// The e-mails suppressed on the Spot's portal (people deleted there for
    /// privacy), newest first.
    pub async fn suppressions(
        &self,
        spot_id: i64,
        limit: i64,
    ) -> Result<Vec<store::portal_changes::Suppression>, IntegrationError> {
        Ok(
            store::portal_changes::suppressions_of_spot(&*self.db.client().await?, spot_id, limit)
                .await?,
        )
    }

    /// The Spot's members left without a contact by a merge, newest first.
    pub async fn conflicts(
        &self,
        spot_id: i64,
        limit: i64,
    ) -> Result<Vec<store::portal_changes::Conflict>, IntegrationError> {
        Ok(
            store::portal_changes::conflicts_of_spot(&*self.db.client().await?, spot_id, limit)
                .await?,
        )
    }

    /// Lifts a suppression on the Spot's portal when the person consented
    /// again: audited on the Spot; the e-mail's member is written (and, with
    /// creation on, created) on its next change. False when there was none.
    pub async fn lift_suppression(
        &self,
        spot_id: i64,
        email: &str,
        source: ChangeSource,
    ) -> Result<bool, IntegrationError> {
        let email = crate::hubspot::properties::normalize_email(email);
        let mut client = self.db.client().await?;
        let lifted =
            store::portal_changes::lift_suppression(&mut client, spot_id, &email, source).await?;
        if lifted {
            info!(spot_id, "an operator lifted a privacy suppression");
        }
        Ok(lifted)
    }

    /// Queues one dead letter (`only`) or all of the Spot's again. Refused
    /// unless the Spot is active: a disconnect drops queued work anyway.
    pub async fn retry_dead_letters(
        &self,
        spot_id: i64,
        only: Option<i64>,
    ) -> Result<u64, IntegrationError> {
        self.require_active(spot_id, "retry its dead letters")
            .await?;
        let mut client = self.db.client().await?;
        let n = store::retry_dead_letters(&mut client, spot_id, only).await?;
        drop(client);
        self.wake.spots([spot_id]);
        info!(spot_id, retried = n, "dead letters queued again");
        Ok(n)
    }

    /// Resynchronises the Spot: a backfill of current values, with its
    /// progress in the integration's `backfill`.
    pub async fn resync(&self, spot_id: i64) -> Result<IntegrationView, IntegrationError> {
        self.require_active(spot_id, "resynchronise it").await?;
        let mut client = self.db.client().await?;
        let restarted = store::restart_backfill(&mut client, spot_id).await?;
        drop(client);
        if !restarted {
            return Err(IntegrationError::Refused(
                "the integration is no longer active".into(),
            ));
        }
        self.wake.integration_changed(spot_id);
        info!(spot_id, "resync requested: the backfill starts again");
        self.view(spot_id).await
    }

    /// Reads the Spot's matched contacts back from HubSpot and compares them
    /// with the database (`reconcile`); with `fix`, queues the drifted ones.
    /// Uses the token delivery keeps fresh and the portal's shared limiter,
    /// so it spends the same budget as delivery, not a second one.
    pub async fn reconcile(
        &self,
        spot_id: i64,
        fix: bool,
        progress: impl FnMut(crate::reconcile::Progress),
    ) -> Result<crate::reconcile::Report, IntegrationError> {
        self.require_active(spot_id, "reconcile it").await?;
        let live = store::active_integration(&*self.db.client().await?, spot_id)
            .await?
            .ok_or_else(|| {
                IntegrationError::Refused("the integration is no longer active".into())
            })?;
        // Refreshing here would race delivery's own refresh of the same
        // token; delivery refreshes it minutes before it expires.
        if live
            .expires_at
            .is_some_and(|t| t < chrono::Utc::now() + chrono::Duration::seconds(30))
        {
            return Err(IntegrationError::Refused(
                "the Spot's HubSpot access token has expired and delivery has not refreshed it yet                  (it does on its next call); try again in a minute"
                    .into(),
            ));
        }
        let token = self
            .sealer
            .open(&live.access_token_enc, TokenSlot::Access(spot_id))
            .map_err(|e| IntegrationError::Refused(e.to_string()))?;
        let portal = crate::hubspot::Portal {
            client: self.hubspot.clone(),
            token,
            limiter: self.limiters.portal(live.portal_id),
            fence: None,
        };
        let report =
            crate::reconcile::reconcile(&self.db, &portal, spot_id, live.portal_id, fix, progress)
                .await
                .map_err(|e| match e {
                    crate::reconcile::ReconcileError::Db(e) => IntegrationError::Db(e),
                    e @ crate::reconcile::ReconcileError::HubSpot(_) => {
                        IntegrationError::HubSpotUnavailable(e.to_string())
                    }
                })?;
        if report.queued.unwrap_or(0) > 0 {
            self.wake.spots([spot_id]);
            info!(
                spot_id,
                queued = report.queued,
                "reconcile queued drifted contacts"
            );
        }
        Ok(report)
    }

    async fn require_active(&self, spot_id: i64, to: &str) -> Result<(), IntegrationError> {
        self.require_spot(spot_id).await?;
        if self.view(spot_id).await?.status != Status::Active {
            return Err(IntegrationError::Refused(format!(
                "the integration is not active: connect (or reconnect) the Spot first, then {to}"
            )));
        }
        Ok(())
    }

    /// The Spot's name, or None if there is no such Spot.
    pub async fn spot_name(&self, spot_id: i64) -> Result<Option<String>, IntegrationError> {
        Ok(store::spot_name(&*self.db.client().await?, spot_id).await?)
    }

    /// A page of the Spots with an integration, failed first.
    pub async fn list(
        &self,
        query: &store::ListQuery,
    ) -> Result<store::ListPage, IntegrationError> {
        Ok(store::list_integrations(&*self.db.client().await?, query).await?)
    }

    async fn require_spot(&self, spot_id: i64) -> Result<(), IntegrationError> {
        if store::spot_exists(&*self.db.client().await?, spot_id).await? {
            Ok(())
        } else {
            Err(IntegrationError::UnknownSpot(spot_id))
        }
    }

    /// Starts the OAuth flow: the sidecar URL to send the admin's browser
    /// to, once, within 10 minutes. Opening it binds the authorization to
    /// that browser (`open_oauth_ticket`): a callback in any other browser
    /// is refused, so an authorize URL handed to someone else (RFC 6749
    /// §10.12) cannot connect the Spot to their portal.
    pub async fn start_oauth(
        &self,
        secret_key: &signed::SigningKeys,
        spot_id: i64,
    ) -> Result<String, IntegrationError> {
        self.require_spot(spot_id).await?;
        let app = self.oauth_app()?;
        let ticket = self
            .issue_one_time(secret_key, Purpose::OAuthStart, spot_id)
            .await?;
        let mut url = url::Url::parse(&app.start_uri)
            .map_err(|e| IntegrationError::Refused(format!("SIDECAR_PUBLIC_URL: {e}")))?;
        url.query_pairs_mut().append_pair("ticket", &ticket.token);
        Ok(url.into())
    }

    /// Opens a connect's ticket, once: HubSpot's authorize URL, with a
    /// signed state bound to the Spot (valid 10 minutes, usable once), and
    /// the binding the browser keeps as a cookie until the callback.
    pub async fn open_oauth_ticket(
        &self,
        secret_key: &signed::SigningKeys,
        ticket: &str,
    ) -> Result<(String, String), IntegrationError> {
        let spot_id = self
            .consume_one_time(secret_key, Purpose::OAuthStart, ticket)
            .await?
            .spot_id;
        let app = self.oauth_app()?;
        let state = self
            .issue_one_time(secret_key, Purpose::OAuthState, spot_id)
            .await?;
        let binding = signed::derive(secret_key, Purpose::OAuthBinding, &state.nonce);
        Ok((app.authorize_url(&state.token), binding))
    }

    fn oauth_app(&self) -> Result<&OAuthApp, IntegrationError> {
        self.oauth.as_ref().ok_or_else(|| {
            IntegrationError::Refused(
                "OAuth is not configured: set HUBSPOT_CLIENT_ID and HUBSPOT_CLIENT_SECRET, or send {\"access_token\": \"…\"}".into(),
            )
        })
    }

    /// A signed token for `purpose`, bound to the Spot, valid 10 minutes,
    /// recorded so that it is accepted once.
    async fn issue_one_time(
        &self,
        secret_key: &signed::SigningKeys,
        purpose: Purpose,
        spot_id: i64,
    ) -> Result<signed::Issued, IntegrationError> {
        let issued = signed::issue(secret_key, purpose, spot_id, signed::STATE_TTL_SECS);
        self.record_one_time(purpose, spot_id, &issued).await?;
        Ok(issued)
    }

    /// Records a token so that it is accepted once.
    async fn record_one_time(
        &self,
        purpose: Purpose,
        spot_id: i64,
        issued: &signed::Issued,
    ) -> Result<(), IntegrationError> {
        store::issue_one_time(
            &*self.db.client().await?,
            purpose.label(),
            &issued.nonce,
            spot_id,
            issued.expires_at,
        )
        .await?;
        Ok(())
    }

    /// Accepts a token `issue_one_time` made, once: its Spot.
    async fn consume_one_time(
        &self,
        secret_key: &signed::SigningKeys,
        purpose: Purpose,
        token: &str,
    ) -> Result<signed::Verified, IntegrationError> {
        let verified = signed::verify(secret_key, purpose, token)
            .map_err(|e| IntegrationError::Refused(e.to_string()))?;
        let consumed =
            store::consume_one_time(&*self.db.client().await?, purpose.label(), &verified.nonce)
                .await?;
        if consumed != Some(verified.spot_id) {
            return Err(IntegrationError::Refused(
                "This link was already used or has expired; start again.".into(),
            ));
        }
        Ok(verified)
    }

    /// A link that opens the Spot's settings page once, within 10 minutes,
    /// for `member_id`, who must be an accepted admin of the Spot: the
    /// session it starts is theirs, checked again on every request.
    pub async fn issue_settings_link(
        &self,
        secret_key: &signed::SigningKeys,
        spot_id: i64,
        member_id: i64,
    ) -> Result<String, IntegrationError> {
        self.require_spot(spot_id).await?;
        let standing = self.standing(spot_id, member_id).await?;
        if !standing.admin {
            return Err(IntegrationError::Forbidden(format!(
                "member {member_id} is not an accepted admin of Spot {spot_id}"
            )));
        }
        let holder = signed::Holder {
            member_id,
            spot_epoch: standing.spot_epoch,
            global_epoch: standing.global_epoch,
        };
        let issued = signed::issue_held(
            secret_key,
            Purpose::SettingsLink,
            spot_id,
            holder,
            signed::STATE_TTL_SECS,
        );
        self.record_one_time(Purpose::SettingsLink, spot_id, &issued)
            .await?;
        Ok(issued.token)
    }

    /// Accepts a settings link once: the Spot whose page it opens, and for
    /// whom (still an accepted admin, with sessions not ended since).
    pub async fn open_settings_link(
        &self,
        secret_key: &signed::SigningKeys,
        token: &str,
    ) -> Result<(i64, signed::Holder), IntegrationError> {
        let verified = self
            .consume_one_time(secret_key, Purpose::SettingsLink, token)
            .await?;
        let holder = signed::Holder::of_nonce(&verified.nonce)
            .ok_or_else(|| IntegrationError::Refused("This link names no admin.".into()))?;
        self.check_holder(verified.spot_id, holder).await?;
        Ok((verified.spot_id, holder))
    }

    /// The member's standing in the Spot, and the session epochs.
    pub async fn standing(
        &self,
        spot_id: i64,
        member_id: i64,
    ) -> Result<store::sessions::Standing, IntegrationError> {
        Ok(store::sessions::standing(&*self.db.client().await?, spot_id, member_id).await?)
    }

    /// A settings session (or link) still holds: its member is still an
    /// accepted admin of the Spot, and no one ended its sessions since.
    pub async fn check_holder(
        &self,
        spot_id: i64,
        holder: signed::Holder,
    ) -> Result<(), IntegrationError> {
        let now = self.standing(spot_id, holder.member_id).await?;
        if now.spot_epoch != holder.spot_epoch || now.global_epoch != holder.global_epoch {
            return Err(IntegrationError::Refused(
                "This session was ended by an operator.".into(),
            ));
        }
        if !now.admin {
            return Err(IntegrationError::Forbidden(
                "You are no longer an admin of this Spot.".into(),
            ));
        }
        Ok(())
    }

    /// Ends every settings session of the Spot (`Some`) or of every Spot.
    pub async fn end_sessions(
        &self,
        spot_id: Option<i64>,
        source: ChangeSource,
    ) -> Result<(), IntegrationError> {
        if let Some(spot) = spot_id {
            self.require_spot(spot).await?;
        }
        let mut client = self.db.client().await?;
        store::sessions::end_sessions(&mut client, spot_id, source).await?;
        info!(?spot_id, "settings sessions ended");
        Ok(())
    }

    /// Connects with a service key or private-app token, at once.
    pub async fn connect_with_token(
        &self,
        spot_id: i64,
        token: &str,
    ) -> Result<IntegrationView, IntegrationError> {
        self.require_spot(spot_id).await?;
        let token = token.trim();
        if token.is_empty() {
            return Err(IntegrationError::Refused("access_token is empty".into()));
        }
        let portal_id = match self.hubspot.portal_id(token).await {
            Ok(p) => p,
            Err(HubSpotError::Auth { message, .. }) => {
                return Err(IntegrationError::Refused(format!(
                    "HubSpot refused the token: {message}"
                )))
            }
            Err(e) => {
                return Err(IntegrationError::HubSpotUnavailable(format!(
                    "could not reach HubSpot to identify the portal: {e}"
                )))
            }
        };
        // That call counted against the portal's budget like any other.
        self.limiters.portal(portal_id).record_unthrottled().await;
        // Settings survive a disconnect; activities cannot run on a static token.
        let current = self.view(spot_id).await?;
        activities_need_oauth(Some(AuthKind::Token), current.activities.any())?;
        let creds = Credentials {
            kind: AuthKind::Token,
            access_token_enc: self.sealer.seal(token, TokenSlot::Access(spot_id)),
            refresh_token_enc: None,
            expires_at: None,
        };
        self.activate(spot_id, portal_id, &creds, None, ChangeSource::AdminApi)
            .await?;
        info!(spot_id, portal_id, "integration connected with a token");
        self.view(spot_id).await
    }

    /// Completes the OAuth flow from HubSpot's redirect: verifies and consumes
    /// the state, exchanges the code, stores the tokens and activates.
    /// Returns the Spot that was connected.
    pub async fn complete_oauth(
        &self,
        secret_key: &signed::SigningKeys,
        code: &str,
        state: &str,
        binding: Option<&str>,
    ) -> Result<i64, IntegrationError> {
        // Only in the browser that opened the ticket; checked before the
        // state is used up, so a refused callback changes nothing.
        let verified = signed::verify(secret_key, Purpose::OAuthState, state)
            .map_err(|e| IntegrationError::Refused(e.to_string()))?;
        if !binding.is_some_and(|b| {
            signed::derived_matches(secret_key, Purpose::OAuthBinding, &verified.nonce, b)
        }) {
            warn!(
                spot_id = verified.spot_id,
                "an OAuth callback came from a browser that did not start the connection; refused"
            );
            return Err(IntegrationError::Forbidden(
                "This connection was started in another browser. Start it again from the Spot's HubSpot settings, in this browser.".into(),
            ));
        }
        let spot_id = self
            .consume_one_time(secret_key, Purpose::OAuthState, state)
            .await?
            .spot_id;
        let Some(app) = &self.oauth else {
            return Err(IntegrationError::Refused("OAuth is not configured.".into()));
        };
        let tokens: Tokens = app.exchange_code(&self.hubspot, code).await.map_err(|e| {
            warn!(error = %crate::internal_events::scrub_personal(&e.to_string()), "OAuth code exchange failed");
            IntegrationError::HubSpotUnavailable(e.to_string())
        })?;
        // `hub_id` is optional in every token answer: without it, ask
        // account-info which portal the new access token belongs to.
        let portal_id = match tokens.hub_id {
            Some(id) => id,
            None => self
                .hubspot
                .portal_id(&tokens.access_token)
                .await
                .map_err(|e| {
                    IntegrationError::HubSpotUnavailable(format!(
                        "could not learn which portal was authorized: {e}"
                    ))
                })?,
        };
        let creds = Credentials {
            kind: AuthKind::OAuth,
            access_token_enc: self
                .sealer
                .seal(&tokens.access_token, TokenSlot::Access(spot_id)),
            refresh_token_enc: Some(
                self.sealer
                    .seal(&tokens.refresh_token, TokenSlot::Refresh(spot_id)),
            ),
            expires_at: Some(tokens.expires_at()),
        };
        self.activate(
            spot_id,
            portal_id,
            &creds,
            Some(&tokens.refresh_token),
            ChangeSource::OAuthCallback,
        )
        .await?;
        info!(
            spot_id = spot_id,
            portal_id, "integration connected through OAuth"
        );
        Ok(spot_id)
    }

    /// A new activation. Waits for the Spot's call in flight, so that once
    /// this returns no call of the previous activation (maybe to another
    /// portal) is made; revokes the previous refresh token unless it is the new one.
    async fn activate(
        &self,
        spot_id: i64,
        portal_id: i64,
        creds: &Credentials,
        new_refresh_token: Option<&str>,
        source: ChangeSource,
    ) -> Result<(), IntegrationError> {
        let replaced = {
            let _fence = self.fences.exclusive(spot_id).await;
            let mut client = self.db.client().await?;
            store::activate(
                &mut client,
                &self.markers,
                spot_id,
                portal_id,
                creds,
                source,
            )
            .await?
        };
        self.wake.integration_changed(spot_id);
        if let Some(old) = replaced.refresh_token_enc {
            match self.sealer.open(&old, TokenSlot::Refresh(spot_id)) {
                Ok(old) if Some(old.as_str()) != new_refresh_token => self.revoke_later(old),
                _ => {}
            }
        }
        Ok(())
    }

    /// Revokes a refresh token at HubSpot, best effort, in the background
    /// (it is erased here already).
    fn revoke_later(&self, token: String) {
        let Some(app) = self.oauth.clone() else {
            return;
        };
        let client = self.hubspot.clone();
        tokio::spawn(async move {
            if let Err(e) = app.revoke(&client, &token).await {
                warn!(error = %e, "could not revoke the old refresh token (it is erased here anyway)");
            }
        });
    }

    /// Changes contact creation and activity categories; they apply in
    /// stream order (SPEC §4.3).
    pub async fn change_settings(
        &self,
        spot_id: i64,
        create_contacts: Option<bool>,
        activities: ActivitiesPatch,
        source: ChangeSource,
    ) -> Result<IntegrationView, IntegrationError> {
        self.require_spot(spot_id).await?;
        let current = self.view(spot_id).await?;
        activities_need_oauth(current.auth_kind, activities.enables_any())?;
        let mut client = self.db.client().await?;
        store::update_settings(
            &mut client,
            &self.markers,
            spot_id,
            create_contacts,
            &activities,
            source,
        )
        .await?;
        drop(client);
        self.view(spot_id).await
    }

    /// Disconnects: `inactive`, both backlogs dropped, tokens erased and the
    /// refresh token revoked (best effort). Waits for the Spot's call in
    /// flight, so nothing is sent for the Spot after it returns.
    pub async fn disconnect(
        &self,
        spot_id: i64,
        source: ChangeSource,
    ) -> Result<IntegrationView, IntegrationError> {
        let view = self.view(spot_id).await?;
        if view.status == Status::Inactive {
            return Ok(view);
        }
        let erased = {
            let _fence = self.fences.exclusive(spot_id).await;
            let mut client = self.db.client().await?;
            store::deactivate(&mut client, &self.markers, spot_id, source).await?
        };
        self.wake.integration_changed(spot_id);
        info!(spot_id, "integration disconnected");
        if let Some(token) =
            erased.and_then(|sealed| self.sealer.open(&sealed, TokenSlot::Refresh(spot_id)).ok())
        {
            self.revoke_later(token);
        }
        self.view(spot_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activities_need_oauth_only_when_turned_on_with_a_static_token() {
        assert!(activities_need_oauth(Some(AuthKind::Token), true).is_err());
        assert!(activities_need_oauth(Some(AuthKind::Token), false).is_ok());
        assert!(activities_need_oauth(Some(AuthKind::OAuth), true).is_ok());
        // Never connected: the settings wait for the connection.
        assert!(activities_need_oauth(None, true).is_ok());
    }
}
