//! The pages in a real browser (SPEC §6): the Spot admin's HubSpot tab and
//! the operator overview, driven in headless Chromium over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them),
//! against the real sidecar, Postgres and the emulator. Each step saves a
//! screenshot into the test's directory (printed at the end); set
//! `SIDECAR_SCREENSHOTS=dir` to also copy them there (docs/ takes two).
//! The refusals (tampered, used, expired links; no CSRF token; another
//! Spot's session) are checked over plain HTTP.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

const SECOND: Duration = Duration::from_secs(1);

/// Headless Chromium behind its chromedriver; both end with the test.
struct Browser {
    client: Client,
    _driver: Process,
    dir: PathBuf,
    shots: Vec<PathBuf>,
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

impl Browser {
    async fn start(test: &str) -> Browser {
        let (Some(driver), Some(chromium)) = (
            find_program(&["chromedriver"]),
            find_program(&["chromium", "chromium-browser", "google-chrome"]),
        ) else {
            panic!(
                "the page tests need Chromium and its WebDriver: \
                 apt-get install chromium chromium-driver (.ci/run installs them)"
            );
        };
        let dir = std::env::temp_dir().join(format!(
            "hubspot-sidecar-pages-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profile")).expect("temp dir");
        let addr = free_addr();
        let port = addr.rsplit(':').next().unwrap_or_default().to_string();
        let log = std::fs::File::create(dir.join("chromedriver.log")).expect("log file");
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let driver = Process(child);
        // The flags keep Chromium off the network it cannot reach here
        // (background services, updates, sync) and run it as root.
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1100,1000",
                    format!("--user-data-dir={}", dir.join("profile").display()),
                ],
            }
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let deadline = Instant::now() + 30 * SECOND;
        let client = loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver did not start a session: {e}"),
            }
        };
        Browser {
            client,
            _driver: driver,
            dir,
            shots: Vec::new(),
        }
    }

    async fn shot(&mut self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("write screenshot");
        if let Some(out) = std::env::var_os("SIDECAR_SCREENSHOTS") {
            let out = Path::new(&out);
            let _ = std::fs::create_dir_all(out);
            let _ = std::fs::write(out.join(format!("{name}.png")), &png);
        }
        self.shots.push(path);
    }

    /// Waits until the element at `css` exists and its text contains `text`.
    async fn wait_text(&self, css: &str, text: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        let mut last = String::new();
        while Instant::now() < until {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if t.contains(text) {
                        return;
                    }
                    last = t;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = self.client.source().await.unwrap_or_default();
        panic!("{css} did not show {text:?} within {deadline:?} (last: {last:?}); page:\n{page}");
    }

    /// Clicks the button whose text is `label`.
    async fn click_button(&self, label: &str) {
        let xpath = format!("//button[normalize-space()='{label}']");
        self.client
            .wait()
            .at_most(10 * SECOND)
            .for_element(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("no button {label:?}: {e}"))
            .click()
            .await
            .expect("click");
    }

    async fn buttons(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in self
            .client
            .find_all(Locator::Css("button"))
            .await
            .unwrap_or_default()
        {
            if b.is_displayed().await.unwrap_or(false) {
                out.push(b.text().await.unwrap_or_default());
            }
        }
        out
    }

    async fn end(self) -> Vec<PathBuf> {
        let _ = self.client.close().await;
        for s in &self.shots {
            eprintln!("screenshot: {}", s.display());
        }
        self.shots
    }
}

