//! `hubspot-sidecar demo` (SPEC §7): a throwaway Postgres with logical
//! replication, the HubSpot emulator in-process, a seeded Spot, realistic
//! member activity with live progress, and a summary. Ctrl-C or `--duration`
//! ends it; the cluster's directory and processes are removed on the way out.

use std::time::{Duration, Instant};

use anyhow::Context;
use hubspot_emulator::{Emulator, EmulatorConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::deliver::derive;
use crate::hubspot::properties::normalize_email;
use crate::pg_cluster::PgCluster;
use crate::service;
use crate::store;

/// Flags of `hubspot-sidecar demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long to drive activity, in seconds.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Members in the seeded Spot.
    #[arg(long, default_value_t = 300)]
    pub members: u32,
    /// Changes per second to drive.
    #[arg(long, default_value_t = 40)]
    pub rate: u32,
    /// Open the settings page and the operator overview in a browser, if one is installed.
    #[arg(long)]
    pub open: bool,
    /// After the summary, keep everything serving until Ctrl-C, to click through the pages.
    #[arg(long)]
    pub keep_running: bool,
}

const STATUSES: [&str; 6] = [
    "invited",
    "accepted",
    "pending",
    "left",
    "declined",
    "deactivated",
];

/// Runs the demo end to end: cluster, emulator, seeded Spot, live activity and a summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // The demo prints its own progress; logs only for problems (RUST_LOG overrides).
    crate::init_logging(LogFormat::Text, "warn");
    println!(
        "hubspot-sidecar demo: {} members, {} changes/s for {} s",
        args.members, args.rate, args.duration
    );
    println!("• starting a throwaway PostgreSQL with wal_level=logical …");
    let cluster = PgCluster::start()
        .await
        .context("starting the throwaway Postgres")?;
    let url = cluster.create_meltingspot_db("meltingspot").await?;
    let pool = store::Db::new(&crate::config::DatabaseConfig::from_url(&url)?)?;
    let db = pool.client().await?;
    println!("• starting the HubSpot emulator …");
    let emu = Emulator::start(EmulatorConfig::default()).await?;
    let (portal, _service_key) = emu.create_portal();

    let spot = seed(&db, &emu, portal, args.members).await?;
    println!(
        "• seeded Spot {spot} \"Growth Club\" with {} members; {} of them already have a HubSpot contact",
        args.members,
        emu.contacts(portal).len()
    );

    let cfg = demo_config(&url, &emu.base_url())?;
    let admin = cfg.admin_token.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let sidecar = tokio::spawn(service::run(cfg, stop_rx, Some(started_tx)));
    let running = started_rx.await.context("the sidecar failed to start")?;
    // It listens first, then takes the leadership, migrates and streams.
    let until = Instant::now() + Duration::from_secs(60);
    while !running.ready() {
        anyhow::ensure!(
            !sidecar.is_finished() && Instant::now() < until,
            "the sidecar did not become ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = format!("http://{}", running.listen_addr);
    let http = reqwest::Client::new();

    // The real OAuth flow: the admin API hands out the authorize URL, the
    // "browser" follows it to the emulator, which redirects to our callback.
    emu.set_next_grant_portal(Some(portal));
    let resp = http
        .post(format!("{api}/api/spots/{spot}/hubspot/connect"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "connect failed: {}",
        resp.text().await?
    );
    let authorize: serde_json::Value = resp.json().await?;
    let authorize = authorize["authorize_url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let page = browse_oauth(&authorize).await?;
    anyhow::ensure!(
        page.status().is_success(),
        "the OAuth callback answered {}",
        page.status()
    );
    println!("• connected the Spot to HubSpot portal {portal} through OAuth ({api}/oauth/hubspot/callback)");
    let resp = http
        .patch(format!("{api}/api/spots/{spot}/hubspot/settings"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"create_contacts": true, "activities": {
            "members": true, "lives": true, "discussions": true, "collections": true, "courses": true}}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "settings failed: {}",
        resp.text().await?
    );
    println!("• turned on contact creation and every activity category");
    // The Spot admin the settings page is opened for (the seed has some).
    let spot_admin: i64 = db
        .query_one(
            "SELECT id FROM members WHERE spot_id = $1 AND role = 'admin' AND status = 'accepted'
              ORDER BY id LIMIT 1",
            &[&spot],
        )
        .await?
        .get(0);
    let links = page_links(&http, &api, &admin, spot, spot_admin).await?;
    if args.open {
        for link in [&links.settings, &links.overview] {
            open_in_browser(link);
        }
    }

    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let mut changes = 0u64;
    let mut ticker =
        tokio::time::interval(Duration::from_millis(1000 / u64::from(args.rate.max(1))));
    let mut last_report = Instant::now();
    let interrupted = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break true,
            _ = ticker.tick() => {}
        }
        if started.elapsed() >= Duration::from_secs(args.duration) {
            break false;
        }
        change(&db, spot, args.members, &mut rng).await?;
        changes += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(started, changes, &emu, portal, &running.metrics);
        }
    };

    if !interrupted {
        println!("• activity stopped; waiting for the backlog to drain …");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if store::backlog_size(&db).await? == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress(started, changes, &emu, portal, &running.metrics);
        summary(
            &db,
            &emu,
            portal,
            spot,
            changes,
            running.metrics.contacts_written.get(),
        )
        .await?;
    } else {
        println!("• interrupted");
    }
    if args.keep_running && !interrupted {
        // The link printed earlier may be used or expired by now: a fresh one.
        let links = page_links(&http, &api, &admin, spot, spot_admin).await?;
        println!("• still serving the pages; Ctrl-C ends the demo");
        println!(
            "  settings page (opens once, within 10 min): {}",
            links.settings
        );
        println!("  operator overview: {}", links.overview);
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(true);
    let _ = sidecar.await;
    emu.shutdown().await;
    drop(cluster);
    println!("• stopped; the throwaway Postgres and its files are gone");
    Ok(())
}

/// The demo's two pages: the Spot's settings (a one-time link) and the operator overview.
struct PageLinks {
    settings: String,
    overview: String,
}

/// Follows a connect's URL as a browser would: the sidecar's start (which
/// sets the cookie binding the authorization to this browser), HubSpot's
/// authorize page (the emulator approves at once), then the callback with
/// that cookie. By hand rather than with a cookie jar, which the service
/// itself never needs.
async fn browse_oauth(start: &str) -> anyhow::Result<reqwest::Response> {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let location = |r: &reqwest::Response| {
        r.headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow::anyhow!("{} answered {} without a redirect", r.url(), r.status())
            })
    };
    let started = browser.get(start).send().await?;
    let cookie = started
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_string();
    let approved = browser.get(location(&started)?).send().await?;
    Ok(browser
        .get(location(&approved)?)
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await?)
}

