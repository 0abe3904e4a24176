//! Timeline activities (SPEC §3, §4.5): the 12 activities, exactly once, with
//! both delivery APIs, following the category toggles in stream order.

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::Duration;

use common::*;
use hubspot_emulator::{CreatedBy, Emulator, EmulatorConfig};
use hubspot_sidecar::config::ActivityApi;

const SECOND: Duration = Duration::from_secs(1);
const ALL_ON: &str = r#"{"activities": {"members": true, "lives": true, "discussions": true, "collections": true, "courses": true}}"#;

async fn settings(sidecar: &Sidecar, spot: i64, body: &str) {
    let (status, v) = sidecar
        .api(
            reqwest::Method::PATCH,
            &format!("/api/spots/{spot}/hubspot/settings"),
            Some(serde_json::from_str(body).unwrap()),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// Connects through OAuth to a fresh portal; returns the portal.
async fn connect(sidecar: &Sidecar, emu: &Emulator, spot: i64) -> u64 {
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    assert_eq!(oauth_connect(sidecar, spot).await.0, 200);
    wait_for("initialization", 30 * SECOND, || async {
        emu.properties(portal)
            .iter()
            .filter(|p| p.group_name == "meltingspot")
            .count()
            == 10
    })
    .await;
    portal
}

fn events_of(emu: &Emulator, portal: u64, contact: &str) -> Vec<hubspot_emulator::TimelineEvent> {
    emu.timeline_events(portal)
        .into_iter()
        .filter(|e| e.object_id == contact)
        .collect()
}

/// Every activity once, on the right contact, with its title, url and time.
async fn all_twelve(api: ActivityApi) {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let mut cfg = oauth_config(&url, &name, &emu);
    cfg.hubspot.activity_api = api;
    cfg.hubspot.app_event_prefix = "pe4242_".into();
    cfg.hubspot.developer_api_key = Some(EmulatorConfig::default().developer_api_key);
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Growth Club").await;
    let portal = connect(&sidecar, &emu, spot).await;
    settings(&sidecar, spot, ALL_ON).await;
    let contact = emu.add_contact(portal, "ada@example.com", &[]);

    db.batch_execute(&format!(
        "INSERT INTO members (id, spot_id, email, status) VALUES (500, {spot}, 'ada@example.com', 'pending');
         UPDATE members SET status = 'accepted', headline = 'x' WHERE id = 500;
         UPDATE members SET headline = 'only the headline' WHERE id = 500;
         INSERT INTO lives (id, spot_id, title, starts_at) VALUES (10, {spot}, 'Launch live', now());
         INSERT INTO live_registrations (id, live_id, member_id, registered_at) VALUES (20, 10, 500, '2026-05-01T10:00:00.123456Z');
         UPDATE live_registrations SET attended_at = '2026-05-02T11:00:00.5Z' WHERE id = 20;
         INSERT INTO replay_views (id, live_id, member_id, watched_at) VALUES (30, 10, 500, '2026-05-03T12:00:00Z');
         INSERT INTO topics (id, spot_id, author_member_id, title, created_at) VALUES (40, {spot}, 500, 'Pricing ideas', '2026-05-04T13:00:00Z');
         INSERT INTO topic_votes (id, topic_id, member_id, created_at) VALUES (50, 40, 500, '2026-05-05T14:00:00Z');
         INSERT INTO documents (id, spot_id, kind, title, url) VALUES
             (60, {spot}, 'page', 'Handbook', 'https://example.com/handbook'),
             (61, {spot}, 'link', 'Blog', 'https://example.com/blog'),
             (62, {spot}, 'file', 'Deck', 'https://example.com/deck.pdf');
         INSERT INTO document_opens (id, document_id, member_id, opened_at) VALUES
             (70, 60, 500, '2026-05-06T15:00:00Z'), (71, 61, 500, '2026-05-07T16:00:00Z'), (72, 62, 500, '2026-05-08T17:00:00Z');
         INSERT INTO courses (id, spot_id, title) VALUES (80, {spot}, 'Onboarding');
         INSERT INTO course_progress (id, course_id, member_id, started_at) VALUES (90, 80, 500, '2026-05-09T18:00:00Z');
         UPDATE course_progress SET completed_at = '2026-05-10T19:00:00Z' WHERE id = 90;
         UPDATE members SET status = 'left' WHERE id = 500;"
    ))
    .await
    .unwrap();

    wait_for("twelve events", 30 * SECOND, || async {
        events_of(&emu, portal, &contact).len() >= 12
    })
    .await;
    wait_handed_off(&db, &name, 10 * SECOND).await;
    sidecar.wait_backlog_empty(spot, "activities").await;
    let events = events_of(&emu, portal, &contact);
    let prefix = if api == ActivityApi::AppEvents {
        "pe4242_"
    } else {
        ""
    };
    let by_type: BTreeMap<String, &hubspot_emulator::TimelineEvent> = events
        .iter()
        .map(|e| (e.event_type.trim_start_matches(prefix).to_string(), e))
        .collect();
    assert_eq!(
        events.len(),
        12,
        "each activity once: {:?}",
        events.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );
    let expect = [
        ("spot_join_requested", "Growth Club", None),
        ("spot_joined", "Growth Club", None),
        ("spot_left", "Growth Club", None),
        (
            "live_registered",
            "Launch live",
            Some("2026-05-01T10:00:00.123Z"),
        ),
        (
            "live_attended",
            "Launch live",
            Some("2026-05-02T11:00:00.500Z"),
        ),
        (
            "replay_watched",
            "Launch live",
            Some("2026-05-03T12:00:00.000Z"),
        ),
        (
            "topic_created",
            "Pricing ideas",
            Some("2026-05-04T13:00:00.000Z"),
        ),
        (
            "topic_voted",
            "Pricing ideas",
            Some("2026-05-05T14:00:00.000Z"),
        ),
        ("page_opened", "Handbook", Some("2026-05-06T15:00:00.000Z")),
        ("link_opened", "Blog", Some("2026-05-07T16:00:00.000Z")),
        (
            "course_started",
            "Onboarding",
            Some("2026-05-09T18:00:00.000Z"),
        ),
        (
            "course_completed",
            "Onboarding",
            Some("2026-05-10T19:00:00.000Z"),
        ),
    ];
    for (kind, title, at) in expect {
        let e = by_type
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} event in {:?}", by_type.keys()));
        if api == ActivityApi::AppEvents {
            assert_eq!(e.event_type, format!("pe4242_{kind}"));
        }
        assert_eq!(
            e.properties.get("spot_name").map(String::as_str),
            Some("Growth Club"),
            "{kind}"
        );
        assert_eq!(
            e.properties.get("title").map(String::as_str),
            Some(title),
            "{kind}"
        );
        if let Some(at) = at {
            assert_eq!(e.timestamp, at, "{kind}");
        }
    }
    assert_eq!(
        by_type["page_opened"].properties["url"],
        "https://example.com/handbook"
    );
    assert_eq!(
        by_type["link_opened"].properties["url"],
        "https://example.com/blog"
    );
    assert!(emu
        .contacts(portal)
        .iter()
        .all(|c| c.created_by == CreatedBy::Seed));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_twelve_activities_once_with_app_events() {
    all_twelve(ActivityApi::AppEvents).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_twelve_activities_once_with_timeline_v3() {
    all_twelve(ActivityApi::TimelineV3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn categories_follow_their_toggles_in_commit_order_and_no_event_creates_a_contact() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Toggles").await;
    let portal = connect(&sidecar, &emu, spot).await;
    let contact = emu.add_contact(portal, "m@example.com", &[]);
    db.batch_execute(&format!(
        "INSERT INTO members (id, spot_id, email, status) VALUES (7, {spot}, 'm@example.com', 'accepted'),
                                                            (8, {spot}, 'nocontact@example.com', 'accepted');
         INSERT INTO lives (id, spot_id, title, starts_at) VALUES (1, {spot}, 'Live', now());
         INSERT INTO topics (id, spot_id, author_member_id, title) VALUES (1, {spot}, 7, 'Off topic');"
    ))
    .await
    .unwrap();
    // Only lives on; the member and discussion activities above were committed
    // before any toggle and send nothing.
    settings(&sidecar, spot, r#"{"activities": {"lives": true}}"#).await;
    db.batch_execute(
        "INSERT INTO live_registrations (id, live_id, member_id) VALUES (1, 1, 7);
         INSERT INTO topic_votes (id, topic_id, member_id) VALUES (1, 1, 7);
         INSERT INTO live_registrations (id, live_id, member_id) VALUES (2, 1, 8);",
    )
    .await
    .unwrap();
    // The toggle off and the next registration commit one after the other.
    settings(&sidecar, spot, r#"{"activities": {"lives": false}}"#).await;
    db.execute(
        "INSERT INTO replay_views (id, live_id, member_id) VALUES (1, 1, 7)",
        &[],
    )
    .await
    .unwrap();
    wait_handed_off(&db, &name, 10 * SECOND).await;
    wait_for("the registration event", 30 * SECOND, || async {
        !events_of(&emu, portal, &contact).is_empty()
    })
    .await;
    sidecar.wait_backlog_empty(spot, "activities").await;
    let events = emu.timeline_events(portal);
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["live_registered"],
        "only the lives activity between the toggles"
    );
    assert_eq!(events[0].object_id, contact);
    // The member without a contact produced no event and no contact.
    assert!(emu
        .contact_by_email(portal, "nocontact@example.com")
        .is_none());
    assert!(sidecar.running.metrics.activities_without_contact.get() >= 1);
    sidecar.stop().await;
}

fn spawn_sidecar(db_url: &str, slot: &str, emu: &Emulator, listen: &str) -> Child {
    oauth_sidecar_command(db_url, slot, &emu.base_url(), listen)
        .spawn()
        .expect("spawn hubspot-sidecar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_500_activities_leaves_each_once() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let spot = seed_spot(&db, "Burst").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    db.batch_execute(&format!(
        "INSERT INTO members (id, spot_id, email, status) SELECT g, {spot}, 'b' || g || '@example.com', 'accepted' FROM generate_series(1, 50) g;
         INSERT INTO lives (id, spot_id, title, starts_at) VALUES (1, {spot}, 'Replay me', now());"
    ))
    .await
    .unwrap();
    for g in 1..=50 {
        emu.add_contact(portal, &format!("b{g}@example.com"), &[]);
    }
    let mut child = spawn_sidecar(&url, &name, &emu, &listen);
    wait_ready(&http, &listen).await;
    assert_eq!(oauth_connect_process(&http, &listen, spot).await, 200);
    change_settings_process(
        &http,
        &listen,
        spot,
        serde_json::json!({"activities": {"lives": true}}),
    )
    .await;

    for n in 1..=500i64 {
        db.execute(
            "INSERT INTO replay_views (id, live_id, member_id) VALUES ($1, 1, $2)",
            &[&n, &(1 + n % 50)],
        )
        .await
        .unwrap();
        if n == 200 {
            child.kill().expect("kill -9");
            child.wait().unwrap();
            child = spawn_sidecar(&url, &name, &emu, &listen);
        }
    }
    wait_for("500 replay events", 120 * SECOND, || async {
        emu.timeline_events(portal).len() >= 500
    })
    .await;
    wait_handed_off(&db, &name, 30 * SECOND).await;
    let events = emu.timeline_events(portal);
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(events.len(), 500, "no duplicate, none missing");
    assert_eq!(ids.len(), 500);
    child.kill().unwrap();
    child.wait().unwrap();
}
