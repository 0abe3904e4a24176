//! `hubspot-sidecar doctor`: checks that a database is ready for the sidecar
//! (SPEC §6) and prints, for each problem, the SQL or setting that fixes it.
//!
//! The work is split in two: [`collect`] reads a [`Snapshot`] of the server
//! with a handful of catalog queries, and [`evaluate`] turns a snapshot into
//! [`Check`]s without touching the network, so that every rule is a pure
//! function that unit tests can exercise (a lost slot or `wal_level = replica`
//! cannot be produced per test database).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

/// The tables the sidecar needs in its publication (see `sql/publication.sql`).
pub const REQUIRED_TABLES: [&str; 12] = [
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

/// Published tables whose UPDATEs must carry the old row, so that the sidecar
/// can tell that attended_at / started_at / completed_at *became* non-null.
pub const FULL_IDENTITY_TABLES: [&str; 3] = ["members", "live_registrations", "course_progress"];

/// Tables the sidecar only reads (names and titles), never through the slot.
pub const LOOKUP_TABLES: [&str; 5] = ["spots", "lives", "topics", "documents", "courses"];

/// The schema of the MeltingSpot tables.
pub const SOURCE_SCHEMA: &str = "public";

/// The sidecar's replication status interval; wal_sender_timeout must leave room for it.
const STATUS_INTERVAL_MS: i64 = 1_000;
/// Below this wal_sender_timeout a stall of a few status intervals drops the stream.
const SENDER_TIMEOUT_WARN_MS: i64 = 10_000;
/// Below this a single late status update can drop the stream.
const SENDER_TIMEOUT_FAIL_MS: i64 = 2_000;

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
pub enum DoctorError {
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
pub struct Options {
    pub slot: String,
    pub publication: String,
    pub max_retained_wal_bytes: i64,
}

impl Options {
    pub fn from_args(args: &DoctorArgs) -> Options {
        Options {
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            max_retained_wal_bytes: i64::try_from(args.max_retained_wal_mb)
                .unwrap_or(i64::MAX / (1 << 20))
                .saturating_mul(1 << 20),
        }
    }
}

/// Everything the checks need, read in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub server_version_num: i32,
    pub database: String,
    pub in_recovery: bool,
    pub wal_level: String,
    pub max_replication_slots: i64,
    pub replication_slots_used: i64,
    pub max_wal_senders: i64,
    pub wal_senders_used: i64,
    /// MB; -1 when unset (no cap).
    pub max_slot_wal_keep_size_mb: i64,
    /// Milliseconds; 0 disables the timeout.
    pub wal_sender_timeout_ms: i64,
    pub role: RoleInfo,
    pub publication: Option<PublicationInfo>,
    /// Every table of the publication (empty when there is none).
    pub published: Vec<PublishedTable>,
    /// The tables the sidecar reads (required and lookup), published or not.
    pub source_tables: Vec<SourceTable>,
    pub state_schema: StateSchema,
    pub slot: Option<SlotInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationInfo {
    pub all_tables: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_code(code: &str) -> Option<ReplicaIdentity> {
        match code {
            "d" => Some(ReplicaIdentity::Default),
            "n" => Some(ReplicaIdentity::Nothing),
            "f" => Some(ReplicaIdentity::Full),
            "i" => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    pub schema: String,
    pub name: String,
    pub identity: ReplicaIdentity,
    pub has_primary_key: bool,
    /// A valid index is marked as the replica identity (for `USING INDEX`).
    pub has_identity_index: bool,
}

impl PublishedTable {
    fn qualified(&self) -> String {
        qualified(&self.schema, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub schema: String,
    pub name: String,
    pub exists: bool,
    pub can_select: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSchema {
    pub exists: bool,
    /// USAGE and CREATE on hubspot_sync (the owner has both).
    pub usable: bool,
    /// CREATE on the database (needed to create hubspot_sync).
    pub can_create_in_database: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    /// reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// pg_current_wal_lsn() - restart_lsn.
    pub retained_bytes: Option<i64>,
    /// pg_current_wal_lsn() - confirmed_flush_lsn.
    pub lag_bytes: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub name: String,
    pub detail: String,
    /// The SQL or setting that fixes a WARN or FAIL.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            status: Status::Pass,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            status: Status::Warn,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            status: Status::Fail,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
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
pub async fn inspect(url: &str, opts: &Options) -> Result<Vec<Check>, DoctorError> {
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
pub fn connection_failure(e: &DoctorError) -> Check {
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

async fn connect(url: &str) -> Result<tokio_postgres::Client, DoctorError> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DoctorError::BadUrl(e.to_string()))?;
    let target = describe_target(&cfg);
    let attempt = tokio::time::timeout(Duration::from_secs(15), cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| DoctorError::ConnectTimeout(target.clone()))?;
    let (client, conn) = attempt.map_err(|source| DoctorError::Connect { target, source })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
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

fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DoctorError {
    move |source| DoctorError::Query { what, source }
}

fn int_setting(name: &'static str, value: &str) -> Result<i64, DoctorError> {
    value.trim().parse().map_err(|_| DoctorError::Setting {
        name,
        value: value.to_string(),
    })
}

/// Reads the snapshot with plain catalog queries (no superuser needed).
pub async fn collect(db: &tokio_postgres::Client, opts: &Options) -> Result<Snapshot, DoctorError> {
    let row = db
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_database()::text,
                    pg_is_in_recovery(), current_user::text,
                    COALESCE(r.rolsuper, false), COALESCE(r.rolreplication, false),
                    (SELECT count(*) FROM pg_replication_slots),
                    (SELECT count(*) FROM pg_stat_replication)
               FROM (SELECT 1) one
               LEFT JOIN pg_roles r ON r.rolname = current_user",
            &[],
        )
        .await
        .map_err(query_err("server and role"))?;
    let server_version_num: i32 = row.get(0);
    let database: String = row.get(1);
    let in_recovery: bool = row.get(2);
    let role = RoleInfo {
        name: row.get(3),
        superuser: row.get(4),
        replication: row.get(5),
    };
    let replication_slots_used: i64 = row.get(6);
    let wal_senders_used: i64 = row.get(7);

    let settings = db
        .query(
            "SELECT name, setting FROM pg_settings
              WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders',
                             'max_slot_wal_keep_size', 'wal_sender_timeout')",
            &[],
        )
        .await
        .map_err(query_err("settings"))?;
    let setting = |name: &str| -> String {
        settings
            .iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get::<_, String>(1))
            .unwrap_or_default()
    };
    let wal_level = setting("wal_level");
    let max_replication_slots =
        int_setting("max_replication_slots", &setting("max_replication_slots"))?;
    let max_wal_senders = int_setting("max_wal_senders", &setting("max_wal_senders"))?;
    let max_slot_wal_keep_size_mb =
        int_setting("max_slot_wal_keep_size", &setting("max_slot_wal_keep_size"))?;
    let wal_sender_timeout_ms = int_setting("wal_sender_timeout", &setting("wal_sender_timeout"))?;

    let publication = db
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate
               FROM pg_publication WHERE pubname = $1",
            &[&opts.publication],
        )
        .await
        .map_err(query_err("publication"))?
        .map(|r| PublicationInfo {
            all_tables: r.get(0),
            insert: r.get(1),
            update: r.get(2),
            delete: r.get(3),
            truncate: r.get(4),
        });

    let mut published = Vec::new();
    if publication.is_some() {
        let rows = db
            .query(
                "SELECT pt.schemaname::text, pt.tablename::text, c.relreplident::text,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                        EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = c.oid AND i.indisreplident AND i.indisvalid)
                   FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                  WHERE pt.pubname = $1
                  ORDER BY 1, 2",
                &[&opts.publication],
            )
            .await
            .map_err(query_err("published tables"))?;
        for r in rows {
            let code: String = r.get(2);
            published.push(PublishedTable {
                schema: r.get(0),
                name: r.get(1),
                identity: ReplicaIdentity::from_code(&code).unwrap_or(ReplicaIdentity::Nothing),
                has_primary_key: r.get(3),
                has_identity_index: r.get(4),
            });
        }
    }

    let mut wanted: Vec<String> = REQUIRED_TABLES
        .iter()
        .chain(LOOKUP_TABLES.iter())
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    for t in &published {
        wanted.push(t.qualified());
    }
    wanted.sort();
    wanted.dedup();
    let rows = db
        .query(
            "SELECT n.nspname::text, c.relname::text, w.name, c.oid IS NOT NULL,
                    COALESCE(has_table_privilege(c.oid, 'SELECT'), false)
               FROM unnest($1::text[]) AS w(name)
               LEFT JOIN pg_class c ON c.oid = to_regclass(w.name)
               LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY w.name",
            &[&wanted],
        )
        .await
        .map_err(query_err("table privileges"))?;
    let source_tables = rows
        .iter()
        .map(|r| {
            let wanted_name: String = r.get(2);
            let (schema, name) =
                match (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)) {
                    (Some(s), Some(n)) => (s, n),
                    _ => split_qualified(&wanted_name),
                };
            SourceTable {
                schema,
                name,
                exists: r.get(3),
                can_select: r.get(4),
            }
        })
        .collect();

    let row = db
        .query_one(
            "SELECT n.oid IS NOT NULL,
                    COALESCE(has_schema_privilege(n.oid, 'USAGE') AND has_schema_privilege(n.oid, 'CREATE'), false),
                    has_database_privilege(current_database(), 'CREATE')
               FROM (SELECT 1) one
               LEFT JOIN pg_namespace n ON n.nspname = 'hubspot_sync'",
            &[],
        )
        .await
        .map_err(query_err("state schema"))?;
    let state_schema = StateSchema {
        exists: row.get(0),
        usable: row.get(1),
        can_create_in_database: row.get(2),
    };

    let slot = db
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, wal_status,
                    CASE WHEN pg_is_in_recovery() THEN NULL
                         ELSE (pg_current_wal_lsn() - restart_lsn)::bigint END,
                    CASE WHEN pg_is_in_recovery() THEN NULL
                         ELSE (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint END
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&opts.slot],
        )
        .await
        .map_err(query_err("replication slot"))?
        .map(|r| SlotInfo {
            plugin: r.get(0),
            slot_type: r.get(1),
            database: r.get(2),
            active: r.get(3),
            active_pid: r.get(4),
            wal_status: r.get(5),
            retained_bytes: r.get(6),
            lag_bytes: r.get(7),
        });

    Ok(Snapshot {
        server_version_num,
        database,
        in_recovery,
        wal_level,
        max_replication_slots,
        replication_slots_used,
        max_wal_senders,
        wal_senders_used,
        max_slot_wal_keep_size_mb,
        wal_sender_timeout_ms,
        role,
        publication,
        published,
        source_tables,
        state_schema,
        slot,
    })
}

/// All checks, in report order.
pub fn evaluate(s: &Snapshot, opts: &Options) -> Vec<Check> {
    let mut out = vec![
        check_server(s),
        check_wal_level(s),
        check_replication_slots(s),
        check_wal_senders(s),
        check_publication(s, opts),
    ];
    if s.publication.is_some() {
        out.push(check_publication_tables(s, opts));
        out.extend(check_replica_identities(s));
    }
    out.push(check_role_replication(s));
    out.push(check_select_privileges(s));
    out.push(check_state_schema(s));
    out.extend(check_slot(s, opts));
    out.push(check_max_slot_wal_keep_size(s));
    out.push(check_wal_sender_timeout(s));
    out
}

pub fn check_server(s: &Snapshot) -> Check {
    let version = version_text(s.server_version_num);
    if s.in_recovery {
        return Check::fail(
            "primary",
            format!("PostgreSQL {version} is a standby (in recovery): the sidecar writes its state to the database"),
            "point DATABASE_URL at the primary (with CloudNativePG: the -rw service)",
        );
    }
    if s.server_version_num < 150_000 {
        return Check::warn(
            "primary",
            format!("PostgreSQL {version}: the sidecar is built and tested for 15 or newer"),
            "upgrade the server to PostgreSQL 15 or newer",
        );
    }
    Check::pass("primary", format!("PostgreSQL {version}, not in recovery"))
}

pub fn check_wal_level(s: &Snapshot) -> Check {
    if s.wal_level == "logical" {
        Check::pass("wal_level", "logical")
    } else {
        Check::fail(
            "wal_level",
            format!("{} (logical decoding needs logical)", s.wal_level),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL \
             (CloudNativePG: spec.postgresql.parameters.wal_level: logical; RDS/Aurora: rds.logical_replication = 1)",
        )
    }
}

fn our_slot_exists(s: &Snapshot) -> bool {
    s.slot.is_some()
}

pub fn check_replication_slots(s: &Snapshot) -> Check {
    let detail = format!(
        "{} of max_replication_slots = {} in use",
        s.replication_slots_used, s.max_replication_slots
    );
    if our_slot_exists(s) {
        Check::pass("replication slots", format!("{detail}, ours among them"))
    } else if s.replication_slots_used < s.max_replication_slots {
        Check::pass(
            "replication slots",
            format!("{detail}, one is free for ours"),
        )
    } else {
        Check::fail(
            "replication slots",
            format!("{detail}: no slot is free for ours"),
            format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL \
                 (or drop an unused slot: SELECT pg_drop_replication_slot('<name>');)",
                s.replication_slots_used + 1
            ),
        )
    }
}

pub fn check_wal_senders(s: &Snapshot) -> Check {
    let detail = format!(
        "{} of max_wal_senders = {} in use",
        s.wal_senders_used, s.max_wal_senders
    );
    let ours_streaming = s.slot.as_ref().is_some_and(|slot| slot.active);
    if ours_streaming {
        Check::pass("wal senders", format!("{detail}, ours among them"))
    } else if s.wal_senders_used < s.max_wal_senders {
        Check::pass("wal senders", format!("{detail}, one is free for ours"))
    } else {
        Check::fail(
            "wal senders",
            format!("{detail}: no sender is free for ours"),
            format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
                s.wal_senders_used + 1
            ),
        )
    }
}

/// The statement that creates the publication as `sql/publication.sql` does.
pub fn create_publication_sql(publication: &str) -> String {
    let tables: Vec<String> = REQUIRED_TABLES
        .iter()
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let mut sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate');",
        quote_ident(publication),
        tables.join(", ")
    );
    for t in FULL_IDENTITY_TABLES {
        let _ = write!(
            sql,
            " ALTER TABLE {} REPLICA IDENTITY FULL;",
            qualified(SOURCE_SCHEMA, t)
        );
    }
    sql.push_str(" (as in sql/publication.sql)");
    sql
}

