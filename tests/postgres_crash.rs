//! G6 for the database side: kill -9 of Postgres while the sidecar runs, then
//! a restart: nothing is lost and every stage recovers on its own.

mod common;

use std::time::Duration;

use common::*;
use hubspot_sidecar::pg_cluster::PgCluster;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_postgres_loses_nothing_and_the_sidecar_recovers() {
    // Its own cluster: the crash must not hit other tests.
    let mut cluster = PgCluster::start().await.expect("start Postgres");
    let url = cluster.create_meltingspot_db("crashdb").await.unwrap();
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, "crash_slot", &emu.base_url())).await;
    let db = sql(&url).await;
    let spot = seed_spot(&db, "Phoenix").await;
    let (portal, token) = emu.create_portal();
    db.execute(
        "INSERT INTO members (spot_id, email, status) SELECT $1, 'p' || g || '@example.com', 'accepted' FROM generate_series(1, 50) g",
        &[&spot],
    )
    .await
    .unwrap();
    for g in 1..=50 {
        emu.add_contact(portal, &format!("p{g}@example.com"), &[]);
    }
    sidecar.connect_with_token(spot, &token).await;
    for round in 0..5 {
        db.execute(
            "UPDATE members SET headline = 'before ' || $1::text WHERE spot_id = $2",
            &[&round.to_string(), &spot],
        )
        .await
        .unwrap();
    }
    cluster.crash_and_restart().await.expect("restart Postgres");
    let db = sql(&url).await;
    for round in 0..5 {
        db.execute(
            "UPDATE members SET headline = 'after ' || $1::text WHERE spot_id = $2",
            &[&round.to_string(), &spot],
        )
        .await
        .unwrap();
    }
    wait_for(
        "every contact holds the last value",
        90 * SECOND,
        || async {
            (1..=50).all(|g| {
                prop(
                    &emu,
                    portal,
                    &format!("p{g}@example.com"),
                    "meltingspot_headline",
                )
                .as_deref()
                    == Some("after 4")
            })
        },
    )
    .await;
    // The admin API recovered too, and the backlog empties (rows are deleted
    // just after HubSpot accepted the write).
    wait_for(
        "the admin API answers with an empty backlog",
        30 * SECOND,
        || async {
            let (status, v) = sidecar
                .api(
                    reqwest::Method::GET,
                    &format!("/api/spots/{spot}/hubspot"),
                    None,
                )
                .await;
            status == 200 && v["backlog"]["properties"] == 0
        },
    )
    .await;
    wait_handed_off(&db, "crash_slot", 30 * SECOND).await;
    sidecar.stop().await;
}
