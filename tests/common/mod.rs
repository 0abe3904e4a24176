//! Test harness: one throwaway Postgres cluster per test binary, a database
//! and a slot per test, the HubSpot emulator in-process, and the sidecar
//! either in-process or as a real child process (for kill -9).
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hubspot_emulator::{Emulator, EmulatorConfig};
use hubspot_sidecar::config::{Config, LogFormat};
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service::{self, Running};
use tokio::sync::{watch, OnceCell};
use tokio_postgres::Client;

/// At least 32 characters, as the start requires.
pub const ADMIN_TOKEN: &str = "test-admin-token-of-the-sidecar-tests-0123456789";
pub const SECRET_KEY: [u8; 32] = [42; 32];

static CLUSTER: OnceCell<PgCluster> = OnceCell::const_new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

pub async fn cluster() -> &'static PgCluster {
    CLUSTER
        .get_or_init(|| async {
            if std::env::var_os("TEST_LOG").is_some() {
                hubspot_sidecar::init_logging(LogFormat::Text, "info");
            }
            PgCluster::start()
                .await
                .expect("start a throwaway Postgres")
        })
        .await
}

/// A fresh database with the MeltingSpot schema and publication, and a unique name
/// (also used as the slot name).
pub async fn fresh_db() -> (String, String) {
    let c = cluster().await;
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let url = c
        .create_meltingspot_db(&name)
        .await
        .expect("create test database");
    (url, name)
}

pub async fn sql(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

pub async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig::default())
        .await
        .expect("start emulator")
}

pub fn config(db_url: &str, slot: &str, hubspot_base: &str) -> Config {
    Config::local(db_url, slot, hubspot_base, ADMIN_TOKEN, SECRET_KEY)
        .expect("a valid database URL")
}

/// An in-process sidecar.
pub struct Sidecar {
    pub running: Running,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl Sidecar {
    pub async fn start(cfg: Config) -> Sidecar {
        let (tx, rx) = watch::channel(false);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(service::run(cfg, rx, Some(started_tx)));
        let running = match started_rx.await {
            Ok(r) => r,
            Err(_) => panic!("sidecar failed to start: {:?}", task.await),
        };
        let s = Sidecar {
            running,
            shutdown: tx,
            task,
            http: reqwest::Client::new(),
        };
        let health = s.running.health.clone();
        wait_for("replication streaming", Duration::from_secs(30), || {
            let h = health.clone();
            async move { h.streaming.load(Ordering::Relaxed) }
        })
        .await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.listen_addr)
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        api_call(&self.http, &self.url(path), method, body).await
    }

    pub async fn connect_with_token(&self, spot_id: i64, token: &str) -> serde_json::Value {
        let (status, body) = self
            .api(
                reqwest::Method::POST,
                &format!("/api/spots/{spot_id}/hubspot/connect"),
                Some(serde_json::json!({"access_token": token})),
            )
            .await;
        assert_eq!(status, 200, "connect answered {body}");
        body
    }

    /// `GET /api/spots/{spot}/hubspot`.
    pub async fn integration(&self, spot_id: i64) -> serde_json::Value {
        self.api(
            reqwest::Method::GET,
            &format!("/api/spots/{spot_id}/hubspot"),
            None,
        )
        .await
        .1
    }

    /// Waits until the Spot's backlog of `kind` (properties, activities) is empty.
    pub async fn wait_backlog_empty(&self, spot_id: i64, kind: &str) {
        wait_for(
            &format!("an empty {kind} backlog"),
            Duration::from_secs(10),
            || async { self.integration(spot_id).await["backlog"][kind] == 0 },
        )
        .await;
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let r = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("sidecar stops within 15 s");
        r.expect("sidecar task").expect("sidecar exits cleanly");
    }
}