pub fn check_publication(s: &Snapshot, opts: &Options) -> Check {
    let name = format!("publication {}", opts.publication);
    let Some(p) = &s.publication else {
        return Check::fail(
            name,
            "does not exist: the sidecar cannot stream without it",
            create_publication_sql(&opts.publication),
        );
    };
    let mut missing = Vec::new();
    for (on, op) in [
        (p.insert, "insert"),
        (p.update, "update"),
        (p.delete, "delete"),
    ] {
        if !on {
            missing.push(op);
        }
    }
    let fix = format!(
        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
        quote_ident(&opts.publication)
    );
    let scope = if p.all_tables {
        "FOR ALL TABLES"
    } else {
        "FOR TABLE"
    };
    if !missing.is_empty() {
        return Check::fail(
            name,
            format!(
                "exists ({scope}) but does not publish {}",
                missing.join(", ")
            ),
            fix,
        );
    }
    if !p.truncate {
        return Check::warn(
            name,
            format!("exists ({scope}) but does not publish truncate: a TRUNCATE would go unseen"),
            fix,
        );
    }
    Check::pass(
        name,
        format!("exists ({scope}), publishes insert, update, delete, truncate"),
    )
}

pub fn check_publication_tables(s: &Snapshot, opts: &Options) -> Check {
    let name = "publication tables";
    let published = |t: &str| {
        s.published
            .iter()
            .any(|p| p.schema == SOURCE_SCHEMA && p.name == t)
    };
    let exists = |t: &str| {
        s.source_tables
            .iter()
            .any(|st| st.schema == SOURCE_SCHEMA && st.name == t && st.exists)
    };
    let missing: Vec<&str> = REQUIRED_TABLES
        .iter()
        .copied()
        .filter(|t| !published(t))
        .collect();
    if missing.is_empty() {
        return Check::pass(
            name,
            format!(
                "all {} required tables are published",
                REQUIRED_TABLES.len()
            ),
        );
    }
    let absent: Vec<String> = missing
        .iter()
        .filter(|t| !exists(t))
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let addable: Vec<String> = missing
        .iter()
        .filter(|t| exists(t))
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let listed: Vec<String> = missing
        .iter()
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let mut fix = String::new();
    if !addable.is_empty() {
        let _ = write!(
            fix,
            "ALTER PUBLICATION {} ADD TABLE {};",
            quote_ident(&opts.publication),
            addable.join(", ")
        );
        for t in FULL_IDENTITY_TABLES {
            if addable.contains(&qualified(SOURCE_SCHEMA, t)) {
                let _ = write!(
                    fix,
                    " ALTER TABLE {} REPLICA IDENTITY FULL;",
                    qualified(SOURCE_SCHEMA, t)
                );
            }
        }
    }
    if !absent.is_empty() {
        if !fix.is_empty() {
            fix.push(' ');
        }
        let _ = write!(
            fix,
            "create {} from sql/meltingspot_schema.sql, then add them to the publication",
            absent.join(", ")
        );
    }
    Check::fail(
        name,
        format!(
            "not published: {} (their changes would never reach HubSpot)",
            listed.join(", ")
        ),
        fix,
    )
}

