//! One transaction far larger than the sidecar's memory limit (the Deployment
//! allows 512 MiB): 2,000,000 row changes, each with its old and new row
//! (members is REPLICA IDENTITY FULL), over a GB of WAL. It must go through,
//! reach HubSpot and move the slot past it, while the sidecar's peak resident
//! memory, read from the kernel (VmHWM), stays bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// One gauge's value from the sidecar's /metrics.
async fn gauge(http: &reqwest::Client, listen: &str, name: &str) -> f64 {
    let Ok(r) = http.get(format!("http://{listen}/metrics")).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_memory_limit_goes_through_in_bounded_memory() {
    let (url, slot) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let (portal, token) = emu.create_portal();

    // A connected Spot whose contacts must end up with the transaction's values…
    let watched = seed_spot(&db, "Watched").await;
    for i in 0..200 {
        emu.add_contact(portal, &format!("w{i}@example.com"), &[]);
    }
    add_members(&db, watched, "w", 200).await;
    // …and a million members of a Spot without an integration, whose rows the
    // stream reads all the same.
    let crowd = seed_spot(&db, "Crowd").await;
    add_members(&db, crowd, "c", 1_000_000).await;

    let child = Process(
        sidecar_command(&url, &slot, &emu.base_url(), &listen)
            .spawn()
            .expect("spawn hubspot-sidecar"),
    );
    wait_ready(&http, &listen).await;
    connect_token(&http, &listen, watched, &token).await;
    wait_headlines_converge(&db, &emu, portal, watched, Duration::from_secs(60)).await;
    let before = peak_rss(child.id());

    // 2,000,000 row changes in ONE transaction.
    let started = Instant::now();
    db.batch_execute(
        "BEGIN;
         UPDATE members SET headline = 'first ' || id;
         UPDATE members SET headline = 'second ' || id;
         COMMIT",
    )
    .await
    .unwrap();
    let (_, end) = slot_position(&db, &slot).await;
    let wal = {
        let r = db
            .query_one("SELECT pg_size_pretty(pg_current_wal_lsn() - '0/0')", &[])
            .await
            .unwrap();
        r.get::<_, String>(0)
    };

    let mut most_in_flight = 0.0f64;
    let mut most_lag = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(900);
    while slot_position(&db, &slot).await.0 < end {
        assert!(
            Instant::now() < deadline,
            "the slot did not pass the large transaction within 900 s"
        );
        most_in_flight = most_in_flight
            .max(gauge(&http, &listen, "hubspot_sidecar_transaction_rows_in_flight").await);
        most_lag =
            most_lag.max(gauge(&http, &listen, "hubspot_sidecar_replication_lag_seconds").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_headlines_converge(&db, &emu, portal, watched, Duration::from_secs(60)).await;
    assert_eq!(
        prop(&emu, portal, "w7@example.com", "meltingspot_headline").as_deref(),
        db.query_one(
            "SELECT headline FROM members WHERE email = 'w7@example.com'",
            &[]
        )
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
        .as_deref()
    );
    let peak = peak_rss(child.id());
    eprintln!(
        "2,000,000 row changes in one transaction ({wal} of WAL in all): through in {:.1} s; \
         peak RSS {} MB (before it: {} MB); at most {most_in_flight} rows in flight seen, lag up to {most_lag:.1} s",
        started.elapsed().as_secs_f64(),
        peak / 1_000_000,
        before / 1_000_000
    );
    assert!(
        peak < 150_000_000,
        "peak RSS {} MB while a 2,000,000-row transaction went through: memory must not grow with a transaction",
        peak / 1_000_000
    );
    assert!(
        most_in_flight > 100_000.0,
        "hubspot_sidecar_transaction_rows_in_flight showed the transaction in progress (saw {most_in_flight})"
    );
    assert!(
        most_lag > 0.0,
        "the lag gauge grew while the transaction was read"
    );
}
