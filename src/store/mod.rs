//! Store stage: everything the sidecar keeps in schema `hubspot_sync`: the
//! hand-off (outbox + checkpoint in one transaction), the contact map, the
//! integrations and the dead letters.

pub mod activities;
mod db;
pub mod dead_letters;
pub mod integrations;
pub mod outbox;
pub mod portal_changes;
pub mod reconcile;
pub mod secrets;
pub mod sessions;

pub use activities::*;
pub use dead_letters::*;
pub use integrations::*;
pub use outbox::*;
pub use reconcile::*;

/// The key the store signs settings markers with (see `translate::markers`).
pub use crate::translate::MarkerKey;
pub use db::{Conn, Db, DbClient, DbError};

use std::collections::BTreeSet;

use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, GenericClient};

use crate::metrics::Metrics;
use crate::translate::{SpotSettings, StreamSettings, Work};

/// The ask a row answers, in a statement for many asks that numbers them
/// `WITH ORDINALITY` (1-based) in its first column.
fn ask_of(row: &tokio_postgres::Row) -> Option<usize> {
    usize::try_from(row.get::<_, i64>(0) - 1).ok()
}

/// Which of `n` asks came back in `rows` (see [`ask_of`]).
fn asks_answered(rows: &[tokio_postgres::Row], n: usize) -> Vec<bool> {
    let mut answered = vec![false; n];
    for i in rows.iter().filter_map(ask_of) {
        if let Some(a) = answered.get_mut(i) {
            *a = true;
        }
    }
    answered
}

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../sql/migrations/0001_init.sql")),
    (2, include_str!("../../sql/migrations/0002_lifecycle.sql")),
    (3, include_str!("../../sql/migrations/0003_activities.sql")),
    (
        4,
        include_str!("../../sql/migrations/0004_refresh_and_mail.sql"),
    ),
    (5, include_str!("../../sql/migrations/0005_tenancy.sql")),
    (
        6,
        include_str!("../../sql/migrations/0006_server_identity.sql"),
    ),
    (
        7,
        include_str!("../../sql/migrations/0007_dead_letter_retries.sql"),
    ),
    (
        8,
        include_str!("../../sql/migrations/0008_one_time_tokens.sql"),
    ),
    (
        9,
        include_str!("../../sql/migrations/0009_outbox_rewrite.sql"),
    ),
    (
        10,
        include_str!("../../sql/migrations/0010_due_order_taken.sql"),
    ),
    (
        11,
        include_str!("../../sql/migrations/0011_backfill_counts.sql"),
    ),
    (
        12,
        include_str!("../../sql/migrations/0012_portal_changes.sql"),
    ),
    (13, include_str!("../../sql/migrations/0013_sessions.sql")),
];

/// Applies the embedded migrations once, serialised by an advisory lock so
/// that two starting sidecars cannot race.
pub async fn migrate(db: &mut Client) -> Result<(), DbError> {
    let tx = db.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(724031001)", &[])
        .await?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
    // schema exists; the least-privilege role only owns the schema (sql/role.sql).
    let has_schema = tx
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = 'hubspot_sync'",
            &[],
        )
        .await?
        .is_some();
    if !has_schema {
        tx.batch_execute("CREATE SCHEMA hubspot_sync").await?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS hubspot_sync.schema_migrations (
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM hubspot_sync.schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO hubspot_sync.schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "applied migration");
        }
    }
    Ok(tx.commit().await?)
}

/// LSN of the last hand-off for `slot` in `hubspot_sync.checkpoint`; streaming resumes there.
pub async fn load_checkpoint(db: &Client, slot: &str) -> Result<Option<u64>, DbError> {
    Ok(checkpoint_row(db, slot).await?.map(|c| c.lsn))
}

/// Where the stream resumes: the checkpoint (0 before the first hand-off) and
/// the settings as of it, read in one snapshot, so that a hand-off committing
/// meanwhile cannot give one without the other.
pub async fn load_resume_point(
    db: &mut Client,
    slot: &str,
) -> Result<(u64, StreamSettings), DbError> {
    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let start = checkpoint_row(&tx, slot).await?.map_or(0, |c| c.lsn);
    let settings = load_stream_settings(&tx).await?;
    tx.commit().await?;
    Ok((start, settings))
}

/// The slot's checkpoint and the server it was taken on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRow {
    /// Everything before it is handed off.
    pub lsn: u64,
    /// The server's system identifier (None: written before migration 6).
    pub system_id: Option<String>,
    /// The server's timeline then.
    pub timeline: Option<i32>,
}

