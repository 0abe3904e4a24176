//! A real Prometheus scrapes the real sidecar binary, with the alert rules of
//! deploy/prometheus/rules.yml loaded. The sidecar is frozen (SIGSTOP) while
//! WAL is written to a published table, then thawed (SIGCONT): Prometheus must
//! record the lag rising above what was written and falling back near zero, and
//! the down alert must go pending during the freeze and clear after it.
//!
//! It uses /usr/bin/prometheus (or $PROMETHEUS_BIN) and skips with a notice when
//! there is none; .ci/validate-deploy installs it for CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);
const JOB: &str = "hubspot-sidecar";
/// WAL written while the sidecar is frozen.
const WAL_TO_WRITE: i64 = 40 << 20;
/// The lag Prometheus must have seen after the thaw.
const LAG_SEEN: i64 = 16 << 20;
/// The lag it must fall back under.
const LAG_SETTLED: i64 = 1 << 20;

/// A child process killed (and a directory removed) on drop, also on panic.
struct Guard {
    child: Child,
    dir: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A frozen process ignores SIGTERM until thawed, but not SIGKILL.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

fn prometheus_bin() -> Option<PathBuf> {
    std::env::var_os("PROMETHEUS_BIN")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")))
        .filter(|p| p.exists())
}

fn start_prometheus(bin: &Path, target: &str) -> (Guard, String) {
    let dir = std::env::temp_dir().join(format!(
        "hubspot-sidecar-prometheus-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
    assert!(rules.exists(), "{} is missing", rules.display());
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
        rules = rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let listen = free_addr();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start prometheus");
    (
        Guard {
            child,
            dir: Some(dir),
        },
        listen,
    )
}

fn spawn_sidecar(db_url: &str, slot: &str, hubspot: &str, listen: &str) -> Guard {
    let child = sidecar_command(db_url, slot, hubspot, listen)
        .spawn()
        .expect("spawn hubspot-sidecar");
    Guard { child, dir: None }
}

/// Prometheus's HTTP API.
struct Prom {
    http: reqwest::Client,
    base: String,
}

impl Prom {
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(5 * SECOND)
            .send()
            .await
            .ok()?;
        let body: Value = resp.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The single value of an instant query, if it has one.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let data = self.get("/api/v1/query", &[("query", promql)]).await?;
        let result = data["result"].as_array()?;
        let first = result.first()?;
        first["value"][1].as_str()?.parse().ok()
    }

    /// (alertname, state) of every active alert.
    async fn alerts(&self) -> Vec<(String, String)> {
        let Some(data) = self.get("/api/v1/alerts", &[]).await else {
            return Vec::new();
        };
        data["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                            x["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_lag_rise_while_frozen_and_fall_after() {
    let Some(bin) = prometheus_bin() else {
        eprintln!(
            "SKIPPED: no Prometheus at /usr/bin/prometheus (apt-get install prometheus, or set PROMETHEUS_BIN); \
             .ci/validate-deploy installs it in CI"
        );
        return;
    };
    let (url, name) = fresh_db().await;
    let db = sql(&url).await;
    let emu = emulator().await;
    let http = reqwest::Client::new();

    // Enough members that rewriting them produces tens of MB of WAL.
    let spot = seed_spot(&db, "Metrics").await;
    db.execute(
        "INSERT INTO members (spot_id, email, status)
         SELECT $1, 'p' || g || '@example.com', 'accepted' FROM generate_series(1, 40000) g",
        &[&spot],
    )
    .await
    .unwrap();

    let listen = free_addr();
    let mut sidecar = spawn_sidecar(&url, &name, &emu.base_url(), &listen);
    wait_ready(&http, &listen).await;

    let (_prometheus, prom_listen) = start_prometheus(&bin, &listen);
    let prom = Prom {
        http: http.clone(),
        base: format!("http://{prom_listen}"),
    };
    wait_for(
        "Prometheus scrapes the sidecar (up == 1), its lag gauge and its active slot",
        60 * SECOND,
        || async {
            prom.scalar(&format!("up{{job=\"{JOB}\"}}")).await == Some(1.0)
                && prom
                    .scalar(&format!(
                        "hubspot_sidecar_replication_lag_bytes{{job=\"{JOB}\"}}"
                    ))
                    .await
                    .is_some()
                && prom
                    .scalar(&format!("hubspot_sidecar_slot_active{{job=\"{JOB}\"}}"))
                    .await
                    == Some(1.0)
        },
    )
    .await;
    // The shipped rules load and evaluate without errors.
    wait_for("the rules of rules.yml evaluate", 30 * SECOND, || async {
        let Some(data) = prom.get("/api/v1/rules", &[]).await else {
            return false;
        };
        let rules: Vec<&Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert!(
            rules.iter().all(|r| r["health"] != "err"),
            "a rule fails to evaluate: {rules:#?}"
        );
        rules.len() >= 8 && rules.iter().all(|r| r["health"] == "ok")
    })
    .await;
    let before = prom
        .scalar(&format!(
            "hubspot_sidecar_replication_lag_bytes{{job=\"{JOB}\"}}"
        ))
        .await
        .unwrap();
    assert!(before < LAG_SEEN as f64, "lag before the freeze: {before}");

    // Freeze the sidecar and write WAL to a published table.
    signal(&sidecar.child, libc::SIGSTOP);
    let frozen_at = Instant::now();
    let start_lsn: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);
    let mut written = 0i64;
    let mut round = 0;
    while written < WAL_TO_WRITE {
        round += 1;
        assert!(round <= 20, "only {written} bytes of WAL after 20 rounds");
        db.execute(
            "UPDATE members SET headline = repeat(md5(id::text || $2), 4) WHERE spot_id = $1",
            &[&spot, &round.to_string()],
        )
        .await
        .unwrap();
        written = db
            .query_one(
                "SELECT (pg_current_wal_lsn() - '0/0')::bigint - $1",
                &[&start_lsn],
            )
            .await
            .unwrap()
            .get(0);
    }
    // Frozen, it cannot be scraped: the down alert goes pending (its `for` is minutes).
    wait_for(
        "HubSpotSidecarDown pending while the sidecar is frozen",
        30 * SECOND,
        || async {
            prom.alerts()
                .await
                .iter()
                .any(|(n, s)| n == "HubSpotSidecarDown" && (s == "pending" || s == "firing"))
        },
    )
    .await;
    // Stay frozen 5 s in all.
    if let Some(rest) = (5 * SECOND).checked_sub(frozen_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    signal(&sidecar.child, libc::SIGCONT);
    eprintln!(
        "froze the sidecar {:?} while writing {} MiB of WAL",
        frozen_at.elapsed(),
        written >> 20
    );

    // Right after the thaw the sidecar samples the lag before it has caught up.
    let seen = format!("max_over_time(hubspot_sidecar_replication_lag_bytes{{job=\"{JOB}\"}}[1m])");
    wait_for(
        "Prometheus recorded the lag above 16 MiB",
        60 * SECOND,
        || async { prom.scalar(&seen).await.unwrap_or(0.0) > LAG_SEEN as f64 },
    )
    .await;
    wait_for(
        "Prometheus sees the lag back under 1 MiB",
        60 * SECOND,
        || async {
            prom.scalar(&format!(
                "hubspot_sidecar_replication_lag_bytes{{job=\"{JOB}\"}}"
            ))
            .await
            .is_some_and(|v| v < LAG_SETTLED as f64)
        },
    )
    .await;
    wait_for("HubSpotSidecarDown clears", 30 * SECOND, || async {
        !prom
            .alerts()
            .await
            .iter()
            .any(|(n, _)| n == "HubSpotSidecarDown")
    })
    .await;
    let peak = prom.scalar(&seen).await.unwrap_or(0.0);
    eprintln!(
        "peak lag recorded by Prometheus: {:.1} MiB",
        peak / 1048576.0
    );

    signal(&sidecar.child, libc::SIGTERM);
    let deadline = Instant::now() + 10 * SECOND;
    while matches!(sidecar.child.try_wait(), Ok(None)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