/// One FAIL/WARN per table with a problem, or one PASS for all.
pub fn check_replica_identities(s: &Snapshot) -> Vec<Check> {
    let mut out = Vec::new();
    for t in &s.published {
        let name = format!("replica identity {}", t.qualified());
        let table = t.qualified();
        match (t.identity, t.has_primary_key) {
            (ReplicaIdentity::Nothing, pk) => out.push(Check::fail(
                name,
                "NOTHING: every UPDATE and DELETE of this published table fails for the application",
                if pk {
                    format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT;")
                } else {
                    format!("ALTER TABLE {table} REPLICA IDENTITY FULL; (or add a primary key)")
                },
            )),
            (ReplicaIdentity::Default, false) => out.push(Check::fail(
                name,
                "DEFAULT without a primary key: every UPDATE and DELETE of this published table fails for the application",
                format!("ALTER TABLE {table} ADD PRIMARY KEY (id); (or ALTER TABLE {table} REPLICA IDENTITY FULL;)"),
            )),
            (ReplicaIdentity::Index, _) if !t.has_identity_index => out.push(Check::fail(
                name,
                "USING INDEX, but no valid index is marked as the replica identity",
                format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT; (or USING INDEX on a valid unique index)"),
            )),
            (identity, _)
                if t.schema == SOURCE_SCHEMA
                    && FULL_IDENTITY_TABLES.contains(&t.name.as_str())
                    && identity != ReplicaIdentity::Full =>
            {
                out.push(Check::warn(
                    name,
                    "not FULL: an UPDATE does not carry the old row, so a status or timestamp that changes \
                     cannot be told from one that was already set (member activities are missed, others may repeat)",
                    format!("ALTER TABLE {table} REPLICA IDENTITY FULL;"),
                ))
            }
            _ => {}
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            "replica identity",
            format!(
                "all {} published tables have a usable replica identity",
                s.published.len()
            ),
        ));
    }
    out
}

