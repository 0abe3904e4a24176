//! `hubspot-sidecar doctor`: checks that a database is ready for the sidecar
//! (SPEC §6) and prints, for each problem, the SQL or setting that fixes it.
//!
//! The work is split in two: `snapshot::collect` reads a `Snapshot` of the server
//! with a handful of catalog queries, and `checks::evaluate` turns a snapshot into
//! `Check`s without touching the network, so that every rule is a pure
//! function that unit tests can exercise (a lost slot or `wal_level = replica`
//! cannot be produced per test database).
//!
//! This file holds the subcommand's arguments, the entry point, the one
//! connection to the server and the rendering of the report; `snapshot` the
//! catalog reads, `checks` the rules (one file per concern) and `sql` the
//! quoting and SQL-building helpers the fixes are written with.

mod checks;
#[cfg(test)]
mod fixtures;
mod snapshot;
mod sql;

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;

use checks::{evaluate, version_text, Check, Status};
use snapshot::collect;

use crate::config::DatabaseConfig;
use crate::store::{Db, DbClient, DbError};

/// The tables the sidecar needs in its publication (see `sql/publication.sql`).
pub(crate) const REQUIRED_TABLES: [&str; 12] = [
    "members",
    "custom_roles",
    "groups",
    "group_members",
    "tags",
    "member_tags",
    "live_registrations",
    "replay_views",
    "topics",
    "topic_votes",
    "document_opens",
    "course_progress",
];

pub(crate) use crate::translate::FULL_IDENTITY_TABLES;

/// Tables the sidecar only reads (names and titles), never through the slot.
pub(crate) const LOOKUP_TABLES: [&str; 5] = ["spots", "lives", "topics", "documents", "courses"];

/// The schema of the MeltingSpot tables.
pub(crate) const SOURCE_SCHEMA: &str = "public";

/// Flags and environment variables of `hubspot-sidecar doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// postgres://… URL, as given to `hubspot-sidecar run`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Replication slot the sidecar uses.
    #[arg(long, env = "SIDECAR_SLOT", default_value = "hubspot_sidecar")]
    pub slot: String,
    /// Publication the sidecar reads (owned by the DBA).
    #[arg(long, env = "SIDECAR_PUBLICATION", default_value = "hubspot_sidecar")]
    pub publication: String,
    /// WARN when the slot retains more WAL than this many MiB.
    #[arg(long, default_value_t = 1024)]
    pub max_retained_wal_mb: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DoctorError {
    #[error("DATABASE_URL is not set: pass --database-url or set DATABASE_URL to the URL `hubspot-sidecar run` uses")]
    MissingUrl,
    #[error("DATABASE_URL is not a valid postgres URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no answer from {0} within 15 s")]
    ConnectTimeout(String),
    #[error("catalog query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("setting {name} has an unexpected value {value:?}")]
    Setting { name: &'static str, value: String },
}

/// What the checks are run against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    pub slot: String,
    pub publication: String,
    pub max_retained_wal_bytes: i64,
}

impl Options {
    pub(crate) fn from_args(args: &DoctorArgs) -> Options {
        Options {
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            max_retained_wal_bytes: i64::try_from(args.max_retained_wal_mb)
                .unwrap_or(i64::MAX / (1 << 20))
                .saturating_mul(1 << 20),
        }
    }
}

/// Entry point of the subcommand: prints the report, returns the exit code
/// (0 when nothing FAILs, 1 otherwise).
pub async fn run(args: DoctorArgs) -> ExitCode {
    let opts = Options::from_args(&args);
    let checks = match args.database_url.as_deref() {
        None => vec![connection_failure(&DoctorError::MissingUrl)],
        Some(url) => match inspect(url, &opts).await {
            Ok(checks) => checks,
            Err(e) => vec![connection_failure(&e)],
        },
    };
    print!("{}", render(&checks));
    ExitCode::from(exit_code(&checks))
}

