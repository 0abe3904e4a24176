//! Tenants stay apart and consent cannot be forged (G4, G5): signed settings
//! markers, fenced reconnects, one token per Spot, complete disconnects,
//! derived values from the member's own Spot, replica identity drift, and the
//! settings audit trail.

mod common;

use std::time::Duration;

use common::*;
use hubspot_emulator::{Emulator, Faults};

const SECOND: Duration = Duration::from_secs(1);

/// A counter or gauge from the sidecar's `/metrics` (0 when absent).
async fn metric(sidecar: &Sidecar, series: &str) -> f64 {
    let text = reqwest::get(sidecar.url("/metrics"))
        .await
        .expect("metrics reachable")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn patch(sidecar: &Sidecar, spot: i64, body: serde_json::Value) -> serde_json::Value {
    let (status, v) = sidecar
        .api(
            reqwest::Method::PATCH,
            &format!("/api/spots/{spot}/hubspot/settings"),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn disconnect(sidecar: &Sidecar, spot: i64) -> serde_json::Value {
    let (status, v) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/disconnect"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The Spot's audit trail, newest first.
async fn audit(sidecar: &Sidecar, spot: i64) -> Vec<serde_json::Value> {
    let (status, v) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Waits until the Spot's property group exists on the portal (initialized).
async fn wait_initialized(emu: &Emulator, portal: u64) {
    wait_for("initialization", 30 * SECOND, || async {
        emu.properties(portal)
            .iter()
            .filter(|p| p.group_name == "meltingspot")
            .count()
            == 10
    })
    .await;
}

/// A database, an emulator and a sidecar with OAuth and App Events.
struct World {
    name: String,
    db: tokio_postgres::Client,
    emu: Emulator,
    sidecar: Sidecar,
}

async fn oauth_world() -> World {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let mut cfg = oauth_config(&url, &name, &emu);
    cfg.hubspot.app_event_prefix = "pe4242_".into();
    let sidecar = Sidecar::start(cfg).await;
    World {
        name,
        db,
        emu,
        sidecar,
    }
}

/// Connects the Spot through OAuth to `portal`.
async fn connect_oauth(w: &World, spot: i64, portal: u64) {
    w.emu.set_next_grant_portal(Some(portal));
    assert_eq!(oauth_connect(&w.sidecar, spot).await.0, 200);
}

/// Settings markers are the stream's only way to learn a toggle, and any role
/// can emit one: a forged marker and a replay of a genuine older one, both
/// emitted by a role that has nothing but CONNECT, change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_settings_markers_change_nothing() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Guarded").await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    wait_initialized(&emu, portal).await;

    // A spy slot captures the genuine marker that turns contact creation on.
    let spy = format!("{name}_spy");
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
        &[&spy],
    )
    .await
    .unwrap();
    patch(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    let rows = db
        .query(
            "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)
              WHERE data LIKE 'message:%hubspot_sidecar.settings%'",
            &[&spy],
        )
        .await
        .unwrap();
    let genuine_on: String = rows
        .last()
        .and_then(|r| {
            r.get::<_, String>(0)
                .split_once("content:")
                .map(|(_, c)| c.to_string())
        })
        .expect("the sidecar wrote a settings marker");
    assert!(
        genuine_on.contains("\"create_contacts\":true"),
        "{genuine_on}"
    );
    db.execute("SELECT pg_drop_replication_slot($1)", &[&spy])
        .await
        .unwrap();
    // The admin turns it off again: the genuine "on" marker is now old.
    patch(
        &sidecar,
        spot,
        serde_json::json!({"create_contacts": false}),
    )
    .await;

    // Someone with only CONNECT replays it and forges a newer one.
    let intruder = format!("intruder_{name}");
    db.batch_execute(&format!("CREATE ROLE {intruder} LOGIN"))
        .await
        .unwrap();
    let intruder_url = url.replacen("postgres@", &format!("{intruder}@"), 1);
    let attacker = sql(&intruder_url).await;
    let forged = serde_json::json!({
        "spot_id": spot, "version": 1_000_000, "status": "active", "create_contacts": true,
        "activities": {"members": true}, "mac": "00".repeat(32),
    })
    .to_string();
    for content in [&genuine_on, &forged] {
        attacker
            .execute(
                "SELECT pg_logical_emit_message(true, 'hubspot_sidecar.settings', $1::text)",
                &[content],
            )
            .await
            .expect("pg_logical_emit_message is executable by PUBLIC");
    }

    // A member inserted after both: no contact may be created for them.
    seed_member(&db, spot, "newcomer@example.com", "accepted").await;
    wait_handed_off(&db, &name, 30 * SECOND).await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert!(
        emu.contact_by_email(portal, "newcomer@example.com")
            .is_none(),
        "a forged or replayed marker turned contact creation on"
    );
    assert_eq!(sidecar.integration(spot).await["create_contacts"], false);
    assert_eq!(
        metric(
            &sidecar,
            "hubspot_sidecar_settings_markers_rejected_total{reason=\"replayed\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &sidecar,
            "hubspot_sidecar_settings_markers_rejected_total{reason=\"bad_signature\"}"
        )
        .await,
        1.0
    );
    // The stream keeps the genuine settings across a restart too.
    let applied: bool = db
        .query_one(
            "SELECT create_contacts FROM hubspot_sync.stream_settings WHERE spot_id = $1",
            &[&spot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!applied);
    sidecar.stop().await;
}

/// Spot A is backfilling into portal P when its admin reconnects it to Q.
/// Record ids are per portal, so an id of P names somebody else's contact
/// on Q: once the reconnect returns P gets nothing, and every Q contact ends
/// with the values of the member whose e-mail it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_another_portal_fences_the_old_one() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let mut cfg = config(&url, &name, &emu.base_url());
    // Slow enough that the backfill is in flight when the reconnect comes.
    cfg.hubspot.rate_limit = 12;
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Moving").await;
    let (p, p_token) = emu.create_portal();
    let (q, q_token) = emu.create_portal();
    const N: usize = 400;
    let mut members = Vec::new();
    for i in 0..N {
        let email = format!("m{i}@example.com");
        members.push((seed_member(&db, spot, &email, "accepted").await, email));
    }
    // Both portals know every e-mail, under ids in opposite orders.
    for (_, email) in &members {
        emu.add_contact(p, email, &[]);
    }
    for (_, email) in members.iter().rev() {
        emu.add_contact(q, email, &[]);
    }
    emu.set_faults(
        Some(p),
        Faults {
            latency: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    );

    sidecar.connect_with_token(spot, &p_token).await;
    // The worst moment: a round has read its contacts from P (its answer is
    // on the way, 300 ms) and is about to write them. A round sends its
    // batches at once, so its writes land within moments of each other:
    // the moment looked for is the one before them, which lasts the read's
    // latency.
    wait_for(
        "a round of the backfill between its read and its write",
        60 * SECOND,
        || async {
            let s = emu.request_stats(p);
            let (reads, updates) = (
                s.count_op("contacts.batch_read"),
                s.count_op("contacts.batch_update"),
            );
            reads > updates
        },
    )
    .await;
    let v = sidecar.connect_with_token(spot, &q_token).await;
    assert_eq!(v["portal_id"], q);
    let p_calls = emu.request_stats(p).total;

    wait_for(
        "every Q contact carries its own member",
        90 * SECOND,
        || async {
            members.iter().all(|(id, email)| {
                prop(&emu, q, email, "meltingspot_member_id").as_deref() == Some(&id.to_string())
            })
        },
    )
    .await;
    // Let anything a stale worker still had in hand come out, then look.
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert_eq!(
        emu.request_stats(p).total,
        p_calls,
        "portal P was called after the reconnect to Q returned"
    );
    for c in emu.contacts(q) {
        let email = c.properties.get("email").cloned().unwrap_or_default();
        let expected = members
            .iter()
            .find(|(_, e)| *e == email)
            .map(|(id, _)| id.to_string());
        assert_eq!(
            c.properties.get("meltingspot_member_id").cloned(),
            expected,
            "Q contact {email} holds another member's values"
        );
    }
    let map_portals: Vec<i64> = db
        .query(
            "SELECT DISTINCT portal_id FROM hubspot_sync.contact_map WHERE spot_id = $1",
            &[&spot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(map_portals, vec![q as i64], "record ids of P were kept");
    sidecar.stop().await;
}

/// A reconnect through OAuth revokes the previous refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_reconnect_revokes_the_old_refresh_token() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Reauthorized").await;
    let (p, _) = emu.create_portal();
    let (q, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(p));
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    assert_eq!(emu.live_refresh_tokens(p), 1);
    emu.set_next_grant_portal(Some(q));
    assert_eq!(oauth_connect(&sidecar, spot).await.0, 200);
    assert_eq!(sidecar.integration(spot).await["portal_id"], q);
    wait_for("P's refresh token revoked", 10 * SECOND, || async {
        emu.live_refresh_tokens(p) == 0
    })
    .await;
    assert_eq!(emu.live_refresh_tokens(q), 1);
    let trail = audit(&sidecar, spot).await;
    assert_eq!(trail[0]["kind"], "connected");
    assert_eq!(trail[0]["source"], "oauth_callback");
    assert_eq!(trail[0]["changes"]["portal_id"]["from"], p);
    assert_eq!(trail[0]["changes"]["portal_id"]["to"], q);
    sidecar.stop().await;
}

/// A service-key Spot and an OAuth Spot share a portal. Revoking the first
/// one's token fails that Spot only (and notifies its admins only); the
/// second one's changes and events keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spots_on_one_portal_are_independent() {
    let w = oauth_world().await;
    let (db, emu, sidecar) = (&w.db, &w.emu, &w.sidecar);
    let (portal, _) = emu.create_portal();
    let key_spot = seed_spot(db, "Keyed").await;
    let oauth_spot = seed_spot(db, "Authorized").await;
    for (spot, who) in [(key_spot, "keyed"), (oauth_spot, "authorized")] {
        let admin = seed_member(db, spot, &format!("admin-{who}@example.com"), "accepted").await;
        db.execute("UPDATE members SET role = 'admin' WHERE id = $1", &[&admin])
            .await
            .unwrap();
        seed_member(db, spot, &format!("{who}@example.com"), "accepted").await;
        emu.add_contact(portal, &format!("{who}@example.com"), &[]);
    }
    emu.add_contact(portal, "joiner@example.com", &[]);

    let key = emu.create_service_key(portal);
    sidecar.connect_with_token(key_spot, &key).await;
    connect_oauth(&w, oauth_spot, portal).await;
    patch(
        sidecar,
        oauth_spot,
        serde_json::json!({"activities": {"members": true}}),
    )
    .await;
    wait_for("both backfills", 30 * SECOND, || async {
        ["keyed@example.com", "authorized@example.com"]
            .iter()
            .all(|e| {
                prop(emu, portal, e, "meltingspot_member_status").as_deref() == Some("accepted")
            })
    })
    .await;

    emu.revoke_token(&key);
    db.execute(
        "UPDATE members SET headline = 'keyed after' WHERE email = 'keyed@example.com'",
        &[],
    )
    .await
    .unwrap();
    wait_for("the key Spot fails", 30 * SECOND, || async {
        sidecar.integration(key_spot).await["status"] == "failed"
    })
    .await;

    db.execute(
        "UPDATE members SET headline = 'authorized after' WHERE email = 'authorized@example.com'",
        &[],
    )
    .await
    .unwrap();
    seed_member(db, oauth_spot, "joiner@example.com", "accepted").await;
    let joiner = emu
        .contact_by_email(portal, "joiner@example.com")
        .expect("joiner contact")
        .id;
    wait_for("the OAuth Spot's change and event", 30 * SECOND, || async {
        prop(
            emu,
            portal,
            "authorized@example.com",
            "meltingspot_headline",
        )
        .as_deref()
            == Some("authorized after")
            && emu
                .timeline_events(portal)
                .iter()
                .any(|e| e.object_id == joiner && e.event_type.ends_with("spot_joined"))
    })
    .await;
    assert_eq!(sidecar.integration(oauth_spot).await["status"], "active");
    assert_ne!(
        prop(emu, portal, "keyed@example.com", "meltingspot_headline").as_deref(),
        Some("keyed after")
    );
    let notified: Vec<i64> = db
        .query(
            "SELECT DISTINCT spot_id FROM hubspot_sync.notifications",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        notified,
        vec![key_spot],
        "only the failed Spot's admins are told"
    );
    let trail = audit(sidecar, key_spot).await;
    assert_eq!(trail[0]["kind"], "failed");
    assert_eq!(trail[0]["source"], "delivery");
    assert!(
        trail[0]["detail"].as_str().unwrap_or("").contains("401"),
        "{}",
        trail[0]
    );
    w.sidecar.stop().await;
}

/// Events queued behind an outage do not survive a disconnect: nothing of
/// them reaches HubSpot after a reconnect and recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_drops_the_queued_events_too() {
    let w = oauth_world().await;
    let (db, emu, sidecar) = (&w.db, &w.emu, &w.sidecar);
    let spot = seed_spot(db, "Paused").await;
    let (portal, _) = emu.create_portal();
    connect_oauth(&w, spot, portal).await;
    patch(
        sidecar,
        spot,
        serde_json::json!({"activities": {"members": true}}),
    )
    .await;
    wait_initialized(emu, portal).await;

    emu.set_faults(
        Some(portal),
        Faults {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    let emails: Vec<String> = (0..3).map(|i| format!("queued{i}@example.com")).collect();
    for e in &emails {
        emu.add_contact(portal, e, &[]);
        seed_member(db, spot, e, "accepted").await;
    }
    wait_for("the events queued", 30 * SECOND, || async {
        sidecar.integration(spot).await["backlog"]["activities"] == 3
    })
    .await;
    let v = disconnect(sidecar, spot).await;
    assert_eq!(v["status"], "inactive");
    assert_eq!(v["backlog"]["activities"], 0, "{v}");
    assert_eq!(v["backlog"]["properties"], 0, "{v}");

    emu.set_faults(Some(portal), Faults::default());
    connect_oauth(&w, spot, portal).await;
    wait_for("the backfill after the reconnect", 30 * SECOND, || async {
        emails.iter().all(|e| {
            prop(emu, portal, e, "meltingspot_member_status").as_deref() == Some("accepted")
        })
    })
    .await;
    sidecar.wait_backlog_empty(spot, "activities").await;
    let joined: Vec<_> = emu
        .timeline_events(portal)
        .into_iter()
        .filter(|e| e.event_type.ends_with("spot_joined"))
        .collect();
    assert!(
        joined.is_empty(),
        "events from before the disconnect: {joined:?}"
    );
    let kinds: Vec<String> = audit(sidecar, spot)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds,
        ["connected", "disconnected", "settings_changed", "connected"]
    );
    w.sidecar.stop().await;
}

/// A membership, tag or custom role row that points to another Spot never
/// puts that Spot's names on this Spot's portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_another_spot_never_reach_the_members_portal() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let alpha = seed_spot(&db, "Alpha").await;
    let bravo = seed_spot(&db, "Bravo").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    let member = seed_member(&db, alpha, "ada@example.com", "accepted").await;
    sidecar.connect_with_token(alpha, &token).await;
    wait_for("the backfill", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_member_id").is_some()
    })
    .await;

    db.batch_execute(&format!(
        "WITH g AS (INSERT INTO groups (spot_id, name) VALUES ({alpha}, 'Alpha team'), ({bravo}, 'Bravo secret') RETURNING id)
         INSERT INTO group_members (group_id, member_id) SELECT id, {member} FROM g;
         WITH t AS (INSERT INTO tags (spot_id, name) VALUES ({bravo}, 'bravo-only') RETURNING id)
         INSERT INTO member_tags (member_id, tag_id) SELECT {member}, id FROM t;
         WITH r AS (INSERT INTO custom_roles (spot_id, name) VALUES ({bravo}, 'Bravo role') RETURNING id)
         UPDATE members SET custom_role_id = (SELECT id FROM r), headline = 'moved' WHERE id = {member};"
    ))
    .await
    .unwrap();
    wait_for("the change", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref() == Some("moved")
    })
    .await;
    let contact = emu.contact_by_email(portal, "ada@example.com").unwrap();
    let value = |p: &str| contact.properties.get(p).cloned().unwrap_or_default();
    assert_eq!(value("meltingspot_groups"), "Alpha team");
    assert_eq!(value("meltingspot_tags"), "");
    assert_eq!(value("meltingspot_member_custom_role"), "");
    for (p, v) in &contact.properties {
        assert!(!v.contains("Bravo") && !v.contains("bravo"), "{p} = {v}");
    }
    assert!(metric(&sidecar, "hubspot_sidecar_cross_spot_references_total").await >= 3.0);
    sidecar.stop().await;
}

/// A DBA drops REPLICA IDENTITY FULL on members while the sidecar runs:
/// the drift is reported at once, and a status event is never guessed from
/// an UPDATE that does not carry the old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_drift_is_reported_and_never_guessed_from() {
    let w = oauth_world().await;
    let (db, emu, sidecar) = (&w.db, &w.emu, &w.sidecar);
    let spot = seed_spot(db, "Drifting").await;
    let (portal, _) = emu.create_portal();
    let contact = emu.add_contact(portal, "pat@example.com", &[]);
    let member = seed_member(db, spot, "pat@example.com", "pending").await;
    connect_oauth(&w, spot, portal).await;
    patch(
        sidecar,
        spot,
        serde_json::json!({"activities": {"members": true}}),
    )
    .await;
    wait_initialized(emu, portal).await;
    let joined = || {
        emu.timeline_events(portal)
            .into_iter()
            .filter(|e| e.object_id == contact && e.event_type.ends_with("spot_joined"))
            .count()
    };

    db.batch_execute("ALTER TABLE public.members REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    // An edit, then a real status change: neither can be told apart now.
    db.execute(
        "UPDATE members SET headline = 'edit' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE members SET status = 'accepted' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_handed_off(db, &w.name, 30 * SECOND).await;
    let drift = "hubspot_sidecar_replica_identity_drift{table=\"members\"}";
    assert_eq!(metric(sidecar, drift).await, 1.0);
    assert!(
        metric(
            sidecar,
            "hubspot_sidecar_activities_unknown_total{table=\"members\"}"
        )
        .await
            >= 2.0
    );
    sidecar.wait_backlog_empty(spot, "activities").await;
    assert_eq!(joined(), 0, "a status event was guessed");

    // Restored: the next status change is an event again, the gauge clears.
    db.batch_execute("ALTER TABLE public.members REPLICA IDENTITY FULL")
        .await
        .unwrap();
    db.execute(
        "UPDATE members SET status = 'left' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE members SET status = 'accepted' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the status event after the fix", 30 * SECOND, || async {
        joined() == 1
    })
    .await;
    assert_eq!(metric(sidecar, drift).await, 0.0);
    w.sidecar.stop().await;
}

/// Support can answer "who turned on contact creation, and when".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_each_change_with_its_source() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Audited").await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    patch(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    // A no-op change records nothing.
    patch(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    disconnect(&sidecar, spot).await;

    let trail = audit(&sidecar, spot).await;
    let kinds: Vec<&str> = trail.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["disconnected", "settings_changed", "connected"]);
    assert!(trail.iter().all(|e| e["source"] == "admin_api"));
    assert_eq!(
        trail[1]["changes"],
        serde_json::json!({"create_contacts": {"from": false, "to": true}})
    );
    assert_eq!(trail[2]["changes"]["portal_id"]["to"], portal);
    assert_eq!(trail[0]["changes"]["status"]["from"], "active");
    assert!(trail[1]["at"].as_str().is_some_and(|t| t.starts_with("20")));
    // Paging: one at a time, newest first.
    let (status, page) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events?limit=1"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["events"][0]["kind"], "disconnected");
    let before = page["next_before"].as_i64().expect("a next page");
    let (_, page) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events?limit=1&before={before}"),
            None,
        )
        .await;
    assert_eq!(page["events"][0]["kind"], "settings_changed");
    sidecar.stop().await;
}
