//! Hostile input at the edges (issue #24): guessed admin tokens, slow
//! clients, values far larger than HubSpot accepts. Each test asserts what
//! the attacker gets and that the sidecar keeps working.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_wrong_logins_are_throttled_and_counted_without_the_token() {
    let (url, name) = fresh_db().await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let resp = http
            .post(sidecar.url("/ui/login"))
            .form(&[("token", format!("guess-number-{i}"))])
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // The bearer check of the admin API counts against the same address.
    let resp = http
        .get(sidecar.url("/api/spots"))
        .bearer_auth("another-guess")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let m = sidecar.running.metrics.render();
    assert!(
        m.contains("hubspot_sidecar_auth_failures_total{outcome=\"refused\",surface=\"login\"} 5"),
        "{m}"
    );
    assert!(
        m.contains(
            "hubspot_sidecar_auth_failures_total{outcome=\"throttled\",surface=\"login\"} 15"
        ),
        "{m}"
    );
    // Health and metrics stay open to the probes.
    let ok = http.get(sidecar.url("/healthz")).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let (url, name) = fresh_db().await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let mut slow = tokio::net::TcpStream::connect(sidecar.running.listen_addr)
        .await
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\nX-Slow: 1")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    // The server closes it (EOF, or a 408 then EOF) within the timeout.
    let closed = tokio::time::timeout(20 * SECOND, async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the slow connection is still open after 20 s"
    );
    assert!(started.elapsed() < 15 * SECOND, "{:?}", started.elapsed());
    // Others are served meanwhile and after.
    let ok = reqwest::get(sidecar.url("/healthz")).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_megabyte_bio_passes_within_the_pods_memory_and_is_truncated() {
    let (url, slot) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    let spot = seed_spot(&db, "Big values").await;
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    let child = Process(
        sidecar_command(&url, &slot, &emu.base_url(), &listen)
            .spawn()
            .expect("spawn"),
    );
    wait_ready(&http, &listen).await;
    connect_token(&http, &listen, spot, &token).await;
    wait_for("the member's contact written", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_member_id").is_some()
    })
    .await;

    db.execute(
        "UPDATE members SET bio = repeat('x', 50 * 1024 * 1024) WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the bio, cut to HubSpot's limit", 120 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_bio").map(|b| b.chars().count())
            == Some(65_536)
    })
    .await;
    // The next change still flows.
    db.execute(
        "UPDATE members SET headline = 'after' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the next change", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref() == Some("after")
    })
    .await;
    let peak = peak_rss(child.id());
    eprintln!("peak RSS with a 50 MB bio: {} MiB", peak / (1024 * 1024));
    assert!(
        peak < 256 * 1024 * 1024,
        "peak RSS {} MiB, over the Deployment's 256 MiB",
        peak / (1024 * 1024)
    );
}

