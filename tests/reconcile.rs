//! `hubspot-sidecar reconcile` (SPEC §6): the binary asks the running
//! sidecar to read a Spot's contacts back from HubSpot and compare them with
//! the database. Zero drift on a converged Spot; the exact drift after a
//! value is changed in HubSpot behind the sidecar's back; `--fix` writes it
//! back.

mod common;

use std::time::Duration;

use common::*;

const SECOND: Duration = Duration::from_secs(1);

/// Runs `hubspot-sidecar reconcile` against the sidecar: exit code and stdout.
async fn reconcile(sidecar: &Sidecar, spot: i64, fix: bool) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubspot-sidecar"));
    cmd.args([
        "reconcile",
        "--spot",
        &spot.to_string(),
        "--url",
        &sidecar.url(""),
    ])
    .env("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN);
    if fix {
        cmd.arg("--fix");
    }
    let out = cmd.output().await.expect("run reconcile");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "reconcile{}: {:?}\n{stdout}{}",
        if fix { " --fix" } else { "" },
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_no_drift_then_the_exact_drift_and_fixes_it() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Reconciled").await;
    let (portal, token) = emu.create_portal();
    let emails = ["ada@example.com", "grace@example.com", "alan@example.com"];
    for email in emails {
        emu.add_contact(portal, email, &[]);
        let member = seed_member(&db, spot, email, "accepted").await;
        db.execute(
            "UPDATE members SET headline = 'Original headline' WHERE id = $1",
            &[&member],
        )
        .await
        .unwrap();
    }
    sidecar.connect_with_token(spot, &token).await;
    wait_for("every contact converged", 30 * SECOND, || async {
        emails.iter().all(|e| {
            prop(&emu, portal, e, "meltingspot_headline").as_deref() == Some("Original headline")
        })
    })
    .await;
    sidecar.wait_backlog_empty(spot, "properties").await;

    let (code, out) = reconcile(&sidecar, spot, false).await;
    assert_eq!(code, 0, "a converged Spot has no drift: {out}");
    assert!(out.contains("3 contacts checked, 0 drifted"), "{out}");

    // Someone edits a contact in HubSpot: the sidecar still believes it wrote the value.
    let grace = emu
        .contact_by_email(portal, "grace@example.com")
        .expect("grace's contact")
        .id;
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/crm/v3/objects/contacts/batch/update",
            emu.base_url()
        ))
        .bearer_auth(emu.create_service_key(portal))
        .json(&serde_json::json!({"inputs": [{"id": grace, "properties": {
            "meltingspot_headline": "Edited in HubSpot", "meltingspot_member_status": "left"}}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);

    let (code, out) = reconcile(&sidecar, spot, false).await;
    assert_eq!(code, 1, "drift exits 1: {out}");
    assert!(
        out.contains("3 contacts checked, 1 drifted (2 properties)"),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("grace@example.com"))
        .collect();
    assert_eq!(rows.len(), 2, "one row per drifted property: {out}");
    assert!(
        rows.iter().any(|r| r.contains("meltingspot_headline")
            && r.contains("Edited in HubSpot")
            && r.contains("Original headline")),
        "{out}"
    );
    assert!(
        rows.iter().any(|r| r.contains("meltingspot_member_status")
            && r.contains("left")
            && r.contains("accepted")),
        "{out}"
    );
    // Nothing was queued without --fix.
    assert_eq!(
        prop(&emu, portal, "grace@example.com", "meltingspot_headline").as_deref(),
        Some("Edited in HubSpot")
    );

    let (code, out) = reconcile(&sidecar, spot, true).await;
    assert_eq!(code, 1, "--fix still reports what drifted: {out}");
    assert!(out.contains("1 contacts queued for delivery"), "{out}");
    wait_for("the fix delivered", 30 * SECOND, || async {
        prop(&emu, portal, "grace@example.com", "meltingspot_headline").as_deref()
            == Some("Original headline")
            && prop(
                &emu,
                portal,
                "grace@example.com",
                "meltingspot_member_status",
            )
            .as_deref()
                == Some("accepted")
    })
    .await;
    sidecar.wait_backlog_empty(spot, "properties").await;
    let (code, out) = reconcile(&sidecar, spot, false).await;
    assert_eq!(code, 0, "fixed: {out}");

    // An unknown Spot, or a wrong token, is an error (exit 2), not a clean bill.
    let (code, _) = reconcile(&sidecar, spot + 100, false).await;
    assert_eq!(code, 2);
    sidecar.stop().await;
}

/// Pages read from HubSpot at once are compared in order and none is lost
/// or counted twice: 650 contacts, more pages than are read at once, drift
/// on the first page and on the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_of_many_pages_checks_every_contact_once() {
    const N: usize = 650;
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let spot = seed_spot(&db, "Many pages").await;
    let (portal, token) = emu.create_portal();
    for i in 1..=N {
        emu.add_contact(portal, &format!("m{i}@example.com"), &[]);
    }
    db.execute(
        "INSERT INTO members (spot_id, email, status, headline)
         SELECT $1, 'm' || g || '@example.com', 'accepted', 'Original headline'
           FROM generate_series(1, $2::int) g",
        &[&spot, &(N as i32)],
    )
    .await
    .unwrap();
    sidecar.connect_with_token(spot, &token).await;
    wait_headlines_converge(&db, &emu, portal, spot, 60 * SECOND).await;
    sidecar.wait_backlog_empty(spot, "properties").await;

    // Edited in HubSpot behind the sidecar's back: the first member and the last.
    for email in ["m1@example.com", &format!("m{N}@example.com")] {
        emu.add_contact(
            portal,
            email,
            &[("meltingspot_headline", "Edited in HubSpot")],
        );
    }
    let (code, out) = reconcile(&sidecar, spot, false).await;
    assert_eq!(code, 1, "drift exits 1: {out}");
    assert!(
        out.contains(&format!("{N} contacts checked, 2 drifted (2 properties)")),
        "{out}"
    );
    for email in ["m1@example.com", &format!("m{N}@example.com")] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("({email})")) && l.contains("Edited in HubSpot")),
            "{email} listed: {out}"
        );
    }
    sidecar.stop().await;
}
