//! Delivery for a fleet of Spots: cost follows work, not tenants. An idle
//! Spot runs no query, work another process queued is still found, and a
//! burst over many Spots goes out together, not one Spot after another.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hubspot_emulator::Faults;
use hubspot_sidecar::store;

const SECOND: Duration = Duration::from_secs(1);

/// `n` Spots, each with one member who has a contact on a portal of the
/// Spot's own, connected through the admin API and backfilled.
async fn connected_spots(
    sidecar: &Sidecar,
    db: &tokio_postgres::Client,
    emu: &hubspot_emulator::Emulator,
    n: usize,
) -> Vec<(i64, u64, i64, String)> {
    let mut spots = Vec::with_capacity(n);
    for i in 0..n {
        let spot = seed_spot(db, &format!("Fleet {i}")).await;
        let email = format!("member{i}@example.com");
        let member = seed_member(db, spot, &email, "accepted").await;
        let (portal, token) = emu.create_portal();
        emu.add_contact(portal, &email, &[]);
        sidecar.connect_with_token(spot, &token).await;
        spots.push((spot, portal, member, email));
    }
    wait_for("every member's contact written", 60 * SECOND, || async {
        spots.iter().all(|(_, portal, _, email)| {
            prop(emu, *portal, email, "meltingspot_member_id").is_some()
        })
    })
    .await;
    spots
}

/// Every portal of `spots` answers each call after `latency`.
fn answer_after(
    emu: &hubspot_emulator::Emulator,
    spots: &[(i64, u64, i64, String)],
    latency: Duration,
) {
    for (_, portal, _, _) in spots {
        emu.set_faults(
            Some(*portal),
            Faults {
                latency: Some(latency),
                ..Default::default()
            },
        );
    }
}

/// Whether every member of `spots` has `headline` on its contact.
fn all_hold(
    emu: &hubspot_emulator::Emulator,
    spots: &[(i64, u64, i64, String)],
    headline: &str,
) -> bool {
    spots.iter().all(|(_, portal, _, email)| {
        prop(emu, *portal, email, "meltingspot_headline").as_deref() == Some(headline)
    })
}

/// Batch updates each portal of `spots` has had so far.
fn batch_updates(emu: &hubspot_emulator::Emulator, spots: &[(i64, u64, i64, String)]) -> Vec<u64> {
    spots
        .iter()
        .map(|(_, p, _, _)| emu.request_stats(*p).count_op("contacts.batch_update"))
        .collect()
}