pub fn check_role_replication(s: &Snapshot) -> Check {
    let name = format!("role {}", s.role.name);
    if s.role.superuser {
        Check::pass(
            name,
            "superuser (works; a role with REPLICATION and no superuser is enough, see sql/role.sql)",
        )
    } else if s.role.replication {
        Check::pass(name, "has REPLICATION")
    } else {
        Check::fail(
            name,
            "lacks REPLICATION: it cannot create or stream the slot",
            format!("ALTER ROLE {} WITH REPLICATION;", quote_ident(&s.role.name)),
        )
    }
}

pub fn check_select_privileges(s: &Snapshot) -> Check {
    let name = "select privilege";
    let missing: Vec<String> = s
        .source_tables
        .iter()
        .filter(|t| t.exists && !t.can_select)
        .map(|t| qualified(&t.schema, &t.name))
        .collect();
    let readable = s
        .source_tables
        .iter()
        .filter(|t| t.exists && t.can_select)
        .count();
    if missing.is_empty() {
        Check::pass(
            name,
            format!(
                "{} can read the {readable} tables the sidecar reads",
                s.role.name
            ),
        )
    } else {
        Check::fail(
            name,
            format!("{} cannot SELECT from {}", s.role.name, missing.join(", ")),
            format!(
                "GRANT SELECT ON {} TO {};",
                missing.join(", "),
                quote_ident(&s.role.name)
            ),
        )
    }
}