pub async fn api_call(
    http: &reqwest::Client,
    url: &str,
    method: reqwest::Method,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http.request(method, url).bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin API reachable");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Waits until `cond` holds, polling; panics with `what` at the deadline.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The slot's confirmed_flush_lsn and the server's current WAL position.
pub async fn slot_position(db: &Client, slot: &str) -> (u64, u64) {
    let row = db
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint, (pg_current_wal_lsn() - '0/0')::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot exists");
    (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
}

/// Inserts a Spot and returns its id.
pub async fn seed_spot(db: &Client, name: &str) -> i64 {
    db.query_one(
        "INSERT INTO spots (name, slug) VALUES ($1, $2) RETURNING id",
        &[&name, &name.to_lowercase().replace(' ', "-")],
    )
    .await
    .expect("insert spot")
    .get(0)
}

pub async fn seed_member(db: &Client, spot_id: i64, email: &str, status: &str) -> i64 {
    db.query_one(
        "INSERT INTO members (spot_id, email, first_name, last_name, status, invited_at)
         VALUES ($1, $2, 'Ada', 'Lovelace', $3, '2026-01-02T03:04:05.678Z') RETURNING id",
        &[&spot_id, &email, &status],
    )
    .await
    .expect("insert member")
    .get(0)
}

/// An accepted admin of the Spot (the first one, or a new one): whom a
/// settings link is for.
pub async fn spot_admin(db: &Client, spot_id: i64) -> i64 {
    if let Some(row) = db
        .query_opt(
            "SELECT id FROM members WHERE spot_id = $1 AND role = 'admin' AND status = 'accepted'
              ORDER BY id LIMIT 1",
            &[&spot_id],
        )
        .await
        .expect("read admins")
    {
        return row.get(0);
    }
    db.query_one(
        "INSERT INTO members (spot_id, email, status, role)
         VALUES ($1::bigint, 'admin-of-' || $1::bigint || '@example.com', 'accepted', 'admin') RETURNING id",
        &[&spot_id],
    )
    .await
    .expect("insert an admin")
    .get(0)
}

/// The CSRF token a page carries (its `csrf-token` meta tag).
pub fn page_csrf_token(html: &str) -> String {
    let (_, rest) = html
        .split_once("name=\"csrf-token\" content=\"")
        .expect("the page carries a CSRF token");
    rest.split('"').next().unwrap_or_default().to_string()
}

/// A contact's property, from the emulator.
pub fn prop(emu: &Emulator, portal: u64, email: &str, name: &str) -> Option<String> {
    emu.contact_by_email(portal, email)
        .and_then(|c| c.properties.get(name).cloned())
}

/// A config for OAuth: the sidecar listens on a port chosen now, so that its
/// public URL (the redirect URI) is known before it starts.
pub fn oauth_config(db_url: &str, slot: &str, emu: &Emulator) -> Config {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cfg = config(db_url, slot, &emu.base_url());
    cfg.listen = format!("127.0.0.1:{port}");
    cfg.public_url = format!("http://127.0.0.1:{port}");
    let defaults = EmulatorConfig::default();
    cfg.hubspot.client_id = Some(defaults.client_id);
    cfg.hubspot.client_secret = Some(defaults.client_secret);
    cfg.hubspot.app_id = Some(defaults.app_id.to_string());
    cfg
}

/// The whole OAuth dance as a browser would do it: connect `{}`, follow the
/// authorize URL to the emulator, which redirects to the sidecar's callback.
/// Returns the callback's status and page.
pub async fn oauth_connect(sidecar: &Sidecar, spot_id: i64) -> (u16, String) {
    let (status, body) = sidecar
        .api(
            reqwest::Method::POST,
            &format!("/api/spots/{spot_id}/hubspot/connect"),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(status, 200, "connect {{}} answered {body}");
    let authorize = body["authorize_url"]
        .as_str()
        .expect("authorize_url")
        .to_string();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let (hubspot_authorize, _) = open_start(&browser, &authorize).await;
    let resp = browser
        .get(&hubspot_authorize)
        .send()
        .await
        .expect("authorize");
    assert_eq!(resp.status().as_u16(), 302, "authorize redirects");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    assert!(
        location.starts_with(&sidecar.url("/oauth/hubspot/callback")),
        "{location}"
    );
    let resp = browser.get(&location).send().await.expect("callback");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// Opens a connect's start URL in `browser` (which must not follow
/// redirects): HubSpot's authorize URL it redirects to, and the binding
/// cookie it set (`name=value`).
pub async fn open_start(browser: &reqwest::Client, start: &str) -> (String, String) {
    let resp = browser.get(start).send().await.expect("start");
    assert_eq!(resp.status().as_u16(), 302, "start redirects to HubSpot");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .expect("the binding cookie")
        .to_string();
    (location, cookie)
}

/// A local SMTP listener that accepts every message and keeps its text.
pub struct SmtpSink {
    pub port: u16,
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        SmtpSink::refusing(&[]).await
    }

    /// A sink that refuses these recipients for good (550 on RCPT).
    pub async fn refusing(refused: &[&str]) -> SmtpSink {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let refused: std::sync::Arc<Vec<String>> =
            std::sync::Arc::new(refused.iter().map(|r| r.to_ascii_uppercase()).collect());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = messages.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let store = store.clone();
                let refused = refused.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                    let mut envelope = String::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO")
                        {
                            b"250 sink\r\n"
                        } else if upper.starts_with("RCPT")
                            && refused.iter().any(|r| upper.contains(r.as_str()))
                        {
                            b"550 5.1.1 no such mailbox\r\n"
                        } else if upper.starts_with("MAIL") || upper.starts_with("RCPT") {
                            envelope.push_str(&line);
                            envelope.push('\n');
                            b"250 OK\r\n"
                        } else if upper.starts_with("DATA") {
                            let _ = w.write_all(b"354 go ahead\r\n").await;
                            let mut data = std::mem::take(&mut envelope);
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                data.push_str(&l);
                                data.push('\n');
                            }
                            store.lock().unwrap().push(data);
                            b"250 queued\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            break;
                        } else {
                            b"250 OK\r\n"
                        };
                        let _ = w.write_all(reply).await;
                    }
                });
            }
        });
        SmtpSink { port, messages }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