/// The revoke of sql/role.sql, for the role the tests' sidecar runs as.
fn emit_message_revoke(role: &str) -> String {
    let role_sql = include_str!("../sql/role.sql");
    let block = role_sql
        .split_inclusive("\n$$;")
        .find(|s| s.contains("REVOKE EXECUTE"))
        .expect("sql/role.sql revokes pg_logical_emit_message");
    let start = block.find("DO $$").expect("a DO block");
    block[start..].replace("hubspot_sidecar", role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_message_from_a_connect_only_role_is_refused_and_delivery_goes_on() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    db.batch_execute(&emit_message_revoke("postgres"))
        .await
        .unwrap();
    let app = format!("{name}_app");
    db.batch_execute(&format!("CREATE ROLE {app} LOGIN"))
        .await
        .unwrap();
    let app_db = sql(&url.replacen("postgres://postgres@", &format!("postgres://{app}@"), 1)).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    let spot = seed_spot(&db, "Emitters").await;
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    sidecar.connect_with_token(spot, &token).await;

    let err = app_db
        .query_one(
            "SELECT pg_logical_emit_message(true, 'x', repeat('x', 300 * 1024 * 1024))",
            &[],
        )
        .await
        .expect_err("refused by the database");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );

    db.execute(
        "UPDATE members SET headline = 'still here' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the next change within 10 s", 10 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref()
            == Some("still here")
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_completed_in_another_browser_connects_nothing() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Bound").await;
    let (victim_portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(victim_portal));
    let (status, body) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/connect"),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let no_redirects = || {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    };
    // The Spot admin opens the link, and hands HubSpot's authorize URL to
    // a HubSpot admin of another company, who approves it.
    let admin = no_redirects();
    let (authorize, cookie) = open_start(&admin, body["authorize_url"].as_str().unwrap()).await;
    let other = no_redirects();
    let approved = other.get(&authorize).send().await.unwrap();
    let callback = approved.headers()["location"].to_str().unwrap().to_string();
    let page = other.get(&callback).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 403);
    let text = page.text().await.unwrap();
    assert!(text.contains("started in another browser"), "{text}");
    assert_eq!(sidecar.integration(spot).await["status"], "inactive");
    assert!(
        emu.properties(victim_portal).is_empty(),
        "nothing written to the other portal"
    );

    // The admin's own browser still completes it.
    let approved = admin.get(&authorize).send().await.unwrap();
    let callback = approved.headers()["location"].to_str().unwrap().to_string();
    let page = admin
        .get(&callback)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(sidecar.integration(spot).await["status"], "active");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_page_never_shows_what_the_query_says() {
    let (url, name) = fresh_db().await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let resp = reqwest::Client::new()
        .get(sidecar.url("/oauth/hubspot/callback"))
        .query(&[
            ("error", "access_denied"),
            (
                "error_description",
                "Your account is locked: call +1 555 0100 now",
            ),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("555 0100"), "{text}");
    assert!(!text.contains("access_denied"), "{text}");
    assert!(
        text.contains("HubSpot did not authorize the connection"),
        "{text}"
    );
    sidecar.stop().await;
}

/// Opens a settings link in a cookie-keeping browser; returns the browser
/// and the page's CSRF token.
async fn open_settings(sidecar: &Sidecar, spot: i64, member: i64) -> (reqwest::Client, String) {
    let (status, body) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/ui-link"),
            Some(serde_json::json!({"member_id": member})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let page = browser
        .get(body["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csrf = page_csrf_token(&page.text().await.unwrap());
    (browser, csrf)
}

async fn change_setting(
    sidecar: &Sidecar,
    browser: &reqwest::Client,
    csrf: &str,
    spot: i64,
) -> u16 {
    browser
        .post(sidecar.url(&format!("/settings/spots/{spot}/settings")))
        .header("x-csrf-token", csrf)
        .json(&serde_json::json!({"create_contacts": true}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_sessions_belong_to_an_admin_and_end_when_they_should() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Sessions").await;
    let (_, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    let ada = spot_admin(&db, spot).await;
    let grace: i64 = db
        .query_one(
            "INSERT INTO members (spot_id, email, status, role) VALUES ($1, 'grace@example.com', 'accepted', 'admin') RETURNING id",
            &[&spot],
        )
        .await
        .unwrap()
        .get(0);
    let member = seed_member(&db, spot, "linus@example.com", "accepted").await;

    // A link is only for an accepted admin of the Spot, named.
    for body in [
        serde_json::json!({"member_id": member}),
        serde_json::json!({"member_id": 999_999}),
    ] {
        let (status, v) = sidecar
            .api(
                reqwest::Method::POST,
                &format!("/api/spots/{spot}/hubspot/ui-link"),
                Some(body),
            )
            .await;
        assert_eq!(status, 403, "{v}");
    }
    let (status, _) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/ui-link"),
            None,
        )
        .await;
    assert_eq!(status, 400);

    // Ada's session changes settings, and the audit trail names her.
    let (ada_browser, ada_csrf) = open_settings(&sidecar, spot, ada).await;
    assert_eq!(
        change_setting(&sidecar, &ada_browser, &ada_csrf, spot).await,
        200
    );
    let (_, events) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events"),
            None,
        )
        .await;
    assert_eq!(events["events"][0]["source"], "settings_page", "{events}");
    assert_eq!(events["events"][0]["member_id"], ada, "{events}");

    // Ada is no longer an admin: her very next change is refused.
    db.execute("UPDATE members SET role = 'member' WHERE id = $1", &[&ada])
        .await
        .unwrap();
    assert_eq!(
        change_setting(&sidecar, &ada_browser, &ada_csrf, spot).await,
        403
    );

    // Grace's session works until the operator ends the Spot's sessions.
    let (grace_browser, grace_csrf) = open_settings(&sidecar, spot, grace).await;
    assert_eq!(
        change_setting(&sidecar, &grace_browser, &grace_csrf, spot).await,
        200
    );
    let (status, _) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/sessions/end"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        change_setting(&sidecar, &grace_browser, &grace_csrf, spot).await,
        403
    );
    let page = grace_browser
        .get(sidecar.url(&format!("/settings/spots/{spot}")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 403);

    // A new link works again; ending every session of every Spot ends it too.
    let (grace_browser, grace_csrf) = open_settings(&sidecar, spot, grace).await;
    assert_eq!(
        change_setting(&sidecar, &grace_browser, &grace_csrf, spot).await,
        200
    );
    let (status, _) = sidecar
        .api(reqwest::Method::POST, "/api/sessions/end", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        change_setting(&sidecar, &grace_browser, &grace_csrf, spot).await,
        403
    );

    // Sign out clears the session in that browser.
    let (browser, csrf) = open_settings(&sidecar, spot, grace).await;
    let out = browser
        .post(sidecar.url(&format!("/settings/spots/{spot}/signout")))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status().as_u16(), 200);
    assert_eq!(change_setting(&sidecar, &browser, &csrf, spot).await, 403);
    sidecar.stop().await;
}
