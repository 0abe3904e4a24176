//! Test fixtures shared by the doctor's unit tests: a database set up as the
//! README says, its slot, and the options doctor runs with by default.

use super::snapshot::{
    EmitMessagePrivileges, PublicationInfo, PublishedTable, ReplicaIdentity, RoleInfo, SlotInfo,
    Snapshot, SourceTable, StateSchema,
};
use super::{Options, FULL_IDENTITY_TABLES, LOOKUP_TABLES, REQUIRED_TABLES};

pub(crate) fn opts() -> Options {
    Options {
        slot: "hubspot_sidecar".into(),
        publication: "hubspot_sidecar".into(),
        max_retained_wal_bytes: 1024 << 20,
    }
}

pub(crate) fn slot() -> SlotInfo {
    SlotInfo {
        plugin: Some("pgoutput".into()),
        slot_type: "logical".into(),
        database: Some("meltingspot".into()),
        active: true,
        active_pid: Some(4242),
        wal_status: Some("reserved".into()),
        retained_bytes: Some(4096),
        lag_bytes: Some(0),
        failover: false,
    }
}

/// A database set up as the README says.
pub(crate) fn good() -> Snapshot {
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
        synchronized_standby_slots: String::new(),
        physical_slots: Vec::new(),
        emit_message: emit_message_revoked(),
    }
}

/// `pg_logical_emit_message` after sql/role.sql: only the sidecar's role (and
/// superusers) may call it.
pub(crate) fn emit_message_revoked() -> EmitMessagePrivileges {
    EmitMessagePrivileges {
        overloads: vec![
            "pg_logical_emit_message(boolean,text,bytea)".into(),
            "pg_logical_emit_message(boolean,text,text)".into(),
        ],
        public: false,
        grantees: Vec::new(),
        others: Vec::new(),
        role_can_execute: true,
    }
}
