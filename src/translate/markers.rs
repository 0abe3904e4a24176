//! Settings markers: the transactional logical messages that carry a Spot's
//! settings in commit order (SPEC §9 "stream order", §10).
//!
//! `pg_logical_emit_message` is executable by PUBLIC unless `sql/role.sql`
//! revoked it (doctor checks): any role that can connect may then put a
//! message with our prefix into the WAL. So a marker is applied only when
//! it carries an HMAC-SHA256 under a key derived from SIDECAR_SECRET_KEY
//! (or, during a rotation, a previous one; it never leaves the sidecar) and a
//! settings version newer than the last one the stream applied for the Spot.
//! The version is `integrations.settings_version`, moved on in the same
//! transaction that writes the marker, so versions grow in commit order.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::SpotSettings;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of the settings markers (written by `store::integrations`).
pub const SETTINGS_PREFIX: &str = "hubspot_sidecar.settings";

/// Why a marker was not applied; the label of
/// `hubspot_sidecar_settings_markers_rejected_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerRejection {
    /// Not a signed marker at all (unparseable, or no MAC).
    Malformed,
    /// The MAC does not match: forged, or signed under another key.
    BadSignature,
    /// A genuine marker whose version is not newer than the one applied.
    Replayed,
}

impl MarkerRejection {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MarkerRejection::Malformed => "malformed",
            MarkerRejection::BadSignature => "bad_signature",
            MarkerRejection::Replayed => "replayed",
        }
    }
}

/// A marker the stream ignored: the Spot it claimed to be for, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedMarker {
    /// The Spot id the marker named, when it could be read.
    pub spot_id: Option<i64>,
    /// Why it was ignored.
    pub reason: MarkerRejection,
}

/// The wire form: the settings and their MAC side by side.
#[derive(Serialize, Deserialize)]
struct Signed {
    #[serde(flatten)]
    settings: SpotSettings,
    mac: String,
}

/// Signs and checks settings markers.
#[derive(Clone)]
pub struct MarkerKey {
    /// The current secret's marker key first (it signs), then the previous
    /// secrets' (they still verify markers written before a rotation).
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for MarkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MarkerKey(..)")
    }
}

impl MarkerKey {
    /// The marker key of a SIDECAR_SECRET_KEY. A key of its own (derived
    /// with HMAC under a fixed label), so that no signature made for another
    /// purpose (the OAuth state) can ever pass as a marker's.
    pub fn new(secret_key: &[u8; 32]) -> MarkerKey {
        MarkerKey::with_previous(secret_key, &[])
    }

    /// The marker keys of SIDECAR_SECRET_KEY and its previous values.
    pub fn with_previous(secret_key: &[u8; 32], previous: &[[u8; 32]]) -> MarkerKey {
        let derive = |secret: &[u8; 32]| -> [u8; 32] {
            let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(b"hubspot-sidecar settings marker key v1");
            mac.finalize().into_bytes().into()
        };
        MarkerKey {
            keys: std::iter::once(secret_key)
                .chain(previous)
                .map(derive)
                .collect(),
        }
    }

    fn mac(&self, key: &[u8; 32], settings: &SpotSettings) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        // The canonical bytes: the settings as this struct serialises them.
        mac.update(&serde_json::to_vec(settings).unwrap_or_default());
        mac
    }

    /// The marker content for these settings.
    pub fn seal(&self, settings: &SpotSettings) -> String {
        let mac = hex::encode(self.mac(&self.keys[0], settings).finalize().into_bytes());
        serde_json::to_string(&Signed {
            settings: settings.clone(),
            mac,
        })
        .unwrap_or_default()
    }

    /// The settings of a marker whose MAC holds (the version is the
    /// caller's to check against what it applied).
    pub fn open(&self, content: &[u8]) -> Result<SpotSettings, RejectedMarker> {
        let signed: Signed = serde_json::from_slice(content).map_err(|_| RejectedMarker {
            spot_id: spot_named(content),
            reason: MarkerRejection::Malformed,
        })?;
        let bad = RejectedMarker {
            spot_id: Some(signed.settings.spot_id),
            reason: MarkerRejection::BadSignature,
        };
        let tag = hex::decode(&signed.mac).map_err(|_| bad.clone())?;
        // `verify_slice` compares in constant time.
        if !self
            .keys
            .iter()
            .any(|key| self.mac(key, &signed.settings).verify_slice(&tag).is_ok())
        {
            return Err(bad);
        }
        Ok(signed.settings)
    }
}

/// The Spot id an unparseable marker names, for the log line.
fn spot_named(content: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(content)
        .ok()?
        .get("spot_id")?
        .as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Activities;

    fn settings(version: i64) -> SpotSettings {
        SpotSettings {
            spot_id: 7,
            version,
            status: "active".into(),
            create_contacts: true,
            activities: Activities::default(),
        }
    }

    #[test]
    fn a_sealed_marker_opens_with_its_key_only() {
        let key = MarkerKey::new(&[1; 32]);
        let sealed = key.seal(&settings(3));
        assert_eq!(key.open(sealed.as_bytes()), Ok(settings(3)));
        let other = MarkerKey::new(&[2; 32]);
        assert_eq!(
            other.open(sealed.as_bytes()).map_err(|r| r.reason),
            Err(MarkerRejection::BadSignature)
        );
    }

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let key = MarkerKey::new(&[1; 32]);
        let sealed = key.seal(&settings(3));
        let forged = sealed.replace("\"create_contacts\":true", "\"create_contacts\":false");
        assert_ne!(forged, sealed);
        let rejected = key.open(forged.as_bytes()).unwrap_err();
        assert_eq!(rejected.reason, MarkerRejection::BadSignature);
        assert_eq!(rejected.spot_id, Some(7));
    }

    #[test]
    fn an_unsigned_marker_is_malformed() {
        let key = MarkerKey::new(&[1; 32]);
        let plain = br#"{"spot_id":7,"status":"active","create_contacts":true}"#;
        let rejected = key.open(plain).unwrap_err();
        assert_eq!(rejected.reason, MarkerRejection::Malformed);
        assert_eq!(rejected.spot_id, Some(7));
        assert_eq!(key.open(b"\xff garbage").unwrap_err().spot_id, None);
    }
}
