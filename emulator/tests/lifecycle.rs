//! Merges, deletions (archive / restore) and privacy deletions of contacts (reference §10).

mod common;

use common::*;
use hubspot_emulator::{Emulator, MergeError};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const MERGE_PROPS: &str =
    "properties=email,firstname,lastname,hs_merged_object_ids,hs_additional_emails";

async fn delete(emu: &Emulator, c: &Client, tok: &str, path: &str) -> (StatusCode, Value) {
    let r = c
        .delete(format!("{}{}", emu.base_url(), path))
        .bearer_auth(tok)
        .send()
        .await
        .expect("delete");
    split(r).await
}

/// Ada (primary) and her old address (secondary), merged through the Rust API.
fn merged_pair(emu: &Emulator, portal: u64) -> (String, String, String) {
    let a = emu.add_contact(portal, "ada@example.com", &[("firstname", "Ada")]);
    let b = emu.add_contact(
        portal,
        "ada.old@example.com",
        &[("firstname", "Augusta"), ("lastname", "Lovelace")],
    );
    let n = emu.merge_contacts(portal, &a, &b);
    (a, b, n)
}

#[tokio::test]
async fn merge_makes_a_new_record_that_reads_by_old_ids_answer() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let (a, b, n) = merged_pair(&emu, portal);
    assert_ne!(n, a);
    assert_ne!(n, b);

    for path in [
        format!("/crm/v3/objects/contacts/{a}?{MERGE_PROPS}"),
        format!("/crm/objects/2026-03/contacts/{b}?{MERGE_PROPS}"),
        format!("/crm/v3/objects/contacts/{n}?{MERGE_PROPS}"),
    ] {
        let (s, v) = get(&emu, &c, &tok, &path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["id"], n.as_str(), "the new id, not the one asked for");
        let p = &v["properties"];
        assert_eq!(p["email"], "ada@example.com");
        assert_eq!(p["firstname"], "Ada", "the primary's value wins");
        assert_eq!(p["lastname"], "Lovelace", "the secondary's value moves");
        assert_eq!(p["hs_additional_emails"], "ada.old@example.com");
        assert_eq!(p["hs_merged_object_ids"], format!("{a};{b}"));
        assert_eq!(p["hs_object_id"], n.as_str());
    }

    // Batch read by the old ids: the merged record, once, under its new id.
    let body = json!({"properties": ["email", "hs_merged_object_ids"], "propertiesWithHistory": [],
        "inputs": [{"id": a}, {"id": b}]});
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/read", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "{v}");
    assert_eq!(results[0]["id"], n.as_str());
    assert_eq!(
        results[0]["properties"]["hs_merged_object_ids"],
        format!("{a};{b}")
    );

    // Not asked for: not returned.
    let (_, v) = get(&emu, &c, &tok, &format!("/crm/v3/objects/contacts/{a}")).await;
    assert!(v["properties"].get("hs_merged_object_ids").is_none(), "{v}");

    // The Rust view: one contact left.
    let all = emu.contacts(portal);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, n);
}

#[tokio::test]
async fn a_chain_of_merges_resolves_to_the_last_record() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let (a, b, n) = merged_pair(&emu, portal);
    let d = emu.add_contact(portal, "lovelace@example.com", &[("lastname", "L.")]);
    let n2 = emu.merge_contacts(portal, &d, &n);
    let (s, v) = get(
        &emu,
        &c,
        &tok,
        &format!("/crm/v3/objects/contacts/{a}?{MERGE_PROPS}"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], n2.as_str());
    let p = &v["properties"];
    assert_eq!(p["email"], "lovelace@example.com");
    assert_eq!(p["lastname"], "L.");
    assert_eq!(p["firstname"], "Ada");
    assert_eq!(
        p["hs_additional_emails"],
        "ada@example.com;ada.old@example.com"
    );
    let mut ids: Vec<u64> = [&a, &b, &n, &d]
        .iter()
        .map(|s| s.parse().expect("numeric"))
        .collect();
    ids.sort();
    let want: Vec<String> = ids.iter().map(u64::to_string).collect();
    assert_eq!(p["hs_merged_object_ids"], want.join(";"));
}

#[tokio::test]
async fn updates_by_an_old_id_are_object_not_found() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let (a, _b, n) = merged_pair(&emu, portal);

    let body = json!({"inputs": [
        {"id": a, "properties": {"firstname": "X"}},
        {"id": n, "properties": {"lastname": "Byron"}}
    ]});
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/update",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["numErrors"], 1);
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
    assert_eq!(v["errors"][0]["context"]["ids"], json!([a]));
    assert_eq!(v["results"][0]["id"], n.as_str());

    let (s, v) = patch(
        &emu,
        &c,
        &tok,
        &format!("/crm/v3/objects/contacts/{a}"),
        json!({"properties": {"firstname": "X"}}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["category"], "OBJECT_NOT_FOUND");
    let merged = emu
        .contact_by_email(portal, "ada@example.com")
        .expect("merged");
    assert_eq!(merged.properties["firstname"], "Ada");
    assert_eq!(merged.properties["lastname"], "Byron");
}