/// Connects, collects a snapshot and evaluates it.
async fn inspect(url: &str, opts: &Options) -> Result<Vec<Check>, DoctorError> {
    let db = connect(url).await?;
    let snapshot = collect(&db, opts).await?;
    let mut checks = vec![Check::pass(
        "connection",
        format!(
            "connected to database {} as {} (server {})",
            snapshot.database,
            snapshot.role.name,
            version_text(snapshot.server_version_num)
        ),
    )];
    checks.extend(evaluate(&snapshot, opts));
    Ok(checks)
}

/// A failure to connect or to read the catalog, as a FAIL line.
fn connection_failure(e: &DoctorError) -> Check {
    let fix = match e {
        DoctorError::MissingUrl | DoctorError::BadUrl(_) => {
            "set DATABASE_URL=postgres://USER:PASSWORD@HOST:5432/DBNAME (the URL the sidecar runs with)"
        }
        DoctorError::Connect { .. } | DoctorError::ConnectTimeout(_) => {
            "check host, port, database name, user and password in DATABASE_URL, that the server accepts \
             TCP connections from here (listen_addresses, pg_hba.conf) and the network path (NetworkPolicy, firewall)"
        }
        DoctorError::Query { .. } | DoctorError::Setting { .. } => {
            "run doctor as the sidecar's role against a PostgreSQL 15 or newer primary"
        }
    };
    Check::fail("connection", e.to_string(), fix)
}

/// The one place doctor opens a connection to the server: through the
/// sidecar's own connector, so doctor sees the database as `run` does.
async fn connect(url: &str) -> Result<DbClient, DoctorError> {
    let cfg = DatabaseConfig::from_url(url).map_err(|e| DoctorError::BadUrl(e.to_string()))?;
    let target = describe_target(&cfg.pg);
    let db = Db::new(&cfg).map_err(|_| DoctorError::ConnectTimeout(target.clone()))?;
    db.client().await.map_err(|e| match e {
        DbError::Postgres(source) => DoctorError::Connect { target, source },
        DbError::Unavailable(_) | DbError::Shared(_) => DoctorError::ConnectTimeout(target),
    })
}

/// host:port/db as user, never the password.
fn describe_target(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("(default user)");
    let db = cfg.get_dbname().unwrap_or(user);
    format!("{host}:{port}/{db} as {user}")
}

/// The report: one line per check, a fix line under each WARN and FAIL, and a summary.
fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "{}  {}: {}", c.status.label(), c.name, c.detail);
        if c.status != Status::Pass {
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "      fix: {fix}");
            }
        }
    }
    let count = |st: Status| checks.iter().filter(|c| c.status == st).count();
    let _ = writeln!(
        out,
        "doctor: {} PASS, {} WARN, {} FAIL",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail)
    );
    out
}

/// 0 when nothing FAILs (WARNs allowed), 1 otherwise.
fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.status == Status::Fail))
}

#[cfg(test)]
mod tests {
    use super::fixtures::{good, opts};
    use super::*;

    #[test]
    fn a_good_database_passes_everything() {
        let checks = evaluate(&good(), &opts());
        let bad: Vec<_> = checks.iter().filter(|c| c.status != Status::Pass).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert_eq!(exit_code(&checks), 0);
        let report = render(&checks);
        assert!(!report.contains("fix:"), "{report}");
        assert!(report.ends_with("FAIL\n"), "{report}");
    }

    #[test]
    fn connection_failure_is_a_fail_line() {
        let c = connection_failure(&DoctorError::MissingUrl);
        assert_eq!(c.status, Status::Fail);
        let report = render(&[c]);
        assert!(report.starts_with("FAIL  connection: DATABASE_URL is not set"));
        assert!(report.contains("      fix: set DATABASE_URL="));
        assert_eq!(
            exit_code(&[connection_failure(&DoctorError::MissingUrl)]),
            1
        );
    }
}
