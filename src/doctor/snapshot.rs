//! The `Snapshot` of a server that the checks judge, and `collect`, which reads
//! it with plain catalog queries: the only part of doctor that queries the server.

use super::sql::{qualified, split_qualified};
use super::{DoctorError, Options, LOOKUP_TABLES, REQUIRED_TABLES, SOURCE_SCHEMA};

/// Everything the checks need, read in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
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
    /// PostgreSQL 17+: the standbys' physical slots the primary waits for
    /// before a failover slot's changes go out ("" when unset or older).
    pub synchronized_standby_slots: String,
    /// Names of the physical slots (the standbys'), for the fix.
    pub physical_slots: Vec<String>,
    pub emit_message: EmitMessagePrivileges,
}

/// Who may call `pg_logical_emit_message`, i.e. write messages into the WAL
/// that the sidecar's stream reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EmitMessagePrivileges {
    /// Every overload in pg_catalog as `regprocedure` writes it, e.g.
    /// `pg_logical_emit_message(boolean,text,text)`.
    pub overloads: Vec<String>,
    /// PUBLIC holds EXECUTE on some overload (the default: a NULL `proacl`).
    pub public: bool,
    /// Roles, other than superusers and the sidecar's, named in an overload's
    /// ACL with EXECUTE: the ones to revoke it from.
    pub grantees: Vec<String>,
    /// Roles, other than superusers and the sidecar's, that can EXECUTE some
    /// overload: directly, through PUBLIC, or through a role they belong to.
    pub others: Vec<String>,
    /// The sidecar's role can EXECUTE every overload.
    pub role_can_execute: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleInfo {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublicationInfo {
    pub all_tables: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicaIdentity {
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
pub(crate) struct PublishedTable {
    pub schema: String,
    pub name: String,
    pub identity: ReplicaIdentity,
    pub has_primary_key: bool,
    /// A valid index is marked as the replica identity (for `USING INDEX`).
    pub has_identity_index: bool,
}

impl PublishedTable {
    pub(crate) fn qualified(&self) -> String {
        qualified(&self.schema, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceTable {
    pub schema: String,
    pub name: String,
    pub exists: bool,
    pub can_select: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateSchema {
    pub exists: bool,
    /// USAGE and CREATE on hubspot_sync (the owner has both).
    pub usable: bool,
    /// CREATE on the database (needed to create hubspot_sync).
    pub can_create_in_database: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotInfo {
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
    /// PostgreSQL 17+: a failover slot (copied to standbys).
    pub failover: bool,
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
pub(crate) async fn collect(
    db: &tokio_postgres::Client,
    opts: &Options,
) -> Result<Snapshot, DoctorError> {
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
                         ELSE (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint END,
                    COALESCE((to_jsonb(s) ->> 'failover')::bool, false)
               FROM pg_replication_slots s WHERE slot_name = $1",
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
            failover: r.get(8),
        });
    let standby_slots = db
        .query_one(
            "SELECT COALESCE(current_setting('synchronized_standby_slots', true), ''),
                    ARRAY(SELECT slot_name::text FROM pg_replication_slots
                           WHERE slot_type = 'physical' ORDER BY slot_name)",
            &[],
        )
        .await
        .map_err(query_err("standby slots"))?;
    let synchronized_standby_slots: String = standby_slots.get(0);
    let physical_slots: Vec<String> = standby_slots.get(1);

    // Roles with or without LOGIN alike: a NOLOGIN role holding EXECUTE passes
    // it on to every login role it is granted to.
    let row = db
        .query_one(
            "WITH f AS (
                 SELECT p.oid, p.oid::regprocedure::text AS sig,
                        COALESCE(p.proacl, acldefault('f', p.proowner)) AS acl
                   FROM pg_proc p
                  WHERE p.proname = 'pg_logical_emit_message'
                    AND p.pronamespace = 'pg_catalog'::regnamespace
             )
             SELECT ARRAY(SELECT sig FROM f ORDER BY sig),
                    EXISTS (SELECT 1 FROM f CROSS JOIN LATERAL aclexplode(f.acl) a
                             WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
                    ARRAY(SELECT DISTINCT r.rolname::text
                            FROM f CROSS JOIN LATERAL aclexplode(f.acl) a
                            JOIN pg_roles r ON r.oid = a.grantee
                           WHERE a.privilege_type = 'EXECUTE' AND NOT r.rolsuper
                             AND r.rolname <> current_user
                           ORDER BY 1),
                    ARRAY(SELECT r.rolname::text FROM pg_roles r
                           WHERE NOT r.rolsuper AND r.rolname <> current_user
                             AND EXISTS (SELECT 1 FROM f
                                          WHERE has_function_privilege(r.oid, f.oid, 'EXECUTE'))
                           ORDER BY 1),
                    COALESCE((SELECT bool_and(has_function_privilege(f.oid, 'EXECUTE')) FROM f),
                             true)",
            &[],
        )
        .await
        .map_err(query_err("pg_logical_emit_message privileges"))?;
    let emit_message = EmitMessagePrivileges {
        overloads: row.get(0),
        public: row.get(1),
        grantees: row.get(2),
        others: row.get(3),
        role_can_execute: row.get(4),
    };

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
        synchronized_standby_slots,
        physical_slots,
        emit_message,
    })
}