pub fn check_state_schema(s: &Snapshot) -> Check {
    let name = "state schema hubspot_sync";
    let role = quote_ident(&s.role.name);
    match (s.state_schema.exists, s.state_schema.usable) {
        (true, true) => Check::pass(name, format!("exists, {} may create in it", s.role.name)),
        (true, false) => Check::fail(
            name,
            format!(
                "exists but {} lacks USAGE or CREATE on it: migrations cannot run",
                s.role.name
            ),
            format!("ALTER SCHEMA hubspot_sync OWNER TO {role};"),
        ),
        (false, _) if s.state_schema.can_create_in_database => {
            Check::pass(name, "missing; the sidecar creates it at start".to_string())
        }
        (false, _) => Check::fail(
            name,
            format!("missing, and {} may not create schemas", s.role.name),
            format!("CREATE SCHEMA hubspot_sync AUTHORIZATION {role};"),
        ),
    }
}

/// The slot's existence, plugin, database, WAL status, activity and retained WAL.
pub fn check_slot(s: &Snapshot, opts: &Options) -> Vec<Check> {
    let name = format!("slot {}", opts.slot);
    let lit = quote_literal(&opts.slot);
    let Some(slot) = &s.slot else {
        return vec![Check::warn(
            name,
            "does not exist yet: `hubspot-sidecar run` creates it (pgoutput) at start",
            format!(
                "nothing to do, or create it now: SELECT pg_create_logical_replication_slot({lit}, 'pgoutput');"
            ),
        )];
    };
    let mut out = Vec::new();
    let drop_fix = format!(
        "SELECT pg_drop_replication_slot({lit}); (the sidecar re-creates it) or set SIDECAR_SLOT to another name"
    );
    if slot.slot_type != "logical" {
        out.push(Check::fail(
            name.clone(),
            format!("is a {} slot, not a logical one", slot.slot_type),
            drop_fix,
        ));
        return out;
    }
    if slot.plugin.as_deref() != Some("pgoutput") {
        out.push(Check::fail(
            name.clone(),
            format!(
                "uses plugin {}, not pgoutput",
                slot.plugin.as_deref().unwrap_or("(none)")
            ),
            drop_fix,
        ));
        return out;
    }
    if slot.database.as_deref() != Some(s.database.as_str()) {
        out.push(Check::fail(
            name.clone(),
            format!(
                "belongs to database {}, not {}",
                slot.database.as_deref().unwrap_or("(none)"),
                s.database
            ),
            format!(
                "set SIDECAR_SLOT to a name of its own for database {}",
                s.database
            ),
        ));
        return out;
    }
    out.push(Check::pass(name.clone(), "logical, pgoutput"));
    out.push(check_slot_wal_status(slot, opts));
    out.push(check_slot_active(slot, opts));
    out.push(check_retained_wal(slot, opts));
    out
}

pub fn check_slot_wal_status(slot: &SlotInfo, opts: &Options) -> Check {
    let name = "slot wal_status";
    let lit = quote_literal(&opts.slot);
    match slot.wal_status.as_deref() {
        Some("lost") => Check::fail(
            name,
            "lost: the WAL it needed was removed (max_slot_wal_keep_size); changes were missed and the slot cannot stream",
            format!(
                "SELECT pg_drop_replication_slot({lit}); DELETE FROM hubspot_sync.checkpoint WHERE slot_name = {lit}; \
                 then restart the sidecar (it creates a new slot) and reconnect each active Spot so its backfill \
                 re-syncs what was missed"
            ),
        ),
        Some("unreserved") => Check::warn(
            name,
            "unreserved: the slot is past max_slot_wal_keep_size and will be lost at the next checkpoint",
            "get the sidecar streaming now (kubectl logs; hubspot_sidecar_replication_lag_bytes), or raise \
             max_slot_wal_keep_size: ALTER SYSTEM SET max_slot_wal_keep_size = '<larger>'; SELECT pg_reload_conf();",
        ),
        Some(st @ ("reserved" | "extended")) => Check::pass(name, st.to_string()),
        Some(other) => Check::warn(
            name,
            format!("unexpected status {other}"),
            "check pg_replication_slots for this slot",
        ),
        None => Check::pass(name, "not reported by this server"),
    }
}

pub fn check_slot_active(slot: &SlotInfo, opts: &Options) -> Check {
    let name = "slot active";
    if slot.active {
        Check::pass(
            name,
            match slot.active_pid {
                Some(pid) => format!("streaming to wal sender pid {pid}"),
                None => "streaming".to_string(),
            },
        )
    } else {
        Check::warn(
            name,
            "inactive: no sidecar is streaming it, so it retains WAL",
            format!(
                "start the sidecar (hubspot-sidecar run with SIDECAR_SLOT={}); if it is gone for good: \
                 SELECT pg_drop_replication_slot({});",
                opts.slot,
                quote_literal(&opts.slot)
            ),
        )
    }
}

