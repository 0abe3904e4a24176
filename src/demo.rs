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
use crate::hubspot::properties::{derive, normalize_email};
use crate::pg_cluster::PgCluster;
use crate::service;
use crate::store;

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
}

const STATUSES: [&str; 6] = [
    "invited",
    "accepted",
    "pending",
    "left",
    "declined",
    "deactivated",
];

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
    let db = store::connect(&url).await?;
    println!("• starting the HubSpot emulator …");
    let emu = Emulator::start(EmulatorConfig::default()).await?;
    let (portal, token) = emu.create_portal();

    let spot = seed(&db, &emu, portal, args.members).await?;
    println!(
        "• seeded Spot {spot} \"Growth Club\" with {} members; {} of them already have a HubSpot contact",
        args.members,
        emu.contacts(portal).len()
    );

    let cfg = demo_config(&url, &emu.base_url());
    let admin = cfg.admin_token.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let sidecar = tokio::spawn(service::run(cfg, stop_rx, Some(started_tx)));
    let running = started_rx.await.context("the sidecar failed to start")?;
    let api = format!("http://{}", running.listen_addr);
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{api}/api/spots/{spot}/hubspot/connect"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"access_token": token}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "connect failed: {}",
        resp.text().await?
    );
    println!("• connected the Spot to HubSpot portal {portal} through the admin API ({api})");

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
    let _ = stop_tx.send(true);
    let _ = sidecar.await;
    emu.shutdown().await;
    drop(cluster);
    println!("• stopped; the throwaway Postgres and its files are gone");
    Ok(())
}

fn demo_config(url: &str, hubspot: &str) -> Config {
    Config::local(
        url,
        "hubspot_sidecar",
        hubspot,
        &hex::encode(rand::random::<[u8; 16]>()),
        rand::random(),
    )
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
    match rng.gen_range(0..100) {
        0..=34 => {
            let headline = format!("Headline #{}", rng.gen_range(0..10_000));
            db.execute(
                "UPDATE members SET headline = $1, updated_at = now() WHERE spot_id = $2 AND email = $3",
                &[&headline, &spot, &email],
            )
            .await?;
        }
        35..=49 => {
            let status = STATUSES[rng.gen_range(0..STATUSES.len())];
            db.execute(
                "UPDATE members SET status = $1, updated_at = now() WHERE spot_id = $2 AND email = $3",
                &[&status, &spot, &email],
            )
            .await?;
        }
        50..=69 => {
            db.execute(
                "INSERT INTO group_members (group_id, member_id)
                 SELECT (SELECT id FROM groups WHERE spot_id = $1 ORDER BY random() LIMIT 1), id
                   FROM members WHERE spot_id = $1 AND email = $2 ON CONFLICT DO NOTHING",
                &[&spot, &email],
            )
            .await?;
        }
        70..=79 => {
            db.execute(
                "DELETE FROM group_members WHERE member_id = (SELECT id FROM members WHERE spot_id = $1 AND email = $2)",
                &[&spot, &email],
            )
            .await?;
        }
        80..=94 => {
            db.execute(
                "INSERT INTO member_tags (member_id, tag_id)
                 SELECT id, (SELECT id FROM tags WHERE spot_id = $1 ORDER BY random() LIMIT 1)
                   FROM members WHERE spot_id = $1 AND email = $2 ON CONFLICT DO NOTHING",
                &[&spot, &email],
            )
            .await?;
        }
        95..=97 => {
            let bio = format!(
                "Writes about community building. Joined cohort {}.",
                rng.gen_range(1..40)
            );
            db.execute(
                "UPDATE members SET bio = $1 WHERE spot_id = $2 AND email = $3",
                &[&bio, &spot, &email],
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
    db: &tokio_postgres::Client,
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
        "  contacts created               {} (contact creation is off: members without a contact get none)",
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
    Ok(())
}