/// Asks the admin API for the settings page's link, as MeltingSpot's web
/// app would, and prints both pages' addresses.
async fn page_links(
    http: &reqwest::Client,
    api: &str,
    admin: &str,
    spot: i64,
    spot_admin: i64,
) -> anyhow::Result<PageLinks> {
    let resp = http
        .post(format!("{api}/api/spots/{spot}/hubspot/ui-link"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"member_id": spot_admin}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "ui-link failed: {}",
        resp.text().await?
    );
    let body: serde_json::Value = resp.json().await?;
    let links = PageLinks {
        settings: body["url"].as_str().unwrap_or_default().to_string(),
        overview: format!("{api}/ui"),
    };
    println!(
        "• the Spot's HubSpot tab (this link opens once, within 10 min): {}",
        links.settings
    );
    println!(
        "• the operator overview: {} (sign in with the admin token {admin})",
        links.overview
    );
    Ok(links)
}

/// Opens `url` with the desktop's browser, if there is one; says so if not.
fn open_in_browser(url: &str) {
    let opener = std::env::var("BROWSER").ok().filter(|b| !b.is_empty());
    let candidates: Vec<String> = opener
        .into_iter()
        .chain(["xdg-open", "open"].map(String::from))
        .collect();
    for program in &candidates {
        let started = std::process::Command::new(program)
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if started.is_ok() {
            return;
        }
    }
    println!("  (no browser found: set BROWSER, or open the link yourself)");
}