/// Reads of the two outboxes by any session so far (every delivery round
/// reads them; Postgres publishes a session's counts within about 10 s).
async fn outbox_reads(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT COALESCE(sum(COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0)), 0)::bigint
           FROM pg_stat_user_tables
          WHERE schemaname = 'hubspot_sync' AND relname IN ('property_outbox', 'activity_outbox')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spots_with_nothing_due_run_no_query() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spots = connected_spots(&sidecar, &db, &emu, 40).await;
    let calls_before: u64 = spots
        .iter()
        .map(|(_, p, _, _)| emu.request_stats(*p).total)
        .sum();
    // Postgres publishes a session's counts within 10 s of its last
    // statement: the window opens once the connects' rounds are counted.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = outbox_reads(&db).await;
    // Every Spot polling every 2 s (what delivery did before) would read the
    // outboxes 40 x 10 times in 20 s; the fleet look reads them twice every
    // 5 s, whatever the number of Spots.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let reads = outbox_reads(&db).await - before;
    assert!(
        reads < 40,
        "{reads} outbox reads in 20 s with 40 idle Spots: idle Spots must not poll"
    );
    let calls_after: u64 = spots
        .iter()
        .map(|(_, p, _, _)| emu.request_stats(*p).total)
        .sum();
    assert_eq!(calls_after, calls_before, "an idle fleet calls HubSpot");

    // Idle is not asleep: a change still goes out at once.
    let (_, portal, member, email) = &spots[7];
    db.execute(
        "UPDATE members SET headline = 'awake' WHERE id = $1",
        &[member],
    )
    .await
    .unwrap();
    wait_for("the change on its contact", 10 * SECOND, || async {
        prop(&emu, *portal, email, "meltingspot_headline").as_deref() == Some("awake")
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queued_by_another_process_is_found() {
    let (url, name) = fresh_db().await;
    let mut db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spots = connected_spots(&sidecar, &db, &emu, 3).await;
    let (spot, portal, member, email) = spots[1].clone();
    // Someone changed the contact in HubSpot; `reconcile --fix` run from a
    // shell (another process: nothing signals this one) queues the member.
    let contact = emu
        .contact_by_email(portal, &email)
        .expect("the member's contact");
    emu.add_contact(portal, &email, &[("meltingspot_member_id", "tampered")]);
    assert_eq!(
        prop(&emu, portal, &email, "meltingspot_member_id").as_deref(),
        Some("tampered")
    );
    let queued = store::queue_for_delivery(&mut db, spot, portal as i64, &[member], &[])
        .await
        .expect("queue as reconcile --fix does");
    assert_eq!(queued, 1);
    wait_for("the member's id written back", 20 * SECOND, || async {
        prop(&emu, portal, &email, "meltingspot_member_id") == Some(member.to_string())
    })
    .await;
    assert_eq!(
        emu.contact_by_email(portal, &email).map(|c| c.id),
        Some(contact.id)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_many_spots_goes_out_in_one_round_trip() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spots = connected_spots(&sidecar, &db, &emu, 40).await;
    // Every call now takes a second: Spot after Spot, 40 changes would
    // take 40 s; together, about one.
    answer_after(&emu, &spots, SECOND);
    let updates_before = batch_updates(&emu, &spots);
    let started = Instant::now();
    for (_, _, member, _) in &spots {
        db.execute(
            "UPDATE members SET headline = 'burst' WHERE id = $1",
            &[member],
        )
        .await
        .unwrap();
    }
    wait_for("every contact holds the burst", 60 * SECOND, || async {
        all_hold(&emu, &spots, "burst")
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "40 changes on 40 portals answering in 1 s each took {took:?}: they went out one after another"
    );
    for ((_, portal, _, _), before) in spots.iter().zip(updates_before) {
        assert_eq!(
            emu.request_stats(*portal).count_op("contacts.batch_update") - before,
            1,
            "one call per Spot"
        );
    }
    sidecar.stop().await;
}

/// Asks of delivery rounds and the statements that answered them, by kind.
fn shared_counts(sidecar: &Sidecar, kind: &str) -> (u64, u64) {
    let m = &sidecar.running.metrics;
    (
        m.delivery_shared_asks.with_label_values(&[kind]).get(),
        m.delivery_shared_statements
            .with_label_values(&[kind])
            .get(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_rounds_share_their_statements_and_one_rounds_bad_rows_fail_only_it() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spots = connected_spots(&sidecar, &db, &emu, 40).await;
    answer_after(&emu, &spots, SECOND / 2);
    // A database role's trigger refuses to store one member's contact: the
    // completion of that Spot's round fails, in a transaction it shares
    // with the other rounds ending at the same time.
    let poisoned = spots[17].2;
    db.batch_execute(&format!(
        "CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.member_id = {poisoned} THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_one BEFORE INSERT OR UPDATE ON hubspot_sync.contact_map
           FOR EACH ROW EXECUTE FUNCTION public.refuse_one();"
    ))
    .await
    .unwrap();
    let updates_before = batch_updates(&emu, &spots);
    // One transaction changes a member in each of the 40 Spots: one
    // hand-off, 40 rounds at once.
    let members: Vec<i64> = spots.iter().map(|s| s.2).collect();
    db.execute(
        "UPDATE members SET headline = 'shared' WHERE id = ANY($1)",
        &[&members],
    )
    .await
    .unwrap();
    wait_for("every contact holds the change", 60 * SECOND, || async {
        all_hold(&emu, &spots, "shared")
    })
    .await;
    // Every round but the poisoned one completed: its outbox row is gone.
    let others: Vec<i64> = spots
        .iter()
        .filter(|s| s.2 != poisoned)
        .map(|s| s.0)
        .collect();
    wait_for("the other rounds completed", 30 * SECOND, || async {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM hubspot_sync.property_outbox WHERE spot_id = ANY($1)",
                &[&others],
            )
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    let still: i64 = db
        .query_one(
            "SELECT count(*) FROM hubspot_sync.property_outbox WHERE member_id = $1",
            &[&poisoned],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "the refused completion keeps its row for a retry");
    // The others completed the first time: one write each, none sent again
    // because a shared completion failed.
    for ((_, portal, member, _), before) in spots.iter().zip(updates_before) {
        if *member != poisoned {
            assert_eq!(
                emu.request_stats(*portal).count_op("contacts.batch_update") - before,
                1,
                "one call for the Spot of member {member}"
            );
        }
    }
    // The trigger goes; the refused row is delivered on its retry.
    db.batch_execute("DROP TRIGGER refuse_one ON hubspot_sync.contact_map")
        .await
        .unwrap();
    wait_for(
        "the refused row delivered on its retry",
        60 * SECOND,
        || async {
            let left: i64 = db
                .query_one(
                    "SELECT count(*) FROM hubspot_sync.property_outbox WHERE member_id = $1",
                    &[&poisoned],
                )
                .await
                .unwrap()
                .get(0);
            left == 0
        },
    )
    .await;
    // A second burst: forty rounds, far fewer statements (without sharing,
    // one per ask).
    let kinds = ["take", "members", "contacts", "fence", "complete"];
    let before: Vec<(u64, u64)> = kinds.iter().map(|k| shared_counts(&sidecar, k)).collect();
    db.execute(
        "UPDATE members SET headline = 'again' WHERE id = ANY($1)",
        &[&members],
    )
    .await
    .unwrap();
    wait_for(
        "every round of the second burst completed",
        60 * SECOND,
        || async {
            let left: i64 = db
                .query_one("SELECT count(*) FROM hubspot_sync.property_outbox", &[])
                .await
                .unwrap()
                .get(0);
            left == 0 && all_hold(&emu, &spots, "again")
        },
    )
    .await;
    for (kind, (asks0, statements0)) in kinds.iter().zip(before) {
        let (asks, statements) = shared_counts(&sidecar, kind);
        let (asks, statements) = (asks - asks0, statements - statements0);
        assert!(asks >= 40, "{kind}: {asks} asks");
        assert!(
            statements * 2 <= asks,
            "{kind}: {statements} statements answered {asks} asks"
        );
    }
    sidecar.stop().await;
}
