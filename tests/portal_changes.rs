//! A portal that changes under the sidecar (README, "Merges, deletions and
//! privacy deletions"): contacts merged, deleted and deleted for privacy in
//! HubSpot, learnt from signed webhooks and, without them, from HubSpot's
//! answers; and webhook requests that are not HubSpot's.

mod common;

use std::time::Duration;

use common::*;
use hubspot_emulator::{Contact, CreatedBy, Emulator, WebhookSigning};

const SECOND: Duration = Duration::from_secs(1);

/// The ten member properties (SPEC §3).
const TEN: [&str; 10] = [
    "meltingspot_member_id",
    "meltingspot_member_status",
    "meltingspot_member_role",
    "meltingspot_member_custom_role",
    "meltingspot_spot_invitation_date",
    "meltingspot_spot_registration_date",
    "meltingspot_groups",
    "meltingspot_tags",
    "meltingspot_headline",
    "meltingspot_bio",
];

fn contact(emu: &Emulator, portal: u64, id: &str) -> Option<Contact> {
    emu.contacts(portal).into_iter().find(|c| c.id == id)
}

fn value(emu: &Emulator, portal: u64, id: &str, name: &str) -> Option<String> {
    contact(emu, portal, id).and_then(|c| c.properties.get(name).cloned())
}

fn created_by_api(emu: &Emulator, portal: u64) -> Vec<String> {
    emu.contacts(portal)
        .into_iter()
        .filter(|c| c.created_by == CreatedBy::Api)
        .filter_map(|c| c.properties.get("email").cloned())
        .collect()
}

