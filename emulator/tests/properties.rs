//! Property groups and property definitions.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn groups_create_conflict_read_and_list() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let body = json!({"name": "meltingspot", "label": "MeltingSpot", "displayOrder": -1});
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/properties/contacts/groups",
        body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        v,
        json!({"name": "meltingspot", "label": "MeltingSpot", "displayOrder": -1, "archived": false})
    );
    // Date-versioned path, same portal: the group exists -> 409.
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/properties/2026-03/contacts/groups",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["category"], "OBJECT_ALREADY_EXISTS");
    let (s, v) = get(
        &emu,
        &c,
        &tok,
        "/crm/properties/2026-03/contacts/groups/meltingspot",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["label"], "MeltingSpot");
    let (s, v) = get(&emu, &c, &tok, "/crm/v3/properties/contacts/groups/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["category"], "OBJECT_NOT_FOUND");
    let (s, v) = get(&emu, &c, &tok, "/crm/v3/properties/contacts/groups").await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"meltingspot") && names.contains(&"contactinformation"));
    // The Rust accessor lists custom groups only.
    let groups = emu.property_groups(portal);
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, "meltingspot");
    // Other object types are refused.
    let (s, _) = get(&emu, &c, &tok, "/crm/v3/properties/companies/groups").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let st = emu.request_stats(portal);
    assert_eq!(st.count("properties.groups.create", 201), 1);
    assert_eq!(st.count("properties.groups.create", 409), 1);
    assert_eq!(st.count("properties.groups.read", 404), 1);
}

#[tokio::test]
async fn property_create_conflict_and_validation() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    post(
        &emu,
        &c,
        &tok,
        "/crm/v3/properties/contacts/groups",
        json!({"name": "meltingspot", "label": "MeltingSpot"}),
    )
    .await;
    let status = json!({"name": "meltingspot_member_status", "label": "Member status", "type": "enumeration", "fieldType": "select",
        "groupName": "meltingspot", "options": [{"label": "Invited", "value": "invited", "displayOrder": 0, "hidden": false}]});
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/properties/contacts",
        status.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["hubspotDefined"], false);
    assert_eq!(v["archived"], false);
    assert_eq!(v["type"], "enumeration");
    assert_eq!(v["modificationMetadata"]["archivable"], true);
    assert!(v["createdAt"].is_string() && v["updatedAt"].is_string());

    let (s, v) = post(&emu, &c, &tok, "/crm/properties/2026-03/contacts", status).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["category"], "OBJECT_ALREADY_EXISTS");
    assert_eq!(v["subCategory"], "Properties.PROPERTY_WITH_NAME_EXISTS");
    assert_eq!(
        v["message"],
        "A property named 'meltingspot_member_status' already exists."
    );

    let bad_cases = [
        json!({"name": "p_pair", "label": "x", "type": "string", "fieldType": "select", "groupName": "meltingspot"}),
        json!({"name": "p_date", "label": "x", "type": "datetime", "fieldType": "text", "groupName": "meltingspot"}),
        json!({"name": "p_enum", "label": "x", "type": "enumeration", "fieldType": "select", "groupName": "meltingspot", "options": []}),
        json!({"name": "p_group", "label": "x", "type": "string", "fieldType": "text", "groupName": "missing"}),
        json!({"name": "Bad-Name", "label": "x", "type": "string", "fieldType": "text", "groupName": "meltingspot"}),
        json!({"name": "p_nolabel", "type": "string", "fieldType": "text", "groupName": "meltingspot"}),
    ];
    for b in bad_cases {
        let (s, v) = post(&emu, &c, &tok, "/crm/v3/properties/contacts", b.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b} -> {v}");
        assert_eq!(v["category"], "VALIDATION_ERROR");
    }
    // `dateTime` is accepted as the old spelling of datetime.
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/properties/contacts",
        json!({"name": "p_dt", "label": "x", "type": "dateTime", "fieldType": "date", "groupName": "meltingspot"})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["type"], "datetime");

    // Read / list / PATCH (options replace the list).
    let (s, _) = get(&emu, &c, &tok, "/crm/v3/properties/contacts/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = patch(
        &emu,
        &c,
        &tok,
        "/crm/v3/properties/contacts/meltingspot_member_status",
        json!({"label": "Status",
        "options": [{"label": "Accepted", "value": "accepted", "displayOrder": 0, "hidden": false},
                    {"label": "Left", "value": "left", "displayOrder": 1, "hidden": false}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let props = emu.properties(portal);
    let p = props
        .iter()
        .find(|p| p.name == "meltingspot_member_status")
        .unwrap();
    assert_eq!(p.label, "Status");
    let values: Vec<&str> = p.options.iter().map(|o| o.value.as_str()).collect();
    assert_eq!(values, ["accepted", "left"]);
    assert!(
        props.iter().all(|p| p.name != "email"),
        "accessor lists custom properties only"
    );
    let (_, v) = get(&emu, &c, &tok, "/crm/v3/properties/contacts").await;
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"email") && names.contains(&"meltingspot_member_status"));
}

#[tokio::test]
async fn property_batch_create_and_read() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    setup_properties(&emu, &c, &tok).await;
    assert_eq!(emu.properties(portal).len(), 3);
    let (s, v) = post(&emu, &c, &tok, "/crm/properties/2026-03/contacts/batch/create", json!({"inputs": [
        {"name": "meltingspot_bio", "label": "Bio", "type": "string", "fieldType": "textarea", "groupName": "meltingspot"},
        {"name": "meltingspot_tags", "label": "Tags", "type": "string", "fieldType": "textarea", "groupName": "meltingspot"},
        {"name": "meltingspot_role", "label": "Role", "type": "enumeration", "fieldType": "select", "groupName": "meltingspot"}
    ]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["status"], "COMPLETE");
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(v["numErrors"], 2);
    let cats: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["category"].as_str().unwrap())
        .collect();
    assert_eq!(cats, ["OBJECT_ALREADY_EXISTS", "VALIDATION_ERROR"]);

    let (s, v) = post(&emu, &c, &tok, "/crm/v3/properties/contacts/batch/read",
        json!({"archived": false, "inputs": [{"name": "meltingspot_bio"}, {"name": "meltingspot_tags"}]})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert!(v.get("errors").is_none());
    let (s, v) = post(&emu, &c, &tok, "/crm/v3/properties/contacts/batch/read",
        json!({"archived": false, "inputs": [{"name": "meltingspot_bio"}, {"name": "meltingspot_nope"}]})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS);
    assert_eq!(v["errors"][0]["category"], "OBJECT_NOT_FOUND");
}