pub fn check_retained_wal(slot: &SlotInfo, opts: &Options) -> Check {
    let name = "retained WAL";
    let Some(retained) = slot.retained_bytes else {
        return Check::pass(name, "not measurable (no restart_lsn or a standby)");
    };
    let lag = slot
        .lag_bytes
        .map(|l| format!(", {} not yet confirmed", bytes_text(l)))
        .unwrap_or_default();
    let detail = format!(
        "{} held by the slot{lag} (threshold {})",
        bytes_text(retained),
        bytes_text(opts.max_retained_wal_bytes)
    );
    if retained > opts.max_retained_wal_bytes {
        Check::warn(
            name,
            detail,
            format!(
                "check that the sidecar streams (slot active, hubspot_sidecar_replication_lag_bytes falling); \
                 if it is gone for good: SELECT pg_drop_replication_slot({});",
                quote_literal(&opts.slot)
            ),
        )
    } else {
        Check::pass(name, detail)
    }
}

pub fn check_max_slot_wal_keep_size(s: &Snapshot) -> Check {
    let name = "max_slot_wal_keep_size";
    if s.max_slot_wal_keep_size_mb < 0 {
        Check::warn(
            name,
            "-1 (unlimited): a stopped sidecar's slot can fill the primary's disk",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '16GB'; SELECT pg_reload_conf(); \
             (size it to the WAL written while the sidecar may be down, below the free disk)",
        )
    } else {
        Check::pass(
            name,
            format!(
                "{} caps the WAL a slot may retain",
                bytes_text(s.max_slot_wal_keep_size_mb.saturating_mul(1 << 20))
            ),
        )
    }
}

pub fn check_wal_sender_timeout(s: &Snapshot) -> Check {
    let name = "wal_sender_timeout";
    let ms = s.wal_sender_timeout_ms;
    let fix = "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();";
    if ms == 0 {
        Check::pass(
            name,
            "0 (disabled): dead connections are only noticed by TCP keepalives",
        )
    } else if ms < SENDER_TIMEOUT_FAIL_MS {
        Check::fail(
            name,
            format!(
                "{ms} ms: the sidecar reports every {STATUS_INTERVAL_MS} ms, so one late report drops the stream"
            ),
            fix,
        )
    } else if ms < SENDER_TIMEOUT_WARN_MS {
        Check::warn(
            name,
            format!(
                "{ms} ms: under 10 s, a pause of a few seconds (GC, CPU throttling) drops the stream"
            ),
            fix,
        )
    } else {
        Check::pass(
            name,
            format!(
                "{} s (the sidecar reports every {} s)",
                ms / 1000,
                STATUS_INTERVAL_MS / 1000
            ),
        )
    }
}

/// The report: one line per check, a fix line under each WARN and FAIL, and a summary.
pub fn render(checks: &[Check]) -> String {
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
pub fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.status == Status::Fail))
}

fn version_text(num: i32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, (num / 100) % 100, num % 100)
    }
}

fn bytes_text(bytes: i64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes.unsigned_abs() >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (MIB * 1024.0))
    } else if bytes.unsigned_abs() >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// An identifier as SQL writes it: bare when that is unambiguous, else quoted.
