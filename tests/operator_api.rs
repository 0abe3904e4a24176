//! The operator's API (SPEC §10): a Spot's dead letters, paged, retried one
//! or all; and a resync of a Spot with its progress.

mod common;

use std::time::Duration;

use common::*;

const SECOND: Duration = Duration::from_secs(1);

async fn call(
    sidecar: &Sidecar,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    sidecar.api(method, path, body).await
}

/// HubSpot's status property without the option `without` (an admin edited
/// it in HubSpot): writing that status is refused with INVALID_OPTION.
async fn set_status_options(emu: &hubspot_emulator::Emulator, token: &str, without: Option<&str>) {
    let options: Vec<serde_json::Value> = [
        "invited",
        "accepted",
        "pending",
        "left",
        "declined",
        "deactivated",
    ]
    .iter()
    .filter(|v| Some(**v) != without)
    .enumerate()
    .map(|(i, v)| serde_json::json!({"label": v, "value": v, "displayOrder": i, "hidden": false}))
    .collect();
    let resp = reqwest::Client::new()
        .patch(format!(
            "{}/crm/v3/properties/contacts/meltingspot_member_status",
            emu.base_url()
        ))
        .bearer_auth(token)
        .json(&serde_json::json!({"options": options}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_page_by_page_and_retried_one_or_all() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Refused").await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    wait_for("initialization", 30 * SECOND, || async {
        emu.properties(portal).len() >= 10
    })
    .await;
    set_status_options(&emu, &token, Some("declined")).await;
    for who in ["first", "second"] {
        emu.add_contact(portal, &format!("{who}@example.com"), &[]);
        seed_member(&db, spot, &format!("{who}@example.com"), "declined").await;
    }
    wait_for("two dead letters", 30 * SECOND, || async {
        sidecar.integration(spot).await["dead_letters"] == 2
    })
    .await;
    let base = format!("/api/spots/{spot}/hubspot/dead-letters");
    let (status, page) = call(
        &sidecar,
        reqwest::Method::GET,
        &format!("{base}?limit=1"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let newest = &page["dead_letters"][0];
    assert_eq!(newest["kind"], "contact_properties");
    assert!(
        newest["reason"].as_str().unwrap_or("").contains("declined"),
        "{newest}"
    );
    assert_eq!(newest["payload"]["email"], "second@example.com");
    let before = page["next_before"].as_i64().expect("a second page");
    let (_, page2) = call(
        &sidecar,
        reqwest::Method::GET,
        &format!("{base}?limit=1&before={before}"),
        None,
    )
    .await;
    assert_eq!(
        page2["dead_letters"][0]["payload"]["email"],
        "first@example.com"
    );
    let first_id = page2["dead_letters"][0]["id"].as_i64().unwrap();

    // The option is back in HubSpot: retry one, then all.
    set_status_options(&emu, &token, None).await;
    let retry = format!("{base}/retry");
    let (status, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &retry,
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &retry,
        Some(serde_json::json!({"id": first_id})),
    )
    .await;
    assert_eq!((status, v["retried"].clone()), (200, 1.into()), "{v}");
    wait_for("the first one delivered", 30 * SECOND, || async {
        prop(
            &emu,
            portal,
            "first@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("declined")
    })
    .await;
    assert_eq!(
        prop(
            &emu,
            portal,
            "second@example.com",
            "meltingspot_member_status"
        ),
        None
    );
    assert_eq!(sidecar.integration(spot).await["dead_letters"], 1);
    let (_, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &retry,
        Some(serde_json::json!({"all": true})),
    )
    .await;
    assert_eq!(v["retried"], 1, "{v}");
    wait_for("the second one delivered", 30 * SECOND, || async {
        prop(
            &emu,
            portal,
            "second@example.com",
            "meltingspot_member_status",
        )
        .as_deref()
            == Some("declined")
    })
    .await;
    assert_eq!(sidecar.integration(spot).await["dead_letters"], 0);
    // The record stays, marked.
    let (_, all) = call(&sidecar, reqwest::Method::GET, &base, None).await;
    let letters = all["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert!(letters.iter().all(|d| d["retried_at"].is_string()));

    // Not on an inactive Spot.
    let (status, _) = call(
        &sidecar,
        reqwest::Method::POST,
        &format!("/api/spots/{spot}/hubspot/disconnect"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &retry,
        Some(serde_json::json!({"all": true})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_rewrites_current_values_and_shows_its_progress() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Resynchronised").await;
    let (portal, token) = emu.create_portal();
    const N: usize = 120;
    for i in 0..N {
        emu.add_contact(portal, &format!("r{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 'r' || g || '@example.com', 'accepted', 'from the database' FROM generate_series(0, $2::int - 1) g",
        &[&spot, &(N as i32)],
    )
    .await
    .unwrap();
    sidecar.connect_with_token(spot, &token).await;
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    let v = sidecar.integration(spot).await;
    assert_eq!(v["backfill"]["running"], false, "{v}");
    assert_eq!(v["backfill"]["queued"], N);

    // Someone edits HubSpot behind the sidecar's back.
    for i in 0..N {
        emu.add_contact(
            portal,
            &format!("r{i}@example.com"),
            &[("meltingspot_headline", "edited in HubSpot")],
        );
    }
    let (status, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &format!("/api/spots/{spot}/hubspot/resync"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Delivery starts the new activation's backfill at once: by the time the
    // answer is read it may be running or, for 120 members, already done.
    assert_eq!(v["backfill"]["members"], N, "{v}");
    assert!(
        v["backfill"]["running"] == true || v["backfill"]["queued"] == N,
        "{v}"
    );
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    wait_for("the resync done", 30 * SECOND, || async {
        let v = sidecar.integration(spot).await;
        v["backfill"]["running"] == false && v["backfill"]["queued"] == N
    })
    .await;
    let (_, trail) = call(
        &sidecar,
        reqwest::Method::GET,
        &format!("/api/spots/{spot}/hubspot/events"),
        None,
    )
    .await;
    assert_eq!(trail["events"][0]["kind"], "resync");
    assert_eq!(trail["events"][0]["source"], "admin_api");
    sidecar.stop().await;
}

/// A resync of a Spot several backfill pages large runs to its end on a
/// portal whose budget is ample, with nothing else happening: a round that
/// sends a partial batch while pages are left runs the next one itself. It
/// used to wait for a signal that never came (5,000 members stopped at 3,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_many_pages_runs_to_its_end_with_an_ample_budget() {
    const N: usize = 5_000;
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = hubspot_emulator::Emulator::start(hubspot_emulator::EmulatorConfig {
        rate_limit_per_10s: 10_000,
        ..Default::default()
    })
    .await
    .expect("start emulator");
    let mut cfg = config(&url, &name, &emu.base_url());
    cfg.hubspot.rate_limit = 10_000;
    let sidecar = Sidecar::start(cfg).await;
    let spot = seed_spot(&db, "Paged").await;
    let (portal, token) = emu.create_portal();
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 'p' || g || '@example.com', 'accepted', 'from the database'
           FROM generate_series(1, $2::int) g",
        &[&spot, &(N as i32)],
    )
    .await
    .unwrap();
    // A contact for the last member only: the rounds are mostly lookups,
    // quick and far under the budget, and the last page's member shows the end.
    let last = format!("p{N}@example.com");
    emu.add_contact(portal, &last, &[]);
    let last_headline = || {
        emu.contact_by_email(portal, &last)
            .and_then(|c| c.properties.get("meltingspot_headline").cloned())
    };
    sidecar.connect_with_token(spot, &token).await;
    wait_for(
        "the activation's backfill to reach the last member",
        120 * SECOND,
        || async { last_headline().as_deref() == Some("from the database") },
    )
    .await;

    emu.add_contact(
        portal,
        &last,
        &[("meltingspot_headline", "edited in HubSpot")],
    );
    let (status, v) = call(
        &sidecar,
        reqwest::Method::POST,
        &format!("/api/spots/{spot}/hubspot/resync"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    wait_for(
        "the resync to reach the last member",
        120 * SECOND,
        || async { last_headline().as_deref() == Some("from the database") },
    )
    .await;
    let v = sidecar.integration(spot).await;
    assert_eq!(v["backfill"]["queued"], N, "{v}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spot_list_is_paged_filtered_and_shows_failed_spots_first() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    // 120 Spots with an integration, every tenth failed, the rest inactive;
    // one named with characters a search must take literally.
    db.batch_execute(
        "INSERT INTO spots (id, name, slug)
           SELECT 5000 + g, CASE WHEN g = 77 THEN 'Odd 100%_club' ELSE 'Club ' || g END, 'club-' || g
             FROM generate_series(1, 120) g;
         INSERT INTO hubspot_sync.integrations (spot_id, status, last_error)
           SELECT 5000 + g, CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'inactive' END,
                  CASE WHEN g % 10 = 0 THEN 'HubSpot refused the token' END
             FROM generate_series(1, 120) g;",
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let list = |query: &'static str| {
        let http = http.clone();
        let url = sidecar.url(&format!("/api/spots{query}"));
        async move {
            let resp = http.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            let status = resp.status().as_u16();
            let total = resp
                .headers()
                .get("x-total-count")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok());
            let body: serde_json::Value = resp.json().await.unwrap();
            (status, total, body)
        }
    };
    let ids = |body: &serde_json::Value| -> Vec<i64> {
        body.as_array()
            .unwrap()
            .iter()
            .map(|v| v["spot_id"].as_i64().unwrap())
            .collect()
    };

    // A page of 50 by default, the 12 failed first, then by id.
    let (status, total, body) = list("").await;
    assert_eq!((status, total), (200, Some(120)));
    let first = ids(&body);
    assert_eq!(first.len(), 50);
    assert!(body.as_array().unwrap()[..12]
        .iter()
        .all(|v| v["status"] == "failed"));
    assert_eq!(first[12], 5001);
    // The pages cover every Spot once.
    let (_, _, second) = list("?offset=50").await;
    let (_, _, third) = list("?offset=100").await;
    let mut all: Vec<i64> = first
        .into_iter()
        .chain(ids(&second))
        .chain(ids(&third))
        .collect();
    assert_eq!(all.len(), 120);
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 120);

    // Filters: a status, an id, a part of a name (taken literally).
    let (_, total, body) = list("?status=failed&limit=5").await;
    assert_eq!(total, Some(12));
    assert_eq!(ids(&body), vec![5010, 5020, 5030, 5040, 5050]);
    let (_, total, body) = list("?q=5042").await;
    assert_eq!((total, ids(&body)), (Some(1), vec![5042]));
    let (_, total, body) = list("?q=100%25_").await;
    assert_eq!((total, ids(&body)), (Some(1), vec![5077]));
    let (_, total, _) = list("?q=club%205").await;
    assert_eq!(total, Some(11), "Club 5, Club 50-59");
    let (status, _, _) = list("?status=broken").await;
    assert_eq!(status, 400);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spots_view_reads_none_of_its_members() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    // A large Spot: what its settings page polls must not grow with it.
    let spot = seed_spot(&db, "Large").await;
    db.execute(
        "INSERT INTO members (spot_id, email, status)
         SELECT $1, 'm' || g || '@example.com', 'accepted' FROM generate_series(1, 50000) g",
        &[&spot],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO hubspot_sync.integrations (spot_id, status) VALUES ($1, 'failed')",
        &[&spot],
    )
    .await
    .unwrap();
    let members_read = || async {
        db.query_one(
            "SELECT (COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0))::bigint
               FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = 'members'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    // Postgres publishes a session's counts within 10 s of its last
    // statement: the window opens and closes 11 s after any activity.
    sidecar.integration(spot).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = members_read().await;
    for _ in 0..20 {
        assert_eq!(sidecar.integration(spot).await["status"], "failed");
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let read = members_read().await - before;
    assert!(
        read < 1000,
        "20 reads of a 50,000-member Spot's view read {read} member rows"
    );
    sidecar.stop().await;
}