/// Waits until the slot's confirmed position reaches everything committed so far.
pub async fn wait_handed_off(db: &Client, slot: &str, deadline: Duration) {
    let (_, committed) = slot_position(db, slot).await;
    wait_for("the slot reaches the last commit", deadline, || async {
        slot_position(db, slot).await.0 >= committed
    })
    .await;
}

/// A free loopback address for a sidecar run as a real process.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string()
}

/// `hubspot-sidecar run` as a real process (for kill -9, SIGTERM, SIGSTOP);
/// callers may add variables before spawning.
pub fn sidecar_command(
    db_url: &str,
    slot: &str,
    hubspot: &str,
    listen: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hubspot-sidecar"));
    c.arg("run")
        .env("DATABASE_URL", db_url)
        .env("SIDECAR_SLOT", slot)
        .env("SIDECAR_LISTEN", listen)
        .env("SIDECAR_PUBLIC_URL", format!("http://{listen}"))
        .env("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SIDECAR_SECRET_KEY", hex::encode(SECRET_KEY))
        .env("HUBSPOT_API_BASE", hubspot)
        .env("HUBSPOT_AUTH_BASE", hubspot)
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    c
}

/// `sidecar_command` with the emulator's OAuth app configured, for Spots that
/// connect through OAuth.
pub fn oauth_sidecar_command(
    db_url: &str,
    slot: &str,
    hubspot: &str,
    listen: &str,
) -> std::process::Command {
    let app = EmulatorConfig::default();
    let mut c = sidecar_command(db_url, slot, hubspot, listen);
    c.env("HUBSPOT_CLIENT_ID", app.client_id)
        .env("HUBSPOT_CLIENT_SECRET", app.client_secret);
    c
}

