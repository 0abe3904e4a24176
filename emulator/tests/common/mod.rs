//! Shared helpers for the emulator's HTTP tests.
#![allow(dead_code)]

use hubspot_emulator::{Emulator, EmulatorConfig};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

pub const REDIRECT: &str = "http://localhost:9187/oauth/hubspot/callback";

pub async fn start() -> Emulator {
    start_with(EmulatorConfig::default()).await
}

pub async fn start_with(cfg: EmulatorConfig) -> Emulator {
    Emulator::start(cfg).await.expect("emulator starts")
}

pub fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub struct Tokens {
    pub portal: u64,
    pub access: String,
    pub refresh: String,
}

/// Runs the authorize redirect; returns the code (and checks the state round-trip).
pub async fn authorize(emu: &Emulator, c: &Client, scope: &str) -> String {
    let resp = c
        .get(format!("{}/oauth/authorize", emu.base_url()))
        .query(&[
            ("client_id", "emulator-client-id"),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "st-1"),
        ])
        .send()
        .await
        .expect("authorize");
    assert_eq!(resp.status(), StatusCode::FOUND);
    let loc = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    let url = reqwest::Url::parse(&loc).expect("url");
    let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert!(q.contains(&("state".into(), "st-1".into())));
    q.into_iter().find(|(k, _)| k == "code").expect("code").1
}

pub const ALL_SCOPES: &str = "oauth crm.objects.contacts.read crm.objects.contacts.write crm.schemas.contacts.read crm.schemas.contacts.write timeline";

/// Full OAuth flow: authorize + code exchange.
pub async fn connect(emu: &Emulator, c: &Client) -> Tokens {
    let code = authorize(emu, c, ALL_SCOPES).await;
    let v = token(
        emu,
        c,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "emulator-client-id"),
            ("client_secret", "emulator-client-secret"),
            ("redirect_uri", REDIRECT),
            ("code", &code),
        ],
    )
    .await;
    assert_eq!(v.0, StatusCode::OK, "{}", v.1);
    Tokens {
        // Absent when the emulator omits it (omit_hub_id).
        portal: v.1["hub_id"].as_u64().unwrap_or(0),
        access: v.1["access_token"].as_str().expect("access").into(),
        refresh: v.1["refresh_token"].as_str().expect("refresh").into(),
    }
}

pub async fn token(emu: &Emulator, c: &Client, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = c
        .post(format!("{}/oauth/v1/token", emu.base_url()))
        .form(form)
        .send()
        .await
        .expect("token");
    split(r).await
}

pub async fn split(r: Response) -> (StatusCode, Value) {
    let s = r.status();
    let text = r.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (s, v)
}

pub async fn post(
    emu: &Emulator,
    c: &Client,
    tok: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let r = c
        .post(format!("{}{}", emu.base_url(), path))
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .expect("post");
    split(r).await
}

pub async fn get(emu: &Emulator, c: &Client, tok: &str, path: &str) -> (StatusCode, Value) {
    let r = c
        .get(format!("{}{}", emu.base_url(), path))
        .bearer_auth(tok)
        .send()
        .await
        .expect("get");
    split(r).await
}

pub async fn patch(
    emu: &Emulator,
    c: &Client,
    tok: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let r = c
        .patch(format!("{}{}", emu.base_url(), path))
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .expect("patch");
    split(r).await
}

/// Creates the §3-like group and an enumeration property.
pub async fn setup_properties(emu: &Emulator, c: &Client, tok: &str) {
    let (s, v) = post(
        emu,
        c,
        tok,
        "/crm/v3/properties/contacts/groups",
        json!({"name": "meltingspot", "label": "MeltingSpot"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = post(
        emu,
        c,
        tok,
        "/crm/v3/properties/contacts/batch/create",
        json!({"inputs": [
            {"name": "meltingspot_member_status", "label": "Member status", "type": "enumeration", "fieldType": "select", "groupName": "meltingspot",
             "options": [{"label": "Invited", "value": "invited", "displayOrder": 0, "hidden": false},
                         {"label": "Accepted", "value": "accepted", "displayOrder": 1, "hidden": false}]},
            {"name": "meltingspot_bio", "label": "Bio", "type": "string", "fieldType": "textarea", "groupName": "meltingspot"},
            {"name": "meltingspot_spot_invitation_date", "label": "Spot invitation date", "type": "datetime", "fieldType": "date", "groupName": "meltingspot"}
        ]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}
