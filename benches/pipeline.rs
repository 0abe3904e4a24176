//! `cargo bench --bench pipeline [-- --transactions N --rows-per-tx R --members M --rate-limit L]`
//!
//! Measures the pipeline against its physical limits, side by side in one run:
//! - reading the stream: `pg_recvlogical` over the same WAL range (the server's
//!   decoding and the wire, nothing else) versus the sidecar reaching the same
//!   end LSN with everything handed off durably and acknowledged;
//! - HubSpot: the batch calls made versus the minimum (every call a full batch
//!   of 100), and calls per 1,000 changed contacts.

use std::time::{Duration, Instant};

use hubspot_emulator::{Emulator, EmulatorConfig};
use hubspot_sidecar::config::{Config, LogFormat};
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service;
use hubspot_sidecar::store::{self, secrets::Sealer, ChangeSource, MarkerKey};

struct Args {
    transactions: usize,
    rows_per_tx: usize,
    members: usize,
    rate_limit: u32,
}

fn args() -> Args {
    let mut a = Args {
        transactions: 20_000,
        rows_per_tx: 5,
        members: 10_000,
        rate_limit: 100,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).and_then(|x| x.parse::<usize>().ok());
        match (v[i].as_str(), next) {
            ("--transactions", Some(n)) => a.transactions = n,
            ("--rows-per-tx", Some(n)) => a.rows_per_tx = n.max(1),
            ("--members", Some(n)) => a.members = n.max(1),
            ("--rate-limit", Some(n)) => a.rate_limit = n.max(1) as u32,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// A Spot whose members (`{prefix}{n}@example.com`) all have a contact in `portal`.
async fn seed_spot(
    db: &tokio_postgres::Client,
    emu: &Emulator,
    portal: u64,
    name: &str,
    prefix: &str,
    members: usize,
) -> anyhow::Result<i64> {
    let spot: i64 = db
        .query_one(
            "INSERT INTO spots (name, slug) VALUES ($1, lower($1)) RETURNING id",
            &[&name],
        )
        .await?
        .get(0);
    db.execute(
        "INSERT INTO members (spot_id, email, status) SELECT $1, $3 || g || '@example.com', 'accepted'
           FROM generate_series(1, $2::int) g",
        &[&spot, &(members as i32), &prefix],
    )
    .await?;
    for g in 1..=members {
        emu.add_contact(portal, &format!("{prefix}{g}@example.com"), &[]);
    }
    Ok(spot)
}

fn token_credentials(key: &[u8; 32], token: &str) -> store::Credentials {
    store::Credentials {
        kind: store::AuthKind::Token,
        access_token_enc: Sealer::new(key).seal(token),
        refresh_token_enc: None,
        expires_at: None,
    }
}

async fn slot_confirmed(db: &tokio_postgres::Client, slot: &str) -> i64 {
    db.query_one(
        "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    hubspot_sidecar::init_logging(LogFormat::Text, "warn");
    println!(
        "pipeline benchmark: {} transactions x {} row updates over {} members (HubSpot limit {}/10 s)",
        a.transactions, a.rows_per_tx, a.members, a.rate_limit
    );
    let cluster = PgCluster::start().await?;
    let url = cluster.create_meltingspot_db("bench").await?;
    let pool = store::Db::new(&hubspot_sidecar::config::DatabaseConfig::from_url(&url)?)?;
    let mut db = pool.client().await?;
    store::migrate(&mut db).await?;
    let emu = Emulator::start(EmulatorConfig {
        rate_limit_per_10s: a.rate_limit.max(110),
        ..Default::default()
    })
    .await?;
    let (portal, token) = emu.create_portal();

    let key = [9u8; 32];
    let spot = seed_spot(&db, &emu, portal, "Bench", "b", a.members).await?;
    let markers = MarkerKey::new(&key);
    store::activate(
        &mut db,
        &markers,
        spot,
        portal as i64,
        &token_credentials(&key, &token),
        ChangeSource::AdminApi,
    )
    .await?;
    for slot in ["bench_sidecar", "bench_recvlogical"] {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    }

    // The load, written before either reader starts.
    let ids: Vec<i64> = db
        .query(
            "SELECT id FROM members WHERE spot_id = $1 ORDER BY id",
            &[&spot],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let start_lsn: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await?
        .get(0);
    let t = Instant::now();
    let stmt = db
        .prepare("UPDATE members SET headline = $1 WHERE id = $2")
        .await?;
    let mut n = 0usize;
    for tx_no in 0..a.transactions {
        let tx = db.transaction().await?;
        for _ in 0..a.rows_per_tx {
            let id = ids[(n * 7919) % ids.len()];
            tx.execute(&stmt, &[&format!("h{tx_no}-{n}"), &id]).await?;
            n += 1;
        }
        tx.commit().await?;
    }
    let end_lsn: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await?
        .get(0);
    let wal_mb = (end_lsn - start_lsn) as f64 / 1e6;
    println!(
        "load: {} transactions, {} row changes, {wal_mb:.1} MB of WAL written in {:.1} s",
        a.transactions,
        n,
        t.elapsed().as_secs_f64()
    );
    let changed: i64 = db
        .query_one(
            "SELECT count(*) FROM members WHERE spot_id = $1 AND headline IS NOT NULL",
            &[&spot],
        )
        .await?
        .get(0);

    // 1. pg_recvlogical over the same range.
    let end_text = format!("{:X}/{:X}", end_lsn >> 32, end_lsn & 0xFFFF_FFFF);
    let t = Instant::now();
    let status = std::process::Command::new(cluster.bin_dir().join("pg_recvlogical"))
        .args([
            "-d",
            &url,
            "--slot",
            "bench_recvlogical",
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=hubspot_sidecar",
        ])
        .args(["-E", &end_text, "-f", "/dev/null"])
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let recv_secs = t.elapsed().as_secs_f64();

    // 2. The sidecar, from the same starting point to the same end, durably handed off.
    let mut cfg = Config::local(&url, "bench_sidecar", &emu.base_url(), "bench", key)?;
    cfg.hubspot.rate_limit = a.rate_limit;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let t = Instant::now();
    let sidecar = tokio::spawn(service::run(cfg, stop_rx, Some(started_tx)));
    let running = started_rx.await?;
    let startup_secs = t.elapsed().as_secs_f64();
    // From here the sidecar reads the slot; "done" is every transaction handed
    // off durably and its LSN acknowledged (sent to the server within 1 s).
    let t = Instant::now();
    while running.metrics.acked_lsn.get() < end_lsn {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let side_secs = t.elapsed().as_secs_f64();
    while slot_confirmed(&db, "bench_sidecar").await < end_lsn {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let confirmed_secs = t.elapsed().as_secs_f64();

    // 3. Delivery to HubSpot.
    let deadline = Instant::now() + Duration::from_secs(3600);
    while store::backlog_size(&db).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliver_secs = t.elapsed().as_secs_f64();
    let stats = emu.request_stats(portal);
    let calls = |op: &str| stats.count_op(op);
    let (reads, updates) = (calls("contacts.batch_read"), calls("contacts.batch_update"));
    let minimum = (changed as u64).div_ceil(100);

    // 4. A backfill: a second Spot, all of whose members have a contact, connects now.
    let (portal2, token2) = emu.create_portal();
    let spot2 = seed_spot(&db, &emu, portal2, "Backfill", "f", a.members).await?;
    let creds2 = token_credentials(&key, &token2);
    let t = Instant::now();
    store::activate(
        &mut db,
        &markers,
        spot2,
        portal2 as i64,
        &creds2,
        ChangeSource::AdminApi,
    )
    .await?;
    loop {
        let row = db
            .query_one(
                "SELECT backfill_done_at IS NOT NULL,
                        (SELECT count(*) FROM hubspot_sync.property_outbox WHERE spot_id = $1)
                   FROM hubspot_sync.integrations WHERE spot_id = $1",
                &[&spot2],
            )
            .await?;
        if row.get::<_, bool>(0) && row.get::<_, i64>(1) == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(3600) {
            anyhow::bail!("the backfill did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backfill_secs = t.elapsed().as_secs_f64();
    let stats2 = emu.request_stats(portal2);
    let (reads2, updates2) = (
        stats2.count_op("contacts.batch_read"),
        stats2.count_op("contacts.batch_update"),
    );
    let minimum2 = (a.members as u64).div_ceil(100);
    let _ = stop_tx.send(true);
    let _ = sidecar.await;

    let tps = |secs: f64| a.transactions as f64 / secs;
    println!(
        "\nreading the stream ({} transactions, {n} row changes, {wal_mb:.1} MB WAL)",
        a.transactions
    );
    println!(
        "  pg_recvlogical, raw bytes to /dev/null   {recv_secs:>7.2} s  {:>9.0} tx/s  {:>9.0} changes/s",
        tps(recv_secs),
        n as f64 / recv_secs
    );
    println!(
        "  hubspot-sidecar, decoded + handed off    {side_secs:>7.2} s  {:>9.0} tx/s  {:>9.0} changes/s",
        tps(side_secs),
        n as f64 / side_secs
    );
    println!(
        "  ratio sidecar / pg_recvlogical time      {:>7.2}",
        side_secs / recv_secs
    );
    println!(
        "  (sidecar start-up before reading: {startup_secs:.2} s; the slot's confirmed_flush_lsn reached the end {confirmed_secs:.2} s after reading began)"
    );
    println!(
        "  hand-offs: {} transactions in {} database transactions",
        running.metrics.transactions.get(),
        running.metrics.handoffs.get()
    );
    println!(
        "\nHubSpot ({changed} changed contacts, limit {}/10 s)",
        a.rate_limit
    );
    println!(
        "  batch updates {updates:>6}   minimum {minimum:>6}   ratio {:.2}",
        updates as f64 / minimum.max(1) as f64
    );
    println!(
        "  batch reads   {reads:>6}   minimum {minimum:>6}   ratio {:.2}",
        reads as f64 / minimum.max(1) as f64
    );
    println!(
        "  calls per 1,000 changed contacts: {:.1} (minimum {:.1}); all delivered {deliver_secs:.1} s after start; peak {} in 10 s; 429s {}",
        (reads + updates) as f64 * 1000.0 / changed.max(1) as f64,
        2.0 * minimum as f64 * 1000.0 / changed.max(1) as f64,
        stats.peak_in_10s,
        stats.rate_limited
    );
    println!(
        "\nBackfill ({} members, every one with a contact, limit {}/10 s)",
        a.members, a.rate_limit
    );
    println!(
        "  {backfill_secs:.1} s from activation to the last write: {:.0} members/s; batch reads {reads2}, batch updates {updates2} (minimum {minimum2} each)",
        a.members as f64 / backfill_secs
    );
    emu.shutdown().await;
    drop(cluster);
    Ok(())
}