/// Waits until a sidecar process answers /readyz with 200.
pub async fn wait_ready(http: &reqwest::Client, listen: &str) {
    wait_for("sidecar /readyz 200", Duration::from_secs(30), || async {
        http.get(format!("http://{listen}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// Waits until every contact of the Spot's members holds the member's headline.
pub async fn wait_headlines_converge(
    db: &Client,
    emu: &Emulator,
    portal: u64,
    spot_id: i64,
    deadline: Duration,
) {
    let expected: Vec<(String, Option<String>)> = db
        .query(
            "SELECT lower(email), headline FROM members WHERE spot_id = $1",
            &[&spot_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    wait_for(
        "every contact holds the database's headline",
        deadline,
        || async {
            expected.iter().all(|(email, headline)| {
                prop(emu, portal, email, "meltingspot_headline").as_deref()
                    == Some(headline.as_deref().unwrap_or(""))
            })
        },
    )
    .await;
}

/// The hand-off checkpoint stored for the slot (0 before the first hand-off).
pub async fn checkpoint(db: &Client, slot: &str) -> u64 {
    db.query_opt(
        "SELECT (lsn - '0/0')::bigint FROM hubspot_sync.checkpoint WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| r.get::<_, i64>(0) as u64)
    .unwrap_or(0)
}

/// The OAuth round trip against a sidecar process listening on `listen`:
/// connect `{}`, then a browser follows the authorize URL through the
/// emulator back to the callback. Returns the callback page's status.
pub async fn oauth_connect_process(http: &reqwest::Client, listen: &str, spot_id: i64) -> u16 {
    let (status, body) = api_call(
        http,
        &format!("http://{listen}/api/spots/{spot_id}/hubspot/connect"),
        reqwest::Method::POST,
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(3))
        .cookie_store(true)
        .build()
        .unwrap();
    browser
        .get(body["authorize_url"].as_str().expect("authorize_url"))
        .send()
        .await
        .expect("authorize and callback")
        .status()
        .as_u16()
}

/// `PATCH …/settings` on a sidecar process; asserts 200.
pub async fn change_settings_process(
    http: &reqwest::Client,
    listen: &str,
    spot_id: i64,
    body: serde_json::Value,
) {
    let (status, v) = api_call(
        http,
        &format!("http://{listen}/api/spots/{spot_id}/hubspot/settings"),
        reqwest::Method::PATCH,
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// A sidecar process that is killed when the test ends, even by a panic.
pub struct Process(pub std::process::Child);

impl std::ops::Deref for Process {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /api/spots/{spot}/hubspot` of a sidecar process.
pub async fn integration_of_process(
    http: &reqwest::Client,
    listen: &str,
    spot: i64,
) -> serde_json::Value {
    api_call(
        http,
        &format!("http://{listen}/api/spots/{spot}/hubspot"),
        reqwest::Method::GET,
        None,
    )
    .await
    .1
}

/// `POST …/connect` with a private-app token on a sidecar process; asserts 200.
pub async fn connect_token(http: &reqwest::Client, listen: &str, spot: i64, token: &str) {
    let (status, body) = api_call(
        http,
        &format!("http://{listen}/api/spots/{spot}/hubspot/connect"),
        reqwest::Method::POST,
        Some(serde_json::json!({"access_token": token})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// `count` accepted members of the Spot, `{prefix}{n}@example.com` for n from 0.
pub async fn add_members(db: &Client, spot_id: i64, prefix: &str, count: i64) {
    db.execute(
        "INSERT INTO members (spot_id, email, status)
         SELECT $1, $2 || g || '@example.com', 'accepted' FROM generate_series(0, $3::bigint - 1) g",
        &[&spot_id, &prefix, &count],
    )
    .await
    .expect("insert members");
}

/// Peak resident memory of a process, in bytes (`VmHWM` in /proc).
pub fn peak_rss(pid: u32) -> u64 {
    memory_field(pid, "VmHWM:").expect("VmHWM in /proc/<pid>/status")
}

/// A memory field of /proc/<pid>/status (`VmHWM:`, `VmRSS:`), in bytes.
pub fn memory_field(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
}
