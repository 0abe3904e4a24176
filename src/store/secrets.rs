//! The key ring: one key per purpose, derived (HKDF-SHA256) from
//! SIDECAR_SECRET_KEY, and the same for each SIDECAR_SECRET_KEY_PREVIOUS,
//! so that rotating the secret is a routine: what a previous key sealed or
//! signed still opens and verifies, tokens are sealed again under the
//! current key (`reseal`), and the previous keys can be dropped once
//! `hubspot_sidecar_tokens_sealed_with_previous_key` reads 0.
//!
//! A token at rest is `0x02 || key id (4) || nonce (12) || AES-256-GCM
//! ciphertext`, its associated data naming the Spot and the column it
//! belongs to: a sealed value copied to another row does not open there.
//! Tokens sealed before the key ring (nonce || ciphertext, under the raw
//! secret, no associated data) still open, and are sealed again.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

/// A sealed token failed to decrypt under every key of the ring.
#[derive(Debug, thiserror::Error)]
#[error(
    "a stored token cannot be decrypted with SIDECAR_SECRET_KEY or any SIDECAR_SECRET_KEY_PREVIOUS: \
     the secret was changed without keeping the old one as previous (runbook: Key rotation)"
)]
pub struct DecryptError;

/// What a key of the ring is derived for.
#[derive(Debug, Clone, Copy)]
enum KeyPurpose {
    /// Tokens at rest.
    Tokens,
    /// Links, OAuth states, sessions, CSRF tokens.
    Signing,
    /// The key's public id, stored with what it sealed.
    Id,
}

impl KeyPurpose {
    fn info(self) -> &'static [u8] {
        match self {
            KeyPurpose::Tokens => b"hubspot-sidecar tokens v2",
            KeyPurpose::Signing => b"hubspot-sidecar signing v2",
            KeyPurpose::Id => b"hubspot-sidecar key id v2",
        }
    }
}

const SALT: &[u8] = b"hubspot-sidecar key ring";
const FORMAT_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const ID_LEN: usize = 4;

/// One secret's keys.
struct Secret {
    /// The raw secret (tokens and signatures made before the key ring).
    raw: [u8; 32],
    id: [u8; ID_LEN],
    tokens: Aes256Gcm,
    legacy_tokens: Aes256Gcm,
    signing: [u8; 32],
}

impl Secret {
    fn new(raw: &[u8; 32]) -> Secret {
        let hk = Hkdf::<Sha256>::new(Some(SALT), raw);
        let derive = |purpose: KeyPurpose| {
            let mut out = [0u8; 32];
            // 32 bytes are always within HKDF-SHA256's output limit.
            let _ = hk.expand(purpose.info(), &mut out);
            out
        };
        let id_bytes = derive(KeyPurpose::Id);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&id_bytes[..ID_LEN]);
        Secret {
            raw: *raw,
            id,
            tokens: Aes256Gcm::new((&derive(KeyPurpose::Tokens)).into()),
            legacy_tokens: Aes256Gcm::new(raw.into()),
            signing: derive(KeyPurpose::Signing),
        }
    }
}

/// SIDECAR_SECRET_KEY and the previous ones, each as its purpose keys.
pub struct KeyRing {
    current: Secret,
    previous: Vec<Secret>,
}

