//! Integration lifecycle per Spot (SPEC §4): OAuth connect, initialization and
//! backfill, contact creation, disconnect, failed with notifications, reconnect.

mod common;

use std::time::Duration;

use common::*;
use hubspot_emulator::{CreatedBy, Emulator, EmulatorConfig};

const SECOND: Duration = Duration::from_secs(1);
const STATUSES: [&str; 6] = [
    "invited",
    "accepted",
    "pending",
    "left",
    "declined",
    "deactivated",
];

async fn patch(sidecar: &Sidecar, spot: i64, body: serde_json::Value) -> (u16, serde_json::Value) {
    sidecar
        .api(
            reqwest::Method::PATCH,
            &format!("/api/spots/{spot}/hubspot/settings"),
            Some(body),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_connect_initializes_and_backfills_only_existing_contacts() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Backfill").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    // One member per status; the even ones already have a contact.
    let mut ids = Vec::new();
    for (i, status) in STATUSES.iter().enumerate() {
        let email = format!("{status}@example.com");
        ids.push(seed_member(&db, spot, &email, status).await);
        if i % 2 == 0 {
            emu.add_contact(portal, &email, &[]);
        }
    }
    let (status, page) = oauth_connect(&sidecar, spot).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("HubSpot is connected"));
    let v = sidecar.integration(spot).await;
    assert_eq!(v["status"], "active");
    assert_eq!(v["portal_id"], portal);

    wait_for("the backfill", 30 * SECOND, || async {
        ["invited", "pending", "declined"].iter().all(|s| {
            prop(
                &emu,
                portal,
                &format!("{s}@example.com"),
                "meltingspot_member_status",
            )
            .as_deref()
                == Some(*s)
        })
    })
    .await;
    let groups = emu.property_groups(portal);
    let group = groups
        .iter()
        .find(|g| g.name == "meltingspot")
        .expect("group");
    assert_eq!(group.label, "MeltingSpot");
    let mut props: Vec<(String, String, String, String)> = emu
        .properties(portal)
        .into_iter()
        .filter(|p| p.group_name == "meltingspot")
        .map(|p| (p.name, p.label, p.type_, p.field_type))
        .collect();
    props.sort();
    let expected = [
        ("meltingspot_bio", "Bio", "string", "textarea"),
        ("meltingspot_groups", "Groups", "string", "textarea"),
        ("meltingspot_headline", "Headline", "string", "text"),
        (
            "meltingspot_member_custom_role",
            "Member custom role",
            "string",
            "text",
        ),
        ("meltingspot_member_id", "Member Id", "string", "text"),
        (
            "meltingspot_member_role",
            "Member role",
            "enumeration",
            "select",
        ),
        (
            "meltingspot_member_status",
            "Member status",
            "enumeration",
            "select",
        ),
        (
            "meltingspot_spot_invitation_date",
            "Spot invitation date",
            "datetime",
            "date",
        ),
        (
            "meltingspot_spot_registration_date",
            "Spot registration date",
            "datetime",
            "date",
        ),
        ("meltingspot_tags", "Tags", "string", "textarea"),
    ];
    let expected: Vec<(String, String, String, String)> = expected
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
        .collect();
    assert_eq!(props, expected);
    let status_prop = emu
        .properties(portal)
        .into_iter()
        .find(|p| p.name == "meltingspot_member_status")
        .unwrap();
    let labels: Vec<String> = status_prop
        .options
        .iter()
        .map(|o| o.label.clone())
        .collect();
    assert_eq!(
        labels,
        [
            "Invited",
            "Accepted",
            "Pending",
            "Left",
            "Declined",
            "Deactivated"
        ]
    );

    // The backfill created nothing: members without a contact still have none.
    for s in ["accepted", "left", "deactivated"] {
        assert!(
            emu.contact_by_email(portal, &format!("{s}@example.com"))
                .is_none(),
            "{s}"
        );
    }
    assert!(emu
        .contacts(portal)
        .iter()
        .all(|c| c.created_by == CreatedBy::Seed));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_without_hub_id_still_connects_the_right_portal() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = Emulator::start(EmulatorConfig {
        omit_hub_id: true,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "No hub id").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    seed_member(&db, spot, "hub@example.com", "accepted").await;
    emu.add_contact(portal, "hub@example.com", &[]);
    let (status, page) = oauth_connect(&sidecar, spot).await;
    assert_eq!(status, 200, "{page}");
    let v = sidecar.integration(spot).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["portal_id"], portal, "learned from account-info");
    wait_for("the backfill reaches the portal", 30 * SECOND, || async {
        prop(&emu, portal, "hub@example.com", "meltingspot_member_status").as_deref()
            == Some("accepted")
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_replayed_state_is_refused() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Forgery").await;
    let other = seed_spot(&db, "Victim").await;
    let (_, body) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/connect"),
            Some(serde_json::json!({})),
        )
        .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = body["authorize_url"].as_str().unwrap().to_string();
    assert!(
        start.starts_with(&sidecar.url("/oauth/hubspot/start?ticket=")),
        "{start}"
    );
    let (authorize, cookie) = open_start(&http, &start).await;
    // The ticket opens once: a second browser gets no authorization of it.
    assert_eq!(
        http.get(&start).send().await.unwrap().status().as_u16(),
        400
    );
    let authorize = url::Url::parse(&authorize).unwrap();
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let callback = |state: String, cookie: Option<String>| {
        let http = http.clone();
        let url = sidecar.url("/oauth/hubspot/callback");
        async move {
            let mut req = http
                .get(url)
                .query(&[("code", "whatever"), ("state", state.as_str())]);
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    // Re-pointed at another Spot: the signature no longer matches.
    let forged = state.replacen(&format!("{spot}."), &format!("{other}."), 1);
    assert_eq!(callback(forged, Some(cookie.clone())).await, 400);
    assert_eq!(
        callback(
            "1.abc.99999999999.c2lnbmF0dXJl".into(),
            Some(cookie.clone())
        )
        .await,
        400
    );
    // In a browser that did not start it (no cookie, or another's): 403, nothing used up.
    assert_eq!(callback(state.clone(), None).await, 403);
    assert_eq!(
        callback(state.clone(), Some("hubspot_sidecar_oauth=forged".into())).await,
        403
    );
    // A genuine state is accepted once (the code is bad, so the exchange fails: 502)…
    assert_eq!(callback(state.clone(), Some(cookie.clone())).await, 502);
    // …and refused when replayed.
    assert_eq!(callback(state, Some(cookie)).await, 400);
    assert_eq!(sidecar.integration(other).await["status"], "inactive");
    assert_eq!(sidecar.integration(spot).await["status"], "inactive");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_creation_applies_to_members_inserted_after_the_switch_only() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Creation").await;
    let old = seed_member(&db, spot, "old@example.com", "accepted").await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    let (status, v) = patch(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["create_contacts"], true);
    db.execute(
        "INSERT INTO members (spot_id, email, first_name, last_name, status) VALUES ($1, ' New@Example.com', 'Grace', 'Hopper', 'invited')",
        &[&spot],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE members SET headline = 'changed' WHERE id = $1",
        &[&old],
    )
    .await
    .unwrap();
    wait_for(
        "the new member's contact, with its properties",
        30 * SECOND,
        || async {
            prop(&emu, portal, "new@example.com", "meltingspot_member_status").as_deref()
                == Some("invited")
        },
    )
    .await;
    let c = emu.contact_by_email(portal, "new@example.com").unwrap();
    assert_eq!(c.created_by, CreatedBy::Api);
    assert_eq!(c.properties["firstname"], "Grace");
    assert_eq!(c.properties["lastname"], "Hopper");
    // The existing member changed too, but gets no contact.
    wait_handed_off(&db, &name, 10 * SECOND).await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert!(emu.contact_by_email(portal, "old@example.com").is_none());
    assert_eq!(emu.contacts(portal).len(), 1);

    // Switched off: a new member gets no contact.
    patch(
        &sidecar,
        spot,
        serde_json::json!({"create_contacts": false}),
    )
    .await;
    db.execute(
        "INSERT INTO members (spot_id, email, status) VALUES ($1, 'later@example.com', 'accepted')",
        &[&spot],
    )
    .await
    .unwrap();
    wait_handed_off(&db, &name, 10 * SECOND).await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert!(emu.contact_by_email(portal, "later@example.com").is_none());

    // Activities need OAuth: refused on a token connection.
    let (status, v) = patch(
        &sidecar,
        spot,
        serde_json::json!({"activities": {"lives": true}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("OAuth"));
    let (status, _) = patch(
        &sidecar,
        spot,
        serde_json::json!({"activities": {"bogus": true}}),
    )
    .await;
    assert_eq!(status, 400);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_disconnect_nothing_is_sent() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Leaving").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    let m = seed_member(&db, spot, "stay@example.com", "accepted").await;
    emu.add_contact(portal, "stay@example.com", &[]);
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    db.execute(
        "UPDATE members SET headline = 'before' WHERE id = $1",
        &[&m],
    )
    .await
    .unwrap();
    wait_for("a write", 30 * SECOND, || async {
        prop(&emu, portal, "stay@example.com", "meltingspot_headline").as_deref() == Some("before")
    })
    .await;
    // A steady stream of changes while disconnecting.
    for i in 0..20 {
        db.execute(
            "UPDATE members SET headline = $1 WHERE id = $2",
            &[&format!("during {i}"), &m],
        )
        .await
        .unwrap();
    }
    let (status, v) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/disconnect"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "inactive");
    assert_eq!(v["backlog"]["properties"], 0);
    let calls_at_disconnect = emu.request_stats(portal).total;
    for i in 0..20 {
        db.execute(
            "UPDATE members SET headline = $1 WHERE id = $2",
            &[&format!("after {i}"), &m],
        )
        .await
        .unwrap();
    }
    wait_handed_off(&db, &name, 10 * SECOND).await;
    // A later positive marker instead of a sleep: a change committed after
    // all of those reaches another Spot's portal, so the stream and delivery
    // have run past them (a wrongly surviving worker polls every 0.5 s).
    let marker_spot = seed_spot(&db, "Marker").await;
    let (marker_portal, marker_token) = emu.create_portal();
    let marker = seed_member(&db, marker_spot, "marker@example.com", "accepted").await;
    emu.add_contact(marker_portal, "marker@example.com", &[]);
    sidecar.connect_with_token(marker_spot, &marker_token).await;
    wait_for("the marker Spot is written", 30 * SECOND, || async {
        prop(
            &emu,
            marker_portal,
            "marker@example.com",
            "meltingspot_member_id",
        )
        .is_some()
    })
    .await;
    db.execute(
        "UPDATE members SET headline = 'marker' WHERE id = $1",
        &[&marker],
    )
    .await
    .unwrap();
    wait_for("the marker change arrives", 30 * SECOND, || async {
        prop(
            &emu,
            marker_portal,
            "marker@example.com",
            "meltingspot_headline",
        )
        .as_deref()
            == Some("marker")
    })
    .await;
    let stats = emu.request_stats(portal);
    let after: u64 = stats.total - calls_at_disconnect;
    // Only the best-effort revocation of the refresh token may follow the disconnect.
    assert!(
        after <= stats.count_op("oauth.revoke"),
        "{after} requests after the disconnect: {:?}",
        stats.by_operation
    );
    let tokens: Option<Vec<u8>> = db
        .query_one(
            "SELECT access_token_enc FROM hubspot_sync.integrations WHERE spot_id = $1",
            &[&spot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tokens.is_none(), "tokens are erased");
    assert_eq!(sidecar.integration(spot).await["backlog"]["properties"], 0);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_for_good_is_marked_and_the_others_still_mailed() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let smtp = SmtpSink::refusing(&["gone@example.com"]).await;
    let mut cfg = oauth_config(&url, &name, &emu);
    cfg.smtp_url = Some(format!("smtp://127.0.0.1:{}", smtp.port));
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Mail").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    // The refused admin sorts first, so a blocking mailer would never reach the other.
    db.batch_execute(&format!(
        "INSERT INTO members (spot_id, email, status, role) VALUES
            ({spot}, 'gone@example.com', 'accepted', 'admin'),
            ({spot}, 'here@example.com', 'accepted', 'admin');"
    ))
    .await
    .unwrap();
    emu.add_contact(portal, "here@example.com", &[]);
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    wait_for("the backfill", 30 * SECOND, || async {
        prop(
            &emu,
            portal,
            "here@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("accepted")
    })
    .await;
    emu.revoke_portal(portal);
    db.execute(
        "UPDATE members SET headline = 'x' WHERE email = 'here@example.com'",
        &[],
    )
    .await
    .unwrap();
    wait_for("the other admin's e-mail", 30 * SECOND, || async {
        smtp.messages()
            .iter()
            .any(|m| m.contains("here@example.com"))
    })
    .await;
    wait_for("the refused one is marked with its reason", 10 * SECOND, || async {
        db.query_opt(
            "SELECT n.rejected_reason FROM hubspot_sync.notifications n JOIN members m ON m.id = n.member_id
              WHERE m.email = 'gone@example.com' AND n.channel = 'email' AND n.rejected_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .is_some_and(|r| r.get::<_, Option<String>>(0).is_some_and(|t| t.contains("550")))
    })
    .await;
    assert!(!smtp
        .messages()
        .iter()
        .any(|m| m.contains("gone@example.com")));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_portal_fails_notifies_admins_once_and_a_reconnect_converges() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let smtp = SmtpSink::start().await;
    let mut cfg = oauth_config(&url, &name, &emu);
    cfg.smtp_url = Some(format!("smtp://127.0.0.1:{}", smtp.port));
    cfg.smtp_from = Some("MeltingSpot <no-reply@meltingspot.test>".into());
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Fragile").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    db.batch_execute(&format!(
        "INSERT INTO members (spot_id, email, status, role) VALUES
            ({spot}, 'admin1@example.com', 'accepted', 'admin'),
            ({spot}, 'admin2@example.com', 'accepted', 'admin'),
            ({spot}, 'invited-admin@example.com', 'invited', 'admin'),
            ({spot}, 'member@example.com', 'accepted', 'member');"
    ))
    .await
    .unwrap();
    emu.add_contact(portal, "member@example.com", &[]);
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    wait_for("the backfill", 30 * SECOND, || async {
        prop(
            &emu,
            portal,
            "member@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("accepted")
    })
    .await;

    emu.revoke_portal(portal);
    db.execute(
        "UPDATE members SET headline = 'while revoked' WHERE email = 'member@example.com'",
        &[],
    )
    .await
    .unwrap();
    wait_for("failed", 30 * SECOND, || async {
        sidecar.integration(spot).await["status"] == "failed"
    })
    .await;
    let v = sidecar.integration(spot).await;
    assert!(
        v["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{v}"
    );

    // While failed: the slot advances, the work is retained, nothing is sent.
    let calls_when_failed = emu.request_stats(portal).total;
    for i in 0..10 {
        db.execute(
            "UPDATE members SET headline = $1 WHERE email = 'member@example.com'",
            &[&format!("failed {i}")],
        )
        .await
        .unwrap();
    }
    wait_handed_off(&db, &name, 10 * SECOND).await;
    assert_eq!(sidecar.integration(spot).await["backlog"]["properties"], 1);
    assert_eq!(emu.request_stats(portal).total, calls_when_failed);

    // One notification per admin (accepted) per channel, once.
    let rows = db
        .query(
            "SELECT m.email, n.channel FROM hubspot_sync.notifications n JOIN members m ON m.id = n.member_id
              WHERE n.spot_id = $1 ORDER BY 1, 2",
            &[&spot],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("admin1@example.com".to_string(), "email".to_string()),
            ("admin1@example.com".into(), "in_app".into()),
            ("admin2@example.com".into(), "email".into()),
            ("admin2@example.com".into(), "in_app".into()),
        ]
    );
    // The e-mails went out through SMTP_URL.
    wait_for("two e-mails through SMTP", 20 * SECOND, || async {
        smtp.messages().len() == 2
    })
    .await;
    let mails = smtp.messages();
    assert!(mails.iter().any(|m| m.contains("admin1@example.com")));
    assert!(
        mails
            .iter()
            .all(|m| m.contains("Subject: HubSpot integration of Fragile failed")),
        "{mails:?}"
    );
    wait_for("e-mail notifications marked delivered", 10 * SECOND, || async {
        db.query_one(
            "SELECT count(*) FROM hubspot_sync.notifications WHERE spot_id = $1 AND channel = 'email' AND delivered_at IS NOT NULL",
            &[&spot],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 2
    })
    .await;

    // Reconnect: active again, the retained work is delivered.
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    let v = sidecar.integration(spot).await;
    assert_eq!(v["status"], "active");
    assert!(v["last_error"].is_null(), "{v}");
    wait_for(
        "the retained change reaches the contact",
        30 * SECOND,
        || async {
            prop(&emu, portal, "member@example.com", "meltingspot_headline").as_deref()
                == Some("failed 9")
        },
    )
    .await;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM hubspot_sync.notifications WHERE spot_id = $1",
            &[&spot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4, "no second notification for the same incident");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spots_on_two_portals_never_exchange_data() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let a = seed_spot(&db, "Alpha").await;
    let b = seed_spot(&db, "Beta").await;
    let (pa, ta) = emu.create_portal();
    let (pb, tb) = emu.create_portal();
    // The same person is a member of both Spots, and a contact in both portals.
    let ma = seed_member(&db, a, "shared@example.com", "accepted").await;
    let mb = seed_member(&db, b, "shared@example.com", "pending").await;
    emu.add_contact(pa, "shared@example.com", &[]);
    emu.add_contact(pb, "shared@example.com", &[]);
    sidecar.connect_with_token(a, &ta).await;
    sidecar.connect_with_token(b, &tb).await;
    db.batch_execute(&format!(
        "UPDATE members SET headline = 'in alpha' WHERE id = {ma};
         UPDATE members SET headline = 'in beta' WHERE id = {mb};"
    ))
    .await
    .unwrap();
    wait_for("both contacts", 30 * SECOND, || async {
        prop(&emu, pa, "shared@example.com", "meltingspot_headline").as_deref() == Some("in alpha")
            && prop(&emu, pb, "shared@example.com", "meltingspot_headline").as_deref()
                == Some("in beta")
    })
    .await;
    assert_eq!(
        prop(&emu, pa, "shared@example.com", "meltingspot_member_id"),
        Some(ma.to_string())
    );
    assert_eq!(
        prop(&emu, pb, "shared@example.com", "meltingspot_member_id"),
        Some(mb.to_string())
    );
    assert_eq!(
        prop(&emu, pa, "shared@example.com", "meltingspot_member_status").as_deref(),
        Some("accepted")
    );
    assert_eq!(
        prop(&emu, pb, "shared@example.com", "meltingspot_member_status").as_deref(),
        Some("pending")
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_never_overwrites_a_newer_value_from_the_stream() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Race").await;
    let (portal, token) = emu.create_portal();
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 'r' || g || '@example.com', 'accepted', 'initial' FROM generate_series(1, 1500) g",
        &[&spot],
    )
    .await
    .unwrap();
    for g in 1..=1500 {
        emu.add_contact(portal, &format!("r{g}@example.com"), &[]);
    }
    sidecar.connect_with_token(spot, &token).await;
    // While the backfill pages through the Spot, the stream changes the same members.
    for round in 0..30 {
        db.execute(
            "UPDATE members SET headline = 'stream ' || $1::text WHERE spot_id = $2 AND id % 30 = $3",
            &[&round.to_string(), &spot, &(round as i64)],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_headlines_converge(&db, &emu, portal, spot, 120 * SECOND).await;
    assert!(sidecar.running.metrics.backfill_queued.get() >= 1500);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_access_token_is_refreshed_and_the_rotated_refresh_token_stored() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = Emulator::start(EmulatorConfig {
        rotate_refresh_tokens: true,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Refresh").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    let m = seed_member(&db, spot, "fresh@example.com", "accepted").await;
    emu.add_contact(portal, "fresh@example.com", &[]);
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    wait_for("the backfill", 30 * SECOND, || async {
        prop(
            &emu,
            portal,
            "fresh@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("accepted")
    })
    .await;
    let sealed = |db: tokio_postgres::Client| async move {
        db.query_one(
            "SELECT refresh_token_enc FROM hubspot_sync.integrations WHERE spot_id = $1",
            &[&spot],
        )
        .await
        .unwrap()
        .get::<_, Vec<u8>>(0)
    };
    let before = sealed(sql(&url).await).await;

    // HubSpot answers 401 EXPIRED_AUTHENTICATION from now on for the old token.
    emu.expire_access_tokens(portal);
    db.execute(
        "UPDATE members SET headline = 'after expiry' WHERE id = $1",
        &[&m],
    )
    .await
    .unwrap();
    wait_for("the write after a refresh", 30 * SECOND, || async {
        prop(&emu, portal, "fresh@example.com", "meltingspot_headline").as_deref()
            == Some("after expiry")
    })
    .await;
    assert_ne!(
        sealed(sql(&url).await).await,
        before,
        "the rotated refresh token is stored"
    );
    assert!(
        sidecar
            .running
            .metrics
            .token_refreshes
            .with_label_values(&["ok"])
            .get()
            >= 1
    );
    assert_eq!(
        sidecar.integration(spot).await["status"],
        "active",
        "an expired token is not a failure"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_the_same_portal_keeps_the_record_ids_it_knows() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Kept").await;
    add_members(&db, spot, "kept", 150).await;
    let (portal, token) = emu.create_portal();
    for g in 0..150 {
        emu.add_contact(portal, &format!("kept{g}@example.com"), &[]);
    }
    sidecar.connect_with_token(spot, &token).await;
    let backfilled = || async {
        let v = sidecar.integration(spot).await;
        v["backfill"]["running"] == false && v["backlog"]["properties"] == 0
    };
    wait_for("the first backfill", 60 * SECOND, backfilled).await;
    let reads = emu.request_stats(portal).count_op("contacts.batch_read");
    assert!(reads >= 2, "the first backfill looked the members up");
    // An admin edits a contact in HubSpot; then the Spot is reconnected to
    // the same portal (a new key, say).
    emu.add_contact(
        portal,
        "kept7@example.com",
        &[("meltingspot_member_status", "left")],
    );
    let updates = emu.request_stats(portal).count_op("contacts.batch_update");
    sidecar.connect_with_token(spot, &token).await;
    wait_for("the value written again", 60 * SECOND, || async {
        prop(
            &emu,
            portal,
            "kept7@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("accepted")
    })
    .await;
    wait_for("the second backfill", 60 * SECOND, backfilled).await;
    let stats = emu.request_stats(portal);
    assert_eq!(
        stats.count_op("contacts.batch_read"),
        reads,
        "no member was looked up again"
    );
    assert_eq!(
        stats.count_op("contacts.batch_update") - updates,
        2,
        "every value written again, 100 contacts a call"
    );
    sidecar.stop().await;
}
