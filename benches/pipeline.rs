//! `cargo bench --bench pipeline [-- --shape catchup|large|stream|fleet|activation|all] [--quick] [options]`
//!
//! Measures the pipeline against its limits, side by side in one run, each
//! shape as a ratio against its limit:
//! - **catchup**: a backlog of committed transactions, read by
//!   `pg_recvlogical` (the server's decoding and the wire, nothing else) and
//!   by the sidecar over the same WAL range, to the same end, with everything
//!   handed off durably and acknowledged; then the HubSpot batch calls made
//!   against the minimum (sum over portals of ceil(changed contacts / 100)
//!   per operation). Runs 200,000 single-row transactions over 50 Spots and
//!   20,000 five-row transactions over one Spot.
//! - **large**: one UPDATE of every member (1,000,000 rows, REPLICA
//!   IDENTITY FULL) in one transaction, read by `pg_recvlogical` and by the
//!   sidecar as a real process, whose peak RSS is read from VmHWM.
//! - **stream**: changes committed at a steady rate to 20 Spots whose
//!   portals answer after 150 ms; commit-to-HubSpot latency percentiles and
//!   calls per change.
//!
//! - **fleet**: 2,000 and 10,000 connected Spots on one sidecar process:
//!   transactions/s on the primary, CPU and HubSpot calls while idle, RSS,
//!   a burst of one change in each of 1,000 Spots (p99 commit-to-HubSpot,
//!   calls per Spot), a restart with every OAuth token due, and a takeover
//!   by a standby when the leader is killed.
//!
//! - **activation**: one Spot of 100,000 members, half with a contact, on a
//!   portal answering after 150 ms at 100 calls per 10 s: its activation,
//!   a resync and a reconcile, each timed against the budget's bound and
//!   its calls against the minimum.
//!
//! `--quick` runs small versions of all five (CI).
//! Options: `--transactions N --rows-per-tx R --spots S --members M`
//! (catchup, M per Spot), `--rows N` (large), `--rate R --seconds T
//! --latency-ms D` (stream), `--spots S --seconds T` (fleet: S Spots, T s
//! idle), `--rate-limit L` (requests per 10 s).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hubspot_emulator::{Emulator, EmulatorConfig, Faults};
use hubspot_sidecar::config::{Config, LogFormat};
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service;
use hubspot_sidecar::store::secrets::{KeyRing, Sealer, TokenSlot};

use hubspot_sidecar::store::{self, ChangeSource, MarkerKey};

const KEY: [u8; 32] = [9u8; 32];

/// Seals tokens as the sidecar under test (SIDECAR_SECRET_KEY = `KEY`) does.
fn sealer() -> Sealer {
    Sealer::new(std::sync::Arc::new(KeyRing::new(&KEY, &[])))
}

#[derive(Clone)]
struct Args {
    shape: String,
    quick: bool,
    transactions: Option<usize>,
    rows_per_tx: Option<usize>,
    spots: Option<usize>,
    members: Option<usize>,
    rows: Option<usize>,
    rate: Option<usize>,
    seconds: Option<usize>,
    latency_ms: u64,
    rate_limit: u32,
}

