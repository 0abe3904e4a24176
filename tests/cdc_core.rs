//! CDC core, end to end: real Postgres (logical replication), the HubSpot
//! emulator, and the sidecar.

mod common;

use std::time::Duration;

use common::*;
use hubspot_emulator::Faults;

const SECOND: Duration = Duration::from_secs(1);

/// Connects a Spot through the admin API and waits until the property group exists.
async fn connect(sidecar: &Sidecar, emu: &hubspot_emulator::Emulator, spot: i64) -> u64 {
    let (portal, token) = emu.create_portal();
    let view = sidecar.connect_with_token(spot, &token).await;
    assert_eq!(view["status"], "active");
    assert_eq!(view["portal_id"], portal);
    wait_for("the ten properties", 30 * SECOND, || async {
        emu.properties(portal)
            .iter()
            .filter(|p| p.group_name == "meltingspot")
            .count()
            == 10
    })
    .await;
    portal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_changes_reach_exactly_the_matching_contacts() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;

    let spot = seed_spot(&db, "Growth Club").await;
    let ada = seed_member(&db, spot, "Ada@Example.com ", "accepted").await;
    let _nobody = seed_member(&db, spot, "nobody@example.com", "invited").await;
    let portal = connect(&sidecar, &emu, spot).await;
    let ada_contact = emu.add_contact(portal, "ada@example.com", &[("firstname", "Ada")]);
    let grace_contact = emu.add_contact(portal, "grace@example.com", &[]);
    let contacts_before = emu.contacts(portal).len();

    // Membership, tags, a custom role, then renames of each.
    db.batch_execute(&format!(
        "INSERT INTO groups (id, spot_id, name) VALUES (901, {spot}, 'Zeta'), (902, {spot}, 'alpha;beta');
         INSERT INTO tags (id, spot_id, name) VALUES (801, {spot}, 'vip');
         INSERT INTO custom_roles (id, spot_id, name) VALUES (701, {spot}, 'Ambassador');
         INSERT INTO group_members VALUES (901, {ada}), (902, {ada});
         INSERT INTO member_tags VALUES ({ada}, 801);
         UPDATE members SET headline = 'Analyst', role = 'admin', custom_role_id = 701,
                registered_at = '2026-02-03T04:05:06.789123Z' WHERE id = {ada};"
    ))
    .await
    .unwrap();
    wait_for("ada's properties", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_groups").as_deref()
            == Some("Zeta;alpha,beta")
            && prop(
                &emu,
                portal,
                "ada@example.com",
                "meltingspot_member_custom_role",
            )
            .as_deref()
                == Some("Ambassador")
    })
    .await;
    let c = emu.contact_by_email(portal, "ada@example.com").unwrap();
    assert_eq!(c.id, ada_contact);
    let p = &c.properties;
    assert_eq!(p["meltingspot_member_id"], ada.to_string());
    assert_eq!(p["meltingspot_member_status"], "accepted");
    assert_eq!(p["meltingspot_member_role"], "admin");
    assert_eq!(p["meltingspot_tags"], "vip");
    assert_eq!(p["meltingspot_headline"], "Analyst");
    assert_eq!(
        p["meltingspot_spot_invitation_date"],
        "2026-01-02T03:04:05.678Z"
    );
    assert_eq!(
        p["meltingspot_spot_registration_date"],
        "2026-02-03T04:05:06.789Z"
    );
    assert_eq!(
        p["firstname"], "Ada",
        "properties we do not own are untouched"
    );

    // Renames fan out; NULL clears; a new member with a contact gets its properties.
    db.batch_execute(&format!(
        "UPDATE groups SET name = 'Omega' WHERE id = 901;
         UPDATE tags SET name = 'gold' WHERE id = 801;
         UPDATE custom_roles SET name = 'Champion' WHERE id = 701;
         UPDATE members SET headline = NULL WHERE id = {ada};
         INSERT INTO members (spot_id, email, status) VALUES ({spot}, 'GRACE@example.com', 'pending');"
    ))
    .await
    .unwrap();
    wait_for("renames and the new member", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_groups").as_deref()
            == Some("Omega;alpha,beta")
            && prop(&emu, portal, "ada@example.com", "meltingspot_tags").as_deref() == Some("gold")
            && prop(
                &emu,
                portal,
                "ada@example.com",
                "meltingspot_member_custom_role",
            )
            .as_deref()
                == Some("Champion")
            && prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref() == Some("")
            && prop(
                &emu,
                portal,
                "grace@example.com",
                "meltingspot_member_status",
            )
            .as_deref()
                == Some("pending")
    })
    .await;
    assert_eq!(
        emu.contact_by_email(portal, "grace@example.com")
            .unwrap()
            .id,
        grace_contact
    );

    // Leaving a group and deleting a tag reach the contact too.
    db.batch_execute(&format!(
        "DELETE FROM group_members WHERE group_id = 902 AND member_id = {ada};
         DELETE FROM tags WHERE id = 801;"
    ))
    .await
    .unwrap();
    wait_for("membership removals", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_groups").as_deref() == Some("Omega")
            && prop(&emu, portal, "ada@example.com", "meltingspot_tags").as_deref() == Some("")
    })
    .await;

    // The member without a contact caused no write and no contact (G5).
    assert!(emu.contact_by_email(portal, "nobody@example.com").is_none());
    assert_eq!(emu.contacts(portal).len(), contacts_before);
    let stats = emu.request_stats(portal);
    assert!(!stats.by_operation.contains_key("contacts.batch_create"));
    assert!(!stats.by_operation.contains_key("contacts.batch_upsert"));

    // Everything handed off was delivered: the backlog is empty.
    sidecar.wait_backlog_empty(spot, "properties").await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_bio_survives_an_update_of_the_headline_only() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Toast").await;
    let m = seed_member(&db, spot, "toast@example.com", "accepted").await;
    let portal = connect(&sidecar, &emu, spot).await;
    emu.add_contact(portal, "toast@example.com", &[]);

    // 20 kB of barely compressible text is stored out of line (TOAST).
    let bio: String = {
        use rand::{distributions::Alphanumeric, Rng};
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(20_000)
            .map(char::from)
            .collect()
    };
    db.execute("UPDATE members SET bio = $1 WHERE id = $2", &[&bio, &m])
        .await
        .unwrap();
    wait_for("the bio", 30 * SECOND, || async {
        prop(&emu, portal, "toast@example.com", "meltingspot_bio").as_deref() == Some(bio.as_str())
    })
    .await;
    let stored: i32 = db
        .query_one(
            "SELECT pg_column_size(bio) FROM members WHERE id = $1",
            &[&m],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored > 2000, "the bio is TOASTed ({stored} bytes stored)");

    db.execute(
        "UPDATE members SET headline = 'Only this' WHERE id = $1",
        &[&m],
    )
    .await
    .unwrap();
    wait_for("the headline", 30 * SECOND, || async {
        prop(&emu, portal, "toast@example.com", "meltingspot_headline").as_deref()
            == Some("Only this")
    })
    .await;
    assert_eq!(
        prop(&emu, portal, "toast@example.com", "meltingspot_bio").as_deref(),
        Some(bio.as_str())
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_down_for_a_minute_holds_no_wal_and_the_backlog_drains() {
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Outage").await;
    let portal = connect(&sidecar, &emu, spot).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let email = format!("m{i}@example.com");
        ids.push(seed_member(&db, spot, &email, "accepted").await);
        emu.add_contact(portal, &email, &[]);
    }
    emu.set_faults(
        Some(portal),
        Faults {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    let mut round = 0;
    while started.elapsed() < outage {
        round += 1;
        db.execute(
            "UPDATE members SET headline = 'round ' || $1::text WHERE spot_id = $2",
            &[&round.to_string(), &spot],
        )
        .await
        .unwrap();
        let (_, committed) = slot_position(&db, &name).await;
        // G3: the slot reaches the commit within 10 s whatever HubSpot does.
        wait_for(
            "slot follows the commit during the outage",
            10 * SECOND,
            || async { slot_position(&db, &name).await.0 >= committed },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let v = sidecar.integration(spot).await;
    assert_eq!(
        v["backlog"]["properties"], 50,
        "the work waits in the backlog: {v}"
    );
    assert!(emu
        .request_stats(portal)
        .by_operation
        .values()
        .any(|s| s.contains_key(&500)));

    emu.set_faults(Some(portal), Faults::default());
    let want = format!("round {round}");
    wait_for(
        "the backlog drains and contacts converge",
        90 * SECOND,
        || async {
            (0..50).all(|i| {
                prop(
                    &emu,
                    portal,
                    &format!("m{i}@example.com"),
                    "meltingspot_headline",
                )
                .as_deref()
                    == Some(want.as_str())
            })
        },
    )
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_portal_gets_more_than_the_rate_limit_in_any_10_seconds() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let mut cfg = config(&url, &name, &emu.base_url());
    cfg.hubspot.rate_limit = 8;
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Busy").await;
    let portal = connect(&sidecar, &emu, spot).await;
    for i in 0..600 {
        emu.add_contact(portal, &format!("busy{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 'busy' || g || '@example.com', 'accepted', 'hello' FROM generate_series(0, 599) g",
        &[&spot],
    )
    .await
    .unwrap();
    wait_for("600 contacts written", 120 * SECOND, || async {
        (0..600).all(|i| {
            prop(
                &emu,
                portal,
                &format!("busy{i}@example.com"),
                "meltingspot_headline",
            )
            .as_deref()
                == Some("hello")
        })
    })
    .await;
    let stats = emu.request_stats(portal);
    assert!(
        stats.peak_in_10s <= 8,
        "peak {} requests in 10 s",
        stats.peak_in_10s
    );
    assert_eq!(stats.rate_limited, 0, "no 429 was needed");
    // 600 contacts are 6 batch reads and 6 batch updates: the minimum.
    assert_eq!(
        stats.by_operation["contacts.batch_update"]
            .values()
            .sum::<u64>(),
        6
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_unpublished_tables_do_not_hold_wal() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    db.batch_execute("CREATE TABLE unrelated (id serial primary key, v text); INSERT INTO unrelated (v) SELECT 'x' FROM generate_series(1, 1000);")
        .await
        .unwrap();
    let (_, written) = slot_position(&db, &name).await;
    wait_for(
        "the slot passes WAL of unpublished tables",
        60 * SECOND,
        || async { slot_position(&db, &name).await.0 >= written },
    )
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_write_is_dead_lettered_and_nothing_else_stops() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Strict").await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    wait_for("the ten properties", 30 * SECOND, || async {
        emu.properties(portal).len() >= 10
    })
    .await;
    // Someone removed the 'declined' option in HubSpot after initialization:
    // writing that status is now rejected with INVALID_OPTION.
    let options: Vec<serde_json::Value> = ["invited", "accepted", "pending", "left", "deactivated"]
        .iter()
        .enumerate()
        .map(|(i, v)| serde_json::json!({"label": v, "value": v, "displayOrder": i, "hidden": false}))
        .collect();
    let resp = reqwest::Client::new()
        .patch(format!(
            "{}/crm/v3/properties/contacts/meltingspot_member_status",
            emu.base_url()
        ))
        .bearer_auth(&token)
        .json(&serde_json::json!({"options": options}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    for i in 0..5 {
        emu.add_contact(portal, &format!("ok{i}@example.com"), &[]);
    }
    emu.add_contact(portal, "bad@example.com", &[]);
    db.batch_execute(&format!(
        "INSERT INTO members (spot_id, email, status, headline)
             SELECT {spot}, 'ok' || g || '@example.com', 'accepted', repeat('é', 70000) FROM generate_series(0, 4) g;
         INSERT INTO members (spot_id, email, status) VALUES ({spot}, 'bad@example.com', 'declined');"
    ))
    .await
    .unwrap();
    wait_for(
        "the good contacts, with the over-long headline cut to the limit",
        30 * SECOND,
        || async {
            (0..5).all(|i| {
                let email = format!("ok{i}@example.com");
                prop(&emu, portal, &email, "meltingspot_member_status").as_deref()
                    == Some("accepted")
                    && prop(&emu, portal, &email, "meltingspot_headline").map(|h| h.chars().count())
                        == Some(65_536)
            })
        },
    )
    .await;
    assert!(sidecar.running.metrics.values_truncated.get() >= 5);
    wait_for("the dead letter", 30 * SECOND, || async {
        db.query_opt(
            "SELECT 1 FROM hubspot_sync.dead_letters WHERE spot_id = $1 AND payload->>'email' = 'bad@example.com'
                AND reason ILIKE '%declined%'",
            &[&spot],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    assert_eq!(
        prop(&emu, portal, "bad@example.com", "meltingspot_member_status"),
        None
    );
    let rendered = sidecar.running.metrics.render();
    assert!(
        rendered.contains("hubspot_sidecar_dead_letters_total{reason="),
        "{rendered}"
    );
    // Nothing is stuck: the backlog is empty.
    sidecar.wait_backlog_empty(spot, "properties").await;
    sidecar.stop().await;
}

/// The race the outbox's version exists for: a change committed while a
/// round is already sending the member's previous values. The round's
/// completion must leave the member queued, so the newer value follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_its_round_is_in_flight_follows_it() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Racing").await;
    let ada = seed_member(&db, spot, "ada@example.com", "accepted").await;
    let portal = connect(&sidecar, &emu, spot).await;
    emu.add_contact(portal, "ada@example.com", &[]);
    db.execute(
        "UPDATE members SET headline = 'zero' WHERE id = $1",
        &[&ada],
    )
    .await
    .unwrap();
    wait_for("'zero' on the contact", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref() == Some("zero")
    })
    .await;

    // HubSpot holds every call; the round for 'first' is sent and held.
    emu.set_faults(
        Some(portal),
        Faults {
            hang: true,
            ..Default::default()
        },
    );
    db.execute(
        "UPDATE members SET headline = 'first' WHERE id = $1",
        &[&ada],
    )
    .await
    .unwrap();
    // The only call on this portal now is the round woken by 'first' (a
    // static token: no activities, no refresh), built before 'second' exists.
    wait_for("the round for 'first' in flight", 30 * SECOND, || async {
        emu.hung_requests() >= 1
    })
    .await;
    // 'second' is committed and handed off while that call is in flight.
    db.execute(
        "UPDATE members SET headline = 'second' WHERE id = $1",
        &[&ada],
    )
    .await
    .unwrap();
    wait_handed_off(&db, &name, 30 * SECOND).await;
    emu.set_faults(Some(portal), Faults::default());

    wait_for(
        "the newer value after the older one",
        30 * SECOND,
        || async {
            prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref()
                == Some("second")
        },
    )
    .await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert_eq!(
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref(),
        Some("second")
    );
    sidecar.stop().await;
}
