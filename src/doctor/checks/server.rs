//! The server itself: a primary of a supported version, `wal_level`, and room
//! for one more replication slot and WAL sender.

use super::{version_text, Check};
use crate::doctor::snapshot::Snapshot;

pub(crate) fn check_server(s: &Snapshot) -> Check {
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

pub(crate) fn check_wal_level(s: &Snapshot) -> Check {
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

pub(crate) fn check_replication_slots(s: &Snapshot) -> Check {
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

pub(crate) fn check_wal_senders(s: &Snapshot) -> Check {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::{evaluate, Status};
    use crate::doctor::fixtures::{good, opts};
    use crate::doctor::{exit_code, render};

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
}
