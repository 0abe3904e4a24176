//! Test harness: one throwaway Postgres cluster per test binary, a database
//! and a slot per test, the HubSpot emulator in-process, and the sidecar
//! either in-process or as a real child process (for kill -9).
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hubspot_emulator::{Emulator, EmulatorConfig};
use hubspot_sidecar::config::{ActivityApi, Config, HubSpotConfig, LogFormat};
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service::{self, Running};
use tokio::sync::{watch, OnceCell};
use tokio_postgres::Client;

pub const ADMIN_TOKEN: &str = "test-admin-token";
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
    Config {
        database_url: db_url.to_string(),
        slot: slot.to_string(),
        publication: "hubspot_sidecar".into(),
        listen: "127.0.0.1:0".into(),
        public_url: "http://localhost".into(),
        admin_token: ADMIN_TOKEN.into(),
        secret_key: SECRET_KEY,
        hubspot: HubSpotConfig {
            api_base: hubspot_base.to_string(),
            auth_base: hubspot_base.to_string(),
            api_version: "2026-03".into(),
            client_id: None,
            client_secret: None,
            app_id: None,
            developer_api_key: None,
            activity_api: ActivityApi::AppEvents,
            app_event_prefix: String::new(),
            rate_limit: 100,
        },
        fail_after: Duration::from_secs(900),
        failed_retention: Duration::from_secs(7 * 86_400),
        smtp_url: None,
        smtp_from: None,
        log_format: LogFormat::Text,
    }
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

/// A contact's property, from the emulator.
pub fn prop(emu: &Emulator, portal: u64, email: &str, name: &str) -> Option<String> {
    emu.contact_by_email(portal, email)
        .and_then(|c| c.properties.get(name).cloned())
}