fn demo_config(url: &str, hubspot: &str) -> anyhow::Result<Config> {
    // The redirect URI must be known before the sidecar starts: choose the port now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = Config::local(
        url,
        "hubspot_sidecar",
        hubspot,
        &hex::encode(rand::random::<[u8; 16]>()),
        rand::random(),
    )?;
    let app = EmulatorConfig::default();
    cfg.listen = format!("127.0.0.1:{port}");
    cfg.public_url = format!("http://127.0.0.1:{port}");
    cfg.hubspot.client_id = Some(app.client_id);
    cfg.hubspot.client_secret = Some(app.client_secret);
    Ok(cfg)
}

async fn seed(
    db: &tokio_postgres::Client,
    emu: &Emulator,
    portal: u64,
    members: u32,
) -> anyhow::Result<i64> {
    let spot: i64 = db
        .query_one(
            "INSERT INTO spots (name, slug) VALUES ('Growth Club', 'growth-club') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    db.batch_execute(&format!(
        "INSERT INTO custom_roles (spot_id, name) VALUES ({spot}, 'Ambassador'), ({spot}, 'Mentor');
         INSERT INTO groups (spot_id, name) SELECT {spot}, n FROM unnest(ARRAY['Founders','Product','Growth','Design','Sales']) n;
         INSERT INTO tags (spot_id, name) SELECT {spot}, n FROM unnest(ARRAY['vip','speaker','early-adopter','partner']) n;
         INSERT INTO lives (spot_id, title, starts_at) VALUES ({spot}, 'Community kickoff', now()), ({spot}, 'Growth AMA', now() + interval '1 day');
         INSERT INTO topics (spot_id, author_member_id, title) VALUES ({spot}, NULL, 'What should we build next?'), ({spot}, NULL, 'Introduce yourself');
         INSERT INTO documents (spot_id, kind, title, url) VALUES
             ({spot}, 'page', 'Community guidelines', 'https://example.com/guidelines'),
             ({spot}, 'link', 'Growth playbook', 'https://example.com/playbook'),
             ({spot}, 'file', 'Brand kit', 'https://example.com/brand.zip');
         INSERT INTO courses (spot_id, title) VALUES ({spot}, 'Onboarding 101'), ({spot}, 'Advanced growth');
         INSERT INTO members (spot_id, email, first_name, last_name, status, role, invited_at, registered_at)
              SELECT {spot}, 'member' || g || '@example.com', 'First' || g, 'Last' || g,
                     (ARRAY['invited','accepted','pending','left','declined','deactivated'])[1 + g % 6],
                     CASE WHEN g % 25 = 0 THEN 'admin' ELSE 'member' END,
                     now() - interval '30 days', CASE WHEN g % 6 = 1 THEN now() - interval '20 days' END
                FROM generate_series(1, {members}) g;"
    ))
    .await?;
    // Most members are already known to the CRM; the rest have no contact and must get none.
    for g in 1..=members {
        if g % 10 < 7 {
            emu.add_contact(portal, &format!("member{g}@example.com"), &[]);
        }
    }
    Ok(spot)
}

