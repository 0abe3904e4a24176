//! Rotating SIDECAR_SECRET_KEY (issue #24): with the old key as
//! SIDECAR_SECRET_KEY_PREVIOUS nothing breaks and every token is sealed
//! again; ending sessions is its own action; a key that opens nothing is a
//! configuration error of the sidecar, never a failure of a Spot.

mod common;

use std::time::Duration;

use common::*;

const SECOND: Duration = Duration::from_secs(1);
const NEW_KEY: [u8; 32] = [77; 32];
const UNRELATED_KEY: [u8; 32] = [99; 32];

fn spawn(
    url: &str,
    slot: &str,
    hubspot: &str,
    listen: &str,
    key: [u8; 32],
    previous: Option<[u8; 32]>,
) -> Process {
    let mut cmd = oauth_sidecar_command(url, slot, hubspot, listen);
    cmd.env("SIDECAR_SECRET_KEY", hex::encode(key));
    if let Some(p) = previous {
        cmd.env("SIDECAR_SECRET_KEY_PREVIOUS", hex::encode(p));
    }
    Process(cmd.spawn().expect("spawn hubspot-sidecar"))
}

async fn metrics(http: &reqwest::Client, listen: &str) -> String {
    http.get(format!("http://{listen}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_with_the_previous_key_breaks_nothing_and_reseals_every_token() {
    let (url, slot) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let token_spot = seed_spot(&db, "Token Spot").await;
    let oauth_spot = seed_spot(&db, "OAuth Spot").await;
    let (token_portal, token) = emu.create_portal();
    let (oauth_portal, _) = emu.create_portal();
    for (spot, portal) in [(token_spot, token_portal), (oauth_spot, oauth_portal)] {
        emu.add_contact(portal, &format!("m{spot}@example.com"), &[]);
        seed_member(&db, spot, &format!("m{spot}@example.com"), "accepted").await;
    }
    let admin = spot_admin(&db, token_spot).await;

    // Connected under the first key, with a settings session open.
    let mut child = spawn(&url, &slot, &emu.base_url(), &listen, SECRET_KEY, None);
    wait_ready(&http, &listen).await;
    connect_token(&http, &listen, token_spot, &token).await;
    emu.set_next_grant_portal(Some(oauth_portal));
    assert_eq!(oauth_connect_process(&http, &listen, oauth_spot).await, 200);
    let (_, link) = api_call(
        &http,
        &format!("http://{listen}/api/spots/{token_spot}/hubspot/ui-link"),
        reqwest::Method::POST,
        Some(serde_json::json!({"member_id": admin})),
    )
    .await;
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let page = browser
        .get(link["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page_csrf_token(&page);
    child.kill().unwrap();
    child.wait().unwrap();

    // The operator rotates: a new key, the old one as previous.
    let _child = spawn(
        &url,
        &slot,
        &emu.base_url(),
        &listen,
        NEW_KEY,
        Some(SECRET_KEY),
    );
    wait_ready(&http, &listen).await;
    db.execute("UPDATE members SET headline = 'after the rotation'", &[])
        .await
        .unwrap();
    for (spot, portal) in [(token_spot, token_portal), (oauth_spot, oauth_portal)] {
        wait_for("the change after the rotation", 30 * SECOND, || async {
            prop(
                &emu,
                portal,
                &format!("m{spot}@example.com"),
                "meltingspot_headline",
            )
            .as_deref()
                == Some("after the rotation")
        })
        .await;
        assert_eq!(
            integration_of_process(&http, &listen, spot).await["status"],
            "active"
        );
    }
    let mails: i64 = db
        .query_one("SELECT count(*) FROM hubspot_sync.notifications", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mails, 0, "no admin was notified");
    // One pass sealed every token again: the previous key can go.
    let m = metrics(&http, &listen).await;
    assert!(
        m.contains("hubspot_sidecar_tokens_sealed_with_previous_key 0"),
        "{m}"
    );
    assert!(m.contains("hubspot_sidecar_tokens_undecryptable 0"), "{m}");
    let sealed_v2: i64 = db
        .query_one(
            "SELECT count(*) FROM hubspot_sync.integrations
              WHERE get_byte(access_token_enc, 0) = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sealed_v2, 2);

    // The session opened before the rotation still works; ending every
    // session is the separate action, and refuses it.
    let change = || async {
        browser
            .post(format!(
                "http://{listen}/settings/spots/{token_spot}/settings"
            ))
            .header("x-csrf-token", &csrf)
            .json(&serde_json::json!({"create_contacts": true}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(change().await, 200);
    let (ended, _) = api_call(
        &http,
        &format!("http://{listen}/api/sessions/end"),
        reqwest::Method::POST,
        None,
    )
    .await;
    assert_eq!(ended, 200);
    assert_eq!(change().await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_opens_no_token_is_a_configuration_error_never_a_spot_failure() {
    let (url, slot) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let spot = seed_spot(&db, "Lost key").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    seed_member(&db, spot, "ada@example.com", "accepted").await;
    let mut child = spawn(&url, &slot, &emu.base_url(), &listen, SECRET_KEY, None);
    wait_ready(&http, &listen).await;
    connect_token(&http, &listen, spot, &token).await;
    wait_for("the member written", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_member_id").is_some()
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // Restarted with an unrelated key and no previous one.
    let _child = spawn(&url, &slot, &emu.base_url(), &listen, UNRELATED_KEY, None);
    wait_ready(&http, &listen).await;
    db.execute("UPDATE members SET headline = 'waits'", &[])
        .await
        .unwrap();
    wait_for(
        "the configuration error on the Spot's view",
        30 * SECOND,
        || async {
            integration_of_process(&http, &listen, spot).await["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("Configuration of this sidecar"))
        },
    )
    .await;
    let view = integration_of_process(&http, &listen, spot).await;
    assert_eq!(view["status"], "active", "{view}");
    let mails: i64 = db
        .query_one("SELECT count(*) FROM hubspot_sync.notifications", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mails, 0, "no admin was notified");
    let m = metrics(&http, &listen).await;
    assert!(m.contains("hubspot_sidecar_tokens_undecryptable 1"), "{m}");
    assert!(
        m.contains("hubspot_sidecar_delivery_retries_total{cause=\"configuration\"}"),
        "{m}"
    );
}
