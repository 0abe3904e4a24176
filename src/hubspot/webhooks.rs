//! HubSpot's webhooks as HubSpot publishes them (reference §10): the v3
//! signature, and the events that tell the sidecar its portal changed under
//! it (contacts merged, deleted, deleted for privacy, restored).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

/// The oldest request timestamp accepted (HubSpot's own clients allow 300,000 ms).
pub const MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-hubspot-signature-v3";
/// The timestamp header (milliseconds since the epoch).
pub const TIMESTAMP_HEADER: &str = "x-hubspot-request-timestamp";

/// Why a request is refused before anything in it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature or timestamp, or one that is not well formed.
    Unsigned,
    /// The signature does not match the request.
    BadSignature,
    /// The timestamp is more than `MAX_AGE` away from now.
    Stale,
}

impl Refusal {
    /// The `outcome` label of the request counter.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::Stale => "stale",
        }
    }
}

/// Checks a request's v3 signature: Base64 of HMAC-SHA256, keyed with the
/// app's client secret, over method, the URL HubSpot called, the raw body
/// and the timestamp, compared in constant time; and the timestamp's age.
pub fn verify_v3(
    client_secret: &str,
    method: &str,
    url: &str,
    body: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    now_ms: i64,
) -> Result<(), Refusal> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(Refusal::Unsigned);
    };
    let sent_ms: i64 = timestamp.trim().parse().map_err(|_| Refusal::Unsigned)?;
    let expected = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| Refusal::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(client_secret.as_bytes())
        .map_err(|_| Refusal::BadSignature)?;
    mac.update(method.as_bytes());
    mac.update(url.as_bytes());
    mac.update(body);
    mac.update(timestamp.trim().as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| Refusal::BadSignature)?;
    // Checked after the signature, so a forged request learns nothing from it.
    let max_age = i64::try_from(MAX_AGE.as_millis()).unwrap_or(i64::MAX);
    if now_ms.abs_diff(sent_ms) > max_age.unsigned_abs() {
        return Err(Refusal::Stale);
    }
    Ok(())
}

/// The signature HubSpot would send.
#[cfg(test)]
fn sign_v3(client_secret: &str, method: &str, url: &str, body: &[u8], timestamp: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(client_secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(method.as_bytes());
    mac.update(url.as_bytes());
    mac.update(body);
    mac.update(timestamp.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// One event of a batch, as far as the sidecar reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent {
    event_id: Option<Value>,
    portal_id: Value,
    occurred_at: Value,
    subscription_type: String,
    object_type_id: Option<String>,
    object_id: Option<Value>,
    primary_object_id: Option<Value>,
    merged_object_ids: Option<Vec<Value>>,
    new_object_id: Option<Value>,
}

/// What happened to a contact of the portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactChange {
    /// `primary` and `merged` became one new record, `new`.
    Merge {
        primary: Option<String>,
        merged: Vec<String>,
        new: String,
    },
    /// Deleted (it may be restored).
    Deletion(String),
    /// Deleted for privacy: never to be created again by this portal's integrations.
    PrivacyDeletion(String),
    /// A deleted contact came back, under its id.
    Restore(String),
}

impl ContactChange {
    /// The `type` label of the event counters, and the stored kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ContactChange::Merge { .. } => "merge",
            ContactChange::Deletion(_) => "deletion",
            ContactChange::PrivacyDeletion(_) => "privacy_deletion",
            ContactChange::Restore(_) => "restore",
        }
    }

    /// The record id the change is about (a merge: the new record).
    pub fn object_id(&self) -> &str {
        match self {
            ContactChange::Merge { new, .. } => new,
            ContactChange::Deletion(id)
            | ContactChange::PrivacyDeletion(id)
            | ContactChange::Restore(id) => id,
        }
    }

    /// Reads back what `accepted_event` stored.
    pub fn from_stored(kind: &str, event: &Value) -> Option<ContactChange> {
        let raw: RawEvent = serde_json::from_value(event.clone()).ok()?;
        let change = change_of(&raw)?;
        (change.kind() == kind).then_some(change)
    }
}

/// An event the sidecar acts on.
#[derive(Debug, Clone)]
pub struct PortalEvent {
    pub portal_id: i64,
    /// Milliseconds since the epoch: HubSpot gives no order but this.
    pub occurred_at_ms: i64,
    pub change: ContactChange,
    /// Same for a repeat of the event (a retry of its batch, or HubSpot
    /// sending it twice), different for any other event.
    pub dedup_key: String,
    /// The event as HubSpot sent it.
    pub raw: Value,
}

