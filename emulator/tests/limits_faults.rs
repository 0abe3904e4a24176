//! Rate limits, fault injection, inspection endpoints and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hubspot_emulator::{EmulatorConfig, Faults};
use reqwest::StatusCode;
use serde_json::{json, Value};

const PATH: &str = "/crm/v3/properties/contacts/groups";

#[tokio::test]
async fn rolling_window_refuses_the_111th_request_then_recovers() {
    let window = Duration::from_secs(3);
    let emu = start_with(EmulatorConfig {
        rate_limit_per_10s: 110,
        rate_window: window,
        ..Default::default()
    })
    .await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let (_, other) = emu.create_portal();
    let started = Instant::now();
    for i in 0..110u32 {
        let r = c
            .get(format!("{}{PATH}", emu.base_url()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        let h = r.headers();
        assert_eq!(h["x-hubspot-ratelimit-max"], "110");
        assert_eq!(
            h["x-hubspot-ratelimit-remaining"].to_str().unwrap(),
            (109 - i).to_string()
        );
        assert_eq!(h["x-hubspot-ratelimit-interval-milliseconds"], "3000");
    }
    assert!(
        started.elapsed() < window,
        "the machine is too slow for this test's window"
    );
    let r = c
        .get(format!("{}{PATH}", emu.base_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-hubspot-ratelimit-remaining"], "0");
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["policyName"], "TEN_SECONDLY_ROLLING");
    assert_eq!(v["errorType"], "RATE_LIMIT");
    assert_eq!(
        v["message"],
        "You have reached your ten_secondly_rolling limit."
    );
    assert!(v["correlationId"].is_string() && v["requestId"].is_string());
    // Another portal has its own window.
    let (s, _) = get(&emu, &c, &other, PATH).await;
    assert_eq!(s, StatusCode::OK);
    let stats = emu.request_stats(portal);
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.peak_in_10s, 110);
    assert_eq!(stats.total, 111);
    assert_eq!(stats.count("properties.groups.list", 200), 110);
    assert_eq!(stats.count("properties.groups.list", 429), 1);
    // Wait for the window to roll (deadline, polling).
    let deadline = started + window + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, _) = get(&emu, &c, &tok, PATH).await;
        if s == StatusCode::OK {
            break;
        }
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "window never rolled");
    }
    assert!(started.elapsed() >= window - Duration::from_millis(200));
    assert_eq!(emu.request_stats(portal).peak_in_10s, 110);
}

