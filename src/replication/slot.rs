//! The slot's health against the checkpoint (SPEC §10): on every (re)connect
//! and every minute, four checks. When one fails, the changes in some range
//! of the WAL can no longer be read, so the slot is recreated and every Spot
//! is resynchronised from current values (`store::resync_all`).
//!
//! 1. The slot exists and is not `lost` (`max_slot_wal_keep_size`).
//! 2. The server is the one the checkpoint was taken on: same system
//!    identifier, same timeline (a failover to a standby or a restore gives
//!    another; a PostgreSQL 17 failover slot keeps its position across a
//!    promotion, so for it a new timeline alone is no gap).
//! 3. The checkpoint is not behind the slot: the server would start after
//!    it, and skip what lies between. (Idle positions are stored before
//!    they are acknowledged, so in normal operation the checkpoint is never
//!    behind the slot's confirmed position.)
//! 4. The checkpoint is not ahead of the server's WAL (a restore into a
//!    cluster whose LSNs are lower: without this check everything below the
//!    old LSN would be skipped).

use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use super::ReplicationError;
use crate::store::CheckpointRow;

/// Why the slot had to be recreated (`hubspot_sidecar_resyncs_total{cause}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncCause {
    /// The slot was dropped, or never came with a failover.
    SlotMissing,
    /// The server invalidated the slot (`wal_status = 'lost'`).
    SlotLost,
    /// Another server (a restore, a new cluster).
    SystemChanged,
    /// Another timeline (a promotion or point-in-time recovery).
    TimelineChanged,
    /// The slot is past the checkpoint: the WAL in between is not readable.
    CheckpointBehindSlot,
    /// The checkpoint is past the server's WAL.
    CheckpointAheadOfServer,
}

impl ResyncCause {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncCause::SlotMissing => "slot_missing",
            ResyncCause::SlotLost => "slot_lost",
            ResyncCause::SystemChanged => "system_changed",
            ResyncCause::TimelineChanged => "timeline_changed",
            ResyncCause::CheckpointBehindSlot => "checkpoint_behind_slot",
            ResyncCause::CheckpointAheadOfServer => "checkpoint_ahead_of_server",
        }
    }

    /// Shows every cause's resync counter at 0 from the start (the metrics
    /// know nothing of the causes: they sit below every stage).
    pub fn zero_counters(metrics: &crate::metrics::Metrics) {
        for cause in Self::ALL {
            metrics
                .resyncs
                .with_label_values(&[cause.as_str()])
                .inc_by(0);
        }
    }

    /// Every cause, for metrics that report each.
    pub const ALL: [ResyncCause; 6] = [
        ResyncCause::SlotMissing,
        ResyncCause::SlotLost,
        ResyncCause::SystemChanged,
        ResyncCause::TimelineChanged,
        ResyncCause::CheckpointBehindSlot,
        ResyncCause::CheckpointAheadOfServer,
    ];
}

/// Which server this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`, as text.
    pub system_id: String,
    /// The timeline of the current WAL position.
    pub timeline: i32,
    /// `pg_current_wal_lsn()`.
    pub wal_lsn: u64,
}

/// The slot as the server shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotState {
    /// `wal_status = 'lost'`.
    pub lost: bool,
    /// `confirmed_flush_lsn`.
    pub confirmed: Option<u64>,
    /// PostgreSQL 17+: synchronised to standbys, survives a promotion.
    pub failover: bool,
}

/// Reads the server's identity.
pub async fn server_identity(db: &Client) -> Result<ServerIdentity, ReplicationError> {
    let row = db
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,
                    pg_current_wal_lsn()",
            &[],
        )
        .await?;
    Ok(ServerIdentity {
        system_id: row.get(0),
        timeline: row.get(1),
        wal_lsn: u64::from(row.get::<_, PgLsn>(2)),
    })
}