async fn patch_settings(sidecar: &Sidecar, spot: i64, body: serde_json::Value) {
    let (status, v) = sidecar
        .api(
            reqwest::Method::PATCH,
            &format!("/api/spots/{spot}/hubspot/settings"),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// Connects through OAuth to a fresh portal (the only kind HubSpot sends
/// webhooks for) and waits for the schema; returns the portal.
async fn connect_oauth(sidecar: &Sidecar, emu: &Emulator, spot: i64) -> u64 {
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    assert_eq!(oauth_connect(sidecar, spot).await.0, 200);
    wait_schema(emu, portal).await;
    portal
}

async fn wait_schema(emu: &Emulator, portal: u64) {
    wait_for("the MeltingSpot properties", 30 * SECOND, || async {
        emu.properties(portal)
            .iter()
            .filter(|p| p.group_name == "meltingspot")
            .count()
            == 10
    })
    .await;
}

/// A sidecar with the emulator's OAuth app, the emulator sending webhooks to it when asked.
async fn start(webhooks: bool) -> (Emulator, Sidecar, tokio_postgres::Client, String) {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let cfg = oauth_config(&url, &name, &emu);
    if webhooks {
        emu.set_webhook_target(Some(format!("{}/webhooks/hubspot", cfg.public_url)));
    }
    let sidecar = Sidecar::start(cfg).await;
    (emu, sidecar, db, name)
}

async fn set_headline(db: &tokio_postgres::Client, member: i64, headline: &str) {
    db.execute(
        "UPDATE members SET headline = $2 WHERE id = $1",
        &[&member, &headline],
    )
    .await
    .unwrap();
}

async fn wait_value(emu: &Emulator, portal: u64, id: &str, name: &str, want: &str) {
    wait_for(
        &format!("{name} = {want:?} on contact {id}"),
        20 * SECOND,
        || async { value(emu, portal, id, name).as_deref() == Some(want) },
    )
    .await;
}

/// Another person's contact, with values of another member on it: what a
/// merge's primary brings into the merged record.
fn seed_other(emu: &Emulator, portal: u64) -> String {
    emu.add_contact(
        portal,
        "grace@example.com",
        &[
            ("meltingspot_member_id", "999"),
            ("meltingspot_headline", "stale"),
            ("meltingspot_member_role", "admin"),
            ("meltingspot_member_status", "left"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_without_webhooks_is_followed_on_the_members_next_change() {
    let (emu, sidecar, db, _) = start(false).await;
    let spot = seed_spot(&db, "Merges").await;
    let (portal, token) = emu.create_portal();
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let grace = seed_other(&emu, portal);
    sidecar.connect_with_token(spot, &token).await;
    patch_settings(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    wait_schema(&emu, portal).await;
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    set_headline(&db, member, "first").await;
    wait_value(&emu, portal, &ada, "meltingspot_headline", "first").await;

    // A sales rep merges Ada into Grace's record (Grace's is the primary).
    let merged = emu.merge_contacts(portal, &grace, &ada);
    assert_eq!(
        value(&emu, portal, &merged, "meltingspot_headline").as_deref(),
        Some("stale")
    );
    set_headline(&db, member, "after the merge").await;

    wait_value(
        &emu,
        portal,
        &merged,
        "meltingspot_headline",
        "after the merge",
    )
    .await;
    let record = contact(&emu, portal, &merged).expect("the merged record");
    for name in TEN {
        assert!(
            record.properties.contains_key(name),
            "{name} on the merged record"
        );
    }
    assert_eq!(
        record.properties["meltingspot_member_id"],
        member.to_string()
    );
    assert_eq!(record.properties["meltingspot_member_status"], "accepted");
    assert_eq!(record.properties["meltingspot_member_role"], "member");
    assert!(
        created_by_api(&emu, portal).is_empty(),
        "no contact created"
    );
    assert_eq!(emu.contacts(portal).len(), 1, "only the merged record");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_announced_by_webhook_reaches_the_merged_record_without_a_change() {
    let (emu, sidecar, db, _) = start(true).await;
    let spot = seed_spot(&db, "Webhook merges").await;
    let portal = connect_oauth(&sidecar, &emu, spot).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let grace = seed_other(&emu, portal);
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    set_headline(&db, member, "Ada's").await;
    wait_value(&emu, portal, &ada, "meltingspot_headline", "Ada's").await;

    let merged = emu.merge_contacts(portal, &grace, &ada);
    wait_value(&emu, portal, &merged, "meltingspot_headline", "Ada's").await;
    wait_value(
        &emu,
        portal,
        &merged,
        "meltingspot_member_id",
        &member.to_string(),
    )
    .await;
    assert_eq!(
        value(&emu, portal, &merged, "meltingspot_member_role").as_deref(),
        Some("member")
    );
    let m = sidecar.running.metrics.render();
    assert!(
        m.contains("hubspot_sidecar_contacts_remapped_total{source=\"webhook\"} 1"),
        "{m}"
    );
    sidecar.stop().await;
}

/// A contact deleted in HubSpot while contact creation is on: nothing is
/// created for the member, other members keep flowing, and a contact
/// created again in HubSpot later gets the member's next change.
async fn deletion(webhooks: bool) {
    let (emu, sidecar, db, _) = start(webhooks).await;
    let spot = seed_spot(&db, "Deletions").await;
    let portal = connect_oauth(&sidecar, &emu, spot).await;
    patch_settings(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    let ada = seed_member(&db, spot, "ada@example.com", "accepted").await;
    let bob = seed_member(&db, spot, "bob@example.com", "accepted").await;
    wait_for("both contacts created", 20 * SECOND, || async {
        created_by_api(&emu, portal).len() == 2
    })
    .await;
    let ada_contact = emu
        .contact_by_email(portal, "ada@example.com")
        .expect("Ada's contact")
        .id;
    assert!(emu.delete_contact(portal, &ada_contact));
    if webhooks {
        wait_for("the deletion applied", 20 * SECOND, || async {
            sidecar
                .running
                .metrics
                .render()
                .contains("hubspot_sidecar_contacts_forgotten_total{source=\"webhook\"} 1")
        })
        .await;
    }

    set_headline(&db, ada, "after the deletion").await;
    set_headline(&db, bob, "Bob keeps flowing").await;
    wait_for("Bob's change", 20 * SECOND, || async {
        prop(&emu, portal, "bob@example.com", "meltingspot_headline").as_deref()
            == Some("Bob keeps flowing")
    })
    .await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert!(
        emu.contact_by_email(portal, "ada@example.com").is_none(),
        "nothing created for a member whose contact HubSpot deleted"
    );

    // Someone creates Ada again in HubSpot; her next change reaches it.
    let again = emu.add_contact(portal, "ada@example.com", &[]);
    set_headline(&db, ada, "found again").await;
    wait_value(&emu, portal, &again, "meltingspot_headline", "found again").await;
    assert_eq!(created_by_api(&emu, portal), vec!["bob@example.com"]);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_learnt_from_hubspots_answer_creates_nothing() {
    deletion(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_announced_by_webhook_creates_nothing() {
    deletion(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privacy_deletion_suppresses_the_email_for_a_member_who_joins_again() {
    let (emu, sidecar, db, _) = start(true).await;
    let spot = seed_spot(&db, "Privacy").await;
    let portal = connect_oauth(&sidecar, &emu, spot).await;
    patch_settings(&sidecar, spot, serde_json::json!({"create_contacts": true})).await;
    let ada = seed_member(&db, spot, "ada@example.com", "accepted").await;
    wait_for("Ada's contact created", 20 * SECOND, || async {
        emu.contact_by_email(portal, "ada@example.com").is_some()
    })
    .await;
    let contact_id = emu
        .contact_by_email(portal, "ada@example.com")
        .expect("created")
        .id;
    assert!(emu.privacy_delete_contact(portal, &contact_id));
    wait_for("the suppression", 20 * SECOND, || async {
        let (_, v) = sidecar
            .api(
                reqwest::Method::GET,
                &format!("/api/spots/{spot}/hubspot/suppressions"),
                None,
            )
            .await;
        v["suppressions"][0]["email"] == "ada@example.com"
    })
    .await;

    // Ada leaves, and joins again with the same e-mail while creation is on.
    db.execute("DELETE FROM members WHERE id = $1", &[&ada])
        .await
        .unwrap();
    let again = seed_member(&db, spot, "ada@example.com", "accepted").await;
    set_headline(&db, again, "back").await;
    let newcomer = seed_member(&db, spot, "linus@example.com", "accepted").await;
    wait_for("the newcomer's contact", 20 * SECOND, || async {
        emu.contact_by_email(portal, "linus@example.com").is_some()
    })
    .await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    assert!(
        emu.contact_by_email(portal, "ada@example.com").is_none(),
        "a privacy-deleted person is not created again"
    );
    let m = sidecar.running.metrics.render();
    assert!(
        m.contains("hubspot_sidecar_suppressions_total{action=\"recorded\"} 1"),
        "{m}"
    );

    // The operator sees it on the Spot's page, with the way to lift it.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = browser
        .post(sidecar.url("/ui/login"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 303);
    let page = browser
        .get(sidecar.url(&format!("/ui/spots/{spot}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let table = page
        .split("id=\"suppression-table\"")
        .nth(1)
        .expect("the suppressions table");
    assert!(table.contains("ada@example.com"), "{page}");
    assert!(table.contains("/suppressions/lift"), "{page}");

    // She consents again: the operator lifts the suppression (audited).
    let (status, v) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/suppressions/lift"),
            Some(serde_json::json!({"email": "Ada@Example.com"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (_, events) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events"),
            None,
        )
        .await;
    assert!(
        events.to_string().contains("suppression_lifted"),
        "{events}"
    );
    let _ = newcomer;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_requests_that_are_not_hubspots_change_nothing() {
    let (emu, sidecar, db, _) = start(false).await;
    let spot = seed_spot(&db, "Hostile").await;
    let portal = connect_oauth(&sidecar, &emu, spot).await;
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let grace = emu.add_contact(portal, "grace@example.com", &[]);
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    set_headline(&db, member, "first").await;
    wait_value(&emu, portal, &ada, "meltingspot_headline", "first").await;

    // Batches naming Ada's real contact as merged away and deleted for privacy.
    let target = sidecar.url("/webhooks/hubspot");
    let forged = serde_json::json!([
        emu.webhook_merge_event(portal, &grace, &[&ada], &grace),
        emu.webhook_event(portal, "contact.privacyDeletion", &ada),
    ]);
    for (signing, want) in [
        (WebhookSigning::Unsigned, 401),
        (WebhookSigning::WrongSecret, 401),
        (WebhookSigning::Stale(6 * 60 * SECOND), 401),
    ] {
        let status = emu.send_webhook(&target, &forged, signing).await;
        assert_eq!(status, Ok(want), "{signing:?}");
    }
    // 5 MB: refused before it is read, whatever its signature.
    let mut big = forged.to_string().into_bytes();
    big.resize(5 * 1024 * 1024, b' ');
    let status = emu
        .send_webhook_raw(&target, big, WebhookSigning::Valid)
        .await;
    assert!(matches!(status, Ok(413) | Err(_)), "{status:?}");

    set_headline(&db, member, "still Ada's own").await;
    wait_value(
        &emu,
        portal,
        &ada,
        "meltingspot_headline",
        "still Ada's own",
    )
    .await;
    assert_ne!(
        value(&emu, portal, &grace, "meltingspot_headline").as_deref(),
        Some("still Ada's own")
    );
    let (_, v) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/suppressions"),
            None,
        )
        .await;
    assert_eq!(v["suppressions"], serde_json::json!([]));
    let m = sidecar.running.metrics.render();
    for line in [
        "hubspot_sidecar_webhook_requests_total{outcome=\"unsigned\"} 1",
        "hubspot_sidecar_webhook_requests_total{outcome=\"bad_signature\"} 1",
        "hubspot_sidecar_webhook_requests_total{outcome=\"stale\"} 1",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
    assert!(!m.contains("outcome=\"accepted\""), "{m}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_fix_follows_a_merged_contact_to_the_merged_record() {
    let (emu, sidecar, db, _) = start(false).await;
    let spot = seed_spot(&db, "Reconciled merges").await;
    let (portal, token) = emu.create_portal();
    let ada = emu.add_contact(portal, "ada@example.com", &[]);
    let grace = seed_other(&emu, portal);
    sidecar.connect_with_token(spot, &token).await;
    wait_schema(&emu, portal).await;
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    set_headline(&db, member, "Ada's").await;
    wait_value(&emu, portal, &ada, "meltingspot_headline", "Ada's").await;
    let merged = emu.merge_contacts(portal, &grace, &ada);

    // No change in the database: reconcile finds the contact gone, and
    // --fix has delivery follow it to the merged record.
    let (status, _) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/reconcile"),
            Some(serde_json::json!({"fix": true})),
        )
        .await;
    assert_eq!(status, 200);
    wait_value(&emu, portal, &merged, "meltingspot_headline", "Ada's").await;
    assert_eq!(
        value(&emu, portal, &merged, "meltingspot_member_id"),
        Some(member.to_string())
    );
    assert!(
        created_by_api(&emu, portal).is_empty(),
        "no contact created"
    );
    sidecar.stop().await;
}
