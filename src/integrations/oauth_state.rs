//! The OAuth `state`: signed with SIDECAR_SECRET_KEY (HMAC-SHA256), bound to a
//! Spot, expiring, and single-use (its nonce is stored and consumed once).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How long a user has to finish the authorization.
pub const STATE_TTL_SECS: i64 = 600;

pub struct IssuedState {
    pub state: String,
    pub nonce: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

pub fn issue(key: &[u8; 32], spot_id: i64) -> IssuedState {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(STATE_TTL_SECS);
    let payload = format!("{spot_id}.{nonce}.{}", expires_at.timestamp());
    let sig = sign(key, &payload);
    IssuedState {
        state: format!("{payload}.{sig}"),
        nonce,
        expires_at,
    }
}

fn sign(key: &[u8; 32], payload: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A state whose signature and expiry hold: its Spot and nonce (still to be consumed).
#[derive(Debug, PartialEq, Eq)]
pub struct VerifiedState {
    pub spot_id: i64,
    pub nonce: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the state is malformed")]
    Malformed,
    #[error("the state's signature is wrong")]
    BadSignature,
    #[error("the state has expired; start the connection again")]
    Expired,
}

pub fn verify(key: &[u8; 32], state: &str) -> Result<VerifiedState, StateError> {
    let (payload, sig) = state.rsplit_once('.').ok_or(StateError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| StateError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| StateError::BadSignature)?;
    let mut parts = payload.split('.');
    let (Some(spot), Some(nonce), Some(exp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StateError::Malformed);
    };
    let spot_id: i64 = spot.parse().map_err(|_| StateError::Malformed)?;
    let exp: i64 = exp.parse().map_err(|_| StateError::Malformed)?;
    if exp < chrono::Utc::now().timestamp() {
        return Err(StateError::Expired);
    }
    Ok(VerifiedState {
        spot_id,
        nonce: nonce.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_states_verify_and_forgeries_do_not() {
        let key = [3u8; 32];
        let issued = issue(&key, 42);
        let v = verify(&key, &issued.state).unwrap();
        assert_eq!(v.spot_id, 42);
        assert_eq!(v.nonce, issued.nonce);
        // Bound to the Spot: changing it breaks the signature.
        let forged = issued.state.replacen("42.", "43.", 1);
        assert_eq!(verify(&key, &forged), Err(StateError::BadSignature));
        assert_eq!(
            verify(&[4u8; 32], &issued.state),
            Err(StateError::BadSignature)
        );
        assert_eq!(verify(&key, "nonsense"), Err(StateError::Malformed));
    }

    #[test]
    fn expired_states_are_refused() {
        let key = [3u8; 32];
        let payload = format!("1.abc.{}", chrono::Utc::now().timestamp() - 1);
        let state = format!("{payload}.{}", sign(&key, &payload));
        assert_eq!(verify(&key, &state), Err(StateError::Expired));
    }
}
