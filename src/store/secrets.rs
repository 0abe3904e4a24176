//! Tokens at rest: AES-256-GCM under SIDECAR_SECRET_KEY, stored as nonce || ciphertext.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

/// A sealed token failed to decrypt: corrupt, or sealed under another SIDECAR_SECRET_KEY.
#[derive(Debug, thiserror::Error)]
#[error("a stored token could not be decrypted: was SIDECAR_SECRET_KEY changed?")]
pub struct DecryptError;

/// Seals and opens tokens with AES-256-GCM under SIDECAR_SECRET_KEY.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl Sealer {
    /// A sealer for the 32-byte SIDECAR_SECRET_KEY.
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Encrypts a token under a fresh random nonce; returns nonce || ciphertext.
    pub fn seal(&self, plaintext: &str) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        // Encryption with a fresh nonce and an in-memory buffer cannot fail.
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .unwrap_or_default();
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts nonce || ciphertext from [`Sealer::seal`] back to the token.
    pub fn open(&self, sealed: &[u8]) -> Result<String, DecryptError> {
        if sealed.len() < 12 {
            return Err(DecryptError);
        }
        let (nonce, ct) = sealed.split_at(12);
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| DecryptError)?;
        String::from_utf8(pt).map_err(|_| DecryptError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_wrong_key() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal("pat-na1-secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.open(&sealed).unwrap(), "pat-na1-secret");
        assert!(Sealer::new(&[8; 32]).open(&sealed).is_err());
    }
}
