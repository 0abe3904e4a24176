//! App Events (v4 and the date-versioned path) and timeline v3.

mod common;

use common::*;
use hubspot_emulator::{CreatedBy, EventApi};
use reqwest::StatusCode;
use serde_json::{json, Value};

const BATCH: &str = "/integrators/timeline/v4/events/batch";

fn ev(id: &str, object: &str) -> Value {
    json!({"eventTypeName": "ae123_spot_joined", "objectId": object, "id": id, "timestamp": "2026-03-18T15:30:32.123Z",
           "properties": {"spot_name": "Growth Club", "title": "Growth Club"}})
}

#[tokio::test]
async fn app_events_batches_are_atomic_on_both_paths() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let ada = emu.add_contact(t.portal, "ada@example.com", &[]);
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        "/integrators/timeline/2026-03/events/batch",
        json!({"inputs": [ev("d1", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the date-versioned path: {v}");
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        "/integrators/timeline/2026-03/events/batch",
        json!({"inputs": [ev("d1", &ada), ev("d2", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        emu.timeline_events(t.portal).len(),
        1,
        "d2 was not stored either"
    );
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        "/integrators/timeline/2025-09/events/batch",
        json!({"inputs": [ev("d3", &ada)]}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "App Events have no 2025-09 version"
    );
}

#[tokio::test]
async fn app_events_batch_success_and_repeated_ids() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let ada = emu.add_contact(t.portal, "ada@example.com", &[]);
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e1", &ada), ev("e2", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "COMPLETE");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    let events = emu.timeline_events(t.portal);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].api, EventApi::AppEvents);
    assert_eq!(events[0].event_type, "ae123_spot_joined");
    assert_eq!(events[0].object_id, ada);
    assert_eq!(events[0].timestamp, "2026-03-18T15:30:32.123Z");
    assert_eq!(events[0].properties["spot_name"], "Growth Club");

    // The same ids again: 409, nothing stored twice, and the body names no id.
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e1", &ada), ev("e2", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["category"], "CONFLICT");
    assert!(v.get("context").is_none(), "{v}");
    assert!(v["message"].as_str().unwrap().contains("already exist"));
    assert_eq!(emu.timeline_events(t.portal).len(), 2);
    // Mixed: atomic, so the new one is NOT stored either (409, none accepted).
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e1", &ada), ev("e3", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(emu.timeline_events(t.portal).len(), 2);
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e3", &ada)]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(emu.timeline_events(t.portal).len(), 3);
    // Single endpoint.
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        "/integrators/timeline/v4/events",
        ev("e4", &ada),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "e4");
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        "/integrators/timeline/v4/events",
        ev("e4", &ada),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(emu.timeline_events(t.portal).len(), 4);
    let stats = emu.request_stats(t.portal);
    assert_eq!(stats.count("app_events.batch", 200), 2);
    assert_eq!(stats.count("app_events.batch", 409), 2);
    assert_eq!(stats.count("app_events.batch", 207), 0, "never a 207");
    assert_eq!(stats.count("app_events.create", 409), 1);
}

#[tokio::test]
async fn app_events_refuse_unknown_objects_bad_inputs_and_service_keys() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let ada = emu.add_contact(t.portal, "ada@example.com", &[]);
    let (s, v) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e1", &ada), ev("e2", "777777")]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["category"], "VALIDATION_ERROR");
    assert_eq!(v["context"]["ids"], json!(["777777"]));
    assert!(
        emu.timeline_events(t.portal).is_empty(),
        "the batch is atomic"
    );
    assert_eq!(
        emu.contacts(t.portal).len(),
        1,
        "no event creates a contact"
    );

    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [{"objectId": ada, "id": "x"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [{"eventTypeName": "t", "id": "x"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let many: Vec<Value> = (0..501).map(|i| ev(&format!("m{i}"), &ada)).collect();
    let (s, _) = post(&emu, &c, &t.access, BATCH, json!({"inputs": many})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // A contact of another portal is unknown here (isolation). Record ids
    // are per portal, as in HubSpot: bob's id is one this portal never gave.
    let (other, key) = emu.create_portal();
    for i in 0..50 {
        emu.add_contact(other, &format!("filler{i}@example.com"), &[]);
    }
    let bob = emu.add_contact(other, "bob@example.com", &[]);
    assert!(emu.contacts(t.portal).iter().all(|c| c.id != bob));
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        BATCH,
        json!({"inputs": [ev("e9", &bob)]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Service keys cannot create events.
    let (s, v) = post(&emu, &c, &key, BATCH, json!({"inputs": [ev("e1", &bob)]})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["category"], "MISSING_SCOPES");
    let (s, _) = post(
        &emu,
        &c,
        &key,
        "/crm/v3/timeline/events/batch/create",
        json!({"inputs": []}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(emu.timeline_events(other).is_empty());

    // An OAuth token without the timeline scope is refused too.
    let code = authorize(
        &emu,
        &c,
        "oauth crm.objects.contacts.read crm.objects.contacts.write",
    )
    .await;
    let (_, v) = token(
        &emu,
        &c,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "emulator-client-id"),
            ("client_secret", "emulator-client-secret"),
            ("redirect_uri", REDIRECT),
            ("code", &code),
        ],
    )
    .await;
    let limited = v["access_token"].as_str().unwrap();
    let (s, _) = post(&emu, &c, limited, BATCH, json!({"inputs": [ev("e1", "1")]})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn timeline_v3_templates_and_events() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let base = emu.base_url();
    let template = json!({"name": "spot_joined", "objectType": "contacts", "headerTemplate": "Joined the Spot {{spot_name}}",
        "detailTemplate": "{{title}}", "tokens": [
            {"name": "spot_name", "label": "Spot name", "type": "string"},
            {"name": "title", "label": "Title", "type": "string"}]});
    let r = c
        .post(format!(
            "{base}/crm/v3/timeline/4242/event-templates?hapikey=wrong"
        ))
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .post(format!(
            "{base}/crm/v3/timeline/1/event-templates?hapikey=emulator-developer-key"
        ))
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (s, v) = split(
        c.post(format!(
            "{base}/crm/v3/timeline/4242/event-templates?hapikey=emulator-developer-key"
        ))
        .json(&template)
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let tid = v["id"].as_str().unwrap().to_string();
    assert!(tid.chars().all(|c| c.is_ascii_digit()));
    let (s, v) = split(
        c.get(format!(
            "{base}/integrators/timeline/v3/4242/event-templates?hapikey=emulator-developer-key"
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["results"][0]["name"], "spot_joined");
    let (s, _) = split(
        c.get(format!(
            "{base}/crm/v3/timeline/4242/event-templates/{tid}?hapikey=emulator-developer-key"
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        emu.request_stats(0).count("timeline.templates.create", 201),
        1
    );

    let ada = emu.add_contact(t.portal, "ada@example.com", &[]);
    let (s, v) = post(&emu, &c, &t.access, "/crm/v3/timeline/events/batch/create", json!({"inputs": [
        {"eventTemplateId": tid, "id": "j-1", "objectId": ada, "timestamp": "2026-03-18T15:30:32.123Z", "tokens": {"spot_name": "Club", "title": "Club"}},
        {"eventTemplateId": tid, "id": "j-2", "email": "New@Example.com", "tokens": {"spot_name": "Club"}},
        {"eventTemplateId": tid, "id": "j-3", "objectId": ada, "tokens": {"undeclared": "x"}},
        {"eventTemplateId": "999", "id": "j-4", "objectId": ada}]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["numErrors"], 2);
    assert_eq!(v["errors"][0]["context"]["ids"], json!(["j-3"]));
    let created = emu
        .contact_by_email(t.portal, "new@example.com")
        .expect("email identification creates the contact");
    assert_eq!(created.created_by, CreatedBy::TimelineEvent);
    let events = emu.timeline_events(t.portal);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].api, EventApi::TimelineV3);
    assert_eq!(events[0].event_type, "spot_joined");
    assert_eq!(events[1].object_id, created.id);

    // Same id again: last write wins, still one event.
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        "/crm/v3/timeline/events",
        json!(
        {"eventTemplateId": tid, "id": "j-1", "objectId": ada, "tokens": {"spot_name": "Renamed"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let events = emu.timeline_events(t.portal);
    assert_eq!(events.len(), 2);
    let j1 = events.iter().find(|e| e.id == "j-1").unwrap();
    assert_eq!(j1.properties["spot_name"], "Renamed");
    let (s, _) = post(
        &emu,
        &c,
        &t.access,
        "/crm/v3/timeline/events",
        json!(
        {"eventTemplateId": tid, "utk": "abc", "tokens": {}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
