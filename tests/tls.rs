//! TLS to Postgres (SPEC §10): a server with `ssl=on` that takes TCP only
//! over TLS (`hostssl`), a CA made here, and each sslmode as libpq means it,
//! for the SQL pool and the replication stream alike.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use hubspot_sidecar::config::{Config, DatabaseConfig};
use hubspot_sidecar::pg_cluster::PgCluster;
use hubspot_sidecar::service;
use hubspot_sidecar::store::Db;
use tokio::sync::OnceCell;

const SECOND: Duration = Duration::from_secs(1);
const DATABASES: [&str; 4] = ["tls_full", "tls_require", "tls_ip", "tls_plain"];

struct TlsServer {
    cluster: PgCluster,
    ca: PathBuf,
}

static SERVER: OnceCell<TlsServer> = OnceCell::const_new();

/// A throwaway certificate authority.
fn new_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hubspot-sidecar test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// One TLS-only server for this file: a throwaway CA signs a certificate
/// for `localhost` only.
async fn server() -> &'static TlsServer {
    SERVER
        .get_or_init(|| async {
            if std::env::var_os("TEST_LOG").is_some() {
                hubspot_sidecar::init_logging(hubspot_sidecar::config::LogFormat::Text, "info");
            }
            let cluster = PgCluster::start().await.expect("start Postgres");
            for db in DATABASES {
                cluster.create_meltingspot_db(db).await.expect("database");
            }
            let (ca, ca_key) = new_ca();
            let server_params =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            let server_key = rcgen::KeyPair::generate().unwrap();
            let cert = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
            cluster
                .enable_tls(&cert.pem(), &server_key.serialize_pem())
                .await
                .expect("enable TLS");
            let ca_path = std::env::temp_dir().join(format!(
                "hubspot-sidecar-test-ca-{}.pem",
                std::process::id()
            ));
            std::fs::write(&ca_path, ca.pem()).unwrap();
            TlsServer {
                cluster,
                ca: ca_path,
            }
        })
        .await
}

fn url(s: &TlsServer, host: &str, db: &str, params: &str) -> String {
    format!(
        "postgres://postgres@{host}:{}/{db}?{params}",
        s.cluster.port()
    )
}

/// A SQL session for the test itself, over verified TLS.
async fn sql_tls(s: &TlsServer, db: &str) -> hubspot_sidecar::store::DbClient {
    let url = url(
        s,
        "localhost",
        db,
        &format!(
            "sslmode=verify-full&sslrootcert={}&application_name=tls-test",
            s.ca.display()
        ),
    );
    Db::new(&DatabaseConfig::from_url(&url).expect("a valid URL"))
        .expect("pool")
        .client()
        .await
        .expect("the test connects over TLS")
}