/// Reads the slot's `hubspot_sync.checkpoint` row.
pub async fn checkpoint_row(
    db: &impl GenericClient,
    slot: &str,
) -> Result<Option<CheckpointRow>, DbError> {
    let row = db
        .query_opt(
            "SELECT lsn, system_identifier, timeline FROM hubspot_sync.checkpoint WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| CheckpointRow {
        lsn: u64::from(r.get::<_, PgLsn>(0)),
        system_id: r.get(1),
        timeline: r.get(2),
    }))
}

/// Records which server and timeline the checkpoint belongs to. A row
/// written before the server was recorded (an upgrade) may trail the slot:
/// the old version acknowledged idle positions without storing them, and
/// everything before the slot's confirmed position was handled, so the
/// checkpoint is raised to it.
pub async fn record_server(
    db: &Client,
    slot: &str,
    system_id: &str,
    timeline: i32,
    confirmed: Option<u64>,
) -> Result<(), DbError> {
    let confirmed = confirmed.map(PgLsn::from);
    db.execute(
        "UPDATE hubspot_sync.checkpoint
            SET system_identifier = $2, timeline = $3,
                lsn = CASE WHEN system_identifier IS NULL AND $4::pg_lsn IS NOT NULL
                           THEN GREATEST(lsn, $4::pg_lsn) ELSE lsn END
          WHERE slot_name = $1",
        &[&slot, &system_id, &timeline, &confirmed],
    )
    .await?;
    Ok(())
}

/// Moves the checkpoint to an idle position (nothing pending before it), so
/// that it is stored before the slot is acknowledged there: the checkpoint
/// is then never behind the slot's confirmed position.
pub async fn advance_checkpoint(db: &Client, slot: &str, lsn: u64) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hubspot_sync.checkpoint (slot_name, lsn, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (slot_name) DO UPDATE
            SET lsn = GREATEST(hubspot_sync.checkpoint.lsn, excluded.lsn), updated_at = now()",
        &[&slot, &PgLsn::from(lsn)],
    )
    .await?;
    Ok(())
}

/// After the slot was recreated at `lsn`: the checkpoint starts there on
/// this server, and every active or failed Spot is backfilled again from
/// current values (under a new activation, so rounds in flight are fenced
/// and the workers start afresh), in one transaction. Returns the Spots.
pub async fn resync_all(
    db: &mut Client,
    slot: &str,
    lsn: u64,
    system_id: &str,
    timeline: i32,
    cause: &str,
) -> Result<Vec<i64>, DbError> {
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO hubspot_sync.checkpoint (slot_name, lsn, updated_at, system_identifier, timeline)
         VALUES ($1, $2, now(), $3, $4)
         ON CONFLICT (slot_name) DO UPDATE
            SET lsn = $2, updated_at = now(), system_identifier = $3, timeline = $4",
        &[&slot, &PgLsn::from(lsn), &system_id, &timeline],
    )
    .await?;
    // Every value is sent again: HubSpot may hold values newer than a
    // restored database.
    let spots = integrations::restart_backfills(&tx, integrations::Restart::All { cause }).await?;
    // Settings markers in the gap are lost with it: the stream starts again
    // from the integrations' own settings (`load_stream_settings` falls back
    // to them).
    tx.execute("DELETE FROM hubspot_sync.stream_settings", &[])
        .await?;
    tx.commit().await?;
    Ok(spots)
}