#[tokio::test]
async fn error_rate_and_latency_faults() {
    let emu = start().await;
    let c = client();
    let (a, ta) = emu.create_portal();
    let (_, tb) = emu.create_portal();
    emu.set_faults(
        Some(a),
        Faults {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    let mut saw_500 = false;
    for _ in 0..12 {
        let (s, v) = get(&emu, &c, &ta, PATH).await;
        assert!(
            s == StatusCode::INTERNAL_SERVER_ERROR || s == StatusCode::SERVICE_UNAVAILABLE,
            "{s}"
        );
        assert_eq!(v["status"], "error");
        if s == StatusCode::INTERNAL_SERVER_ERROR {
            saw_500 = true;
            assert_eq!(v["category"], "INTERNAL_ERROR");
        }
    }
    assert!(saw_500);
    let stats = emu.request_stats(a);
    assert_eq!(stats.count_op("properties.groups.list"), 12);
    assert_eq!(stats.count("properties.groups.list", 200), 0);
    // Portal b is not faulted.
    let (s, _) = get(&emu, &c, &tb, PATH).await;
    assert_eq!(s, StatusCode::OK);
    // Global latency.
    emu.set_faults(
        None,
        Faults {
            latency: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    let (s, _) = get(&emu, &c, &ta, PATH).await;
    assert_eq!(s, StatusCode::OK, "None also drops per-portal faults");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    emu.set_faults(None, Faults::default());
    let t0 = Instant::now();
    let (s, _) = get(&emu, &c, &tb, PATH).await;
    assert_eq!(s, StatusCode::OK);
    assert!(t0.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn hang_until_faults_are_cleared() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    emu.set_faults(
        Some(portal),
        Faults {
            hang: true,
            ..Default::default()
        },
    );
    let err = c
        .get(format!("{}{PATH}", emu.base_url()))
        .bearer_auth(&tok)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("a hung request times out");
    assert!(err.is_timeout());
    let url = format!("{}{PATH}", emu.base_url());
    let c2 = c.clone();
    let tok2 = tok.clone();
    let pending = tokio::spawn(async move {
        c2.get(url)
            .bearer_auth(tok2)
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    emu.set_faults(Some(portal), Faults::default());
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // Shutdown does not wait forever on a hung request.
    emu.set_faults(
        None,
        Faults {
            hang: true,
            ..Default::default()
        },
    );
    let url = format!("{}{PATH}", emu.base_url());
    let pending =
        tokio::spawn(async move { c.get(url).bearer_auth(tok).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    emu.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(4));
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    if let Ok(status) = outcome {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test]
async fn a_lost_answer_was_applied_all_the_same() {
    let emu = start().await;
    let c = client();
    let (portal, tok) = emu.create_portal();
    let id = emu.add_contact(portal, "lost@example.com", &[]);
    emu.set_faults(
        Some(portal),
        Faults {
            lose_answer_rate: 1.0,
            ..Default::default()
        },
    );
    let body = json!({"inputs": [{"id": id, "properties": {"lastname": "Lovelace"}}]});
    let read = async {
        c.post(format!(
            "{}/crm/v3/objects/contacts/batch/update",
            emu.base_url()
        ))
        .bearer_auth(&tok)
        .json(&body)
        .send()
        .await?
        .text()
        .await
    }
    .await;
    assert!(read.is_err(), "the client never reads the answer: {read:?}");
    let contact = emu
        .contact_by_email(portal, "lost@example.com")
        .expect("contact");
    assert_eq!(
        contact.properties["lastname"], "Lovelace",
        "the write was applied"
    );
}

#[tokio::test]
async fn inspection_endpoints_mirror_the_rust_api() {
    let emu = start().await;
    let c = client();
    let base = emu.base_url();
    let (s, v) = split(
        c.post(format!("{base}/_emulator/portals"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let portal = v["portal_id"].as_u64().unwrap();
    let tok = v["token"].as_str().unwrap().to_string();
    setup_properties(&emu, &c, &tok).await;
    let (_, v) = split(
        c.post(format!("{base}/_emulator/portals/{portal}/contacts"))
            .json(&json!({"email": "ada@example.com", "properties": {"firstname": "Ada"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        emu.contact_by_email(portal, "ada@example.com").unwrap().id,
        id
    );

    let get_json = |path: String| {
        let c = c.clone();
        async move { split(c.get(path).send().await.unwrap()).await.1 }
    };
    let ids = get_json(format!("{base}/_emulator/portals")).await;
    assert!(ids.as_array().unwrap().contains(&json!(portal)));
    let contacts = get_json(format!("{base}/_emulator/portals/{portal}/contacts")).await;
    assert_eq!(contacts[0]["properties"]["firstname"], "Ada");
    assert_eq!(contacts[0]["created_by"], "Seed");
    let groups = get_json(format!("{base}/_emulator/portals/{portal}/groups")).await;
    assert_eq!(groups[0]["name"], "meltingspot");
    let props = get_json(format!("{base}/_emulator/portals/{portal}/properties")).await;
    assert_eq!(props.as_array().unwrap().len(), 3);
    assert_eq!(props[0]["type"], json!(emu.properties(portal)[0].type_));
    let events = get_json(format!("{base}/_emulator/portals/{portal}/events")).await;
    assert_eq!(events, json!([]));
    let stats = get_json(format!("{base}/_emulator/portals/{portal}/stats")).await;
    assert_eq!(
        stats["total"], 2,
        "/_emulator requests are not counted: {stats}"
    );
    assert_eq!(stats["by_operation"]["properties.groups.create"]["201"], 1);

    // Faults over HTTP.
    let (s, _) = split(
        c.post(format!("{base}/_emulator/faults"))
            .json(&json!({"portal_id": portal, "error_rate": 1.0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(&emu, &c, &tok, PATH).await;
    assert!(s.is_server_error());
    c.post(format!("{base}/_emulator/faults"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (s, _) = get(&emu, &c, &tok, PATH).await;
    assert_eq!(s, StatusCode::OK);

    // next-grant, expire-tokens, revoke.
    c.post(format!("{base}/_emulator/next-grant"))
        .json(&json!({"portal_id": portal}))
        .send()
        .await
        .unwrap();
    let t = connect(&emu, &c).await;
    assert_eq!(t.portal, portal);
    c.post(format!("{base}/_emulator/portals/{portal}/expire-tokens"))
        .send()
        .await
        .unwrap();
    let (s, v) = get(&emu, &c, &t.access, PATH).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["category"], "EXPIRED_AUTHENTICATION");
    c.post(format!("{base}/_emulator/portals/{portal}/revoke"))
        .send()
        .await
        .unwrap();
    let (s, v) = get(&emu, &c, &tok, PATH).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["category"], "INVALID_AUTHENTICATION");

    // Unknown portal, reset.
    let (s, _) = split(
        c.get(format!("{base}/_emulator/portals/1/contacts"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = split(
        c.post(format!("{base}/_emulator/reset"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let ids: Value = get_json(format!("{base}/_emulator/portals")).await;
    assert_eq!(ids, json!([]));
    assert!(emu.contacts(portal).is_empty());
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let emu = start().await;
    let c = client();
    let (_, tok) = emu.create_portal();
    let (s, v) = get(&emu, &c, &tok, "/crm/objects/v9/contacts/batch/read").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["status"], "error");
    let (s, _) = get(&emu, &c, &tok, "/crm/v3/objects/contacts/batch/read").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, v) = post(
        &emu,
        &c,
        &tok,
        "/crm/v3/objects/contacts/batch/read",
        json!("not an object"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["category"], "VALIDATION_ERROR");
}