impl KeyRing {
    /// The ring of the current secret and the previous ones (oldest last).
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> KeyRing {
        KeyRing {
            current: Secret::new(current),
            previous: previous.iter().map(Secret::new).collect(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// The keys that sign and verify links, states and sessions: the
    /// current one signs; every one, and the raw secrets signatures made
    /// before the key ring used, verify.
    pub fn signing(&self) -> crate::integrations::signed::SigningKeys {
        let derived = self.all().map(|s| s.signing);
        let raw = self.all().map(|s| s.raw);
        crate::integrations::signed::SigningKeys::new(derived.chain(raw).collect())
    }

    /// The raw secrets, current first: what the settings markers' key is
    /// derived from (its own derivation, unchanged, so markers already in
    /// the WAL still verify).
    pub fn raw_secrets(&self) -> Vec<[u8; 32]> {
        self.all().map(|s| s.raw).collect()
    }

    /// The current key's id, as stored with what it seals (hex, for logs).
    pub fn current_id(&self) -> String {
        hex::encode(self.current.id)
    }
}

/// Which stored token a sealed value is: its associated data.
#[derive(Debug, Clone, Copy)]
pub enum TokenSlot {
    /// `integrations.access_token_enc` of a Spot.
    Access(i64),
    /// `integrations.refresh_token_enc` of a Spot.
    Refresh(i64),
}

impl TokenSlot {
    fn aad(self) -> String {
        match self {
            TokenSlot::Access(spot) => {
                format!("hubspot_sync.integrations.access_token_enc spot={spot}")
            }
            TokenSlot::Refresh(spot) => {
                format!("hubspot_sync.integrations.refresh_token_enc spot={spot}")
            }
        }
    }
}

/// Seals and opens tokens with the key ring.
#[derive(Clone)]
pub struct Sealer {
    ring: std::sync::Arc<KeyRing>,
}

impl Sealer {
    /// A sealer over `ring`.
    pub fn new(ring: std::sync::Arc<KeyRing>) -> Self {
        Sealer { ring }
    }

    /// The current key's id (hex), for the log.
    pub fn key_id(&self) -> String {
        self.ring.current_id()
    }

    /// Encrypts a token for `slot` under the current key and a fresh nonce.
    pub fn seal(&self, plaintext: &str, slot: TokenSlot) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = slot.aad();
        // Encryption with a fresh nonce and an in-memory buffer cannot fail.
        let ct = self
            .ring
            .current
            .tokens
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + ID_LEN + NONCE_LEN + ct.len());
        out.push(FORMAT_V2);
        out.extend_from_slice(&self.ring.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a token of `slot`, under whichever key of the ring sealed it.
    pub fn open(&self, sealed: &[u8], slot: TokenSlot) -> Result<String, DecryptError> {
        self.open_v2(sealed, slot)
            .or_else(|| self.open_legacy(sealed))
            .ok_or(DecryptError)
    }

    /// Whether `sealed` is under another key than the current one (or in
    /// the format from before the key ring): the re-seal pass seals it again.
    pub fn is_stale(&self, sealed: &[u8]) -> bool {
        !(sealed.len() > 1 + ID_LEN
            && sealed[0] == FORMAT_V2
            && sealed[1..=ID_LEN] == self.ring.current.id)
    }

    fn open_v2(&self, sealed: &[u8], slot: TokenSlot) -> Option<String> {
        if sealed.len() < 1 + ID_LEN + NONCE_LEN || sealed[0] != FORMAT_V2 {
            return None;
        }
        let (id, rest) = sealed[1..].split_at(ID_LEN);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let secret = self.ring.all().find(|s| s.id == id)?;
        let aad = slot.aad();
        let pt = secret
            .tokens
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(pt).ok()
    }

    /// nonce || ciphertext under a raw secret, as sealed before the key ring.
    fn open_legacy(&self, sealed: &[u8]) -> Option<String> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.ring.all().find_map(|s| {
            let pt = s.legacy_tokens.decrypt(Nonce::from_slice(nonce), ct).ok()?;
            String::from_utf8(pt).ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn sealer(current: u8, previous: &[u8]) -> Sealer {
        let previous: Vec<[u8; 32]> = previous.iter().map(|b| [*b; 32]).collect();
        Sealer::new(Arc::new(KeyRing::new(&[current; 32], &previous)))
    }

    #[test]
    fn a_token_opens_only_in_its_own_slot_and_under_a_key_of_the_ring() {
        let s = sealer(7, &[]);
        let sealed = s.seal("pat-na1-secret", TokenSlot::Access(1));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            s.open(&sealed, TokenSlot::Access(1)).unwrap(),
            "pat-na1-secret"
        );
        assert!(
            s.open(&sealed, TokenSlot::Access(2)).is_err(),
            "another Spot's row"
        );
        assert!(
            s.open(&sealed, TokenSlot::Refresh(1)).is_err(),
            "another column"
        );
        assert!(sealer(8, &[]).open(&sealed, TokenSlot::Access(1)).is_err());
        assert!(!s.is_stale(&sealed));
    }

    #[test]
    fn after_a_rotation_the_previous_key_opens_and_the_token_is_stale() {
        let old = sealer(7, &[]);
        let sealed = old.seal("refresh-1", TokenSlot::Refresh(3));
        let rotated = sealer(9, &[7]);
        assert_eq!(
            rotated.open(&sealed, TokenSlot::Refresh(3)).unwrap(),
            "refresh-1"
        );
        assert!(rotated.is_stale(&sealed));
        let again = rotated.seal("refresh-1", TokenSlot::Refresh(3));
        assert!(!rotated.is_stale(&again));
        assert!(
            sealer(9, &[]).open(&sealed, TokenSlot::Refresh(3)).is_err(),
            "previous dropped"
        );
    }

    #[test]
    fn a_token_sealed_before_the_key_ring_still_opens_and_is_stale() {
        let raw = [7u8; 32];
        let cipher = Aes256Gcm::new((&raw).into());
        let nonce = [1u8; NONCE_LEN];
        let mut legacy = nonce.to_vec();
        legacy.extend(
            cipher
                .encrypt(Nonce::from_slice(&nonce), b"old".as_ref())
                .unwrap(),
        );
        let s = sealer(7, &[]);
        assert_eq!(s.open(&legacy, TokenSlot::Access(1)).unwrap(), "old");
        assert!(s.is_stale(&legacy));
        assert_eq!(
            sealer(9, &[7]).open(&legacy, TokenSlot::Access(1)).unwrap(),
            "old"
        );
    }
}

/// What a re-seal pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Tokens sealed again under the current key.
    pub resealed: u64,
    /// Tokens still under a previous key or the old format (changed
    /// meanwhile, or undecryptable): the previous keys are still needed.
    pub remaining: u64,
    /// Tokens no key of the ring opens.
    pub undecryptable: u64,
}

/// Seals every stored token that is not under the current key again under
/// it, so that SIDECAR_SECRET_KEY_PREVIOUS can be dropped after one pass.
/// A token a refresh replaced meanwhile is left to the refresh, which
/// sealed it under the current key anyway.
pub async fn reseal(
    db: &tokio_postgres::Client,
    sealer: &Sealer,
) -> Result<Resealed, super::DbError> {
    let rows = db
        .query(
            "SELECT spot_id, access_token_enc, refresh_token_enc FROM hubspot_sync.integrations
              WHERE access_token_enc IS NOT NULL OR refresh_token_enc IS NOT NULL",
            &[],
        )
        .await?;
    let mut out = Resealed::default();
    for row in rows {
        let spot: i64 = row.get(0);
        for (column, slot, sealed) in [
            (
                "access_token_enc",
                TokenSlot::Access(spot),
                row.get::<_, Option<Vec<u8>>>(1),
            ),
            (
                "refresh_token_enc",
                TokenSlot::Refresh(spot),
                row.get::<_, Option<Vec<u8>>>(2),
            ),
        ] {
            let Some(sealed) = sealed.filter(|s| sealer.is_stale(s)) else {
                continue;
            };
            let Ok(token) = sealer.open(&sealed, slot) else {
                out.undecryptable += 1;
                out.remaining += 1;
                continue;
            };
            let fresh = sealer.seal(&token, slot);
            // Only if the row still holds what was read: never undo a refresh.
            let changed = db
                .execute(
                    &format!(
                        "UPDATE hubspot_sync.integrations SET {column} = $3
                          WHERE spot_id = $1 AND {column} = $2"
                    ),
                    &[&spot, &sealed, &fresh],
                )
                .await?;
            if changed == 1 {
                out.resealed += 1;
            } else {
                out.remaining += 1;
            }
        }
    }
    Ok(out)
}
