//! The rules: `evaluate` turns a `Snapshot` into the report's `Check`s, in
//! report order, without touching the network. One file per concern.

mod emit_message;
mod identity;
mod privileges;
mod publication;
mod server;
mod slot;

use super::snapshot::Snapshot;
use super::Options;
use emit_message::check_emit_message;
use identity::check_replica_identities;
use privileges::{check_role_replication, check_select_privileges, check_state_schema};
use publication::{check_publication, check_publication_tables};
use server::{check_replication_slots, check_server, check_wal_level, check_wal_senders};
use slot::{
    check_failover_slots, check_max_slot_wal_keep_size, check_slot, check_wal_sender_timeout,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Status {
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
pub(crate) struct Check {
    pub status: Status,
    pub name: String,
    pub detail: String,
    /// The SQL or setting that fixes a WARN or FAIL.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            status: Status::Pass,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Warn,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub(crate) fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Fail,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// All checks, in report order.
pub(crate) fn evaluate(s: &Snapshot, opts: &Options) -> Vec<Check> {
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
    out.push(check_emit_message(s));
    out.extend(check_slot(s, opts));
    out.push(check_max_slot_wal_keep_size(s));
    out.push(check_wal_sender_timeout(s));
    out.push(check_failover_slots(s, opts));
    out
}

pub(crate) fn version_text(num: i32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, (num / 100) % 100, num % 100)
    }
}

pub(crate) fn bytes_text(bytes: i64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes.unsigned_abs() >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (MIB * 1024.0))
    } else if bytes.unsigned_abs() >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{bytes} bytes")
    }
}
