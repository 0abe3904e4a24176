//! Webhooks: who gets them, their shape, signature v3, batching, retries and the hand-made
//! (hostile) batches.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::Router;
use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};
use hubspot_emulator::{Emulator, EmulatorConfig, WebhookAttempt, WebhookSigning};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "emulator-client-secret";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }

    fn events(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// Checks the v3 signature the way a receiver must (constant-time compare).
    fn signature_valid(&self, url: &str) -> bool {
        let (Some(ts), Some(sig)) = (
            self.header("x-hubspot-request-timestamp"),
            self.header("x-hubspot-signature-v3"),
        ) else {
            return false;
        };
        let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(sig) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
        mac.update(b"POST");
        mac.update(url.as_bytes());
        mac.update(&self.body);
        mac.update(ts.as_bytes());
        mac.verify_slice(&expected).is_ok()
    }

    fn age_ms(&self) -> i64 {
        let ts: i64 = self
            .header("x-hubspot-request-timestamp")
            .and_then(|t| t.parse().ok())
            .expect("timestamp");
        chrono::Utc::now().timestamp_millis() - ts
    }
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Statuses to answer, in order; 200 once they run out.
    answers: Arc<Mutex<VecDeque<u16>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> AxStatus {
    r.got.lock().expect("lock").push(Received { headers, body });
    let status = r.answers.lock().expect("lock").pop_front().unwrap_or(200);
    AxStatus::from_u16(status).expect("status")
}

/// A receiver on an ephemeral port; returns it and the URL to configure (with a query string,
/// which the signature must cover as configured).
async fn receiver(answers: &[u16]) -> (Receiver, String) {
    let r = Receiver::default();
    r.answers.lock().expect("lock").extend(answers);
    let app = Router::new()
        .fallback(receive)
        .layer(DefaultBodyLimit::disable())
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (r, format!("http://{addr}/webhooks/hubspot?app=spot"))
}

async fn emulator(target: &str, retry: Duration) -> Emulator {
    start_with(EmulatorConfig {
        webhook_target: Some(target.to_string()),
        webhook_retry_delays: vec![retry],
        ..EmulatorConfig::default()
    })
    .await
}

/// A portal where the app was installed by OAuth (webhooks go only to such portals).
fn installed_portal(emu: &Emulator) -> (u64, String) {
    let (portal, key) = emu.create_portal();
    let _ = emu.grant_oauth_tokens(portal);
    (portal, key)
}

async fn wait_for(emu: &Emulator, what: &str, ok: impl Fn(&[WebhookAttempt]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempts = emu.webhook_attempts();
        if ok(&attempts) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {attempts:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_deletion_is_signed_v3_and_retried_after_a_500() {
    let (rx, url) = receiver(&[500]).await;
    let emu = emulator(&url, Duration::from_millis(100)).await;
    let (portal, _) = installed_portal(&emu);
    let id = emu.add_contact(portal, "ada@example.com", &[]);
    assert!(emu.delete_contact(portal, &id));

    wait_for(&emu, "a delivered retry", |a| {
        a.iter().any(|a| a.delivered())
    })
    .await;
    let attempts = emu.webhook_attempts();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].attempt_number, 0);
    assert_eq!(attempts[0].status, Some(500));
    assert_eq!(attempts[1].attempt_number, 1);
    assert_eq!(attempts[1].status, Some(200));
    assert_eq!(attempts[0].batch_id, attempts[1].batch_id);
    assert_eq!(attempts[1].url, url);

    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 2);
    for (n, r) in got.iter().enumerate() {
        assert!(r.signature_valid(&url), "attempt {n} is signed v3");
        assert!(!r.signature_valid("http://elsewhere/webhooks/hubspot?app=spot"));
        assert!(r.age_ms() >= 0 && r.age_ms() < 60_000);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let events = r.events();
        let e = &events[0];
        assert_eq!(events.as_array().map(Vec::len), Some(1));
        assert_eq!(e["subscriptionType"], "contact.deletion");
        assert_eq!(e["attemptNumber"], n);
        assert_eq!(e["objectId"], json!(id.parse::<u64>().expect("numeric")));
        assert_eq!(e["portalId"], portal);
        assert_eq!(e["appId"], 4242);
        assert_eq!(e["changeSource"], "CRM_UI");
        assert!(e["eventId"].is_u64() && e["subscriptionId"].is_u64());
        assert!(e["occurredAt"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000));
    }
    assert_eq!(
        got[0].events()[0]["eventId"],
        got[1].events()[0]["eventId"],
        "a retry carries the same events"
    );
    assert_ne!(
        got[0].header("x-hubspot-signature-v3"),
        got[1].header("x-hubspot-signature-v3")
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn portals_without_the_oauth_install_get_no_webhooks() {
    let (rx, url) = receiver(&[]).await;
    let emu = emulator(&url, Duration::from_millis(100)).await;
    let (portal, _) = emu.create_portal();
    let id = emu.add_contact(portal, "ada@example.com", &[]);
    assert!(emu.delete_contact(portal, &id));
    // An installed portal's event goes out; the service-key portal's never does.
    let (installed, _) = installed_portal(&emu);
    let other = emu.add_contact(installed, "bob@example.com", &[]);
    assert!(emu.delete_contact(installed, &other));
    wait_for(&emu, "the installed portal's event", |a| !a.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].events()[0]["portalId"], installed);

    // After an uninstall (every token revoked), none either.
    emu.revoke_portal(installed);
    let third = emu.add_contact(installed, "cy@example.com", &[]);
    assert!(emu.delete_contact(installed, &third));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.got.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn webhooks_are_off_without_a_target_and_follow_a_target_set_later() {
    let (rx, url) = receiver(&[]).await;
    let emu = start().await;
    let (portal, _) = installed_portal(&emu);
    let a = emu.add_contact(portal, "a@example.com", &[]);
    assert!(emu.delete_contact(portal, &a));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(emu.webhook_attempts().is_empty());
    emu.set_webhook_target(Some(url));
    assert!(emu.restore_contact(portal, &a));
    wait_for(&emu, "the restore", |a| a.iter().any(|a| a.delivered())).await;
    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].events()[0]["subscriptionType"], "contact.restore");
}

#[tokio::test]
async fn merge_and_privacy_deletion_events_over_http() {
    let (rx, url) = receiver(&[]).await;
    let emu = emulator(&url, Duration::from_millis(100)).await;
    let c = client();
    let (portal, tok) = installed_portal(&emu);
    let a = emu.add_contact(portal, "ada@example.com", &[("firstname", "Ada")]);
    let b = emu.add_contact(
        portal,
        "ada.old@example.com",
        &[("lastname", "Lovelace"), ("firstname", "A.")],
    );
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/merge",
        json!({"primaryObjectId": a, "objectIdToMerge": b}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let n: u64 = v["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
    wait_for(&emu, "the merge", |a| !a.is_empty()).await;

    let (s, _) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/gdpr-delete",
        json!({"objectId": n.to_string()}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    wait_for(&emu, "three batches", |a| a.len() >= 3).await;

    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 3);
    let num = |s: &str| json!(s.parse::<u64>().expect("numeric"));
    let merge = &got[0].events()[0];
    assert_eq!(merge["subscriptionType"], "contact.merge");
    assert_eq!(merge["objectId"], n);
    assert_eq!(merge["newObjectId"], n);
    assert_eq!(merge["primaryObjectId"], num(&a));
    assert_eq!(merge["mergedObjectIds"], json!([num(&b)]));
    assert_eq!(merge["numberOfPropertiesMoved"], 1, "lastname");
    assert_eq!(merge["changeSource"], "API");
    // The deletion first, the privacy deletion in a request of its own.
    let del = got[1].events();
    let privacy = got[2].events();
    assert_eq!(del.as_array().map(Vec::len), Some(1));
    assert_eq!(privacy.as_array().map(Vec::len), Some(1));
    assert_eq!(del[0]["subscriptionType"], "contact.deletion");
    assert_eq!(privacy[0]["subscriptionType"], "contact.privacyDeletion");
    assert_eq!(del[0]["objectId"], n);
    assert_eq!(privacy[0]["objectId"], n);
    assert!(got.iter().all(|r| r.signature_valid(&url)));
}

#[tokio::test]
async fn close_events_share_a_batch() {
    let (rx, url) = receiver(&[]).await;
    let emu = emulator(&url, Duration::from_millis(100)).await;
    let (portal, _) = installed_portal(&emu);
    let ids: Vec<String> = (0..5)
        .map(|i| emu.add_contact(portal, &format!("p{i}@example.com"), &[]))
        .collect();
    for id in &ids {
        assert!(emu.delete_contact(portal, id));
    }
    wait_for(&emu, "the batch", |a| !a.is_empty()).await;
    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 1);
    let events = got[0].events();
    let objects: Vec<String> = events
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["objectId"].to_string())
        .collect();
    assert_eq!(objects, ids);
}

#[tokio::test]
async fn an_unreachable_target_is_retried_and_given_up() {
    // A port nobody listens on (bound, then released).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/hooks");
    let emu = emulator(&url, Duration::from_millis(10)).await;
    let (portal, _) = installed_portal(&emu);
    let id = emu.add_contact(portal, "a@example.com", &[]);
    assert!(emu.delete_contact(portal, &id));
    wait_for(&emu, "11 attempts", |a| a.len() >= 11).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let attempts = emu.webhook_attempts();
    assert_eq!(attempts.len(), 11, "1 + 10 retries");
    assert!(attempts
        .iter()
        .all(|a| a.error.is_some() && a.status.is_none()));
    let numbers: Vec<u32> = attempts.iter().map(|a| a.attempt_number).collect();
    assert_eq!(numbers, (0..=10).collect::<Vec<u32>>());
}

#[tokio::test]
async fn hand_made_batches_signed_every_which_way() {
    let (rx, url) = receiver(&[]).await;
    let emu = start().await;
    let portal = 1234;
    let merge = emu.webhook_merge_event(portal, "11", &["12"], "13");
    assert_eq!(merge["subscriptionType"], "contact.merge");
    assert_eq!(merge["objectId"], 13);
    assert_eq!(merge["newObjectId"], 13);
    assert_eq!(merge["mergedObjectIds"], json!([12]));
    let batch = json!([emu.webhook_event(portal, "contact.deletion", "7"), merge]);

    for signing in [
        WebhookSigning::Valid,
        WebhookSigning::Unsigned,
        WebhookSigning::WrongSecret,
        WebhookSigning::Stale(Duration::from_secs(600)),
    ] {
        assert_eq!(emu.send_webhook(&url, &batch, signing).await, Ok(200));
    }
    let big = vec![b' '; 5 * 1024 * 1024];
    assert_eq!(
        emu.send_webhook_raw(&url, big, WebhookSigning::Valid).await,
        Ok(200)
    );

    let got = rx.got.lock().expect("lock").clone();
    assert_eq!(got.len(), 5);
    assert!(got[0].signature_valid(&url));
    assert!(got[0].age_ms() < 60_000);
    assert_eq!(got[0].events(), batch);
    assert!(got[1].header("x-hubspot-signature-v3").is_none());
    assert!(got[1].header("x-hubspot-request-timestamp").is_some());
    assert!(!got[2].signature_valid(&url));
    assert!(got[3].signature_valid(&url));
    assert!(got[3].age_ms() >= 600_000);
    assert_eq!(got[4].body.len(), 5 * 1024 * 1024);
    assert!(got[4].signature_valid(&url));
    // Hand-made batches are not the delivery task's.
    assert!(emu.webhook_attempts().is_empty());

    let refused = emu
        .send_webhook("http://127.0.0.1:1/nowhere", &batch, WebhookSigning::Valid)
        .await;
    assert!(refused.is_err());
}
