//! Webhooks of the public app, delivered the way HubSpot publishes it (reference §10).
//!
//! Contact changes of portals where the app was installed by OAuth become events in the
//! state's outbox; one background task (spawned by `Emulator::start_on`, aborted on shutdown)
//! waits for events, lets a short window go by so that close events share a request, and POSTs
//! each portal's events as a JSON array of at most 100 to the configured target, signed with
//! signature v3. A batch answered with a connection failure, a timeout or any 4xx/5xx is tried
//! again after the configured delays (at most [`MAX_RETRIES`] times), `attemptNumber` counting
//! up, with a fresh timestamp and signature each time.
//!
//! First attempts go out one batch after another, in the order the events happened (so a
//! privacy deletion's `contact.deletion` batch is sent before its `contact.privacyDeletion`
//! batch); retries run on their own and may overtake later batches, as HubSpot's do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::task::JoinSet;

use crate::model::{WebhookAttempt, WebhookSigning};
use crate::state::{Shared, State};
use crate::EmulatorConfig;

/// Events are at most this many per request (HubSpot: "up to 100").
pub(crate) const MAX_EVENTS_PER_REQUEST: usize = 100;
/// How long events are gathered before a batch goes out.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// HubSpot's timeout per webhook request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HubSpot retries a failed batch up to 10 times.
pub(crate) const MAX_RETRIES: u32 = 10;

/// What made a change, as the events' `changeSource` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeSource {
    /// A person in HubSpot's UI: the emulator's Rust and `/_emulator/` calls.
    CrmUi,
    /// An integration's API call: the emulator's HTTP API routes.
    Api,
}

impl ChangeSource {
    fn as_str(self) -> &'static str {
        match self {
            ChangeSource::CrmUi => "CRM_UI",
            ChangeSource::Api => "API",
        }
    }
}

/// An entry of the outbox.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Event {
        portal: u64,
        /// The target at the time of the change: a target set later gets only later events.
        target: String,
        event: Value,
    },
    /// Closes the portal's open batch: its next event goes into another request.
    Break { portal: u64 },
}

/// The subscription an event type belongs to. HubSpot gives every subscription of an app an
/// id; the emulator's app has one per contact event type, numbered stably.
fn subscription_id(subscription_type: &str) -> u64 {
    const KNOWN: [&str; 7] = [
        "contact.creation",
        "contact.deletion",
        "contact.merge",
        "contact.privacyDeletion",
        "contact.propertyChange",
        "contact.restore",
        "contact.associationChange",
    ];
    let n = KNOWN
        .iter()
        .position(|t| *t == subscription_type)
        .map_or(99, |i| i as u64 + 1);
    3_100_000 + n
}

/// A JSON number for a numeric record id; anything else stays a string (hand-made hostile
/// events).
pub(crate) fn object_id_value(id: &str) -> Value {
    id.trim()
        .parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::String(id.to_string()))
}

/// One event as HubSpot sends it, with `attemptNumber` 0.
pub(crate) fn event_json(
    cfg: &EmulatorConfig,
    portal: u64,
    subscription_type: &str,
    object_id: Value,
    source: ChangeSource,
    at: DateTime<Utc>,
) -> Value {
    // Below 2^53: an id every JSON reader keeps exactly (HubSpot's are far smaller still).
    let event_id: u64 = rand::thread_rng().gen_range(1..(1u64 << 53));
    json!({
        "eventId": event_id,
        "subscriptionId": subscription_id(subscription_type),
        "portalId": portal,
        "appId": cfg.app_id,
        "occurredAt": at.timestamp_millis(),
        "subscriptionType": subscription_type,
        "attemptNumber": 0,
        "objectId": object_id,
        "changeSource": source.as_str(),
    })
}

/// Makes a `contact.merge` event of one made by [`event_json`] (whose `objectId` is the new
/// record, like `newObjectId`).
pub(crate) fn add_merge_fields(
    e: &mut Value,
    primary: &str,
    merged: &[&str],
    new_id: &str,
    moved: usize,
) {
    e["primaryObjectId"] = object_id_value(primary);
    e["mergedObjectIds"] = Value::Array(merged.iter().map(|m| object_id_value(m)).collect());
    e["newObjectId"] = object_id_value(new_id);
    e["numberOfPropertiesMoved"] = json!(moved);
}