/// How one event of a batch was read.
#[derive(Debug)]
pub enum Parsed {
    Event(PortalEvent),
    /// A subscription the sidecar does not act on (its name).
    Other(String),
}

/// Why a batch cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("the body is not a JSON array of events: {0}")]
    NotJson(String),
    #[error("a batch carries at most {max} events; this one has {got}")]
    TooMany { max: usize, got: usize },
    #[error("event {index} lacks {what}")]
    Incomplete { index: usize, what: &'static str },
}

/// HubSpot sends fewer than 100 events per request; anything far above is not HubSpot.
pub const MAX_EVENTS: usize = 1_000;

/// Reads a batch. Ids come as numbers or strings; both are kept as text.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Parsed>, BatchError> {
    let values: Vec<Value> =
        serde_json::from_slice(body).map_err(|e| BatchError::NotJson(e.to_string()))?;
    if values.len() > MAX_EVENTS {
        return Err(BatchError::TooMany {
            max: MAX_EVENTS,
            got: values.len(),
        });
    }
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            let raw: RawEvent =
                serde_json::from_value(value.clone()).map_err(|_| BatchError::Incomplete {
                    index,
                    what: "portalId, occurredAt or subscriptionType",
                })?;
            let portal_id = number(&raw.portal_id).ok_or(BatchError::Incomplete {
                index,
                what: "a numeric portalId",
            })?;
            let occurred_at_ms = number(&raw.occurred_at).ok_or(BatchError::Incomplete {
                index,
                what: "a numeric occurredAt",
            })?;
            let Some(change) = change_of(&raw) else {
                return Ok(Parsed::Other(raw.subscription_type.clone()));
            };
            let dedup_key = format!(
                "{portal_id}:{}:{}:{occurred_at_ms}:{}",
                change.kind(),
                change.object_id(),
                raw.event_id.as_ref().and_then(id_text).unwrap_or_default(),
            );
            Ok(Parsed::Event(PortalEvent {
                portal_id,
                occurred_at_ms,
                change,
                dedup_key,
                raw: value,
            }))
        })
        .collect()
}

