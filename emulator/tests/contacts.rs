//! Contacts: batch read/update/create/upsert, single object calls and search.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hubspot_emulator::{CreatedBy, EmulatorConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn ids_of(v: &Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn batch_read_by_email_is_case_insensitive_and_reports_missing() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let ada = emu.add_contact(
        portal,
        "ada@example.com",
        &[
            ("firstname", "Ada"),
            ("meltingspot_member_status", "invited"),
        ],
    );
    let bob = emu.add_contact(portal, "Bob@Example.com", &[]);
    let body = json!({"idProperty": "email", "properties": ["email", "meltingspot_member_status"],
        "inputs": [{"id": " ADA@example.com "}, {"id": "bob@example.com"}]});
    for path in [
        "/crm/v3/objects/contacts/batch/read?archived=false",
        "/crm/objects/2026-03/contacts/batch/read",
    ] {
        let (s, v) = post(&emu, &c, &tok, path, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "COMPLETE");
        assert!(v.get("numErrors").is_none());
        let mut got = ids_of(&v);
        got.sort();
        let mut want = vec![ada.clone(), bob.clone()];
        want.sort();
        assert_eq!(got, want);
        let r = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == ada.as_str())
            .unwrap();
        assert_eq!(r["properties"]["email"], "ada@example.com");
        assert_eq!(r["properties"]["meltingspot_member_status"], "invited");
        assert_eq!(r["properties"]["hs_object_id"], ada.as_str());
        assert!(
            r["properties"].get("firstname").is_none(),
            "only requested + default props"
        );
        assert_eq!(r["archived"], false);
    }
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/read",
        json!({"idProperty": "email", "inputs": [{"id": "ada@example.com"}, {"id": "nobody@example.com"}, {"id": "ghost@example.com"}]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS);
    assert_eq!(v["numErrors"], 1);
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
    assert_eq!(
        v["errors"][0]["context"]["ids"],
        json!(["nobody@example.com", "ghost@example.com"])
    );
    // Default properties when none are requested.
    assert_eq!(v["results"][0]["properties"]["firstname"], "Ada");
    assert!(v["results"][0]["properties"].get("lastname").is_some());
    // None found: 207 with empty results.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/read",
        json!({"idProperty": "email", "inputs": [{"id": "x@example.com"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS);
    assert_eq!(v["results"], json!([]));
    // By record id.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/read",
        json!({"inputs": [{"id": ada}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids_of(&v), vec![ada]);
    // More than 100 inputs.
    let inputs: Vec<Value> = (0..101)
        .map(|i| json!({"id": format!("u{i}@example.com")}))
        .collect();
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/read",
        json!({"idProperty": "email", "inputs": inputs}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["category"], "VALIDATION_ERROR");
}

#[tokio::test]
async fn batch_update_by_id_missing_ids_and_email_refusal() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[("meltingspot_bio", "old")]);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/objects/2026-03/contacts/batch/update",
        json!({"inputs": [
        {"id": ada, "properties": {"meltingspot_member_status": "accepted", "meltingspot_bio": "",
                                   "meltingspot_spot_invitation_date": "1582947017000"}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["results"][0]["properties"]["meltingspot_member_status"],
        "accepted"
    );
    let contact = emu.contact_by_email(portal, "ADA@example.com").unwrap();
    assert_eq!(
        contact
            .properties
            .get("meltingspot_member_status")
            .map(String::as_str),
        Some("accepted")
    );
    assert_eq!(
        contact
            .properties
            .get("meltingspot_bio")
            .map(String::as_str),
        Some(""),
        "\"\" clears the value (stored as an empty value)"
    );
    assert_eq!(
        contact.properties["meltingspot_spot_invitation_date"],
        "2020-02-29T03:30:17.000Z"
    );

    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/update",
        json!({"inputs": [
        {"id": "ada@example.com", "idProperty": "email", "properties": {"meltingspot_bio": "x"}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["message"],
        "Unable to perform update/upsert by non-unique 0-1 property"
    );

    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/update", json!({"inputs": [
        {"id": ada, "properties": {"meltingspot_bio": "new"}},
        {"id": "999999", "properties": {"meltingspot_bio": "y"}, "objectWriteTraceId": "t-missing"}]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(ids_of(&v), vec![ada.clone()]);
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
    assert_eq!(v["errors"][0]["context"]["ids"], json!(["999999"]));
    assert_eq!(
        emu.contact_by_email(portal, "ada@example.com")
            .unwrap()
            .properties["meltingspot_bio"],
        "new"
    );

    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/update", json!({"inputs": [
        {"id": ada, "properties": {"meltingspot_bio": "a"}}, {"id": ada, "properties": {"meltingspot_bio": "b"}}]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("Duplicate IDs"));
}

#[tokio::test]
async fn batch_update_validation_fails_the_whole_batch() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let bob = emu.add_contact(portal, "bob@example.com", &[]);
    let long = "é".repeat(65_537);
    let cases = [
        (json!({"email": "example.lcom"}), "INVALID_EMAIL", "email"),
        (
            json!({"meltingspot_member_status": "Accepted"}),
            "INVALID_OPTION",
            "meltingspot_member_status",
        ),
        (
            json!({"meltingspot_bio": long}),
            "INVALID_LENGTH",
            "meltingspot_bio",
        ),
        (json!({"nope": "x"}), "PROPERTY_DOESNT_EXIST", "nope"),
        (
            json!({"meltingspot_spot_invitation_date": "tomorrow"}),
            "INVALID_DATETIME",
            "meltingspot_spot_invitation_date",
        ),
        (
            json!({"hs_object_id": "1"}),
            "READ_ONLY_VALUE",
            "hs_object_id",
        ),
    ];
    for (props, code, name) in cases {
        let (s, v) = post(
            &emu,
            &c,
            &tok,
            "/crm/v3/objects/contacts/batch/update",
            json!({"inputs": [
            {"id": ada, "properties": {"meltingspot_bio": "fine"}},
            {"id": bob, "properties": props}]}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{code}: {v}");
        assert_eq!(v["category"], "VALIDATION_ERROR");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.starts_with("Property values were not valid: "), "{msg}");
        let inner: Value =
            serde_json::from_str(&msg["Property values were not valid: ".len()..]).unwrap();
        assert_eq!(inner[0]["error"], code);
        assert_eq!(inner[0]["name"], name);
        assert_eq!(inner[0]["isValid"], false);
        assert_eq!(v["errors"][0]["code"], code);
        assert_eq!(v["errors"][0]["context"]["id"], json!([bob]));
        assert_eq!(v["errors"][0]["context"]["propertyName"], json!([name]));
        assert_eq!(v["context"]["ids"], json!([bob]));
    }
    assert!(
        !emu.contact_by_email(portal, "ada@example.com")
            .unwrap()
            .properties
            .contains_key("meltingspot_bio"),
        "nothing of a failed batch is written"
    );
    // With objectWriteTraceIds the valid input goes through and the bad one is reported (207).
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/update",
        json!({"inputs": [
        {"id": ada, "properties": {"meltingspot_bio": "fine"}, "objectWriteTraceId": "t1"},
        {"id": bob, "properties": {"email": "bad@"}, "objectWriteTraceId": "t2"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(ids_of(&v), vec![ada]);
    assert_eq!(
        v["errors"][0]["context"]["objectWriteTraceId"],
        json!(["t2"])
    );
    assert_eq!(v["errors"][0]["category"], "VALIDATION_ERROR");
}

#[tokio::test]
async fn batch_create_with_trace_ids_reports_duplicates_per_input() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/create", json!({"inputs": [
        {"properties": {"email": "new@example.com", "firstname": "New", "meltingspot_member_status": "invited"}, "objectWriteTraceId": "m-1", "associations": []},
        {"properties": {"email": "ADA@example.com"}, "objectWriteTraceId": "m-2"},
        {"properties": {"email": "new@example.com"}, "objectWriteTraceId": "m-3"},
        {"properties": {"email": "bad"}, "objectWriteTraceId": "m-4"}]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(v["results"][0]["objectWriteTraceId"], "m-1");
    let new_id = v["results"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(v["numErrors"], 3);
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs[0]["category"], "CONFLICT");
    assert_eq!(
        errs[0]["message"],
        format!("Contact already exists. Existing ID: {ada}")
    );
    assert_eq!(errs[0]["context"]["objectWriteTraceId"], json!(["m-2"]));
    assert_eq!(
        errs[1]["message"],
        format!("Contact already exists. Existing ID: {new_id}")
    );
    assert_eq!(errs[2]["category"], "VALIDATION_ERROR");
    assert!(errs[2]["message"]
        .as_str()
        .unwrap()
        .contains("INVALID_EMAIL"));
    let created = emu.contact_by_email(portal, "new@example.com").unwrap();
    assert_eq!(created.created_by, CreatedBy::Api);
    assert_eq!(created.id, new_id);

    // Without trace ids a duplicate fails the whole batch.
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/create", json!({"inputs": [
        {"properties": {"email": "other@example.com"}}, {"properties": {"email": "ada@example.com"}}]})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["category"], "CONFLICT");
    assert_eq!(
        v["message"],
        format!("Contact already exists. Existing ID: {ada}")
    );
    assert!(emu.contact_by_email(portal, "other@example.com").is_none());
    // Needs one of email / firstname / lastname.
    let (s, _) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/create",
        json!({"inputs": [{"properties": {"meltingspot_bio": "x"}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn batch_upsert_creates_and_updates_all_or_nothing() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/upsert", json!({"inputs": [
        {"idProperty": "email", "id": "Ada@Example.com", "properties": {"meltingspot_member_status": "accepted"}},
        {"idProperty": "email", "id": "zed@example.com", "properties": {"firstname": "Zed"}}]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let res = v["results"].as_array().unwrap();
    assert_eq!(res[0]["id"], ada.as_str());
    assert_eq!(res[0]["new"], false);
    assert_eq!(res[1]["new"], true);
    assert_eq!(
        emu.contact_by_email(portal, "zed@example.com")
            .unwrap()
            .properties["firstname"],
        "Zed"
    );
    let (s, _) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/upsert", json!({"inputs": [
        {"idProperty": "email", "id": "yan@example.com", "properties": {"firstname": "Yan"}},
        {"idProperty": "email", "id": "ada@example.com", "properties": {"meltingspot_member_status": "gone"}}]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(emu.contact_by_email(portal, "yan@example.com").is_none());
}

#[tokio::test]
async fn single_contact_calls() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "ada@example.com", "firstname": "Ada"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/objects/2026-03/contacts",
        json!({"properties": {"email": "ADA@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["category"], "CONFLICT");
    assert_eq!(
        v["message"],
        format!("Contact already exists. Existing ID: {id}")
    );
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "bad@@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("\"error\":\"INVALID_EMAIL\""));
    let (s, v) = get(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/ada%40example.com?idProperty=email&properties=firstname",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["properties"]["firstname"], "Ada");
    let (s, v) = get(&emu, &c, &tok, "/crm/v3/objects/contacts/424242").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["category"], "OBJECT_NOT_FOUND");
    let (s, _) = patch(
        &emu,
        &c,
        &tok,
        &format!("/crm/v3/objects/contacts/{id}"),
        json!({"properties": {"meltingspot_bio": "hi"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(emu.contacts(portal)[0].properties["meltingspot_bio"], "hi");
}

#[tokio::test]
async fn search_eq_in_and_secondly_limit() {
    let emu = start_with(EmulatorConfig {
        search_rate_per_s: 5,
        ..Default::default()
    })
    .await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let ada = emu.add_contact(portal, "ada@example.com", &[("firstname", "Ada")]);
    let bob = emu.add_contact(portal, "bob@example.com", &[]);
    emu.add_contact(portal, "cy@example.com", &[]);
    let search = |body: Value| {
        let (emu, c, tok) = (&emu, &c, &tok);
        async move {
            let r = c
                .post(format!("{}/crm/v3/objects/contacts/search", emu.base_url()))
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                r.headers().get("x-hubspot-ratelimit-max").is_none(),
                "search carries no rate-limit headers"
            );
            split(r).await
        }
    };
    let (s, v) = search(json!({"filterGroups": [{"filters": [{"propertyName": "email", "operator": "EQ", "value": "ADA@example.com"}]}],
        "properties": ["email", "firstname"], "limit": 10})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["total"], 1);
    assert_eq!(v["results"][0]["id"], ada.as_str());
    assert_eq!(v["results"][0]["properties"]["firstname"], "Ada");
    let (s, v) = search(json!({"filterGroups": [{"filters": [{"propertyName": "email", "operator": "IN", "values": ["ada@example.com", "bob@example.com"]}]}], "limit": 1})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["total"], 2);
    assert_eq!(v["paging"]["next"]["after"], "1");
    let (s, v) = search(json!({"filterGroups": [{"filters": [{"propertyName": "email", "operator": "IN", "values": ["ada@example.com", "bob@example.com"]}]}], "limit": 1, "after": "1"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["results"][0]["id"], bob.as_str());
    let (s, _) = search(json!({"limit": 201})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // 4 searches so far inside one second (if the machine was fast); push until refused.
    let mut refused = None;
    for _ in 0..6 {
        let (s, v) = search(json!({"limit": 1})).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(v);
            break;
        }
    }
    let v = refused.expect("the 6th search inside a second is refused");
    assert_eq!(v["policyName"], "SECONDLY");
    assert_eq!(v["errorType"], "RATE_LIMIT");
    assert_eq!(v["message"], "You have reached your secondly limit.");
    let stats = emu.request_stats(portal);
    assert!(stats.count("contacts.search", 429) >= 1);
    assert_eq!(
        stats.peak_in_10s, 0,
        "search does not count toward the ten-secondly window"
    );
    // The secondly window rolls: wait for a success with a deadline.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, _) = search(json!({"limit": 1})).await;
        if s == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "search limit never rolled");
    }
}

/// E-mail look-ups are indexed: 100,000 seeded contacts and a batch read by e-mail stay fast,
/// and e-mail changes and merges keep the look-ups right.
#[tokio::test]
async fn email_lookups_scale_and_follow_changes() {
    const N: usize = 100_000;
    let started = Instant::now();
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let ids: Vec<String> = (0..N)
        .map(|i| emu.add_contact(portal, &format!("user{i}@example.com"), &[]))
        .collect();
    let seeded = started.elapsed();
    // Seeding an existing e-mail updates that contact.
    assert_eq!(
        emu.add_contact(portal, " USER7@example.com", &[("firstname", "Seven")]),
        ids[7]
    );
    let picks: Vec<usize> = (0..100).map(|k| k * (N / 100) + k).collect();
    let inputs: Vec<Value> = picks
        .iter()
        .map(|i| json!({"id": format!(" User{i}@Example.com")}))
        .collect();
    let read = |inputs: Vec<Value>| {
        let (emu, c, tok) = (&emu, &c, &tok);
        async move {
            post(
                emu,
                c,
                tok,
                "/crm/v3/objects/contacts/batch/read",
                json!({"idProperty": "email", "properties": ["email"], "inputs": inputs}),
            )
            .await
        }
    };
    let (s, v) = read(inputs).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut got = ids_of(&v);
    got.sort();
    let mut want: Vec<String> = picks.iter().map(|i| ids[*i].clone()).collect();
    want.sort();
    assert_eq!(got, want);

    // An e-mail change (PATCH): the old address is gone, the new one answers.
    let (s, v) = patch(
        &emu,
        &c,
        &tok,
        &format!("/crm/v3/objects/contacts/{}", ids[10]),
        json!({"properties": {"email": "Renamed@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = read(vec![json!({"id": "user10@example.com"})]).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    let (s, v) = read(vec![json!({"id": "renamed@example.com"})]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids_of(&v), vec![ids[10].clone()]);
    assert_eq!(
        emu.contact_by_email(portal, "RENAMED@example.com")
            .unwrap()
            .id,
        ids[10]
    );
    // The old address is free again.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "user10@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let reborn = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        emu.contact_by_email(portal, "user10@example.com")
            .unwrap()
            .id,
        reborn
    );

    // A merge: the new record answers the primary's e-mail; the secondary's e-mail becomes an
    // additional one (no read match, but a create with it conflicts with the new record).
    let merged = emu.merge_contacts(portal, &ids[20], &ids[21]);
    let (s, v) = read(vec![
        json!({"id": "user20@example.com"}),
        json!({"id": "user21@example.com"}),
    ])
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(ids_of(&v), vec![merged.clone()]);
    assert_eq!(
        v["errors"][0]["context"]["ids"],
        json!(["user21@example.com"])
    );
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "USER21@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().ends_with(&merged), "{v}");

    let total = started.elapsed();
    eprintln!("seeded {N} contacts in {seeded:?}; whole test {total:?}");
    // Linear scans took minutes here; the index keeps it to seconds even in debug builds.
    assert!(total < Duration::from_secs(10), "too slow: {total:?}");
    emu.shutdown().await;
}