/// `POST ui-link` for the Spot: the URL MeltingSpot's web app sends the admin to.
async fn settings_link(sidecar: &Sidecar, db: &tokio_postgres::Client, spot: i64) -> String {
    let admin = spot_admin(db, spot).await;
    let (status, body) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot}/hubspot/ui-link"),
            Some(serde_json::json!({"member_id": admin})),
        )
        .await;
    assert_eq!(status, 200, "ui-link answered {body}");
    body["url"].as_str().expect("url").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_admin_connects_turns_members_on_repairs_a_failure_and_disconnects() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, "Growth Club").await;
    let (portal, _) = emu.create_portal();
    emu.set_next_grant_portal(Some(portal));
    let mut browser = Browser::start("spot-admin").await;

    // The link opens the page with a session for this Spot.
    browser
        .client
        .goto(&settings_link(&sidecar, &db, spot).await)
        .await
        .unwrap();
    browser.wait_text("#status", "Inactive", 10 * SECOND).await;
    assert!(browser
        .buttons()
        .await
        .contains(&"Connect to HubSpot".to_string()));
    let url_now = browser.client.current_url().await.unwrap();
    assert_eq!(url_now.path(), format!("/settings/spots/{spot}"));
    browser.shot("settings-inactive").await;

    // Connect: HubSpot's page opens in a popup, which closes on its own;
    // the page behind it shows the new status without a manual reload.
    browser.click_button("Connect to HubSpot").await;
    browser.wait_text("#status", "Active", 20 * SECOND).await;
    assert_eq!(
        sidecar.integration(spot).await["portal_id"],
        portal as i64,
        "connected to the granted portal"
    );
    wait_for("initialization", 30 * SECOND, || async {
        emu.properties(portal).len() >= 10
    })
    .await;

    // Members on: a member who becomes accepted shows up in the timeline.
    browser
        .client
        .find(Locator::Css("#members"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_text("#message", "Members is on.", 10 * SECOND)
        .await;
    assert_eq!(
        sidecar.integration(spot).await["activities"]["members"],
        true
    );
    let (_, trail) = sidecar
        .api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot}/hubspot/events?limit=1"),
            None,
        )
        .await;
    assert_eq!(
        trail["events"][0]["source"], "settings_page",
        "the audit trail says where the change came from: {trail}"
    );
    browser.client.refresh().await.unwrap();
    browser.wait_text("#status", "Active", 10 * SECOND).await;
    browser.shot("settings-active").await;
    let contact = emu.add_contact(portal, "ada@example.com", &[]);
    let member = seed_member(&db, spot, "ada@example.com", "invited").await;
    db.execute(
        "UPDATE members SET status = 'accepted', registered_at = now() WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the joined event in the timeline", 30 * SECOND, || async {
        emu.timeline_events(portal)
            .iter()
            .any(|e| e.object_id == contact && e.event_type.contains("joined"))
    })
    .await;

    // HubSpot revokes the app: after the next change the page says Failed.
    emu.revoke_portal(portal);
    db.execute(
        "UPDATE members SET headline = 'After the revocation' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    browser.wait_text("#status", "Failed", 60 * SECOND).await;
    browser
        .wait_text(".problem", "stopped working", 5 * SECOND)
        .await;
    let buttons = browser.buttons().await;
    assert!(
        buttons.contains(&"Reconnect HubSpot".to_string()),
        "{buttons:?}"
    );
    browser.shot("settings-failed").await;

    // Reconnect through HubSpot again: Active, and the change made while
    // failed reaches the contact.
    browser.click_button("Reconnect HubSpot").await;
    browser.wait_text("#status", "Active", 20 * SECOND).await;
    wait_for("the kept change delivered", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref()
            == Some("After the revocation")
    })
    .await;

    // Disconnect asks first; Confirm makes it Inactive.
    browser.click_button("Disconnect HubSpot").await;
    let dialog = browser
        .client
        .find(Locator::Css("#confirm-disconnect"))
        .await
        .unwrap();
    assert!(dialog.is_displayed().await.unwrap(), "the dialog is open");
    let focused = browser
        .client
        .execute("return document.activeElement.textContent", vec![])
        .await
        .unwrap();
    assert_eq!(focused, "Cancel", "the focus is in the dialog");
    browser.shot("settings-confirm-disconnect").await;
    browser.click_button("Confirm").await;
    browser.wait_text("#status", "Inactive", 10 * SECOND).await;
    assert!(browser
        .buttons()
        .await
        .contains(&"Connect to HubSpot".to_string()));
    assert_eq!(sidecar.integration(spot).await["status"], "inactive");
    browser.shot("settings-disconnected").await;
    browser.end().await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_signs_in_and_sees_every_spot() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(config(&url, &name, &emu.base_url())).await;
    let mut spots = Vec::new();
    for spot_name in ["Growth Club", "Design Guild"] {
        let spot = seed_spot(&db, spot_name).await;
        let (portal, token) = emu.create_portal();
        let email = format!("member{spot}@example.com");
        emu.add_contact(portal, &email, &[]);
        seed_member(&db, spot, &email, "accepted").await;
        sidecar.connect_with_token(spot, &token).await;
        spots.push(spot);
    }
    // A member HubSpot refuses to create becomes a dead letter of the first Spot.
    let (status, body) = sidecar
        .api(
            reqwest::Method::PATCH,
            &format!("/api/spots/{}/hubspot/settings", spots[0]),
            Some(serde_json::json!({"create_contacts": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    db.execute(
        "INSERT INTO members (spot_id, email, status) VALUES ($1, 'broken at example', 'accepted')",
        &[&spots[0]],
    )
    .await
    .unwrap();
    wait_for("the dead letter", 30 * SECOND, || async {
        sidecar.integration(spots[0]).await["dead_letters"] == 1
    })
    .await;
    let mut browser = Browser::start("operator").await;
    browser.client.goto(&sidecar.url("/ui")).await.unwrap();
    let field = browser
        .client
        .find(Locator::Css("#token"))
        .await
        .expect("the login form");
    field.send_keys("not the token").await.unwrap();
    browser.click_button("Sign in").await;
    browser
        .wait_text(".problem", "not the admin token", 10 * SECOND)
        .await;
    let field = browser.client.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(ADMIN_TOKEN).await.unwrap();
    browser.click_button("Sign in").await;
    browser.wait_text("#spots", "Spot", 10 * SECOND).await;
    let rows = browser
        .client
        .find_all(Locator::Css("#spots tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "both Spots are listed");
    for ((row, spot), name) in rows.iter().zip(&spots).zip(["Growth Club", "Design Guild"]) {
        let text = row.text().await.unwrap();
        assert!(text.contains(&format!("Spot {spot} {name}")), "{text}");
        assert!(text.contains("Active"), "{text}");
    }
    browser.wait_text("#slot-state", &name, 5 * SECOND).await;
    browser.shot("operator-overview").await;

    // The filter: a part of a name, in any case, finds that Spot alone.
    browser
        .client
        .find(Locator::Css("input[name=q]"))
        .await
        .expect("the search field")
        .send_keys("design")
        .await
        .unwrap();
    browser.click_button("Show").await;
    browser
        .wait_text(".pager", "1 to 1 of 1", 10 * SECOND)
        .await;
    let rows = browser
        .client
        .find_all(Locator::Css("#spots tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "only the Spot searched for");
    assert!(rows[0].text().await.unwrap().contains("Design Guild"));
    browser.client.goto(&sidecar.url("/ui")).await.unwrap();
    browser
        .wait_text(".pager", "1 to 2 of 2", 10 * SECOND)
        .await;

    // A Spot's page: its facts, dead letters and audit trail.
    browser
        .client
        .find(Locator::LinkText(&format!("Spot {}", spots[0])))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait_text("h1", "Growth Club", 10 * SECOND).await;
    browser
        .wait_text("#audit-title", "audit trail", 5 * SECOND)
        .await;
    let source = browser.client.source().await.unwrap();
    assert!(
        source.contains("connected"),
        "the audit trail lists the connect"
    );

    // Reconcile from the page: the converged Spot has no drift.
    sidecar.wait_backlog_empty(spots[0], "properties").await;
    browser.click_button("Reconcile").await;
    browser
        .wait_text(
            "#reconcile-summary",
            "1 contacts checked, 0 drifted",
            20 * SECOND,
        )
        .await;
    browser
        .wait_text("#dead-letter-table tbody", "INVALID_EMAIL", 5 * SECOND)
        .await;
    browser.shot("operator-spot").await;

    // Retry the dead letter: it is queued again (and refused again).
    browser.click_button("Retry").await;
    browser
        .wait_text(".outcome", "1 dead letter(s) queued again", 10 * SECOND)
        .await;
    browser.end().await;
    sidecar.stop().await;
}

/// A browser without a browser: a cookie jar and no redirects followed.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Opens a settings link: the 303 and its Set-Cookie land in the jar.
async fn open_link(client: &reqwest::Client, link: &str) -> u16 {
    client.get(link).send().await.unwrap().status().as_u16()
}

/// The CSRF token the page carries.
async fn page_csrf(client: &reqwest::Client, page: &str) -> String {
    let html = client.get(page).send().await.unwrap().text().await.unwrap();
    page_csrf_token(&html)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_used_expired_links_forged_requests_and_other_spots_are_refused() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let mine = seed_spot(&db, "Mine").await;
    let theirs = seed_spot(&db, "Theirs").await;
    let (_, token) = emu.create_portal();
    sidecar.connect_with_token(mine, &token).await;
    let (_, token) = emu.create_portal();
    sidecar.connect_with_token(theirs, &token).await;

    // Without the admin token there is no link.
    let resp = reqwest::Client::new()
        .post(sidecar.url(&format!("/api/spots/{mine}/hubspot/ui-link")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // A tampered link (another Spot's id under the same signature) opens nothing.
    let link = settings_link(&sidecar, &db, mine).await;
    let tampered = link.replacen(&format!("link={mine}."), &format!("link={theirs}."), 1);
    assert_ne!(tampered, link);
    let browser = http_client();
    assert_eq!(open_link(&browser, &tampered).await, 403);
    let page = sidecar.url(&format!("/settings/spots/{theirs}"));
    assert_eq!(browser.get(&page).send().await.unwrap().status(), 403);

    // The genuine link opens the page once.
    assert_eq!(open_link(&browser, &link).await, 303);
    let page = sidecar.url(&format!("/settings/spots/{mine}"));
    assert_eq!(browser.get(&page).send().await.unwrap().status(), 200);
    assert_eq!(open_link(&http_client(), &link).await, 403, "used once");

    // An expired link opens nothing.
    let stale = settings_link(&sidecar, &db, mine).await;
    db.execute(
        "UPDATE hubspot_sync.one_time_tokens SET expires_at = now() - interval '1 second'
          WHERE purpose = 'settings_link' AND used_at IS NULL",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(open_link(&http_client(), &stale).await, 403, "expired");

    // A change without the CSRF token, or with another session's, changes nothing.
    let csrf = page_csrf(&browser, &page).await;
    let change = |csrf: Option<String>, spot: i64| {
        let mut req = browser
            .post(sidecar.url(&format!("/settings/spots/{spot}/settings")))
            .json(&serde_json::json!({"create_contacts": true}));
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        req.send()
    };
    assert_eq!(change(None, mine).await.unwrap().status(), 403);
    assert_eq!(
        change(Some("forged".into()), mine).await.unwrap().status(),
        403
    );
    let other = http_client();
    let their_link = settings_link(&sidecar, &db, theirs).await;
    assert_eq!(open_link(&other, &their_link).await, 303);
    let their_csrf = page_csrf(&other, &sidecar.url(&format!("/settings/spots/{theirs}"))).await;
    assert_eq!(
        change(Some(their_csrf), mine).await.unwrap().status(),
        403,
        "another session's token"
    );
    // This Spot's session cannot act on another Spot, even with its own token.
    assert_eq!(
        change(Some(csrf.clone()), theirs).await.unwrap().status(),
        403,
        "another Spot"
    );
    for spot in [mine, theirs] {
        assert_eq!(
            sidecar.integration(spot).await["create_contacts"],
            false,
            "nothing changed for Spot {spot}"
        );
    }
    let resp = browser
        .post(sidecar.url(&format!("/settings/spots/{mine}/disconnect")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(sidecar.integration(mine).await["status"], "active");

    // With its token the same request goes through.
    assert_eq!(change(Some(csrf), mine).await.unwrap().status(), 200);
    assert_eq!(sidecar.integration(mine).await["create_contacts"], true);

    // The session cookie is HttpOnly and SameSite=Lax.
    let resp = http_client()
        .get(settings_link(&sidecar, &db, mine).await)
        .send()
        .await
        .unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );

    // The operator pages need a session too, and their actions the token.
    let op = http_client();
    assert_eq!(
        op.get(sidecar.url("/ui")).send().await.unwrap().status(),
        401
    );
    let resp = op
        .post(sidecar.url("/ui/login"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let resp = op
        .post(sidecar.url(&format!("/ui/spots/{mine}/disconnect")))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(sidecar.integration(mine).await["status"], "active");
    sidecar.stop().await;
}

/// Markup typed into every place a page shows text from the database.
const HOSTILE: &str = r#""><img src=x onerror=alert(1)>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_shown_as_text_on_both_pages() {
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let sidecar = Sidecar::start(oauth_config(&url, &name, &emu)).await;
    let spot = seed_spot(&db, HOSTILE).await;
    let (portal, token) = emu.create_portal();
    sidecar.connect_with_token(spot, &token).await;
    // A dead letter whose reason and e-mail, an audit entry whose detail,
    // and a suppressed e-mail: all the markup.
    db.execute(
        "INSERT INTO hubspot_sync.dead_letters (spot_id, member_id, kind, payload, reason)
         VALUES ($1, 1, 'contact_properties', jsonb_build_object('email', $2::text), $2)",
        &[&spot, &HOSTILE],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO hubspot_sync.integration_events (spot_id, kind, source, detail)
         VALUES ($1, 'failed', 'delivery', $2)",
        &[&spot, &HOSTILE],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO hubspot_sync.suppressions (portal_id, email, reason) VALUES ($1, $2, 'privacy_deletion')",
        &[&(portal as i64), &HOSTILE],
    )
    .await
    .unwrap();
    seed_member(&db, spot, HOSTILE, "accepted").await;

    let mut browser = Browser::start("hostile-text").await;
    browser.client.goto(&sidecar.url("/ui")).await.unwrap();
    let field = browser.client.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(ADMIN_TOKEN).await.unwrap();
    browser.click_button("Sign in").await;
    browser.wait_text("#spots", "Spot", 10 * SECOND).await;
    let injected = |b: &Browser| {
        let client = b.client.clone();
        async move {
            client
                .find_all(Locator::Css("img"))
                .await
                .map(|v| v.len())
                .unwrap_or(0)
        }
    };
    let text = |b: &Browser| {
        let client = b.client.clone();
        async move {
            client
                .find(Locator::Css("body"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(injected(&browser).await, 0, "the overview");
    assert!(
        text(&browser).await.contains(HOSTILE),
        "the Spot's name, as text"
    );

    browser
        .client
        .goto(&sidecar.url(&format!("/ui/spots/{spot}")))
        .await
        .unwrap();
    browser.wait_text("h1", "Spot", 10 * SECOND).await;
    assert_eq!(injected(&browser).await, 0, "the Spot's operator page");
    let body = text(&browser).await;
    // Name, dead-letter reason and e-mail, audit detail, suppressed e-mail.
    assert!(body.matches(HOSTILE).count() >= 5, "{body}");
    browser.shot("hostile-operator").await;

    browser
        .client
        .goto(&settings_link(&sidecar, &db, spot).await)
        .await
        .unwrap();
    browser.wait_text("h1", "HubSpot", 10 * SECOND).await;
    assert_eq!(injected(&browser).await, 0, "the settings page");
    assert!(
        text(&browser).await.contains(HOSTILE),
        "the Spot's name, as text"
    );
    browser.end().await;
    sidecar.stop().await;
}
