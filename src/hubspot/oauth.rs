//! OAuth 2 of a HubSpot public app: the authorize URL, code exchange, refresh
//! and revocation (reference §4).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::endpoint::Endpoint;
use super::{HubSpotClient, HubSpotError};

/// Scopes the sidecar asks for: contacts and their schema, and timeline events.
pub const SCOPES: &str = "oauth crm.objects.contacts.read crm.objects.contacts.write \
                          crm.schemas.contacts.read crm.schemas.contacts.write timeline";

#[derive(Clone, Debug)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    /// `SIDECAR_PUBLIC_URL/oauth/hubspot/start`: where a connect sends the
    /// browser first, to bind the authorization to it.
    pub start_uri: String,
    pub auth_base: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
    #[serde(default)]
    pub hub_id: Option<i64>,
}

impl Tokens {
    pub fn expires_at(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + Duration::from_secs(self.expires_in)
    }
}

impl OAuthApp {
    pub fn authorize_url(&self, state: &str) -> String {
        let mut url = url::Url::parse(&format!("{}/oauth/authorize", self.auth_base))
            .unwrap_or_else(|_| {
                url::Url::parse("https://app.hubspot.com/oauth/authorize").expect("static URL")
            });
        url.query_pairs_mut()
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", SCOPES)
            .append_pair("state", state);
        url.into()
    }

    async fn token_call(
        &self,
        client: &HubSpotClient,
        form: &[(&str, &str)],
    ) -> Result<Tokens, HubSpotError> {
        let (_, body) = client
            .send_form(&Endpoint::OAuthToken, reqwest::Method::POST, form)
            .await?;
        let mut tokens: Tokens = serde_json::from_value(body.clone())
            .map_err(|e| HubSpotError::Transient(format!("oauth.token: unexpected answer: {e}")))?;
        if tokens.hub_id.is_none() {
            tokens.hub_id = body.get("hub_id").and_then(Value::as_i64);
        }
        Ok(tokens)
    }

    pub async fn exchange_code(
        &self,
        client: &HubSpotClient,
        code: &str,
    ) -> Result<Tokens, HubSpotError> {
        self.token_call(
            client,
            &[
                ("grant_type", "authorization_code"),
                ("client_id", &self.client_id),
                ("client_secret", &self.client_secret),
                ("redirect_uri", &self.redirect_uri),
                ("code", code),
            ],
        )
        .await
    }

    /// A refresh may rotate the refresh token: callers store the one returned.
    pub async fn refresh(
        &self,
        client: &HubSpotClient,
        refresh_token: &str,
    ) -> Result<Tokens, HubSpotError> {
        self.token_call(
            client,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", &self.client_id),
                ("client_secret", &self.client_secret),
                ("refresh_token", refresh_token),
            ],
        )
        .await
    }

    /// Revokes a refresh token (disconnect). Best effort: callers log failures.
    pub async fn revoke(
        &self,
        client: &HubSpotClient,
        refresh_token: &str,
    ) -> Result<(), HubSpotError> {
        client
            .send_form(
                &Endpoint::OAuthRevoke,
                reqwest::Method::POST,
                &[
                    ("client_id", &self.client_id),
                    ("client_secret", &self.client_secret),
                    ("token", refresh_token),
                    ("token_type_hint", "refresh_token"),
                ],
            )
            .await?;
        Ok(())
    }
}