/// Writes the work of a batch of transactions and the checkpoint at their end
/// LSN in ONE database transaction. Only after it commits may the slot be
/// acknowledged up to `end_lsn`. Returns what it queued.
pub async fn hand_off(
    db: &mut Client,
    slot: &str,
    work: &Work,
    xids: &[u32],
    end_lsn: u64,
    metrics: &Metrics,
) -> Result<Queued, DbError> {
    let lsn = PgLsn::from(end_lsn);
    if work.queues_rows() {
        wait_visible(db, xids, metrics).await?;
    }
    let tx = db.transaction().await?;
    let queued = queue_work(&tx, work, lsn).await?;
    for settings in work.settings.values() {
        let json = serde_json::to_value(settings.activities).unwrap_or_default();
        tx.execute(
            "INSERT INTO hubspot_sync.stream_settings (spot_id, status, create_contacts, activities, lsn, version)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (spot_id) DO UPDATE
                SET status = $2, create_contacts = $3, activities = $4, lsn = $5, version = $6",
            &[&settings.spot_id, &settings.status, &settings.create_contacts, &json, &lsn, &settings.version],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO hubspot_sync.checkpoint (slot_name, lsn, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (slot_name) DO UPDATE SET lsn = GREATEST(hubspot_sync.checkpoint.lsn, excluded.lsn), updated_at = now()",
        &[&slot, &lsn],
    )
    .await?;
    tx.commit().await?;
    Ok(queued)
}

/// Writes part of a transaction that is still being read: its outbox rows,
/// without the checkpoint, which moves only once the whole transaction is
/// handed off. A crash before that replays the transaction from its start,
/// and these writes are idempotent upserts (deterministic event ids; an
/// outbox row is a marker to read the member again), so replaying them is
/// harmless. This bounds memory for a transaction of any size.
pub async fn hand_off_ahead(
    db: &mut Client,
    work: &Work,
    xid: u32,
    commit_lsn: u64,
    metrics: &Metrics,
) -> Result<Queued, DbError> {
    wait_visible(db, &[xid], metrics).await?;
    let tx = db.transaction().await?;
    let queued = queue_work(&tx, work, PgLsn::from(commit_lsn)).await?;
    tx.commit().await?;
    Ok(queued)
}

/// What a hand-off queued.
#[derive(Debug, Default)]
pub struct Queued {
    /// Outbox rows it wrote (rows it left as they were are not counted).
    pub touched: u64,
    /// The Spots it wrote rows for (activities: the Spots of those it
    /// offered, some of which a disconnect may have dropped): their workers
    /// are woken.
    pub spots: BTreeSet<i64>,
}

/// The outbox rows for `work`: a member's property row, every activity.
async fn queue_work(
    tx: &tokio_postgres::Transaction<'_>,
    work: &Work,
    lsn: PgLsn,
) -> Result<Queued, DbError> {
    let mut queued = queue_activities(tx, &work.activities).await?;
    if work.touches_members() {
        let members: Vec<i64> = work.members.keys().copied().collect();
        let member_spots: Vec<Option<i64>> = work.members.values().copied().collect();
        let groups: Vec<i64> = work.groups.iter().copied().collect();
        let tags: Vec<i64> = work.tags.iter().copied().collect();
        let roles: Vec<i64> = work.custom_roles.iter().copied().collect();
        let create: Vec<i64> = work.create_contacts.iter().copied().collect();
        // Fan-outs are expanded here, against the same snapshot that stores the
        // checkpoint. Spots without a live integration produce no work (G5); a
        // failed one keeps collecting it for its reconnect (SPEC §4.7). A
        // member whose own row the stream carried comes with its Spot; the
        // others are looked up by key (LATERAL; OFFSET 0 keeps the planner
        // from turning it into a scan of every member of the live Spots, which
        // it chose on fresh statistics), so a hand-off costs what it carries,
        // not the size of the Spots it touches. (Carrying the Spot took a
        // hand-off of 10,000 members from 137 to 108 ms in psql. A member deleted or moved
        // since is queued under the Spot its row had; delivery reads the row
        // again, writes nothing there and forgets its contact in that Spot,
        // G4, as for a member deleted after its hand-off.)
        // Returns the Spots of the rows it wrote. A row it left as it was was
        // due already; a round that took while this held its lock was told
        // so and looks again (`take_due_markers`).
        let row = tx
            .query_one(
                "WITH ids AS (
                     SELECT id, max(spot_id) AS spot_id, bool_or(create_contact) AS create_contact FROM (
                         SELECT unnest($1::bigint[]) AS id, unnest($8::bigint[]) AS spot_id, false AS create_contact
                         UNION ALL SELECT unnest($7::bigint[]), NULL, true
                         UNION ALL SELECT member_id, NULL, false FROM public.group_members WHERE group_id = ANY($2)
                         UNION ALL SELECT member_id, NULL, false FROM public.member_tags WHERE tag_id = ANY($3)
                         UNION ALL SELECT id, NULL, false FROM public.members WHERE custom_role_id = ANY($4)
                         UNION ALL SELECT id, NULL, false FROM public.members WHERE $5
                     ) changed GROUP BY id
                 ), written AS (
                 INSERT INTO hubspot_sync.property_outbox AS o (spot_id, member_id, lsn, create_contact, taken)
                 SELECT m.spot_id, m.id, $6, ids.create_contact, false
                   FROM ids
                  CROSS JOIN LATERAL (
                        SELECT ids.spot_id, ids.id WHERE ids.spot_id IS NOT NULL
                        UNION ALL
                        SELECT spot_id, id FROM public.members
                         WHERE id = ids.id AND ids.spot_id IS NULL OFFSET 0) m
                   JOIN hubspot_sync.integrations i
                     ON i.spot_id = m.spot_id AND i.status IN ('active', 'failed')
                  -- One lock order for every writer of the outbox: no deadlocks.
                  ORDER BY m.spot_id, m.id
                  -- A disconnect committing meanwhile waits for this hand-off and
                  -- then drops what it queued, or this one sees it and queues nothing.
                    FOR SHARE OF i
                 -- A row no round has taken yet stays as it is: the round
                 -- that takes it reads the member's values after this commit
                 -- (the conflict locks the row until then). A taken row gets
                 -- a new version, so its round's completion leaves it queued.
                 ON CONFLICT (spot_id, member_id) DO UPDATE
                    SET version = nextval('hubspot_sync.outbox_version'),
                        lsn = GREATEST(o.lsn, excluded.lsn),
                        create_contact = o.create_contact OR excluded.create_contact,
                        taken = false
                  WHERE o.taken OR (excluded.create_contact AND NOT o.create_contact)
                 RETURNING o.spot_id
                 )
                 SELECT count(*), coalesce(array_agg(DISTINCT spot_id), '{}') FROM written",
                &[&members, &groups, &tags, &roles, &work.all_members, &lsn, &create, &member_spots],
            )
            .await?;
        queued.touched += u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        queued.spots.extend(row.get::<_, Vec<i64>>(1));
    }
    Ok(queued)
}

/// Waits until these decoded transactions are visible to new snapshots.
///
/// A commit reaches the WAL, and so the stream, an instant before the
/// committing backend leaves the proc array; a snapshot taken in that instant
/// still sees the transaction as running. The hand-off expands fan-outs and
/// delivery reads members over SQL, so both must see what the stream saw.
///
/// The instant can be long: with a synchronous standby that lags, a commit is
/// in the WAL (and decoded) while its backend waits for the standby, and is
/// invisible all that time. Proceeding would let delivery read the row as it
/// was before the commit, write those values and delete the marker, leaving
/// the contact stale (G1). So this never gives up: it waits (and the slot
/// waits with it), logs every 10 s and counts the time
/// (`hubspot_sidecar_visibility_wait_seconds_total`).
async fn wait_visible(db: &Client, xids: &[u32], metrics: &Metrics) -> Result<(), DbError> {
    if xids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut counted = std::time::Duration::ZERO;
    let mut next_log = std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        // Widen the 32-bit xids of the stream with the epoch of the current xmax.
        let xmax: i64 = db
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await?
            .get(0);
        let full: Vec<String> = xids
            .iter()
            .map(|&x| {
                let mut v = (xmax & !0xFFFF_FFFF) | i64::from(x);
                if v > xmax {
                    v -= 1 << 32;
                }
                v.to_string()
            })
            .collect();
        let visible: bool = db
            .query_one(
                "SELECT bool_and(pg_visible_in_snapshot(x::xid8, s))
                   FROM unnest($1::text[]) x, pg_current_snapshot() s",
                &[&full],
            )
            .await?
            .get::<_, Option<bool>>(0)
            .unwrap_or(true);
        let waited = started.elapsed();
        // Only a wait past the usual instant is worth a counter.
        if waited > std::time::Duration::from_secs(1) {
            metrics
                .visibility_wait_seconds
                .inc_by((waited - counted.max(std::time::Duration::from_secs(1))).as_secs_f64());
            counted = waited;
        }
        if visible {
            return Ok(());
        }
        if waited >= next_log {
            tracing::warn!(
                waited_s = waited.as_secs(),
                transactions = xids.len(),
                "committed transactions in the stream are not visible yet (a synchronous \
                 standby that lags?); the hand-off waits for them, and the slot with it"
            );
            next_log += std::time::Duration::from_secs(10);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}

/// The settings the stream had seen at the checkpoint.
pub async fn load_stream_settings(db: &impl GenericClient) -> Result<StreamSettings, DbError> {
    let rows = db
        .query(
            // A Spot the stream has not seen yet (first start) begins from its row.
            "SELECT spot_id, status, create_contacts, activities, version FROM hubspot_sync.stream_settings
             UNION ALL
             SELECT spot_id, status, create_contacts, activities, settings_version FROM hubspot_sync.integrations i
              WHERE NOT EXISTS (SELECT 1 FROM hubspot_sync.stream_settings s WHERE s.spot_id = i.spot_id)",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let spot_id: i64 = r.get(0);
            let activities: serde_json::Value = r.get(3);
            (
                spot_id,
                SpotSettings {
                    spot_id,
                    status: r.get(1),
                    create_contacts: r.get(2),
                    activities: serde_json::from_value(activities).unwrap_or_default(),
                    version: r.get(4),
                },
            )
        })
        .collect())
}