/// Starts the sidecar and expects it to fail; returns the whole error chain.
async fn start_error(cfg: Config) -> String {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let result = tokio::time::timeout(30 * SECOND, service::run(cfg, rx, None))
        .await
        .expect("the start fails quickly rather than retrying forever");
    format!("{:#}", result.expect_err("the start is refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_to_localhost_encrypts_every_connection_the_walsender_included() {
    let s = server().await;
    let db = sql_tls(s, "tls_full").await;
    let emu = emulator().await;
    let sidecar_url = url(
        s,
        "localhost",
        "tls_full",
        &format!("sslmode=verify-full&sslrootcert={}", s.ca.display()),
    );
    let sidecar = Sidecar::start(config(&sidecar_url, "tls_full", &emu.base_url())).await;
    let spot = seed_spot(&db, "Encrypted").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "ada@example.com", &[]);
    let member = seed_member(&db, spot, "ada@example.com", "accepted").await;
    sidecar.connect_with_token(spot, &token).await;
    db.execute(
        "UPDATE members SET headline = 'over TLS' WHERE id = $1",
        &[&member],
    )
    .await
    .unwrap();
    wait_for("the change reaches HubSpot", 30 * SECOND, || async {
        prop(&emu, portal, "ada@example.com", "meltingspot_headline").as_deref() == Some("over TLS")
    })
    .await;

    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl),
                    count(*) FILTER (WHERE a.backend_type = 'walsender' AND s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'hubspot-sidecar'",
            &[],
        )
        .await
        .unwrap();
    let (all, encrypted, walsenders): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(all >= 2, "the sidecar's sessions are visible: {all}");
    assert_eq!(encrypted, all, "every session of the sidecar is encrypted");
    assert_eq!(walsenders, 1, "the replication stream is encrypted");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_to_an_address_the_certificate_does_not_name_is_refused_clearly() {
    let s = server().await;
    let emu = emulator().await;
    let ip_url = url(
        s,
        "127.0.0.1",
        "tls_ip",
        &format!("sslmode=verify-full&sslrootcert={}", s.ca.display()),
    );
    let error = start_error(config(&ip_url, "tls_ip", &emu.base_url())).await;
    assert!(
        error.contains("does not name the host") && error.contains("verify-ca"),
        "{error}"
    );
    // A CA that did not sign the server's certificate.
    let (other_ca, _) = new_ca();
    let other = std::env::temp_dir().join(format!(
        "hubspot-sidecar-other-ca-{}.pem",
        std::process::id()
    ));
    std::fs::write(&other, other_ca.pem()).unwrap();
    let wrong_ca = url(
        s,
        "localhost",
        "tls_ip",
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let error = start_error(config(&wrong_ca, "tls_ip", &emu.base_url())).await;
    assert!(
        error.contains("not signed by the CA in sslrootcert"),
        "{error}"
    );
    // verify-ca checks the chain only: the same address is accepted.
    let ca_url = url(
        s,
        "127.0.0.1",
        "tls_ip",
        &format!("sslmode=verify-ca&sslrootcert={}", s.ca.display()),
    );
    let sidecar = Sidecar::start(config(&ca_url, "tls_ip", &emu.base_url())).await;
    let db = sql_tls(s, "tls_ip").await;
    wait_for("the replication stream over verify-ca", 30 * SECOND, || async {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'hubspot-sidecar' AND a.backend_type = 'walsender' AND s.ssl
                AND a.datname = 'tls_ip'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(sidecar
        .running
        .health
        .streaming
        .load(std::sync::atomic::Ordering::Relaxed));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_a_ca_and_plaintext_is_refused_clearly() {
    let s = server().await;
    let db = sql_tls(s, "tls_require").await;
    let emu = emulator().await;
    let require = url(s, "127.0.0.1", "tls_require", "sslmode=require");
    let sidecar = Sidecar::start(config(&require, "tls_require", &emu.base_url())).await;
    let spot = seed_spot(&db, "Required").await;
    let (portal, token) = emu.create_portal();
    emu.add_contact(portal, "bo@example.com", &[]);
    seed_member(&db, spot, "bo@example.com", "accepted").await;
    sidecar.connect_with_token(spot, &token).await;
    wait_for("the backfill over TLS", 30 * SECOND, || async {
        prop(&emu, portal, "bo@example.com", "meltingspot_member_status").as_deref()
            == Some("accepted")
    })
    .await;
    sidecar.stop().await;

    // The server takes TCP only over TLS: sslmode=disable is told why.
    let plain = url(s, "127.0.0.1", "tls_plain", "sslmode=disable");
    let error = start_error(config(&plain, "tls_plain", &emu.base_url())).await;
    assert!(error.contains("only over TLS"), "{error}");
}

#[test]
fn a_ca_file_that_cannot_be_read_stops_the_start_with_the_variable() {
    let e = DatabaseConfig::from_url(
        "postgres://u@db/ms?sslmode=verify-full&sslrootcert=/does/not/exist.pem",
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains("DATABASE_URL") && e.contains("/does/not/exist.pem"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_refused_clearly() {
    // The other tests' cluster, which has TLS off.
    let (plain_url, name) = fresh_db().await;
    let emu = emulator().await;
    let error = start_error(config(
        &format!("{plain_url}?sslmode=require"),
        &name,
        &emu.base_url(),
    ))
    .await;
    assert!(error.contains("does not accept TLS"), "{error}");
}
