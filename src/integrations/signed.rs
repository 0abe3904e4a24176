//! Signed, expiring tokens bound to a Spot: the OAuth `state`, the settings
//! page's one-time link, and the page sessions. One mechanism for all of
//! them: HMAC-SHA256 under the key ring's signing key over the purpose and the
//! payload, so a token issued for one purpose never passes for another (an
//! OAuth state cannot open a session). Single use, where a purpose needs it,
//! is the store's: the nonce is recorded and consumed once.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The keys tokens are signed and verified with: the first signs, every
/// one verifies (the previous keys of a rotation, and the raw secrets that
/// signed before the key ring), so a rotation ends no session and no link.
#[derive(Clone)]
pub struct SigningKeys {
    keys: std::sync::Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKeys(..)")
    }
}

impl SigningKeys {
    /// `keys[0]` signs; all verify. An empty list is a programming error.
    pub fn new(keys: Vec<[u8; 32]>) -> SigningKeys {
        assert!(!keys.is_empty(), "at least the current signing key");
        SigningKeys {
            keys: std::sync::Arc::new(keys),
        }
    }

    /// One key (tests, tools).
    pub fn single(key: [u8; 32]) -> SigningKeys {
        SigningKeys::new(vec![key])
    }

    fn current(&self) -> &[u8; 32] {
        &self.keys[0]
    }
}

/// What a token is for; signed with it, so it cannot be used for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The OAuth `state` of a connect (single use, recorded by the store).
    OAuthState,
    /// The link that opens a Spot's settings page (single use, recorded).
    SettingsLink,
    /// The settings page's session cookie for one Spot.
    SpotSession,
    /// The operator overview's session cookie (spot id 0).
    OperatorSession,
    /// A session's CSRF token, derived from the session's nonce.
    Csrf,
    /// The ticket a connect hands out: the sidecar URL the admin's browser
    /// opens once to start the authorization (single use, recorded).
    OAuthStart,
    /// The cookie that binds an OAuth `state` to the browser that opened
    /// the ticket, derived from the state's nonce.
    OAuthBinding,
}

impl Purpose {
    /// The label signed with the payload, and the store's name for the purpose.
    pub fn label(self) -> &'static str {
        match self {
            Purpose::OAuthState => "oauth_state",
            Purpose::SettingsLink => "settings_link",
            Purpose::SpotSession => "spot_session",
            Purpose::OperatorSession => "operator_session",
            Purpose::Csrf => "csrf",
            Purpose::OAuthStart => "oauth_start",
            Purpose::OAuthBinding => "oauth_binding",
        }
    }
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long a user has to finish an OAuth authorization or open a link.
pub const STATE_TTL_SECS: i64 = 600;

/// A token just issued, with what the store records of it.
pub struct Issued {
    /// The token itself: `{spot}.{nonce}.{expiry}.{signature}`.
    pub token: String,
    /// Its random part (recorded for single use; a session's CSRF seed).
    pub nonce: String,
    /// When it stops being accepted.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Whom a settings link or session is for, carried in its signed nonce:
/// the member, and the session epochs current when it was issued (an
/// operator bumps them to end sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The admin it was issued to.
    pub member_id: i64,
    /// The Spot's session epoch then.
    pub spot_epoch: i64,
    /// The epoch of every Spot's sessions then.
    pub global_epoch: i64,
}

impl Holder {
    /// Reads the holder back from a nonce `issue_held` made.
    pub fn of_nonce(nonce: &str) -> Option<Holder> {
        let mut parts = nonce.split('-');
        let holder = Holder {
            member_id: parts.next()?.parse().ok()?,
            spot_epoch: parts.next()?.parse().ok()?,
            global_epoch: parts.next()?.parse().ok()?,
        };
        parts.next()?;
        parts.next().is_none().then_some(holder)
    }
}

/// Issues a token for `purpose` and `spot_id`, valid `ttl_secs`.
pub fn issue(keys: &SigningKeys, purpose: Purpose, spot_id: i64, ttl_secs: i64) -> Issued {
    issue_with_nonce(keys.current(), purpose, spot_id, ttl_secs, random_nonce())
}

/// Issues a token that also names its holder (in its nonce, under the signature).
pub fn issue_held(
    keys: &SigningKeys,
    purpose: Purpose,
    spot_id: i64,
    holder: Holder,
    ttl_secs: i64,
) -> Issued {
    let nonce = format!(
        "{}-{}-{}-{}",
        holder.member_id,
        holder.spot_epoch,
        holder.global_epoch,
        random_nonce()
    );
    issue_with_nonce(keys.current(), purpose, spot_id, ttl_secs, nonce)
}

