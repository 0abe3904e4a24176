//! The replication slot and the WAL it holds: its shape, wal_status, activity,
//! retained WAL, and the settings that bound them (max_slot_wal_keep_size,
//! wal_sender_timeout).

use super::{bytes_text, Check};
use crate::doctor::snapshot::{SlotInfo, Snapshot};
use crate::doctor::sql::quote_literal;
use crate::doctor::Options;

/// The sidecar's replication status interval; wal_sender_timeout must leave room for it.
const STATUS_INTERVAL_MS: i64 = 1_000;
/// Below this wal_sender_timeout a stall of a few status intervals drops the stream.
const SENDER_TIMEOUT_WARN_MS: i64 = 10_000;
/// Below this a single late status update can drop the stream.
const SENDER_TIMEOUT_FAIL_MS: i64 = 2_000;

/// The slot's existence, plugin, database, WAL status, activity and retained WAL.
pub(crate) fn check_slot(s: &Snapshot, opts: &Options) -> Vec<Check> {
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

pub(crate) fn check_slot_wal_status(slot: &SlotInfo, opts: &Options) -> Check {
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

pub(crate) fn check_slot_active(slot: &SlotInfo, opts: &Options) -> Check {
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

pub(crate) fn check_retained_wal(slot: &SlotInfo, opts: &Options) -> Check {
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

pub(crate) fn check_max_slot_wal_keep_size(s: &Snapshot) -> Check {
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

pub(crate) fn check_wal_sender_timeout(s: &Snapshot) -> Check {
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

/// PostgreSQL 17+: the slot is a failover slot and the primary waits for
/// the standbys' slots, so a promotion keeps the slot (no resync). Older
/// servers cannot: a failover is healed by a resync, which is said here.
pub(crate) fn check_failover_slots(s: &Snapshot, opts: &Options) -> Check {
    const NAME: &str = "failover slots";
    if s.server_version_num < 170_000 {
        return Check::pass(
            NAME,
            format!(
                "PostgreSQL {}: logical slots are not copied to standbys; after a failover the \
                 sidecar recreates its slot and resynchronises every Spot (runbook: Standby and failover)",
                super::version_text(s.server_version_num)
            ),
        );
    }
    if s.slot.as_ref().is_some_and(|slot| !slot.failover) {
        return Check::warn(
            NAME,
            "the slot is not a failover slot: a promotion loses it and costs a resync",
            format!(
                "psql \"dbname={} replication=database\" -c 'ALTER_REPLICATION_SLOT {} (FAILOVER true)'",
                s.database, opts.slot
            ),
        );
    }
    if s.synchronized_standby_slots.is_empty() && !s.physical_slots.is_empty() {
        return Check::warn(
            NAME,
            "synchronized_standby_slots is empty: a standby may be promoted without the slot's latest position",
            format!(
                "ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf(); \
                 and on each standby: sync_replication_slots = on, hot_standby_feedback = on",
                quote_literal(&s.physical_slots.join(","))
            ),
        );
    }
    Check::pass(
        NAME,
        "the slot is a failover slot; check sync_replication_slots = on on each standby",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::{evaluate, Status};
    use crate::doctor::exit_code;
    use crate::doctor::fixtures::{good, opts, slot};

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
    fn failover_slots_are_checked_from_postgres_17_on() {
        let mut s = good();
        s.server_version_num = 150_004;
        assert_eq!(check_failover_slots(&s, &opts()).status, Status::Pass);
        s.server_version_num = 170_002;
        let c = check_failover_slots(&s, &opts());
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap_or_default().contains("FAILOVER true"));
        s.slot.as_mut().unwrap().failover = true;
        s.physical_slots = vec!["standby_1".into()];
        let c = check_failover_slots(&s, &opts());
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap_or_default().contains("'standby_1'"));
        s.synchronized_standby_slots = "standby_1".into();
        assert_eq!(check_failover_slots(&s, &opts()).status, Status::Pass);
    }
}