pub fn quote_ident(name: &str) -> String {
    let simple = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if simple {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

fn split_qualified(q: &str) -> (String, String) {
    match q.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => (SOURCE_SCHEMA.to_string(), q.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            slot: "hubspot_sidecar".into(),
            publication: "hubspot_sidecar".into(),
            max_retained_wal_bytes: 1024 << 20,
        }
    }

    fn slot() -> SlotInfo {
        SlotInfo {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("meltingspot".into()),
            active: true,
            active_pid: Some(4242),
            wal_status: Some("reserved".into()),
            retained_bytes: Some(4096),
            lag_bytes: Some(0),
        }
    }

    /// A database set up as the README says.
    fn good() -> Snapshot {
        let published = REQUIRED_TABLES
            .iter()
            .map(|t| PublishedTable {
                schema: "public".into(),
                name: t.to_string(),
                identity: if FULL_IDENTITY_TABLES.contains(t) {
                    ReplicaIdentity::Full
                } else {
                    ReplicaIdentity::Default
                },
                has_primary_key: true,
                has_identity_index: false,
            })
            .collect();
        let source_tables = REQUIRED_TABLES
            .iter()
            .chain(LOOKUP_TABLES.iter())
            .map(|t| SourceTable {
                schema: "public".into(),
                name: t.to_string(),
                exists: true,
                can_select: true,
            })
            .collect();
        Snapshot {
            server_version_num: 160_004,
            database: "meltingspot".into(),
            in_recovery: false,
            wal_level: "logical".into(),
            max_replication_slots: 10,
            replication_slots_used: 1,
            max_wal_senders: 10,
            wal_senders_used: 1,
            max_slot_wal_keep_size_mb: 16 * 1024,
            wal_sender_timeout_ms: 60_000,
            role: RoleInfo {
                name: "hubspot_sidecar".into(),
                superuser: false,
                replication: true,
            },
            publication: Some(PublicationInfo {
                all_tables: false,
                insert: true,
                update: true,
                delete: true,
                truncate: true,
            }),
            published,
            source_tables,
            state_schema: StateSchema {
                exists: true,
                usable: true,
                can_create_in_database: false,
            },
            slot: Some(slot()),
        }
    }

    fn by_name<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
    }

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
    fn wal_level_replica_fails_with_the_alter_system_fix() {
        let mut s = good();
        s.wal_level = "replica".into();
        let c = check_wal_level(&s);
        assert_eq!(c.status, Status::Fail);
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("ALTER SYSTEM SET wal_level = logical"));
        let checks = evaluate(&s, &opts());
        assert_eq!(exit_code(&checks), 1);
        let report = render(&checks);
        assert!(report.contains("FAIL  wal_level: replica"), "{report}");
        assert!(
            report.contains("      fix: ALTER SYSTEM SET wal_level = logical;"),
            "{report}"
        );
    }

    #[test]
    fn slots_and_senders_need_room_unless_ours_exists() {
        let mut s = good();
        s.replication_slots_used = 10;
        s.wal_senders_used = 10;
        assert_eq!(check_replication_slots(&s).status, Status::Pass);
        assert_eq!(check_wal_senders(&s).status, Status::Pass);
        s.slot.as_mut().unwrap().active = false;
        let senders = check_wal_senders(&s);
        assert_eq!(senders.status, Status::Fail);
        assert!(senders.fix.unwrap().contains("max_wal_senders = 11"));
        s.slot = None;
        let slots = check_replication_slots(&s);
        assert_eq!(slots.status, Status::Fail);
        assert!(slots.fix.unwrap().contains("max_replication_slots = 11"));
        s.replication_slots_used = 3;
        assert_eq!(check_replication_slots(&s).status, Status::Pass);
    }

    #[test]
    fn a_missing_publication_fails_with_create_publication() {
        let mut s = good();
        s.publication = None;
        s.published.clear();
        let checks = evaluate(&s, &opts());
        let c = by_name(&checks, "publication hubspot_sidecar");
        assert_eq!(c.status, Status::Fail);
        let fix = c.fix.as_deref().unwrap();
        assert!(fix.starts_with("CREATE PUBLICATION hubspot_sidecar FOR TABLE public.members,"));
        assert!(fix.contains("ALTER TABLE public.course_progress REPLICA IDENTITY FULL;"));
        // The table and identity checks have nothing to look at.
        assert!(!checks.iter().any(|c| c.name == "publication tables"));
    }

    #[test]
    fn publication_operations() {
        let mut s = good();
        s.publication.as_mut().unwrap().truncate = false;
        assert_eq!(check_publication(&s, &opts()).status, Status::Warn);
        s.publication.as_mut().unwrap().delete = false;
        let c = check_publication(&s, &opts());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("delete"));
        assert!(c
            .fix
            .unwrap()
            .contains("SET (publish = 'insert, update, delete, truncate')"));
    }

    #[test]
    fn missing_tables_are_named_with_alter_publication() {
        let mut s = good();
        s.published
            .retain(|t| t.name != "tags" && t.name != "course_progress");
        let c = check_publication_tables(&s, &opts());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("public.tags"), "{}", c.detail);
        let fix = c.fix.unwrap();
        assert!(fix.starts_with(
            "ALTER PUBLICATION hubspot_sidecar ADD TABLE public.tags, public.course_progress;"
        ));
        assert!(fix.contains("ALTER TABLE public.course_progress REPLICA IDENTITY FULL;"));
        // A table that does not exist cannot be added: the schema is named instead.
        s.source_tables.retain(|t| t.name != "tags");
        let fix = check_publication_tables(&s, &opts()).fix.unwrap();
        assert!(fix.contains("create public.tags from sql/meltingspot_schema.sql"));
    }

    #[test]
    fn replica_identity_rules() {
        let table = |name: &str, identity, pk, idx| PublishedTable {
            schema: "public".into(),
            name: name.into(),
            identity,
            has_primary_key: pk,
            has_identity_index: idx,
        };
        let mut s = good();
        s.published = vec![
            table("members", ReplicaIdentity::Nothing, true, false),
            table("tags", ReplicaIdentity::Default, false, false),
            table("groups", ReplicaIdentity::Index, false, true),
            table("topics", ReplicaIdentity::Index, false, false),
            table("live_registrations", ReplicaIdentity::Default, true, false),
            table("course_progress", ReplicaIdentity::Full, false, false),
            table("custom_roles", ReplicaIdentity::Full, false, false),
        ];
        let checks = check_replica_identities(&s);
        let status = |n: &str| {
            checks
                .iter()
                .find(|c| c.name == format!("replica identity public.{n}"))
                .map(|c| (c.status, c.fix.clone().unwrap_or_default()))
        };
        let (st, fix) = status("members").unwrap();
        assert_eq!(st, Status::Fail);
        assert_eq!(fix, "ALTER TABLE public.members REPLICA IDENTITY DEFAULT;");
        let (st, fix) = status("tags").unwrap();
        assert_eq!(st, Status::Fail);
        assert!(fix.contains("REPLICA IDENTITY FULL"), "{fix}");
        assert_eq!(status("groups"), None);
        assert_eq!(status("topics").unwrap().0, Status::Fail);
        let (st, fix) = status("live_registrations").unwrap();
        assert_eq!(st, Status::Warn);
        assert_eq!(
            fix,
            "ALTER TABLE public.live_registrations REPLICA IDENTITY FULL;"
        );
        assert_eq!(status("course_progress"), None);
        assert_eq!(status("custom_roles"), None);
    }

    #[test]
    fn role_without_replication_or_select() {
        let mut s = good();
        s.role = RoleInfo {
            name: "Reader".into(),
            superuser: false,
            replication: false,
        };
        s.source_tables[0].can_select = false;
        let r = check_role_replication(&s);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.fix.as_deref(),
            Some("ALTER ROLE \"Reader\" WITH REPLICATION;")
        );
        let p = check_select_privileges(&s);
        assert_eq!(p.status, Status::Fail);
        assert_eq!(
            p.fix.as_deref(),
            Some("GRANT SELECT ON public.members TO \"Reader\";")
        );
        s.role.superuser = true;
        assert_eq!(check_role_replication(&s).status, Status::Pass);
    }

    #[test]
    fn state_schema_rules() {
        let mut s = good();
        s.state_schema = StateSchema {
            exists: false,
            usable: false,
            can_create_in_database: true,
        };
        assert_eq!(check_state_schema(&s).status, Status::Pass);
        s.state_schema.can_create_in_database = false;
        let c = check_state_schema(&s);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.fix.as_deref(),
            Some("CREATE SCHEMA hubspot_sync AUTHORIZATION hubspot_sidecar;")
        );
        s.state_schema.exists = true;
        assert_eq!(check_state_schema(&s).status, Status::Fail);
    }

    #[test]
    fn a_lost_slot_fails_and_unreserved_warns() {
        let mut sl = slot();
        sl.wal_status = Some("lost".into());
        let c = check_slot_wal_status(&sl, &opts());
        assert_eq!(c.status, Status::Fail);
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .starts_with("SELECT pg_drop_replication_slot('hubspot_sidecar');"));
        let mut s = good();
        s.slot = Some(sl.clone());
        assert_eq!(exit_code(&evaluate(&s, &opts())), 1);

        sl.wal_status = Some("unreserved".into());
        assert_eq!(check_slot_wal_status(&sl, &opts()).status, Status::Warn);
        sl.wal_status = Some("extended".into());
        assert_eq!(check_slot_wal_status(&sl, &opts()).status, Status::Pass);
    }

    #[test]
    fn slot_shape_activity_and_retained_wal() {
        let mut s = good();
        s.slot = None;
        let c = &check_slot(&s, &opts())[0];
        assert_eq!(c.status, Status::Warn);
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("pg_create_logical_replication_slot('hubspot_sidecar', 'pgoutput')"));
        // WARNs alone still exit 0.
        assert_eq!(exit_code(&evaluate(&s, &opts())), 0);

        let mut sl = slot();
        sl.plugin = Some("test_decoding".into());
        s.slot = Some(sl);
        let checks = check_slot(&s, &opts());
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, Status::Fail);

        let mut sl = slot();
        sl.database = Some("other".into());
        s.slot = Some(sl);
        assert_eq!(check_slot(&s, &opts())[0].status, Status::Fail);

        let mut sl = slot();
        sl.active = false;
        assert_eq!(check_slot_active(&sl, &opts()).status, Status::Warn);
        sl.retained_bytes = Some((1024 << 20) + 1);
        assert_eq!(check_retained_wal(&sl, &opts()).status, Status::Warn);
        sl.retained_bytes = Some(1024 << 20);
        assert_eq!(check_retained_wal(&sl, &opts()).status, Status::Pass);
    }

    #[test]
    fn keep_size_and_sender_timeout() {
        let mut s = good();
        s.max_slot_wal_keep_size_mb = -1;
        let c = check_max_slot_wal_keep_size(&s);
        assert_eq!(c.status, Status::Warn);
        assert!(c
            .fix
            .unwrap()
            .starts_with("ALTER SYSTEM SET max_slot_wal_keep_size"));
        for (ms, want) in [
            (0, Status::Pass),
            (1, Status::Fail),
            (1_999, Status::Fail),
            (2_000, Status::Warn),
            (9_999, Status::Warn),
            (10_000, Status::Pass),
            (60_000, Status::Pass),
        ] {
            s.wal_sender_timeout_ms = ms;
            assert_eq!(check_wal_sender_timeout(&s).status, want, "{ms} ms");
        }
    }

    #[test]
    fn standby_and_old_servers() {
        let mut s = good();
        s.in_recovery = true;
        assert_eq!(check_server(&s).status, Status::Fail);
        s.in_recovery = false;
        s.server_version_num = 140_010;
        assert_eq!(check_server(&s).status, Status::Warn);
        assert_eq!(version_text(160_004), "16.4");
        assert_eq!(version_text(90_624), "9.6.24");
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

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("hubspot_sidecar"), "hubspot_sidecar");
        assert_eq!(quote_ident("My Pub"), "\"My Pub\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(bytes_text(3 << 20), "3.0 MiB");
        assert_eq!(bytes_text(512), "512 bytes");
    }
}
