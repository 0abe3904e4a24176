//! Production topologies (SPEC §10): a commit that stays invisible for a
//! while (a synchronous standby that lags), a sidecar started against a
//! standby, and two replicas with one leader. Each test that changes the
//! server's configuration runs its own throwaway cluster.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service;

const SECOND: Duration = Duration::from_secs(1);

async fn admin(cluster: &PgCluster) -> tokio_postgres::Client {
    sql(&cluster.url("postgres")).await
}

async fn ready(http: &reqwest::Client, addr: &str) -> bool {
    http.get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// With a synchronous standby that does not answer, an application's commit
/// is in the WAL (and in the stream) but invisible until the standby
/// answers. The hand-off waits for it however long it takes, so delivery
/// never reads the row as it was before and marks it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_commit_is_waited_for_never_read_stale() {
    let cluster = PgCluster::start().await.expect("Postgres");
    let url = cluster.create_meltingspot_db("visible").await.unwrap();
    let db = sql(&url).await;
    let emu = emulator().await;
    // The sidecar's own commits do not wait for the standby; the application's do.
    let sidecar_url = format!("{url}?options=-c%20synchronous_commit%3Dlocal");
    let sidecar = Sidecar::start(config(&sidecar_url, "visible", &emu.base_url())).await;
    let spot = seed_spot(&db, "Synchronous").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "sam@example.com", &[]);
    let member = seed_member(&db, spot, "sam@example.com", "accepted").await;
    sidecar.connect_with_token(spot, &token).await;
    wait_for("the backfill", 30 * SECOND, || async {
        prop(&emu, portal, "sam@example.com", "meltingspot_member_status").is_some()
    })
    .await;

    let admin = admin(&cluster).await;
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let app = sql(&url).await;
    let committing = tokio::spawn(async move {
        app.execute(
            "UPDATE members SET headline = 'after the standby answered' WHERE id = $1",
            &[&member],
        )
        .await
        .map(|_| ())
    });
    // Longer than any give-up a hand-off might have had.
    let metrics = sidecar.running.metrics.clone();
    wait_for(
        "the hand-off waits 12 s for visibility",
        60 * SECOND,
        || async { metrics.visibility_wait_seconds.get() >= 11.0 },
    )
    .await;
    assert!(
        !committing.is_finished(),
        "the commit waits for the standby"
    );
    assert_ne!(
        prop(&emu, portal, "sam@example.com", "meltingspot_headline").as_deref(),
        Some("after the standby answered")
    );

    admin
        .batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    committing.await.unwrap().expect("the commit completes");
    wait_for("the committed value in HubSpot", 30 * SECOND, || async {
        prop(&emu, portal, "sam@example.com", "meltingspot_headline").as_deref()
            == Some("after the standby answered")
    })
    .await;
    sidecar.stop().await;
}

/// Started against a standby, the sidecar waits (not ready, nothing sent)
/// and starts by itself once the standby is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_standby_it_waits_and_starts_after_promotion() {
    let primary = PgCluster::start().await.expect("primary");
    let url = primary.create_meltingspot_db("promoted").await.unwrap();
    let db = sql(&url).await;
    let spot = seed_spot(&db, "Promoted").await;
    seed_member(&db, spot, "pia@example.com", "accepted").await;
    let standby = PgCluster::start_standby(&primary).await.expect("standby");
    let standby_url = standby.url("promoted");
    let emu = emulator().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(service::run(
        config(&standby_url, "promoted", &emu.base_url()),
        stop_rx,
        Some(started_tx),
    ));
    let running = started_rx
        .await
        .expect("the sidecar listens while it waits");
    let addr = running.listen_addr.to_string();
    let http = reqwest::Client::new();
    // It stays up and not ready while the server is in recovery.
    let until = Instant::now() + 3 * SECOND;
    while Instant::now() < until {
        assert!(!task.is_finished(), "the sidecar exited against a standby");
        assert!(!ready(&http, &addr).await, "ready against a standby");
        let health = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!running.health.migrated.load(Ordering::Relaxed));

    drop(db);
    drop(primary);
    let promoted_at = Instant::now();
    standby.promote().await.expect("promote");
    wait_for("ready after the promotion", 30 * SECOND, || {
        ready(&http, &addr)
    })
    .await;
    let took = promoted_at.elapsed();
    eprintln!("started {:.1} s after the promotion", took.as_secs_f64());

    // And it works: a Spot connected on the promoted server is backfilled.
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "pia@example.com", &[]);
    let (status, body) = api_call(
        &http,
        &format!("http://{addr}/api/spots/{spot}/hubspot/connect"),
        reqwest::Method::POST,
        Some(serde_json::json!({"access_token": token})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the backfill on the promoted server",
        30 * SECOND,
        || async {
            prop(&emu, portal, "pia@example.com", "meltingspot_member_status").as_deref()
                == Some("accepted")
        },
    )
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap().expect("clean stop");
}