/// Reads the slot; None when it does not exist. Version-independent (the
/// `failover` column exists from PostgreSQL 17 on).
pub async fn slot_state(db: &Client, slot: &str) -> Result<Option<SlotState>, ReplicationError> {
    let row = db
        .query_opt(
            "SELECT s.wal_status = 'lost', s.confirmed_flush_lsn,
                    COALESCE((to_jsonb(s) ->> 'failover')::bool, false), s.plugin
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(plugin) = row.as_ref().map(|r| r.get::<_, Option<String>>(3)) {
        if plugin.as_deref() != Some("pgoutput") {
            return Err(ReplicationError::Protocol(format!(
                "slot {slot} exists with plugin {plugin:?}, not pgoutput: drop it or choose another SIDECAR_SLOT"
            )));
        }
    }
    Ok(row.map(|r| SlotState {
        lost: r.get::<_, Option<bool>>(0).unwrap_or(false),
        confirmed: r.get::<_, Option<PgLsn>>(1).map(u64::from),
        failover: r.get(2),
    }))
}

/// The four checks, pure: what (if anything) forces a resync.
pub fn verdict(
    checkpoint: Option<&CheckpointRow>,
    server: &ServerIdentity,
    slot: Option<&SlotState>,
) -> Option<ResyncCause> {
    // No checkpoint: a first start, nothing was streamed that could be missed.
    let cp = checkpoint?;
    if cp
        .system_id
        .as_deref()
        .is_some_and(|id| id != server.system_id)
    {
        return Some(ResyncCause::SystemChanged);
    }
    let Some(slot) = slot else {
        return Some(ResyncCause::SlotMissing);
    };
    if slot.lost {
        return Some(ResyncCause::SlotLost);
    }
    if cp.timeline.is_some_and(|t| t != server.timeline) && !slot.failover {
        return Some(ResyncCause::TimelineChanged);
    }
    if cp.lsn > server.wal_lsn {
        return Some(ResyncCause::CheckpointAheadOfServer);
    }
    // Rows written before the server was recorded (an upgrade) may trail an
    // idle acknowledgement of the old version: only known rows are checked.
    if cp.system_id.is_some() && slot.confirmed.is_some_and(|c| c > cp.lsn) {
        return Some(ResyncCause::CheckpointBehindSlot);
    }
    None
}

/// Drops the slot if it exists (ending a walsender that still holds it) and
/// creates it anew. Returns its starting position.
pub async fn recreate(db: &Client, slot: &str) -> Result<u64, ReplicationError> {
    db.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
          WHERE slot_name = $1 AND active_pid IS NOT NULL",
        &[&slot],
    )
    .await?;
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?;
    create(db, slot).await
}

/// Creates the slot with pgoutput (a failover slot from PostgreSQL 17 on, so
/// that it is synchronised to standbys and survives a promotion). Returns its
/// starting position.
pub async fn create(db: &Client, slot: &str) -> Result<u64, ReplicationError> {
    let version: i32 = db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let sql = if version >= 170_000 {
        "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let lsn: PgLsn = db.query_one(sql, &[&slot]).await?.get(0);
    Ok(u64::from(lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerIdentity {
        ServerIdentity {
            system_id: "7000".into(),
            timeline: 1,
            wal_lsn: 1000,
        }
    }

    fn cp(lsn: u64) -> CheckpointRow {
        CheckpointRow {
            lsn,
            system_id: Some("7000".into()),
            timeline: Some(1),
        }
    }

    fn slot(confirmed: u64) -> SlotState {
        SlotState {
            lost: false,
            confirmed: Some(confirmed),
            failover: false,
        }
    }

    #[test]
    fn a_healthy_slot_and_a_fresh_start_need_nothing() {
        assert_eq!(verdict(Some(&cp(900)), &server(), Some(&slot(900))), None);
        assert_eq!(verdict(Some(&cp(900)), &server(), Some(&slot(800))), None);
        assert_eq!(verdict(None, &server(), None), None);
    }

    #[test]
    fn each_check_names_its_cause() {
        use ResyncCause::*;
        assert_eq!(verdict(Some(&cp(900)), &server(), None), Some(SlotMissing));
        let lost = SlotState {
            lost: true,
            ..slot(900)
        };
        assert_eq!(
            verdict(Some(&cp(900)), &server(), Some(&lost)),
            Some(SlotLost)
        );
        let other = ServerIdentity {
            system_id: "8000".into(),
            ..server()
        };
        assert_eq!(
            verdict(Some(&cp(900)), &other, Some(&slot(900))),
            Some(SystemChanged)
        );
        let promoted = ServerIdentity {
            timeline: 2,
            ..server()
        };
        assert_eq!(
            verdict(Some(&cp(900)), &promoted, Some(&slot(900))),
            Some(TimelineChanged)
        );
        let failover = SlotState {
            failover: true,
            ..slot(900)
        };
        assert_eq!(verdict(Some(&cp(900)), &promoted, Some(&failover)), None);
        assert_eq!(
            verdict(Some(&cp(2000)), &server(), Some(&slot(900))),
            Some(CheckpointAheadOfServer)
        );
        assert_eq!(
            verdict(Some(&cp(900)), &server(), Some(&slot(950))),
            Some(CheckpointBehindSlot)
        );
        // A row from before the server was recorded is not held to check 3.
        let legacy = CheckpointRow {
            system_id: None,
            timeline: None,
            ..cp(900)
        };
        assert_eq!(verdict(Some(&legacy), &server(), Some(&slot(950))), None);
    }
}