fn random_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn issue_with_nonce(
    key: &[u8; 32],
    purpose: Purpose,
    spot_id: i64,
    ttl_secs: i64,
    nonce: String,
) -> Issued {
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(ttl_secs);
    let payload = format!("{spot_id}.{nonce}.{}", expires_at.timestamp());
    let sig = URL_SAFE_NO_PAD.encode(mac(key, purpose, &payload).finalize().into_bytes());
    Issued {
        token: format!("{payload}.{sig}"),
        nonce,
        expires_at,
    }
}

fn mac(key: &[u8; 32], purpose: Purpose, payload: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(purpose.label().as_bytes());
    mac.update(b"\n");
    mac.update(payload.as_bytes());
    mac
}

/// A value derived from `input` for `purpose` under the current key (a
/// session's CSRF token, an OAuth binding).
pub fn derive(keys: &SigningKeys, purpose: Purpose, input: &str) -> String {
    URL_SAFE_NO_PAD.encode(derive_one(keys.current(), purpose, input))
}

/// Whether `given` is the value derived from `input` for `purpose` under
/// any of the keys (constant time): what a page got before a rotation
/// still holds after it.
pub fn derived_matches(keys: &SigningKeys, purpose: Purpose, input: &str, given: &str) -> bool {
    keys.keys.iter().any(|k| {
        let expected = URL_SAFE_NO_PAD.encode(derive_one(k, purpose, input));
        constant_time_eq(expected.as_bytes(), given.as_bytes())
    })
}

fn derive_one(key: &[u8; 32], purpose: Purpose, input: &str) -> [u8; 32] {
    mac(key, purpose, input).finalize().into_bytes().into()
}

/// Keys derived from `input` for `purpose`: tokens signed with them stop
/// verifying when `input` changes (operator sessions end with the admin token).
pub fn derive_key(keys: &SigningKeys, purpose: Purpose, input: &str) -> SigningKeys {
    SigningKeys::new(
        keys.keys
            .iter()
            .map(|k| derive_one(k, purpose, input))
            .collect(),
    )
}

/// A token whose signature and expiry hold: its Spot and nonce.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The Spot it is bound to.
    pub spot_id: i64,
    /// Its random part (to consume, for single-use purposes).
    pub nonce: String,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of ours at all.
    #[error("the link is malformed")]
    Malformed,
    /// Tampered with, or issued for another purpose or under another key.
    #[error("the link's signature is wrong")]
    BadSignature,
    /// Past its expiry.
    #[error("the link has expired; start again")]
    Expired,
}

/// Checks `token`'s signature for `purpose` and its expiry.
pub fn verify(keys: &SigningKeys, purpose: Purpose, token: &str) -> Result<Verified, TokenError> {
    let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    if !keys
        .keys
        .iter()
        .any(|key| mac(key, purpose, payload).verify_slice(&sig).is_ok())
    {
        return Err(TokenError::BadSignature);
    }
    let mut parts = payload.split('.');
    let (Some(spot), Some(nonce), Some(exp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let spot_id: i64 = spot.parse().map_err(|_| TokenError::Malformed)?;
    let exp: i64 = exp.parse().map_err(|_| TokenError::Malformed)?;
    if exp < chrono::Utc::now().timestamp() {
        return Err(TokenError::Expired);
    }
    Ok(Verified {
        spot_id,
        nonce: nonce.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let key = SigningKeys::single([3u8; 32]);
        let issued = issue(&key, Purpose::OAuthState, 42, STATE_TTL_SECS);
        let v = verify(&key, Purpose::OAuthState, &issued.token).unwrap();
        assert_eq!(v.spot_id, 42);
        assert_eq!(v.nonce, issued.nonce);
        // Bound to the Spot: changing it breaks the signature.
        let forged = issued.token.replacen("42.", "43.", 1);
        assert_eq!(
            verify(&key, Purpose::OAuthState, &forged),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(
                &SigningKeys::single([4u8; 32]),
                Purpose::OAuthState,
                &issued.token
            ),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&key, Purpose::OAuthState, "nonsense"),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_token_of_one_purpose_is_refused_for_another() {
        let key = SigningKeys::single([3u8; 32]);
        let state = issue(&key, Purpose::OAuthState, 7, STATE_TTL_SECS);
        assert_eq!(
            verify(&key, Purpose::SpotSession, &state.token),
            Err(TokenError::BadSignature)
        );
        let link = issue(&key, Purpose::SettingsLink, 7, STATE_TTL_SECS);
        assert_eq!(
            verify(&key, Purpose::SpotSession, &link.token),
            Err(TokenError::BadSignature)
        );
        assert!(verify(&key, Purpose::SettingsLink, &link.token).is_ok());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let key = SigningKeys::single([3u8; 32]);
        let issued = issue(&key, Purpose::SettingsLink, 1, -1);
        assert_eq!(
            verify(&key, Purpose::SettingsLink, &issued.token),
            Err(TokenError::Expired)
        );
    }
}