impl State {
    /// Queues an event for the portal, if the app is installed there and a target is set.
    pub fn emit_webhook(&mut self, portal: u64, event: Value) {
        let Some(target) = self.cfg.webhook_target.clone() else {
            return;
        };
        if !self.portals.get(&portal).is_some_and(|p| p.app_installed) {
            return;
        }
        self.outbox.push(Outgoing::Event {
            portal,
            target,
            event,
        });
        self.webhook_wake.notify_one();
    }

    /// The portal's following events go into another request than the ones before (a no-op
    /// when none of its events wait).
    pub fn break_webhook_batch(&mut self, portal: u64) {
        let waiting = self
            .outbox
            .iter()
            .any(|o| matches!(o, Outgoing::Event { portal: p, .. } if *p == portal));
        if waiting {
            self.outbox.push(Outgoing::Break { portal });
        }
    }
}

/// Signature v3: Base64(HMAC-SHA256(secret, method + URL + body + timestamp)).
pub(crate) fn signature_v3(
    secret: &str,
    method: &str,
    url: &str,
    body: &[u8],
    timestamp: &str,
) -> String {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(method.as_bytes());
    mac.update(url.as_bytes());
    mac.update(body);
    mac.update(timestamp.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The client the deliveries use: HubSpot's timeout, no redirects followed.
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// POSTs `body` to `url` with the timestamp header and, when `secret` is given, the v3
/// signature made with it. The receiver's status, or why there was none.
pub(crate) async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    secret: Option<&str>,
    timestamp_ms: i64,
) -> Result<u16, String> {
    let ts = timestamp_ms.to_string();
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-HubSpot-Request-Timestamp", &ts);
    if let Some(secret) = secret {
        req = req.header(
            "X-HubSpot-Signature-v3",
            signature_v3(secret, "POST", url, &body, &ts),
        );
    }
    let resp = req.body(body).send().await.map_err(describe)?;
    Ok(resp.status().as_u16())
}

fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        format!("timeout: {e}")
    } else if e.is_connect() {
        format!("connection failed: {e}")
    } else {
        e.to_string()
    }
}

/// A hand-made request for `Emulator::send_webhook[_raw]`.
pub(crate) async fn send_hostile(
    secret: &str,
    url: &str,
    body: Vec<u8>,
    signing: WebhookSigning,
) -> Result<u16, String> {
    let client = http_client()?;
    let now = Utc::now().timestamp_millis();
    let wrong = format!("{secret}-not-the-client-secret");
    let (ts, key) = match signing {
        WebhookSigning::Valid => (now, Some(secret)),
        WebhookSigning::Unsigned => (now, None),
        WebhookSigning::WrongSecret => (now, Some(wrong.as_str())),
        WebhookSigning::Stale(ago) => {
            let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
            (now.saturating_sub(ago), Some(secret))
        }
    };
    post_signed(&client, url, body, key, ts).await
}

/// Events of one portal for one target, sent (and retried) together.
struct Batch {
    id: u64,
    portal: u64,
    target: String,
    events: Vec<Value>,
}

/// Cuts the outbox into requests: per portal and target, in order, at most 100 events each,
/// a new one after every `Break`.
fn batches(items: Vec<Outgoing>, next_id: &mut u64) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    let mut open: HashMap<(u64, String), usize> = HashMap::new();
    for item in items {
        match item {
            Outgoing::Break { portal } => open.retain(|(p, _), _| *p != portal),
            Outgoing::Event {
                portal,
                target,
                event,
            } => {
                let key = (portal, target);
                let slot = open.get(&key).copied().filter(|&i| {
                    out.get(i)
                        .is_some_and(|b| b.events.len() < MAX_EVENTS_PER_REQUEST)
                });
                match slot.and_then(|i| out.get_mut(i)) {
                    Some(b) => b.events.push(event),
                    None => {
                        let id = *next_id;
                        *next_id += 1;
                        open.insert(key.clone(), out.len());
                        out.push(Batch {
                            id,
                            portal,
                            target: key.1,
                            events: vec![event],
                        });
                    }
                }
            }
        }
    }
    out
}

/// The delay before retry `n` (1-based): the n-th of the list, the last one once the list
/// runs out; `None` (no retries) for an empty list.
fn retry_delay(delays: &[Duration], n: u32) -> Option<Duration> {
    let i = usize::try_from(n.saturating_sub(1)).unwrap_or(usize::MAX);
    delays.get(i).or(delays.last()).copied()
}

