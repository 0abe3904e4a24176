//! Crash safety (G1, G6): kill -9 of the real sidecar process mid-stream.

mod common;

use std::process::Child;
use std::time::Duration;

use common::*;

const SECOND: Duration = Duration::from_secs(1);

fn spawn_sidecar(db_url: &str, slot: &str, hubspot: &str, listen: &str) -> Child {
    sidecar_command(db_url, slot, hubspot, listen)
        .spawn()
        .expect("spawn hubspot-sidecar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_2000_updates_then_restart_converges() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let spot = seed_spot(&db, "Crash").await;
    let (portal, token) = emu.create_portal();
    for i in 0..100 {
        emu.add_contact(portal, &format!("c{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status) SELECT $1, 'c' || g || '@example.com', 'accepted' FROM generate_series(0, 99) g",
        &[&spot],
    )
    .await
    .unwrap();

    let mut child = spawn_sidecar(&url, &name, &emu.base_url(), &listen);
    wait_ready(&http, &listen).await;
    let (status, body) = api_call(
        &http,
        &format!("http://{listen}/api/spots/{spot}/hubspot/connect"),
        reqwest::Method::POST,
        Some(serde_json::json!({"access_token": token})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (confirmed_at_start, _) = slot_position(&db, &name).await;

    // 2,000 single-row transactions; the sidecar dies by SIGKILL a quarter of the way in.
    let ids: Vec<i64> = db
        .query(
            "SELECT id FROM members WHERE spot_id = $1 ORDER BY id",
            &[&spot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for n in 0..2000usize {
        let id = ids[n % ids.len()];
        db.execute(
            "UPDATE members SET headline = $1 WHERE id = $2",
            &[&format!("v{n}"), &id],
        )
        .await
        .unwrap();
        if n == 500 {
            child.kill().expect("kill -9");
            child.wait().unwrap();
        }
    }
    child = spawn_sidecar(&url, &name, &emu.base_url(), &listen);
    wait_ready(&http, &listen).await;

    wait_headlines_converge(&db, &emu, portal, spot, 120 * SECOND).await;
    let (_, committed) = slot_position(&db, &name).await;
    wait_for(
        "the slot's confirmed_flush_lsn reaches the last commit",
        30 * SECOND,
        || async { slot_position(&db, &name).await.0 >= committed },
    )
    .await;
    assert!(slot_position(&db, &name).await.0 > confirmed_at_start);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_new_process_counts_the_old_ones_calls() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let listen = free_addr();
    let spot = seed_spot(&db, "Restarted").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    seed_member(&db, spot, "ada@example.com", "accepted").await;
    let mut first = Process(spawn_sidecar(&url, &name, &emu.base_url(), &listen));
    wait_ready(&http, &listen).await;
    connect_token(&http, &listen, spot, &token).await;
    wait_for(
        "the first process wrote the contact",
        30 * SECOND,
        || async {
            prop(&emu, portal, "ada@example.com", "meltingspot_member_status").as_deref()
                == Some("accepted")
        },
    )
    .await;
    first.kill().expect("kill -9");
    first.wait().expect("reap");

    // The new process's limiter starts empty, while HubSpot still counts the
    // old one's calls: it must wait them out instead of calling blind.
    let log_path = std::env::temp_dir().join(format!("restart-{name}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let _second = Process(
        sidecar_command(&url, &name, &emu.base_url(), &listen)
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .expect("spawn the second process"),
    );
    wait_for(
        "the previous process's calls counted",
        15 * SECOND,
        || async {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            text.lines().any(|l| {
                l.contains("called moments ago by the previous process")
                    && l.contains(&portal.to_string())
            })
        },
    )
    .await;
}