#[tokio::test]
async fn lookups_by_email_match_the_primary_email_only() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let (_a, _b, n) = merged_pair(&emu, portal);
    let body = json!({"idProperty": "email", "properties": ["email"], "propertiesWithHistory": [],
        "inputs": [{"id": "ada.old@example.com"}, {"id": "ada@example.com"}]});
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/read", body).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["results"][0]["id"], n.as_str());
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
    assert_eq!(
        v["errors"][0]["context"]["ids"],
        json!(["ada.old@example.com"])
    );

    // Additional e-mails stay unique: a new contact cannot take one.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "ADA.OLD@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        v["message"],
        format!("Contact already exists. Existing ID: {n}")
    );
    assert!(emu
        .contact_by_email(portal, "ada.old@example.com")
        .is_none());
}

#[tokio::test]
async fn merge_over_http() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let a = emu.add_contact(portal, "grace@example.com", &[]);
    let b = emu.add_contact(portal, "g.hopper@example.com", &[("lastname", "Hopper")]);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/objects/2026-03/contacts/merge",
        json!({"primaryObjectId": a, "objectIdToMerge": b}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let n = v["id"].as_str().expect("id").to_string();
    assert_ne!(n, a);
    assert_eq!(v["properties"]["email"], "grace@example.com");
    assert_eq!(v["properties"]["lastname"], "Hopper");
    assert_eq!(v["archived"], false);

    // Old ids are no longer mergeable, nor is a record with itself.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/merge",
        json!({"primaryObjectId": a, "objectIdToMerge": n}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/merge",
        json!({"primaryObjectId": n, "objectIdToMerge": n}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(matches!(
        emu.try_merge_contacts(portal, &n, "999999"),
        Err(MergeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn delete_then_restore_keeps_the_id() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let a = emu.add_contact(portal, "alan@example.com", &[("firstname", "Alan")]);

    let (s, _) = delete(&emu, &c, &tok, &format!("/crm/v3/objects/contacts/{a}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Gone from reads, searches and e-mail matches; updates are OBJECT_NOT_FOUND.
    let (s, _) = get(&emu, &c, &tok, &format!("/crm/v3/objects/contacts/{a}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/read",
        json!({"idProperty": "email", "properties": [], "inputs": [{"id": "alan@example.com"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/search",
        json!({"filterGroups": [{"filters": [{"propertyName": "email", "operator": "EQ", "value": "alan@example.com"}]}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["total"], 0);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/update",
        json!({"inputs": [{"id": a, "properties": {"firstname": "X"}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
    // Deleting again is harmless.
    let (s, _) = delete(&emu, &c, &tok, &format!("/crm/v3/objects/contacts/{a}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // A new contact may take the e-mail; the old one cannot come back while it has it.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "alan@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let newer = v["id"].as_str().expect("id").to_string();
    assert!(!emu.restore_contact(portal, &a));
    assert!(emu.delete_contact(portal, &newer));
    assert!(emu.restore_contact(portal, &a));
    assert!(!emu.restore_contact(portal, &a), "already back");

    let (s, v) = get(
        &emu,
        &c,
        &tok,
        &format!("/crm/v3/objects/contacts/{a}?properties=email,firstname"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], a.as_str());
    assert_eq!(v["properties"]["firstname"], "Alan");
    assert_eq!(
        emu.contact_by_email(portal, "alan@example.com")
            .map(|c| c.id),
        Some(a)
    );
    let (s, _) = delete(&emu, &c, &tok, "/crm/v3/objects/contacts/987654").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn privacy_delete_blocklists_but_the_api_may_create_again() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let a = emu.add_contact(portal, "kurt@example.com", &[("firstname", "Kurt")]);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/objects/2026-03/contacts/gdpr-delete",
        json!({"objectId": "Kurt@Example.com", "idProperty": "email"}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(emu.is_privacy_blocked(portal, " KURT@example.com"));
    assert!(!emu.is_privacy_blocked(portal, "other@example.com"));
    assert!(emu.contacts(portal).is_empty());
    assert!(!emu.restore_contact(portal, &a), "not restorable");
    let (s, _) = get(&emu, &c, &tok, &format!("/crm/v3/objects/contacts/{a}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts",
        json!({"properties": {"email": "kurt@example.com"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "the API is not blocked: {v}");
    assert_ne!(v["id"], a.as_str());

    // By id, through the Rust API; unknown ids are refused.
    let id = v["id"].as_str().expect("id").to_string();
    assert!(emu.privacy_delete_contact(portal, &id));
    assert!(!emu.privacy_delete_contact(portal, &id));
    let (s, _) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/gdpr-delete",
        json!({"objectId": id}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