fn args() -> Args {
    let mut a = Args {
        shape: "all".into(),
        quick: false,
        transactions: None,
        rows_per_tx: None,
        spots: None,
        members: None,
        rows: None,
        rate: None,
        seconds: None,
        latency_ms: 150,
        rate_limit: 100,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).cloned();
        let n = next.as_deref().and_then(|x| x.parse::<usize>().ok());
        match (v[i].as_str(), n) {
            ("--quick", _) => {
                a.quick = true;
                i += 1;
                continue;
            }
            ("--shape", _) if next.is_some() => a.shape = next.unwrap_or_default(),
            ("--transactions", Some(n)) => a.transactions = Some(n.max(1)),
            ("--rows-per-tx", Some(n)) => a.rows_per_tx = Some(n.max(1)),
            ("--spots", Some(n)) => a.spots = Some(n.max(1)),
            ("--members", Some(n)) => a.members = Some(n.max(1)),
            ("--rows", Some(n)) => a.rows = Some(n.max(1)),
            ("--rate", Some(n)) => a.rate = Some(n.max(1)),
            ("--seconds", Some(n)) => a.seconds = Some(n.max(1)),
            ("--latency-ms", Some(n)) => a.latency_ms = n as u64,
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

/// What every shape needs: a database with the schema, and the emulator.
struct Bench {
    cluster: PgCluster,
    emu: Emulator,
    dbs: usize,
}

struct Db {
    url: String,
    client: tokio_postgres::Client,
    slot: String,
}

impl Bench {
    async fn database(&mut self) -> anyhow::Result<Db> {
        self.dbs += 1;
        let name = format!("bench{}", self.dbs);
        let url = self.cluster.create_meltingspot_db(&name).await?;
        let pool = store::Db::new(&hubspot_sidecar::config::DatabaseConfig::from_url(&url)?)?;
        let mut client = pool.client().await?;
        store::migrate(&mut client).await?;
        drop(client);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(Db {
            url,
            client,
            slot: format!("{name}_sidecar"),
        })
    }
}

/// A Spot of `members` members (`{prefix}{n}@example.com`), connected to a
/// new portal; the first `contacts` of them have a contact.
async fn seed_spot(
    db: &mut tokio_postgres::Client,
    emu: &Emulator,
    name: &str,
    members: usize,
    contacts: usize,
) -> anyhow::Result<(i64, u64)> {
    let (portal, token) = emu.create_portal();
    let spot: i64 = db
        .query_one(
            "INSERT INTO spots (name, slug) VALUES ($1, lower($1)) RETURNING id",
            &[&name],
        )
        .await?
        .get(0);
    let prefix = format!("{}-", name.to_lowercase());
    db.execute(
        "INSERT INTO members (spot_id, email, status) SELECT $1, $3 || g || '@example.com', 'accepted'
           FROM generate_series(1, $2::int) g",
        &[&spot, &(members as i32), &prefix],
    )
    .await?;
    for g in 1..=contacts.min(members) {
        emu.add_contact(portal, &format!("{prefix}{g}@example.com"), &[]);
    }
    let credentials = store::Credentials {
        kind: store::AuthKind::Token,
        access_token_enc: sealer().seal(&token, TokenSlot::Access(spot)),
        refresh_token_enc: None,
        expires_at: None,
    };
    store::activate(
        db,
        &MarkerKey::new(&KEY),
        spot,
        portal as i64,
        &credentials,
        ChangeSource::AdminApi,
    )
    .await?;
    Ok((spot, portal))
}

async fn lsn_now(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await?
        .get(0))
}

/// Logical replication slots at the current position, one per reader.
async fn create_slots(db: &Db, slots: &[&str]) -> anyhow::Result<()> {
    for slot in slots {
        db.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    Ok(())
}

/// `pg_recvlogical` from the slot's start to `end_lsn`: the time it took.
fn recvlogical(cluster: &PgCluster, url: &str, slot: &str, end_lsn: i64) -> anyhow::Result<f64> {
    let end_text = format!("{:X}/{:X}", end_lsn >> 32, end_lsn & 0xFFFF_FFFF);
    let t = Instant::now();
    let status = std::process::Command::new(cluster.bin_dir().join("pg_recvlogical"))
        .args(["-d", url, "--slot", slot, "--start", "--no-loop"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=hubspot_sidecar",
        ])
        .args(["-E", &end_text, "-f", "/dev/null"])
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    Ok(t.elapsed().as_secs_f64())
}

async fn start_sidecar(
    db: &Db,
    emu: &Emulator,
    rate_limit: u32,
) -> anyhow::Result<(
    service::Running,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let mut cfg = Config::local(&db.url, &db.slot, &emu.base_url(), common::ADMIN_TOKEN, KEY)?;
    cfg.hubspot.rate_limit = rate_limit;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(service::run(cfg, stop_rx, Some(started_tx)));
    let running = started_rx.await?;
    Ok((running, stop_tx, task))
}

async fn wait_backlog_empty(db: &tokio_postgres::Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while store::backlog_size(db).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not empty within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_backfills(db: &tokio_postgres::Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM hubspot_sync.integrations WHERE backfill_done_at IS NULL",
                &[],
            )
            .await?
            .get(0);
        if pending == 0 {
            return wait_backlog_empty(db, within).await;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backfills did not finish within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Catchup {
    transactions: usize,
    rows_per_tx: usize,
    spots: usize,
    members: usize,
}

/// (a) A backlog of committed transactions: the stream against
/// `pg_recvlogical`, and HubSpot calls against the minimum.
async fn catchup(b: &mut Bench, a: &Args, shape: Catchup) -> anyhow::Result<()> {
    let Catchup {
        transactions,
        rows_per_tx,
        spots,
        members,
    } = shape;
    println!(
        "\n== catchup: {transactions} transactions x {rows_per_tx} row updates over {spots} Spots x {members} members (HubSpot limit {}/10 s per portal)",
        a.rate_limit
    );
    let mut db = b.database().await?;
    let mut portals = Vec::new();
    for s in 0..spots {
        portals.push(seed_spot(&mut db.client, &b.emu, &format!("C{s}"), members, members).await?);
    }
    // The backfills of the new connections first, so that the calls counted
    // below are the backlog's alone.
    {
        let (_running, stop, task) = start_sidecar(&db, &b.emu, a.rate_limit).await?;
        wait_backfills(&db.client, Duration::from_secs(600)).await?;
        let _ = stop.send(true);
        let _ = task.await;
    }
    // pg_recvlogical reads the range once untimed (warm_slot), so that
    // neither its timed read nor the sidecar after it meets a cold cache.
    let (warm_slot, recv_slot) = (
        format!("{}_warmup", db.slot),
        format!("{}_recvlogical", db.slot),
    );
    create_slots(&db, &[&warm_slot, &recv_slot]).await?;
    let ids: Vec<i64> = db
        .client
        .query("SELECT id FROM members ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    // The load, written before either reader starts, from 4 connections.
    let start_lsn = lsn_now(&db.client).await?;
    let t = Instant::now();
    let writers = 4;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = db.url.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let (mut c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let stmt = c
                .prepare("UPDATE members SET headline = $1 WHERE id = $2")
                .await?;
            let mut tx_no = w;
            while tx_no < transactions {
                let tx = c.transaction().await?;
                for r in 0..rows_per_tx {
                    let n = tx_no * rows_per_tx + r;
                    let id = ids[(n * 7919) % ids.len()];
                    tx.execute(&stmt, &[&format!("h{tx_no}-{r}"), &id]).await?;
                }
                tx.commit().await?;
                tx_no += writers;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let end_lsn = lsn_now(&db.client).await?;
    let wal_mb = (end_lsn - start_lsn) as f64 / 1e6;
    let changes = transactions * rows_per_tx;
    println!(
        "load: {changes} row changes, {wal_mb:.1} MB of WAL, written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let changed: HashMap<i64, i64> = db
        .client
        .query(
            "SELECT spot_id, count(*) FROM members WHERE headline IS NOT NULL GROUP BY spot_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    recvlogical(&b.cluster, &db.url, &warm_slot, end_lsn)?;
    let recv_secs = recvlogical(&b.cluster, &db.url, &recv_slot, end_lsn)?;

    let before: HashMap<u64, (u64, u64)> = portals
        .iter()
        .map(|(_, p)| {
            let s = b.emu.request_stats(*p);
            (
                *p,
                (
                    s.count_op("contacts.batch_read"),
                    s.count_op("contacts.batch_update"),
                ),
            )
        })
        .collect();
    let t = Instant::now();
    let (running, stop, task) = start_sidecar(&db, &b.emu, a.rate_limit).await?;
    let startup = t.elapsed().as_secs_f64();
    let t = Instant::now();
    while running.metrics.acked_lsn.get() < end_lsn {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let side_secs = t.elapsed().as_secs_f64();
    wait_backlog_empty(&db.client, Duration::from_secs(3600)).await?;
    let deliver_secs = t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = task.await;

    let (mut reads, mut updates, mut minimum, mut peak, mut throttled) = (0, 0, 0, 0, 0);
    for (spot, portal) in &portals {
        let s = b.emu.request_stats(*portal);
        let (r0, u0) = before[portal];
        reads += s.count_op("contacts.batch_read") - r0;
        updates += s.count_op("contacts.batch_update") - u0;
        minimum += (changed.get(spot).copied().unwrap_or(0) as u64).div_ceil(100);
        peak = peak.max(s.peak_in_10s);
        throttled += s.rate_limited;
    }
    let contacts: i64 = changed.values().sum();
    println!(
        "  pg_recvlogical, raw bytes to /dev/null   {recv_secs:>7.2} s  {:>9.0} changes/s",
        changes as f64 / recv_secs
    );
    println!(
        "  hubspot-sidecar, decoded + handed off    {side_secs:>7.2} s  {:>9.0} changes/s",
        changes as f64 / side_secs
    );
    println!(
        "  speed ratio sidecar / pg_recvlogical     {:>7.2}x   (start-up before reading {startup:.2} s; {} hand-offs taking {:.2} s in all, {:.2} s of it waiting for visibility)",
        recv_secs / side_secs,
        running.metrics.handoffs.get(),
        running.metrics.handoff_seconds.get_sample_sum(),
        running.metrics.visibility_wait_seconds.get()
    );
    println!(
        "  HubSpot, {contacts} changed contacts on {} portals: batch updates {updates} / minimum {minimum} = {:.2}x, batch reads {reads} / minimum {minimum} = {:.2}x; peak {peak} in 10 s, {throttled} x 429; all delivered {deliver_secs:.1} s after reading began",
        portals.len(),
        updates as f64 / minimum.max(1) as f64,
        reads as f64 / minimum.max(1) as f64,
    );
    Ok(())
}

/// A value of the sidecar's /metrics.
async fn metric(http: &reqwest::Client, listen: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// (b) One UPDATE of every member in one transaction: time against
/// `pg_recvlogical`, and the sidecar process's peak RSS.
async fn large(b: &mut Bench, a: &Args, rows: usize) -> anyhow::Result<()> {
    println!("\n== large: one UPDATE of {rows} members in one transaction (REPLICA IDENTITY FULL: old and new row)");
    let mut db = b.database().await?;
    seed_spot(&mut db.client, &b.emu, "Large", rows, 0).await?;
    // The sidecar reads while the WAL is hot, pg_recvlogical after it.
    let recv_slot = format!("{}_recvlogical", db.slot);
    create_slots(&db, &[&recv_slot, &db.slot]).await?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let http = reqwest::Client::new();
    // The release binary, as deployed.
    let child = common::Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_hubspot-sidecar"))
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("SIDECAR_SLOT", &db.slot)
            .env("SIDECAR_LISTEN", &listen)
            .env("SIDECAR_PUBLIC_URL", format!("http://{listen}"))
            .env("SIDECAR_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("SIDECAR_SECRET_KEY", hex::encode(KEY))
            .env("HUBSPOT_API_BASE", b.emu.base_url())
            .env("HUBSPOT_RATE_LIMIT", a.rate_limit.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()?,
    );
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&http, &listen, "hubspot_sidecar_acknowledged_lsn")
        .await
        .is_none()
    {
        anyhow::ensure!(Instant::now() < deadline, "the sidecar did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = common::peak_rss(pid);
    let start_lsn = lsn_now(&db.client).await?;
    let t = Instant::now();
    db.client
        .execute("UPDATE members SET headline = 'large ' || id", &[])
        .await?;
    let end_lsn = lsn_now(&db.client).await?;
    println!(
        "load: {rows} row changes, {:.0} MB of WAL, written in {:.1} s",
        (end_lsn - start_lsn) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut most_in_flight = 0.0f64;
    loop {
        let acked = metric(&http, &listen, "hubspot_sidecar_acknowledged_lsn")
            .await
            .unwrap_or(0.0);
        most_in_flight = most_in_flight.max(
            metric(&http, &listen, "hubspot_sidecar_transaction_rows_in_flight")
                .await
                .unwrap_or(0.0),
        );
        if acked >= end_lsn as f64 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(3600),
            "the sidecar did not pass the transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let side_secs = t.elapsed().as_secs_f64();
    let peak = common::peak_rss(pid);
    drop(child);
    let recv_secs = recvlogical(&b.cluster, &db.url, &recv_slot, end_lsn)?;
    println!(
        "  pg_recvlogical, raw bytes to /dev/null   {recv_secs:>7.2} s  {:>9.0} changes/s",
        rows as f64 / recv_secs
    );
    println!(
        "  hubspot-sidecar process, handed off      {side_secs:>7.2} s  {:>9.0} changes/s",
        rows as f64 / side_secs
    );
    println!(
        "  speed ratio sidecar / pg_recvlogical     {:>7.2}x",
        recv_secs / side_secs
    );
    println!(
        "  sidecar peak RSS (VmHWM) {:.0} MB (idle before the transaction: {:.0} MB; goal < 150 MB); up to {most_in_flight} rows in flight seen",
        peak as f64 / 1e6,
        idle_rss as f64 / 1e6
    );
    Ok(())
}

/// (c) A steady stream of single-row changes to many Spots whose portals
/// answer slowly: commit-to-HubSpot latency and calls per change.
async fn stream(b: &mut Bench, a: &Args, rate: usize, seconds: usize) -> anyhow::Result<()> {
    let spots = a.spots.unwrap_or(20);
    let per_spot = (rate * seconds).div_ceil(spots);
    println!(
        "\n== stream: {rate} changes/s for {seconds} s over {spots} Spots, every HubSpot call answered after {} ms (limit {}/10 s per portal)",
        a.latency_ms, a.rate_limit
    );
    let mut db = b.database().await?;
    let mut portals = Vec::new();
    for s in 0..spots {
        portals
            .push(seed_spot(&mut db.client, &b.emu, &format!("S{s}"), per_spot, per_spot).await?);
    }
    let (running, stop, task) = start_sidecar(&db, &b.emu, a.rate_limit).await?;
    wait_backfills(&db.client, Duration::from_secs(600)).await?;
    for (_, p) in &portals {
        b.emu.set_faults(
            Some(*p),
            Faults {
                latency: Some(Duration::from_millis(a.latency_ms)),
                ..Default::default()
            },
        );
    }
    let calls_before: u64 = portals
        .iter()
        .map(|(_, p)| b.emu.request_stats(*p).total)
        .sum();
    // Change k goes to Spot k % spots, to a member not changed before, so the
    // contact's last update is that change's.
    let mut emails: Vec<Vec<(i64, String)>> = Vec::new();
    for (spot, _) in &portals {
        emails.push(
            db.client
                .query(
                    "SELECT id, lower(email) FROM members WHERE spot_id = $1 ORDER BY id",
                    &[spot],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        );
    }
    let stmt = db
        .client
        .prepare("UPDATE members SET headline = $1 WHERE id = $2")
        .await?;
    let total = rate * seconds;
    let mut committed = Vec::with_capacity(total);
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(t0 + every * k as u32).await;
        let s = k % spots;
        let (id, email) = &emails[s][k / spots];
        db.client.execute(&stmt, &[&format!("s{k}"), id]).await?;
        committed.push((portals[s].1, email.clone(), chrono::Utc::now()));
    }
    let behind = t0.elapsed().as_secs_f64() - seconds as f64;
    wait_backlog_empty(&db.client, Duration::from_secs(600)).await?;
    let handoffs = running.metrics.handoffs.get();
    let _ = stop.send(true);
    let _ = task.await;
    drop(running);
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(portal, email, at)| {
            let c = b.emu.contact_by_email(*portal, email)?;
            Some((c.updated_at - *at).num_microseconds()? as f64 / 1e6)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let calls: u64 = portals
        .iter()
        .map(|(_, p)| b.emu.request_stats(*p).total)
        .sum::<u64>()
        - calls_before;
    println!(
        "  commit-to-HubSpot latency over {} changes: p50 {:.3} s  p90 {:.3} s  p99 {:.3} s  max {:.3} s   (goal p99 < 0.4 s)",
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  HubSpot calls {calls} for {total} changes: {:.3} calls per change; {handoffs} hand-offs (the load generator ended {behind:.2} s behind its schedule)",
        calls as f64 / total as f64
    );
    // One round at a time per portal: a change waits for the batch being
    // gathered, then for its call. With b changes per call at λ changes/s
    // per portal, p99 ≈ 0.99·b/λ + latency, so a p99 goal bounds b.
    let per_portal = rate as f64 / spots as f64;
    let call = a.latency_ms as f64 / 1e3;
    if 0.4 > call {
        println!(
            "  fewest calls per change any one-round-at-a-time batching allows with p99 < 0.4 s here: {:.3}",
            0.99 / ((0.4 - call) * per_portal)
        );
    }
    Ok(())
}

/// Transactions committed in the database so far (every backend's, ours
/// included: two per sample). Postgres flushes a backend's counts at most
/// once a second and an idle one's within 10 s, so a short window is read
/// up to that late at both ends.
async fn commits(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// CPU time the process has used (user + system), from /proc.
/// Makes every OAuth token of the fleet due for a refresh.
async fn expire_oauth_tokens(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    db.execute(
        "UPDATE hubspot_sync.integrations SET token_expires_at = now() - interval '1 minute'
          WHERE auth_kind = 'oauth'",
        &[],
    )
    .await?;
    Ok(())
}

/// The most transactions committed in any one second of the next
/// `seconds` (less the one each look is).
async fn peak_transactions(db: &tokio_postgres::Client, seconds: u32) -> anyhow::Result<i64> {
    let mut peak = 0i64;
    let mut last = commits(db).await?;
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = commits(db).await?;
        peak = peak.max(now - last - 1);
        last = now;
    }
    Ok(peak)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / per_second
}

/// CPU time every `postgres` process on the machine has used.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

/// The process's resident memory now (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    common::memory_field(pid, "VmRSS:").unwrap_or(0)
}

/// The sum of a metric's series (every label) on the sidecar's /metrics.
async fn metric_sum(http: &reqwest::Client, listen: &str, name: &str) -> f64 {
    let Ok(resp) = http.get(format!("http://{listen}/metrics")).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `(kind, asks, statements)` of the statements delivery rounds share, so
/// far (`hubspot_sidecar_delivery_shared_*_total`).
async fn shared_statements(http: &reqwest::Client, listen: &str) -> Vec<(&'static str, f64, f64)> {
    let mut counts = Vec::new();
    for kind in hubspot_sidecar::metrics::SHARED_KINDS {
        let label = format!("{{kind=\"{kind}\"}}");
        let asks = metric_sum(
            http,
            listen,
            &format!("hubspot_sidecar_delivery_shared_asks_total{label}"),
        )
        .await;
        let statements = metric_sum(
            http,
            listen,
            &format!("hubspot_sidecar_delivery_shared_statements_total{label}"),
        )
        .await;
        counts.push((kind, asks, statements));
    }
    counts
}

/// Starts the release binary on the fleet's database; returns it once
/// /readyz answers 200, with the time that took.
async fn start_fleet_sidecar(
    db: &Db,
    emu: &Emulator,
    listen: &str,
    rate_limit: u32,
) -> anyhow::Result<(common::Process, f64)> {
    spawn_fleet_sidecar(db, emu, listen, rate_limit, "/readyz").await
}

/// Starts the release binary on the fleet's database; returns it once
/// `until` answers 200 (`/healthz`: a standby that waits to lead).
async fn spawn_fleet_sidecar(
    db: &Db,
    emu: &Emulator,
    listen: &str,
    rate_limit: u32,
    until: &str,
) -> anyhow::Result<(common::Process, f64)> {
    let t = Instant::now();
    let child = common::Process(
        common::oauth_sidecar_command(&db.url, &db.slot, &emu.base_url(), listen)
            .env("SIDECAR_SECRET_KEY", hex::encode(KEY))
            .env("HUBSPOT_RATE_LIMIT", rate_limit.to_string())
            .spawn()?,
    );
    let took = wait_ready(listen, until, t).await?;
    Ok((child, took))
}

/// Seconds from `since` until `path` answers 200 (at most 120 s).
async fn wait_ready(listen: &str, path: &str, since: Instant) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    loop {
        let ready = http
            .get(format!("http://{listen}{path}"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return Ok(since.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(120),
            "{path} did not answer 200 within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Commits one change to each member, back to back, and waits until every
/// one reached its contact: the commit-to-HubSpot latencies, sorted.
async fn changes_reach_hubspot(
    db: &tokio_postgres::Client,
    emu: &Emulator,
    targets: &[(u64, i64, String)],
    tag: &str,
) -> anyhow::Result<Vec<f64>> {
    let stmt = db
        .prepare("UPDATE members SET headline = $1 WHERE id = $2")
        .await?;
    let mut committed = Vec::with_capacity(targets.len());
    for (portal, member, email) in targets {
        db.execute(&stmt, &[&tag, member]).await?;
        committed.push((*portal, email.clone(), chrono::Utc::now()));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut latencies = Vec::with_capacity(committed.len());
    for (portal, email, at) in &committed {
        loop {
            let contact = emu.contact_by_email(*portal, email);
            let arrived = contact.filter(|c| {
                c.properties.get("meltingspot_headline").map(String::as_str) == Some(tag)
            });
            if let Some(c) = arrived {
                latencies.push((c.updated_at - *at).num_microseconds().unwrap_or(0) as f64 / 1e6);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "a change did not reach HubSpot within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// (d) Many small Spots on one sidecar process, each on a portal of its
/// own, half through OAuth: what an idle fleet costs the primary and the
/// process, a burst of one change in each of `burst` Spots whose portals
/// answer after `latency_ms`, and a restart with every OAuth token due.
async fn fleet(
    b: &mut Bench,
    a: &Args,
    spots: usize,
    burst: usize,
    idle_secs: u64,
) -> anyhow::Result<()> {
    println!(
        "\n== fleet: {spots} connected Spots of 5 members, each on its own portal, every other one through OAuth; idle for {idle_secs} s, then one change in each of {burst} Spots (calls answered after {} ms), then a restart with every OAuth token due",
        a.latency_ms
    );
    let mut db = b.database().await?;
    let t = Instant::now();
    let ids: Vec<i64> = db
        .client
        .query(
            "INSERT INTO spots (name, slug) SELECT 'Fleet ' || g, 'fleet-' || g
               FROM generate_series(1, $1::int) g RETURNING id",
            &[&(spots as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.client
        .execute(
            "INSERT INTO members (spot_id, email, status)
             SELECT s, 'm' || g || '-' || s || '@example.com', 'accepted'
               FROM unnest($1::bigint[]) s, generate_series(1, 5) g",
            &[&ids],
        )
        .await?;
    let sealer = sealer();
    let markers = MarkerKey::new(&KEY);
    let mut portals = Vec::with_capacity(spots);
    for (i, &spot) in ids.iter().enumerate() {
        let (portal, key) = b.emu.create_portal();
        let credentials = if i % 2 == 1 {
            let (access, refresh) = b.emu.grant_oauth_tokens(portal);
            store::Credentials {
                kind: store::AuthKind::OAuth,
                access_token_enc: sealer.seal(&access, TokenSlot::Access(spot)),
                refresh_token_enc: Some(sealer.seal(&refresh, TokenSlot::Refresh(spot))),
                expires_at: Some(chrono::Utc::now() + chrono::Duration::minutes(30)),
            }
        } else {
            store::Credentials {
                kind: store::AuthKind::Token,
                access_token_enc: sealer.seal(&key, TokenSlot::Access(spot)),
                refresh_token_enc: None,
                expires_at: None,
            }
        };
        store::activate(
            &mut db.client,
            &markers,
            spot,
            portal as i64,
            &credentials,
            ChangeSource::AdminApi,
        )
        .await?;
        portals.push(portal);
    }
    // Connected long ago and backfilled; the burst's Spots create their
    // property group and properties when the sidecar starts (the others
    // are never called).
    let burst_spots: Vec<i64> = ids.iter().take(burst).copied().collect();
    db.client
        .execute(
            "UPDATE hubspot_sync.integrations
                SET initialized_at = CASE WHEN spot_id = ANY($1) THEN NULL ELSE now() END,
                    backfill_done_at = now()",
            &[&burst_spots],
        )
        .await?;
    // The first member of each burst Spot has a contact the map knows.
    let mut targets = Vec::with_capacity(burst);
    for (i, &spot) in ids.iter().take(burst).enumerate() {
        let email = format!("m1-{spot}@example.com");
        let contact = b.emu.add_contact(portals[i], &email, &[]);
        let member: i64 = db
            .client
            .query_one("SELECT id FROM members WHERE lower(email) = $1", &[&email])
            .await?
            .get(0);
        db.client
            .execute(
                "INSERT INTO hubspot_sync.contact_map (spot_id, portal_id, member_id, email, contact_id)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&spot, &(portals[i] as i64), &member, &email, &contact],
            )
            .await?;
        b.emu.set_faults(
            Some(portals[i]),
            Faults {
                latency: Some(Duration::from_millis(a.latency_ms)),
                ..Default::default()
            },
        );
        targets.push((portals[i], member, email));
    }
    create_slots(&db, &[&db.slot]).await?;
    println!("seeded in {:.1} s", t.elapsed().as_secs_f64());

    let listen = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let http = reqwest::Client::new();
    let (child, ready_secs) = start_fleet_sidecar(&db, &b.emu, &listen, a.rate_limit).await?;
    let pid = child.id();
    // Settle: every Spot served and initialized, and the calls of that out
    // of HubSpot's 10 s window; Postgres has published those sessions'
    // counts by then too.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let uninitialized: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM hubspot_sync.integrations WHERE initialized_at IS NULL",
                &[],
            )
            .await?
            .get(0);
        let served = metric_sum(&http, &listen, "hubspot_sidecar_delivery_spots").await;
        if uninitialized == 0 && served >= spots as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "delivery did not take up every Spot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let calls =
        |emu: &Emulator| -> u64 { portals.iter().map(|p| emu.request_stats(*p).total).sum() };
    let (c0, cpu0, calls0) = (commits(&db.client).await?, cpu_seconds(pid), calls(&b.emu));
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (c1, cpu1, calls1) = (commits(&db.client).await?, cpu_seconds(pid), calls(&b.emu));
    let idle_rss = rss(pid);
    let tps = (c1 - c0 - 1) as f64 / idle_secs as f64;
    let cpu = (cpu1 - cpu0) / idle_secs as f64 * 100.0;
    println!(
        "  idle {idle_secs} s: {tps:.2} transactions/s on the primary (goal < 5), {cpu:.2}% of a core (goal < 2%), {} HubSpot calls (goal 0)",
        calls1 - calls0
    );
    println!(
        "  memory: RSS {:.1} MB with {spots} Spots (goal < 150 MB at 10,000), {:.0} bytes per Spot over the whole process; ready {ready_secs:.2} s after start",
        idle_rss as f64 / 1e6,
        idle_rss as f64 / spots as f64
    );

    // The operator's list through the whole fleet, a page of 50 at a time.
    let mut took = Vec::new();
    for k in 0..40usize {
        let query = match k % 4 {
            0 => format!("?limit=50&offset={}", (k * 997) % spots.max(1)),
            1 => "?status=failed&limit=50".to_string(),
            2 => format!("?q={}&limit=50", ids[k % ids.len()]),
            _ => "?q=fleet%2019&limit=50".to_string(),
        };
        let t = Instant::now();
        let resp = http
            .get(format!("http://{listen}/api/spots{query}"))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 200,
            "GET /api/spots{query}: {}",
            resp.status()
        );
        resp.bytes().await?;
        took.push(t.elapsed().as_secs_f64());
    }
    took.sort_by(f64::total_cmp);
    println!(
        "  GET /api/spots, a page of 50 of {spots} (offsets, status, id, name): p50 {:.3} s  p95 {:.3} s (goal p95 < 0.2 s); 2 statements a page",
        percentile(&took, 0.5),
        percentile(&took, 0.95)
    );

    // Three bursts, two seconds apart: one burst's p99 moves by up to 0.4 s
    // with what else the two cores are doing.
    let mut p99s = Vec::new();
    for round in 1..=BURSTS {
        let burst_calls0: u64 = targets
            .iter()
            .map(|(p, _, _)| b.emu.request_stats(*p).total)
            .sum();
        let cpu_before = (
            cpu_seconds(pid),
            postgres_cpu_seconds(),
            cpu_seconds(std::process::id()),
        );
        let shared_before = shared_statements(&http, &listen).await;
        let t = Instant::now();
        let tag = format!("burst {round}");
        let latencies = changes_reach_hubspot(&db.client, &b.emu, &targets, &tag).await?;
        let wall = t.elapsed().as_secs_f64();
        let cpu_after = (
            cpu_seconds(pid),
            postgres_cpu_seconds(),
            cpu_seconds(std::process::id()),
        );
        let burst_calls: u64 = targets
            .iter()
            .map(|(p, _, _)| b.emu.request_stats(*p).total)
            .sum::<u64>()
            - burst_calls0;
        let p99 = percentile(&latencies, 0.99);
        p99s.push(p99);
        println!(
            "  burst {round}, one change in each of {burst} Spots: commit-to-HubSpot p50 {:.3} s  p99 {p99:.3} s  max {:.3} s (goal p99 < 0.5 s; one call takes {:.3} s); {:.2} calls per Spot (goal 1); CPU over its {wall:.2} s (2 cores): sidecar {:.2} s, Postgres {:.2} s, this benchmark (load, emulator) {:.2} s",
            percentile(&latencies, 0.5),
            latencies.last().copied().unwrap_or(f64::NAN),
            a.latency_ms as f64 / 1e3,
            burst_calls as f64 / burst.max(1) as f64,
            cpu_after.0 - cpu_before.0,
            cpu_after.1 - cpu_before.1,
            cpu_after.2 - cpu_before.2
        );
        let shared: Vec<String> = shared_statements(&http, &listen)
            .await
            .into_iter()
            .zip(shared_before)
            .filter(|((_, asks, _), (_, asks0, _))| asks > asks0)
            .map(|((kind, asks, statements), (_, asks0, statements0))| {
                format!("{kind} {:.0}/{:.0}", statements - statements0, asks - asks0)
            })
            .collect();
        println!(
            "    statements the rounds shared, per kind (statements/asks): {}",
            shared.join(", ")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    p99s.sort_by(f64::total_cmp);
    println!(
        "  bursts: median p99 {:.3} s, worst {:.3} s (goal < 0.5 s)",
        p99s[p99s.len() / 2],
        p99s.last().copied().unwrap_or(f64::NAN)
    );

    // A restart (kill -9, as a failover is) with every OAuth token due,
    // once the burst's calls have left HubSpot's window: a new process holds
    // a portal called in the last 10 s until they have (G6).
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(child);
    expire_oauth_tokens(&db.client).await?;
    let c_start = commits(&db.client).await?;
    let (child, ready_secs) = start_fleet_sidecar(&db, &b.emu, &listen, a.rate_limit).await?;
    let pid = child.id();
    // Statements in the start's first seconds, by the second.
    let first_second = commits(&db.client).await? - c_start;
    let peak = peak_transactions(&db.client, 5).await?;
    // The first change after the start, to an OAuth Spot whose token is due.
    let oauth_target = targets
        .iter()
        .skip(1)
        .step_by(2)
        .take(1)
        .cloned()
        .collect::<Vec<_>>();
    let first = changes_reach_hubspot(&db.client, &b.emu, &oauth_target, "after restart").await?;
    let refreshes = metric_sum(&http, &listen, "hubspot_sidecar_token_refreshes_total").await;
    let busiest = portals
        .iter()
        .map(|p| b.emu.request_stats(*p).peak_in_10s)
        .max()
        .unwrap_or(0);
    println!(
        "  restart with {} OAuth tokens due: ready {ready_secs:.2} s (goal < 10 s); {first_second} transactions until ready, then at most {peak} in a second; first change reached HubSpot {:.3} s after its commit (goal < 1 s); {refreshes:.0} refreshes (only Spots with work refresh); busiest portal {busiest} calls in 10 s (limit {}); RSS {:.1} MB",
        spots / 2,
        first.first().copied().unwrap_or(f64::NAN),
        a.rate_limit,
        rss(pid) as f64 / 1e6
    );

    // A takeover: a standby waits beside the leader; the leader is killed
    // (-9) with every OAuth token due; the standby leads, and a change
    // reaches HubSpot.
    let standby_listen = common::free_addr();
    let (standby, _) =
        spawn_fleet_sidecar(&db, &b.emu, &standby_listen, a.rate_limit, "/healthz").await?;
    expire_oauth_tokens(&db.client).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let c_start = commits(&db.client).await?;
    let killed = Instant::now();
    drop(child);
    let took_over = wait_ready(&standby_listen, "/readyz", killed).await?;
    let until_ready = commits(&db.client).await? - c_start;
    let peak = peak_transactions(&db.client, 5).await?;
    let first = changes_reach_hubspot(&db.client, &b.emu, &oauth_target, "after takeover").await?;
    let busiest = portals
        .iter()
        .map(|p| b.emu.request_stats(*p).peak_in_10s)
        .max()
        .unwrap_or(0);
    println!(
        "  takeover by a standby after kill -9 of the leader, {} OAuth tokens due: ready {took_over:.2} s after the kill (goal < 10 s; the standby looks for the lock every 2 s); {until_ready} transactions until ready, then at most {peak} in a second; first change reached HubSpot {:.3} s after its commit (goal < 1 s); busiest portal {busiest} calls in 10 s (limit {}); RSS {:.1} MB",
        spots / 2,
        first.first().copied().unwrap_or(f64::NAN),
        a.rate_limit,
        rss(standby.id()) as f64 / 1e6
    );
    drop(standby);
    Ok(())
}

/// Bursts the fleet shape measures, one after the other.
const BURSTS: usize = 3;

/// (e) The activation, then a resync, then a reconcile of one large Spot,
/// half of whose members have a contact, on a portal answering every call
/// after `latency_ms`: each one's time against the budget's bound (calls /
/// limit per 10 s) and its calls against the minimum (activation and
/// resync: a lookup per 100 members and an update per 100 matched;
/// reconcile: a read per 100 matched).
async fn activation(b: &mut Bench, a: &Args, members: usize) -> anyhow::Result<()> {
    let matched = members / 2;
    println!(
        "\n== activation, resync and reconcile: one Spot of {members} members, {matched} with a contact, calls answered after {} ms (limit {}/10 s)",
        a.latency_ms, a.rate_limit
    );
    let mut db = b.database().await?;
    let (spot, portal) = seed_spot(&mut db.client, &b.emu, "Huge", members, matched).await?;
    // Connected a while ago: a start within 10 s of an integration's change
    // takes the portal's window as full (the process before it may have
    // called it), which a connect in the running process does not.
    db.client
        .execute(
            "UPDATE hubspot_sync.integrations SET updated_at = now() - interval '1 minute'",
            &[],
        )
        .await?;
    b.emu.set_faults(
        Some(portal),
        Faults {
            latency: Some(Duration::from_millis(a.latency_ms)),
            ..Default::default()
        },
    );
    let per_second = a.rate_limit as f64 / 10.0;
    let lookups = members.div_ceil(100) as u64;
    let updates = matched.div_ceil(100) as u64;
    let t = Instant::now();
    let (running, stop, task) = start_sidecar(&db, &b.emu, a.rate_limit).await?;
    wait_backfills(&db.client, Duration::from_secs(3600)).await?;
    let report = |phase: &str, took: f64, before: &PhaseCalls, minimum: u64| {
        let s = b.emu.request_stats(portal);
        let now = PhaseCalls::of(&s);
        // Initialization's calls (property group and properties) count too.
        let calls = now.total - before.total;
        let batch = (now.reads + now.updates) - (before.reads + before.updates);
        let bound = calls as f64 / per_second;
        println!(
            "  {phase}: {took:.1} s; the budget allows {bound:.1} s for its {calls} calls: {:.2}x (goal <= 1.1x); batch calls {batch} (reads {}, updates {}) against a minimum of {minimum}: {:.2}x (goal <= 1.05x); peak {} calls in 10 s",
            took / bound,
            now.reads - before.reads,
            now.updates - before.updates,
            batch as f64 / minimum as f64,
            s.peak_in_10s
        );
    };
    report(
        "activation",
        t.elapsed().as_secs_f64(),
        &PhaseCalls::default(),
        lookups + updates,
    );
    // Each phase starts with the portal's window empty, as the bound assumes.
    let quiet = Duration::from_secs(if a.quick { 1 } else { 11 });
    let http = reqwest::Client::new();
    let api = |path: &str| {
        format!(
            "http://{}/api/spots/{spot}/hubspot/{path}",
            running.listen_addr
        )
    };

    // Resync: every value written again. Record ids are known, so only the
    // members without a contact are looked up again (the minimum here is
    // the activation's, which looks every member up).
    tokio::time::sleep(quiet).await;
    let before = PhaseCalls::of(&b.emu.request_stats(portal));
    let t = Instant::now();
    let status = http
        .post(api("resync"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await?
        .status();
    anyhow::ensure!(status.is_success(), "resync answered {status}");
    wait_backfills(&db.client, Duration::from_secs(3600)).await?;
    wait_backlog_empty(&db.client, Duration::from_secs(600)).await?;
    report(
        "resync",
        t.elapsed().as_secs_f64(),
        &before,
        lookups + updates,
    );

    // Reconcile: every matched contact read back by id, 100 a call.
    tokio::time::sleep(quiet).await;
    let before = PhaseCalls::of(&b.emu.request_stats(portal));
    let t = Instant::now();
    let answer = http
        .post(api("reconcile"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let last = answer.lines().last().unwrap_or_default();
    anyhow::ensure!(last.contains("\"report\""), "reconcile ended with {last}");
    anyhow::ensure!(
        last.contains(&format!("\"checked\":{matched},")),
        "reconcile did not check every matched contact: {last}"
    );
    report("reconcile", t.elapsed().as_secs_f64(), &before, updates);

    let _ = stop.send(true);
    let _ = task.await;
    Ok(())
}

/// A portal's call counts at one moment, to count one phase's calls.
#[derive(Default)]
struct PhaseCalls {
    total: u64,
    reads: u64,
    updates: u64,
}

impl PhaseCalls {
    fn of(s: &hubspot_emulator::RequestStats) -> Self {
        PhaseCalls {
            total: s.total,
            reads: s.count_op("contacts.batch_read"),
            updates: s.count_op("contacts.batch_update"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    hubspot_sidecar::init_logging(LogFormat::Text, "warn");
    let mut b = Bench {
        cluster: PgCluster::start().await?,
        emu: Emulator::start(EmulatorConfig {
            rate_limit_per_10s: a.rate_limit.max(110),
            ..Default::default()
        })
        .await?,
        dbs: 0,
    };
    let all = a.shape == "all";
    if all || a.shape == "catchup" {
        let custom = a.transactions.is_some() || a.spots.is_some();
        let shapes = if custom {
            vec![Catchup {
                transactions: a.transactions.unwrap_or(20_000),
                rows_per_tx: a.rows_per_tx.unwrap_or(1),
                spots: a.spots.unwrap_or(1),
                members: a.members.unwrap_or(1000),
            }]
        } else if a.quick {
            vec![
                Catchup {
                    transactions: 20_000,
                    rows_per_tx: 1,
                    spots: 10,
                    members: 200,
                },
                Catchup {
                    transactions: 2_000,
                    rows_per_tx: 5,
                    spots: 1,
                    members: 1_000,
                },
            ]
        } else {
            vec![
                Catchup {
                    transactions: 200_000,
                    rows_per_tx: 1,
                    spots: 50,
                    members: 1_000,
                },
                Catchup {
                    transactions: 20_000,
                    rows_per_tx: 5,
                    spots: 1,
                    members: 10_000,
                },
            ]
        };
        for shape in shapes {
            catchup(&mut b, &a, shape).await?;
        }
    }
    if all || a.shape == "large" {
        let rows = a.rows.unwrap_or(if a.quick { 100_000 } else { 1_000_000 });
        large(&mut b, &a, rows).await?;
    }
    if all || a.shape == "stream" {
        let rate = a.rate.unwrap_or(200);
        let seconds = a.seconds.unwrap_or(if a.quick { 10 } else { 60 });
        stream(&mut b, &a, rate, seconds).await?;
    }
    if all || a.shape == "activation" {
        let members = a.members.unwrap_or(if a.quick { 2_000 } else { 100_000 });
        activation(&mut b, &a, members).await?;
    }
    if all || a.shape == "fleet" {
        let sizes: Vec<usize> = match a.spots {
            Some(n) => vec![n],
            None if a.quick => vec![2_000],
            None => vec![2_000, 10_000],
        };
        let idle = a.seconds.unwrap_or(if a.quick { 20 } else { 60 }) as u64;
        for spots in sizes {
            let burst = spots.min(if a.quick { 200 } else { 1_000 });
            fleet(&mut b, &a, spots, burst, idle).await?;
        }
    }
    b.emu.shutdown().await;
    drop(b.cluster);
    Ok(())
}
