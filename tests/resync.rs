//! Slot loss, failover and restore (SPEC §10): detected on start, healed by
//! recreating the slot and resynchronising every Spot from current values.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SECOND: Duration = Duration::from_secs(1);

/// Connects a token Spot with `n` members (each with a contact) and waits
/// for the backfill; returns the Spot and the portal.
async fn connected_spot(
    db: &tokio_postgres::Client,
    emu: &hubspot_emulator::Emulator,
    sidecar: &Sidecar,
    n: usize,
) -> (i64, u64) {
    let spot = seed_spot(db, "Resynced").await;
    let (portal, token) = emu.create_portal();
    for i in 0..n {
        emu.add_contact(portal, &format!("s{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 's' || g || '@example.com', 'accepted', 'before' FROM generate_series(0, $2::int - 1) g",
        &[&spot, &(n as i32)],
    )
    .await
    .unwrap();
    sidecar.connect_with_token(spot, &token).await;
    wait_headlines_converge(db, emu, portal, spot, 120 * SECOND).await;
    (spot, portal)
}

async fn resyncs(sidecar: &Sidecar, cause: &str) -> u64 {
    sidecar
        .running
        .metrics
        .resyncs
        .with_label_values(&[cause])
        .get()
}

/// The slot is dropped while the sidecar is down and changes are made: the
/// new slot starts after them, so only a resync brings them to HubSpot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_the_gap_resynchronised() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let (spot, portal) = connected_spot(&db, &emu, &sidecar, 20).await;
    sidecar.stop().await;

    db.execute(
        "UPDATE members SET headline = 'in the gap' WHERE spot_id = $1",
        &[&spot],
    )
    .await
    .unwrap();
    db.execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .unwrap();

    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    assert_eq!(resyncs(&sidecar, "slot_missing").await, 1);
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    let (status, trail) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(trail["events"][0]["kind"], "resync");
    assert_eq!(trail["events"][0]["detail"], "slot_missing");
    // And the stream goes on from the new slot.
    db.execute(
        "UPDATE members SET headline = 'after' WHERE spot_id = $1",
        &[&spot],
    )
    .await
    .unwrap();
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    sidecar.stop().await;
}

/// A checkpoint ahead of the server's WAL (the database was restored into
/// a cluster whose LSNs are lower): without a resync, everything below the
/// old LSN would be skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_another_server_is_not_trusted() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let (spot, portal) = connected_spot(&db, &emu, &sidecar, 10).await;
    sidecar.stop().await;
    db.execute(
        "UPDATE hubspot_sync.checkpoint SET lsn = 'FFFF/0' WHERE slot_name = $1",
        &[&name],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE members SET headline = 'restored' WHERE spot_id = $1",
        &[&spot],
    )
    .await
    .unwrap();
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    assert_eq!(resyncs(&sidecar, "checkpoint_ahead_of_server").await, 1);
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    sidecar.stop().await;

    // Another system identifier is a restore as well.
    db.execute(
        "UPDATE hubspot_sync.checkpoint SET system_identifier = '1' WHERE slot_name = $1",
        &[&name],
    )
    .await
    .unwrap();
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    assert_eq!(resyncs(&sidecar, "system_changed").await, 1);
    // A healthy restart does not resync.
    sidecar.stop().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    assert!([
        "slot_missing",
        "system_changed",
        "checkpoint_ahead_of_server",
        "checkpoint_behind_slot"
    ]
    .iter()
    .all(|c| sidecar
        .running
        .metrics
        .resyncs
        .with_label_values(&[c])
        .get()
        == 0));
    sidecar.stop().await;
}

/// Waits until the Spot's backfill is done and its outbox empty, from the
/// database (polling 10,000 contacts in the emulator would slow it down).
async fn wait_drained(db: &tokio_postgres::Client, spot: i64, deadline: Duration) {
    wait_for("the backfill done and the outbox empty", deadline, || async {
        db.query_one(
            "SELECT (SELECT backfill_done_at IS NOT NULL FROM hubspot_sync.integrations WHERE spot_id = $1)
                AND NOT EXISTS (SELECT 1 FROM hubspot_sync.property_outbox WHERE spot_id = $1)",
            &[&spot],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
    })
    .await;
}

/// How long a resync of 10,000 members takes (HubSpot limit 100 per 10 s,
/// so the floor is 200 calls = 20 s). Run by hand:
/// `cargo test --test resync -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn resync_of_10000_members_timing() {
    const N: usize = 10_000;
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Large").await;
    let (portal, token) = emu.create_portal();
    for i in 0..N {
        emu.add_contact(portal, &format!("s{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 's' || g || '@example.com', 'accepted', 'before' FROM generate_series(0, $2::int - 1) g",
        &[&spot, &(N as i32)],
    )
    .await
    .unwrap();
    sidecar.connect_with_token(spot, &token).await;
    wait_drained(&db, spot, 600 * SECOND).await;
    sidecar.stop().await;
    db.execute(
        "UPDATE members SET headline = 'gap' WHERE spot_id = $1",
        &[&spot],
    )
    .await
    .unwrap();
    db.execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .unwrap();
    let before = emu.request_stats(portal);
    let t = Instant::now();
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    wait_drained(&db, spot, 600 * SECOND).await;
    let took = t.elapsed();
    let after = emu.request_stats(portal);
    let gap = emu
        .contacts(portal)
        .iter()
        .filter(|c| c.properties.get("meltingspot_headline").map(String::as_str) == Some("gap"))
        .count();
    assert_eq!(gap, N, "every contact resynchronised");
    eprintln!(
        "resync of {N} members: {:.1} s from start until the last write was stored; {} batch reads, {} batch updates",
        took.as_secs_f64(),
        after.count_op("contacts.batch_read") - before.count_op("contacts.batch_read"),
        after.count_op("contacts.batch_update") - before.count_op("contacts.batch_update"),
    );
    sidecar.stop().await;
}