/// The delivery task. Runs until aborted (which also aborts the pending retries).
pub(crate) async fn run(shared: Arc<Shared>) {
    let wake = shared.lock().webhook_wake.clone();
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "webhooks disabled: no HTTP client");
            return;
        }
    };
    let mut retries = JoinSet::new();
    loop {
        wake.notified().await;
        if shared.is_stopping() {
            return;
        }
        tokio::time::sleep(BATCH_WINDOW).await;
        while retries.try_join_next().is_some() {}
        let todo = {
            let mut st = shared.lock();
            let items = std::mem::take(&mut st.outbox);
            let mut next = st.next_webhook_batch;
            let todo = batches(items, &mut next);
            st.next_webhook_batch = next;
            todo
        };
        for batch in todo {
            if shared.is_stopping() {
                return;
            }
            if !attempt(&shared, &client, &batch, 0).await {
                retries.spawn(retry(shared.clone(), client.clone(), batch));
            }
        }
    }
}

async fn retry(shared: Arc<Shared>, client: reqwest::Client, batch: Batch) {
    for n in 1..=MAX_RETRIES {
        let delay = retry_delay(&shared.lock().cfg.webhook_retry_delays, n);
        let Some(delay) = delay else {
            return;
        };
        tokio::time::sleep(delay).await;
        if shared.is_stopping() || attempt(&shared, &client, &batch, n).await {
            return;
        }
    }
    tracing::debug!(
        batch = batch.id,
        "webhook batch given up after {MAX_RETRIES} retries"
    );
}

/// One POST of the batch; whether it was delivered (no retry wanted).
async fn attempt(shared: &Shared, client: &reqwest::Client, batch: &Batch, n: u32) -> bool {
    let secret = shared.lock().cfg.client_secret.clone();
    let events: Vec<Value> = batch
        .events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if let Value::Object(m) = &mut e {
                m.insert("attemptNumber".into(), json!(n));
            }
            e
        })
        .collect();
    let events = Value::Array(events);
    let body = events.to_string().into_bytes();
    let outcome = post_signed(
        client,
        &batch.target,
        body,
        Some(&secret),
        Utc::now().timestamp_millis(),
    )
    .await;
    tracing::debug!(batch = batch.id, attempt = n, ?outcome, "webhook attempt");
    let record = WebhookAttempt {
        batch_id: batch.id,
        portal_id: batch.portal,
        url: batch.target.clone(),
        attempt_number: n,
        events,
        status: outcome.as_ref().ok().copied(),
        error: outcome.as_ref().err().cloned(),
        at: Utc::now(),
    };
    let delivered = record.status.is_some_and(|s| s < 400);
    shared.lock().webhook_log.push(record);
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(portal: u64, n: u64) -> Outgoing {
        Outgoing::Event {
            portal,
            target: "http://t/".into(),
            event: json!({ "n": n }),
        }
    }

    #[test]
    fn batches_split_by_portal_break_and_size() {
        let mut items = vec![ev(1, 0), ev(2, 1), ev(1, 2), Outgoing::Break { portal: 1 }];
        items.push(ev(1, 3));
        items.extend((0..150).map(|i| ev(3, i)));
        let mut next = 7;
        let b = batches(items, &mut next);
        let sizes: Vec<(u64, usize)> = b.iter().map(|b| (b.portal, b.events.len())).collect();
        assert_eq!(sizes, vec![(1, 2), (2, 1), (1, 1), (3, 100), (3, 50)]);
        assert_eq!(b[0].id, 7);
        assert_eq!(next, 12);
    }

    #[test]
    fn retry_delays_repeat_the_last() {
        let d = [Duration::from_secs(1), Duration::from_secs(2)];
        assert_eq!(retry_delay(&d, 1), Some(Duration::from_secs(1)));
        assert_eq!(retry_delay(&d, 2), Some(Duration::from_secs(2)));
        assert_eq!(retry_delay(&d, 9), Some(Duration::from_secs(2)));
        assert_eq!(retry_delay(&[], 1), None);
    }

    #[test]
    fn signature_matches_a_known_value() {
        // Base64(HMAC-SHA256("secret", "POSThttp://x/{}1")), computed with Python's hmac.
        let s = signature_v3("secret", "POST", "http://x/", b"{}", "1");
        assert_eq!(s, "45zH/qlJKCxvfec+Mf/2PR5+sngb0Vbw3fjLY/13F7U=");
    }
}