/// Two replicas: one leads (ready, streams, delivers), the other stands by
/// (not ready, sends nothing). kill -9 of the leader during a stream of
/// changes and activities: the other takes over within 15 s, and everything
/// arrives exactly once. At no moment are both ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_a_takeover_after_kill_9() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();
    let spot = seed_spot(&db, "Replicated").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    const MEMBERS: usize = 40;
    for i in 0..MEMBERS {
        emu.add_contact(portal, &format!("r{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status)
         SELECT $1, 'r' || g || '@example.com', 'pending' FROM generate_series(0, $2::int - 1) g",
        &[&spot, &(MEMBERS as i32)],
    )
    .await
    .unwrap();
    let addrs = [free_addr(), free_addr()];
    let spawn = |addr: &str| {
        let mut c = oauth_sidecar_command(&url, &name, &emu.base_url(), addr);
        c.env("HUBSPOT_APP_EVENT_PREFIX", "pe4242_");
        c.spawn().expect("spawn a replica")
    };
    let mut replicas = [Some(spawn(&addrs[0])), Some(spawn(&addrs[1]))];

    // Watch readiness throughout: never both at once.
    let watching = {
        let (http, addrs) = (http.clone(), addrs.clone());
        tokio::spawn(async move {
            let mut both = 0;
            loop {
                let (a, b) = tokio::join!(ready(&http, &addrs[0]), ready(&http, &addrs[1]));
                if a && b {
                    both += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if both > 0 {
                    return both;
                }
            }
        })
    };
    let until = Instant::now() + 30 * SECOND;
    let leader = loop {
        let (a, b) = tokio::join!(ready(&http, &addrs[0]), ready(&http, &addrs[1]));
        match (a, b) {
            (true, false) => break 0,
            (false, true) => break 1,
            _ => {}
        }
        assert!(
            Instant::now() < until,
            "no replica became the leader within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let standby = 1 - leader;
    // Changes go through the leader only (its fences order them with its calls).
    let (status, body) = api_call(
        &http,
        &format!("http://{}/api/spots/{spot}/hubspot/connect", addrs[standby]),
        reqwest::Method::POST,
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        oauth_connect_process(&http, &addrs[leader], spot).await,
        200
    );
    change_settings_process(
        &http,
        &addrs[leader],
        spot,
        serde_json::json!({"activities": {"members": true}}),
    )
    .await;

    // A stream of changes and status changes (each accepted is a spot_joined event).
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
    let mut killed_at = None;
    for (n, id) in ids.iter().enumerate() {
        db.execute(
            "UPDATE members SET status = 'accepted', headline = $1 WHERE id = $2",
            &[&format!("h{n}"), id],
        )
        .await
        .unwrap();
        if n == MEMBERS / 2 {
            let mut child = replicas[leader].take().unwrap();
            child.kill().expect("kill -9 the leader");
            child.wait().unwrap();
            killed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = killed_at.unwrap();
    wait_for("the standby takes over", 15 * SECOND, || {
        ready(&http, &addrs[standby])
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!(
        "takeover {:.1} s after kill -9 of the leader",
        takeover.as_secs_f64()
    );

    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    let contacts: Vec<String> = emu.contacts(portal).into_iter().map(|c| c.id).collect();
    wait_for("one spot_joined per member", 60 * SECOND, || async {
        let joined: Vec<_> = emu
            .timeline_events(portal)
            .into_iter()
            .filter(|e| e.event_type.ends_with("spot_joined"))
            .collect();
        joined.len() >= MEMBERS
    })
    .await;
    let joined: Vec<String> = emu
        .timeline_events(portal)
        .into_iter()
        .filter(|e| e.event_type.ends_with("spot_joined"))
        .map(|e| e.object_id)
        .collect();
    for c in &contacts {
        assert_eq!(
            joined.iter().filter(|j| *j == c).count(),
            1,
            "contact {c}: spot_joined exactly once"
        );
    }
    assert!(!watching.is_finished(), "both replicas were ready at once");
    watching.abort();
    for c in replicas.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