/// One realistic change to the Spot.
async fn change(
    db: &tokio_postgres::Client,
    spot: i64,
    members: u32,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let email = format!("member{}@example.com", rng.gen_range(1..=members));
    let member = "(SELECT id FROM members WHERE spot_id = $1 AND email = $2)";
    let pick = |table: &str| {
        format!("(SELECT id FROM {table} WHERE spot_id = $1 ORDER BY random() LIMIT 1)")
    };
    match rng.gen_range(0..100) {
        0..=19 => {
            let headline = format!("Headline #{}", rng.gen_range(0..10_000));
            db.execute(
                "UPDATE members SET headline = $3, updated_at = now() WHERE spot_id = $1 AND email = $2",
                &[&spot, &email, &headline],
            )
            .await?;
        }
        20..=27 => {
            let status = STATUSES[rng.gen_range(0..STATUSES.len())];
            db.execute(
                "UPDATE members SET status = $3, updated_at = now() WHERE spot_id = $1 AND email = $2",
                &[&spot, &email, &status],
            )
            .await?;
        }
        28..=37 => {
            db.execute(
                &format!("INSERT INTO group_members (group_id, member_id) SELECT {}, {member} ON CONFLICT DO NOTHING", pick("groups")),
                &[&spot, &email],
            )
            .await?;
        }
        38..=42 => {
            db.execute(
                &format!("DELETE FROM group_members WHERE member_id = {member}"),
                &[&spot, &email],
            )
            .await?;
        }
        43..=49 => {
            db.execute(
                &format!("INSERT INTO member_tags (member_id, tag_id) SELECT {member}, {} ON CONFLICT DO NOTHING", pick("tags")),
                &[&spot, &email],
            )
            .await?;
        }
        50..=54 => {
            // A newcomer: with contact creation on, it gets a contact, then its activities.
            let n: u32 = rng.gen_range(0..1_000_000);
            let status = if rng.gen_bool(0.7) {
                "accepted"
            } else {
                "pending"
            };
            db.execute(
                "INSERT INTO members (spot_id, email, first_name, last_name, status, registered_at)
                 VALUES ($1, $2, 'New', 'Member', $3, now()) ON CONFLICT DO NOTHING",
                &[&spot, &format!("newcomer{n}@example.com"), &status],
            )
            .await?;
        }
        55..=64 => {
            db.execute(
                &format!(
                    "INSERT INTO live_registrations (live_id, member_id) SELECT {}, {member}",
                    pick("lives")
                ),
                &[&spot, &email],
            )
            .await?;
        }
        65..=69 => {
            db.execute(
                &format!("UPDATE live_registrations SET attended_at = now() WHERE attended_at IS NULL AND member_id = {member}"),
                &[&spot, &email],
            )
            .await?;
        }
        70..=74 => {
            db.execute(
                &format!(
                    "INSERT INTO replay_views (live_id, member_id) SELECT {}, {member}",
                    pick("lives")
                ),
                &[&spot, &email],
            )
            .await?;
        }
        75..=79 => {
            db.execute(
                &format!(
                    "INSERT INTO topic_votes (topic_id, member_id) SELECT {}, {member}",
                    pick("topics")
                ),
                &[&spot, &email],
            )
            .await?;
        }
        80..=81 => {
            let title = format!("Question #{}", rng.gen_range(0..10_000));
            db.execute(
                &format!(
                    "INSERT INTO topics (spot_id, author_member_id, title) SELECT $1, {member}, $3"
                ),
                &[&spot, &email, &title],
            )
            .await?;
        }
        82..=89 => {
            db.execute(
                &format!(
                    "INSERT INTO document_opens (document_id, member_id) SELECT {}, {member}",
                    pick("documents")
                ),
                &[&spot, &email],
            )
            .await?;
        }
        90..=95 => {
            db.execute(
                &format!(
                    "INSERT INTO course_progress (course_id, member_id, started_at) SELECT {}, {member}, now()",
                    pick("courses")
                ),
                &[&spot, &email],
            )
            .await?;
        }
        96..=97 => {
            db.execute(
                &format!("UPDATE course_progress SET completed_at = now() WHERE completed_at IS NULL AND member_id = {member}"),
                &[&spot, &email],
            )
            .await?;
        }
        _ => {
            // A rename fans out to every member of the group.
            let n = rng.gen_range(1..1000);
            db.execute(
                "UPDATE groups SET name = regexp_replace(name, ' v[0-9]+$', '') || ' v' || $2::text
                  WHERE id = (SELECT id FROM groups WHERE spot_id = $1 ORDER BY random() LIMIT 1)",
                &[&spot, &n.to_string()],
            )
            .await?;
        }
    }
    Ok(())
}

fn progress(
    started: Instant,
    changes: u64,
    emu: &Emulator,
    portal: u64,
    metrics: &crate::metrics::Metrics,
) {
    let stats = emu.request_stats(portal);
    println!(
        "  t={:>3}s  changes={:<6} transactions={:<6} hubspot calls={:<5} (429s {})  contact writes={:<6} backlog={:<4} lag={} B",
        started.elapsed().as_secs(),
        changes,
        metrics.transactions.get(),
        stats.total,
        stats.rate_limited,
        metrics.contacts_written.get(),
        metrics.backlog_items.with_label_values(&["properties"]).get(),
        metrics.replication_lag_bytes.get(),
    );
}