/// The change an event announces, for contacts only (`contact.*`, or
/// `object.*` of object type `0-1`); None for anything else or an event
/// without the ids it needs.
fn change_of(raw: &RawEvent) -> Option<ContactChange> {
    let (family, action) = raw.subscription_type.split_once('.')?;
    let contact = match family {
        "contact" => true,
        "object" => raw.object_type_id.as_deref() == Some("0-1"),
        _ => false,
    };
    if !contact {
        return None;
    }
    let object = raw.object_id.as_ref().and_then(id_text);
    match action {
        "merge" => {
            let new = raw
                .new_object_id
                .as_ref()
                .and_then(id_text)
                .or_else(|| object.clone())?;
            let merged = raw
                .merged_object_ids
                .iter()
                .flatten()
                .filter_map(id_text)
                .collect();
            Some(ContactChange::Merge {
                primary: raw.primary_object_id.as_ref().and_then(id_text),
                merged,
                new,
            })
        }
        "deletion" => Some(ContactChange::Deletion(object?)),
        "privacyDeletion" => Some(ContactChange::PrivacyDeletion(object?)),
        "restore" => Some(ContactChange::Restore(object?)),
        _ => None,
    }
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A record id as text: HubSpot sends numbers here, and strings in the CRM API.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        Value::String(s)
            if !s.trim().is_empty() && s.trim().chars().all(|c| c.is_ascii_digit()) =>
        {
            Some(s.trim().to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "client-secret";
    const URL: &str = "https://sidecar.example.com/webhooks/hubspot";

    #[test]
    fn a_signature_verifies_only_for_its_own_request_and_time() {
        let body = br#"[{"portalId":1}]"#;
        let now = 1_700_000_000_000_i64;
        let ts = now.to_string();
        let sig = sign_v3(SECRET, "POST", URL, body, &ts);
        let check = |secret: &str, url: &str, body: &[u8], sig: Option<&str>, at: i64| {
            verify_v3(secret, "POST", url, body, Some(&ts), sig, at)
        };
        assert_eq!(check(SECRET, URL, body, Some(&sig), now), Ok(()));
        assert_eq!(
            check("other", URL, body, Some(&sig), now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(
                SECRET,
                "https://evil.example.com/webhooks/hubspot",
                body,
                Some(&sig),
                now
            ),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(SECRET, URL, b"[]", Some(&sig), now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(check(SECRET, URL, body, None, now), Err(Refusal::Unsigned));
        assert_eq!(
            check(SECRET, URL, body, Some("not base64!"), now),
            Err(Refusal::BadSignature)
        );
        let six_minutes = 6 * 60 * 1000;
        assert_eq!(
            check(SECRET, URL, body, Some(&sig), now + six_minutes),
            Err(Refusal::Stale)
        );
        assert_eq!(
            check(SECRET, URL, body, Some(&sig), now + 4 * 60 * 1000),
            Ok(())
        );
    }

    #[test]
    fn a_batch_reads_contact_changes_and_passes_over_the_rest() {
        let body = br#"[
            {"eventId":1,"portalId":62515,"occurredAt":1000,"subscriptionType":"contact.merge",
             "objectId":9,"primaryObjectId":5,"mergedObjectIds":[6],"newObjectId":9,"attemptNumber":0},
            {"eventId":2,"portalId":"62515","occurredAt":1001,"subscriptionType":"contact.privacyDeletion","objectId":"7"},
            {"eventId":3,"portalId":62515,"occurredAt":1002,"subscriptionType":"object.deletion","objectTypeId":"0-1","objectId":8},
            {"eventId":4,"portalId":62515,"occurredAt":1003,"subscriptionType":"object.deletion","objectTypeId":"0-2","objectId":8},
            {"eventId":5,"portalId":62515,"occurredAt":1004,"subscriptionType":"contact.propertyChange","objectId":8}
        ]"#;
        let parsed = parse_batch(body).unwrap();
        let changes: Vec<_> = parsed
            .iter()
            .map(|p| match p {
                Parsed::Event(e) => Some(e.change.clone()),
                Parsed::Other(_) => None,
            })
            .collect();
        assert_eq!(
            changes,
            vec![
                Some(ContactChange::Merge {
                    primary: Some("5".into()),
                    merged: vec!["6".into()],
                    new: "9".into()
                }),
                Some(ContactChange::PrivacyDeletion("7".into())),
                Some(ContactChange::Deletion("8".into())),
                None,
                None,
            ]
        );
        let Parsed::Event(first) = &parsed[0] else {
            panic!()
        };
        assert_eq!(first.dedup_key, "62515:merge:9:1000:1");
        assert_eq!(
            ContactChange::from_stored("merge", &first.raw),
            Some(first.change.clone())
        );
    }

    #[test]
    fn a_batch_that_is_not_one_is_refused() {
        assert!(matches!(parse_batch(b"{}"), Err(BatchError::NotJson(_))));
        assert!(matches!(
            parse_batch(br#"[{"subscriptionType":"contact.deletion"}]"#),
            Err(BatchError::Incomplete { index: 0, .. })
        ));
        let many = format!("[{}]", vec!["{}"; MAX_EVENTS + 1].join(","));
        assert!(matches!(
            parse_batch(many.as_bytes()),
            Err(BatchError::TooMany { .. })
        ));
    }

    #[test]
    fn the_app_subscribes_to_exactly_the_changes_the_sidecar_follows() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/hubspot-app/src/app/webhooks/webhooks-hsmeta.json");
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let config = &meta["config"];
        assert!(config["settings"]["targetUrl"]
            .as_str()
            .unwrap()
            .ends_with("/webhooks/hubspot"));
        let mut subscribed: Vec<&str> = ["legacyCrmObjects", "hubEvents"]
            .iter()
            .flat_map(|k| config["subscriptions"][k].as_array().unwrap())
            .map(|s| s["subscriptionType"].as_str().unwrap())
            .collect();
        subscribed.sort_unstable();
        assert_eq!(
            subscribed,
            [
                "contact.deletion",
                "contact.merge",
                "contact.privacyDeletion",
                "contact.restore"
            ]
        );
        // Each reads as a change the sidecar acts on.
        for t in subscribed {
            let raw: RawEvent = serde_json::from_value(serde_json::json!({
                "portalId": 1, "occurredAt": 1, "subscriptionType": t, "objectId": 5, "newObjectId": 6
            }))
            .unwrap();
            assert!(change_of(&raw).is_some(), "{t}");
        }
    }
}
