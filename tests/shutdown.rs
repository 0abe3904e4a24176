//! Graceful shutdown of the real binary: SIGTERM ends `hubspot-sidecar run`
//! with exit code 0 within 10 s, after handing off and checkpointing what it
//! had decoded.

mod common;

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use common::*;

const SECOND: Duration = Duration::from_secs(1);

/// The child is killed if a test panics before it exits.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_sidecar(db_url: &str, slot: &str, hubspot: &str, listen: &str) -> Proc {
    Proc(
        sidecar_command(db_url, slot, hubspot, listen)
            .spawn()
            .expect("spawn hubspot-sidecar"),
    )
}

/// A counter or gauge from /metrics (0 when absent).
async fn metric(http: &reqwest::Client, listen: &str, name: &str) -> f64 {
    let Ok(resp) = http.get(format!("http://{listen}/metrics")).send().await else {
        return 0.0;
    };
    let body = resp.text().await.unwrap_or_default();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn sigterm(p: &Proc) {
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    let rc = unsafe { libc::kill(p.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill -TERM");
}

/// Waits for the child to exit, at most `limit`.
async fn exit_within(p: &mut Proc, limit: Duration) -> (ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = p.0.try_wait().expect("wait for the sidecar") {
            return (status, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "the sidecar did not exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Setup {
    url: String,
    name: String,
    db: tokio_postgres::Client,
    emu: hubspot_emulator::Emulator,
    http: reqwest::Client,
    listen: String,
    ids: Vec<i64>,
    token: String,
}

async fn setup(spot_name: &str) -> Setup {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let spot = seed_spot(&db, spot_name).await;
    let (portal, token) = emu.create_portal();
    for i in 0..20 {
        emu.add_contact(portal, &format!("s{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status)
         SELECT $1, 's' || g || '@example.com', 'accepted' FROM generate_series(0, 19) g",
        &[&spot],
    )
    .await
    .unwrap();
    let ids = db
        .query(
            "SELECT id FROM members WHERE spot_id = $1 ORDER BY id",
            &[&spot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    Setup {
        url,
        name,
        db,
        emu,
        http: reqwest::Client::new(),
        listen: free_addr(),
        ids,
        token,
    }
}

/// Updates one member in its own transaction; returns an LSN taken just before
/// COMMIT, so that the commit's end LSN is beyond it.
async fn update_marked(db: &mut tokio_postgres::Client, id: i64, headline: &str) -> u64 {
    let tx = db.transaction().await.unwrap();
    tx.execute(
        "UPDATE members SET headline = $1 WHERE id = $2",
        &[&headline, &id],
    )
    .await
    .unwrap();
    let before_commit = tx
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64;
    tx.commit().await.unwrap();
    before_commit
}

async fn connect_spot(s: &Setup) {
    let spot: i64 =
        s.db.query_one("SELECT spot_id FROM members WHERE id = $1", &[&s.ids[0]])
            .await
            .unwrap()
            .get(0);
    let (status, body) = api_call(
        &s.http,
        &format!("http://{}/api/spots/{spot}/hubspot/connect", s.listen),
        reqwest::Method::POST,
        Some(serde_json::json!({"access_token": s.token})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_within_10s_with_the_last_commit_checkpointed() {
    let s = setup("Shutdown").await;
    let mut child = spawn_sidecar(&s.url, &s.name, &s.emu.base_url(), &s.listen);
    wait_ready(&s.http, &s.listen).await;
    connect_spot(&s).await;

    // Let everything committed so far be handed off, so that the decoded-transaction
    // counter moves by our updates alone from here on.
    let mut db = sql(&s.url).await;
    let settled = update_marked(&mut db, s.ids[0], "settled").await;
    wait_for("the sidecar has caught up", 30 * SECOND, || async {
        checkpoint(&s.db, &s.name).await > settled
    })
    .await;
    let decoded_before =
        metric(&s.http, &s.listen, "hubspot_sidecar_transactions_total").await as u64;
    const UPDATES: u64 = 50;
    let mut before_last_commit = 0;
    for n in 0..UPDATES {
        let id = s.ids[n as usize % s.ids.len()];
        before_last_commit = update_marked(&mut db, id, &format!("h{n}")).await;
    }
    // The sidecar has decoded the last commit (its hand-off may or may not have run yet).
    wait_for("the sidecar decoded every update", 30 * SECOND, || async {
        metric(&s.http, &s.listen, "hubspot_sidecar_transactions_total").await as u64
            >= decoded_before + UPDATES
    })
    .await;

    sigterm(&child);
    let (status, took) = exit_within(&mut child, 10 * SECOND).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end the sidecar with exit code 0, got {status}"
    );
    eprintln!("sidecar exited 0 {took:?} after SIGTERM");

    let stored = checkpoint(&s.db, &s.name).await;
    let (confirmed, _) = slot_position(&s.db, &s.name).await;
    assert!(
        stored > before_last_commit || confirmed > before_last_commit,
        "neither the checkpoint ({stored:X}) nor the slot's confirmed_flush_lsn ({confirmed:X}) \
         covers the last commit (which began after {before_last_commit:X})"
    );
    // The slot is free again for the next sidecar.
    wait_for("the slot is released", 10 * SECOND, || async {
        !s.db
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.name],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_write_load_still_exits_0_within_10s_and_restarts_cleanly() {
    let s = setup("Shutdown under load").await;
    let mut child = spawn_sidecar(&s.url, &s.name, &s.emu.base_url(), &s.listen);
    wait_ready(&s.http, &s.listen).await;
    connect_spot(&s).await;

    // A writer commits single-row updates until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let url = s.url.clone();
        let ids = s.ids.clone();
        tokio::spawn(async move {
            let db = sql(&url).await;
            let mut n = 0usize;
            while !*stop_rx.borrow_and_update() && n < 20_000 {
                db.execute(
                    "UPDATE members SET bio = $1 WHERE id = $2",
                    &[&format!("b{n}"), &ids[n % ids.len()]],
                )
                .await
                .unwrap();
                n += 1;
            }
            n
        })
    };
    wait_for(
        "the sidecar is decoding the writes",
        30 * SECOND,
        || async {
            metric(&s.http, &s.listen, "hubspot_sidecar_transactions_total").await >= 200.0
        },
    )
    .await;

    sigterm(&child);
    let (status, took) = exit_within(&mut child, 10 * SECOND).await;
    let _ = stop_tx.send(true);
    let written = writer.await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    eprintln!("sidecar exited 0 {took:?} after SIGTERM, {written} updates written");

    // What it checkpointed is a real position, and a new sidecar carries on from
    // there past the last commit.
    let stored = checkpoint(&s.db, &s.name).await;
    let (_, current) = slot_position(&s.db, &s.name).await;
    assert!(stored > 0 && stored <= current, "{stored:X} vs {current:X}");
    let mut db = sql(&s.url).await;
    let before_last_commit = update_marked(&mut db, s.ids[0], "after the restart").await;
    let mut again = spawn_sidecar(&s.url, &s.name, &s.emu.base_url(), &s.listen);
    wait_ready(&s.http, &s.listen).await;
    wait_for(
        "the restarted sidecar checkpoints past the last commit",
        30 * SECOND,
        || async { checkpoint(&s.db, &s.name).await > before_last_commit },
    )
    .await;
    sigterm(&again);
    let (status, _) = exit_within(&mut again, 10 * SECOND).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}