async fn summary(
    db: &store::Conn,
    emu: &Emulator,
    portal: u64,
    spot: i64,
    changes: u64,
    contact_writes: u64,
) -> anyhow::Result<()> {
    let ids: Vec<i64> = db
        .query("SELECT id FROM members WHERE spot_id = $1", &[&spot])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let records = store::member_records(db, &ids).await?;
    let (mut with_contact, mut converged) = (0, 0);
    for r in &records {
        let Some(contact) = emu.contact_by_email(portal, &normalize_email(&r.email)) else {
            continue;
        };
        with_contact += 1;
        let (want, _) = derive(r);
        let touched = contact.properties.contains_key("meltingspot_member_id");
        if !touched
            || want
                .iter()
                .all(|(k, v)| contact.properties.get(k) == Some(v))
        {
            converged += 1;
        }
    }
    let stats = emu.request_stats(portal);
    let calls = |op: &str| {
        stats
            .by_operation
            .get(op)
            .map(|s| s.values().sum::<u64>())
            .unwrap_or(0)
    };
    let updated: Vec<_> = emu
        .contacts(portal)
        .into_iter()
        .filter(|c| c.properties.contains_key("meltingspot_member_id"))
        .collect();
    let writes = calls("contacts.batch_update");
    println!("\nSummary");
    println!("  changes committed              {changes}");
    println!(
        "  contacts updated               {} (of {with_contact} members with a contact)",
        updated.len()
    );
    println!(
        "  contacts created               {} (contact creation is on for members who joined during the demo)",
        emu.contacts(portal).iter().filter(|c| c.created_by != hubspot_emulator::CreatedBy::Seed).count()
    );
    println!("  contacts matching the database {converged} of {with_contact}");
    println!(
        "  HubSpot calls                  {} in all; 429s: {}; peak in any 10 s: {} (limit 100)",
        stats.total, stats.rate_limited, stats.peak_in_10s
    );
    for op in stats.by_operation.keys() {
        println!("    {op:<28} {}", calls(op));
    }
    println!(
        "  contact writes                 {} in {writes} batch updates ({:.1} per call; the minimum, with every write in a full batch of 100, is {} calls)",
        contact_writes,
        contact_writes as f64 / writes.max(1) as f64,
        contact_writes.div_ceil(100),
    );
    let events = emu.timeline_events(portal);
    let mut by_type: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for e in &events {
        *by_type.entry(e.event_type.as_str()).or_default() += 1;
    }
    println!("  timeline events                {} in all", events.len());
    for (t, n) in &by_type {
        println!("    {t:<28} {n}");
    }
    // The contact with the most MeltingSpot values makes the best example.
    if let Some(c) = updated.iter().max_by_key(|c| {
        c.properties
            .iter()
            .filter(|(k, v)| k.starts_with("meltingspot_") && !v.is_empty())
            .count()
    }) {
        println!(
            "  one contact ({}):",
            c.properties.get("email").cloned().unwrap_or_default()
        );
        for (k, v) in c
            .properties
            .iter()
            .filter(|(k, _)| k.starts_with("meltingspot_"))
        {
            println!("    {k:<36} {v}");
        }
    }
    // The busiest timeline.
    let mut per_contact: std::collections::HashMap<&str, Vec<&hubspot_emulator::TimelineEvent>> =
        Default::default();
    for e in &events {
        per_contact.entry(e.object_id.as_str()).or_default().push(e);
    }
    if let Some((id, mut timeline)) = per_contact.into_iter().max_by_key(|(_, v)| v.len()) {
        timeline.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        let email = emu
            .contacts(portal)
            .into_iter()
            .find(|c| c.id == id)
            .and_then(|c| c.properties.get("email").cloned())
            .unwrap_or_default();
        println!("  one contact's timeline ({email}):");
        for e in timeline {
            let title = e.properties.get("title").map(String::as_str).unwrap_or("");
            println!("    {}  {:<22} {title}", e.timestamp, e.event_type);
        }
    }
    Ok(())
}
