//! The outbox as delivery sees it: due rows, the members' current values,
//! what is known of their contacts, and the completion of a delivery round.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::DbError;

/// A due outbox row.
#[derive(Clone, Debug)]
pub struct Marker {
    /// Spot whose integration the row belongs to.
    pub spot_id: i64,
    /// Member whose HubSpot properties are due.
    pub member_id: i64,
    /// Outbox version at read time; completion deletes the row only if it is unchanged.
    pub version: i64,
    /// The member was inserted while contact creation was on.
    pub create_contact: bool,
    /// Write every value, whatever the contact map says was written (`reconcile --fix`).
    pub rewrite: bool,
    /// When the change was handed off (delivery latency starts here).
    pub enqueued_at: DateTime<Utc>,
}

/// Takes up to `limit` due `hubspot_sync.property_outbox` rows of a Spot, in
/// the order they are sent (read along `property_outbox_due_order_idx`, so it
/// costs the batch, not the backlog).
///
/// Taking marks the rows `taken`, committed before the round reads the
/// members' values: a hand-off that finds a row not taken knows no round has
/// read those values yet, so it leaves the row as it is (`store::hand_off`;
/// in psql about three times cheaper per row than a new version, which is
/// what a backlog changing the same members again and again costs). A hand-off that finds it taken gives it a new
/// version, so the round's completion leaves it for the next round.
///
/// Also returns how many due rows of the batch it left because another
/// transaction held them (a hand-off about to commit, a disconnect): the
/// caller looks again shortly, as nothing else tells it when they are free.
///
/// One statement takes for many Spots at once, `asks` being `(spot_id,
/// limit)` pairs: a burst over a thousand Spots costs the primary a few
/// takes, not a thousand (`deliver::shared`). The answers come in the order
/// of `asks`. A Spot asked twice gets its rows once, on its first ask (the
/// scheduler runs one round per Spot, so it does not happen).
pub async fn take_due_markers(
    db: &super::Conn,
    asks: &[(i64, i64)],
) -> Result<Vec<(Vec<Marker>, usize)>, DbError> {
    let mut spots: Vec<i64> = Vec::with_capacity(asks.len());
    let mut limits: Vec<i64> = Vec::with_capacity(asks.len());
    for &(spot, limit) in asks {
        if !spots.contains(&spot) {
            spots.push(spot);
            limits.push(limit);
        }
    }
    let statement = db
        .prepare_cached(
            "WITH asked AS (
                 SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS a(spot_id, lim)
             ), due AS (
                 SELECT a.spot_id, d.member_id
                   FROM asked a
                  CROSS JOIN LATERAL (
                        SELECT o.member_id FROM hubspot_sync.property_outbox o
                         WHERE o.spot_id = a.spot_id AND o.next_attempt_at <= now()
                         ORDER BY o.next_attempt_at, o.version LIMIT a.lim) d
             ), k AS (
                 -- A row locked by a hand-off (or a disconnect) is left for
                 -- the next round, a moment later (the count below):
                 -- taking never waits, so it cannot deadlock with any
                 -- writer, whatever order that one locks in.
                 SELECT o.spot_id, o.member_id
                   FROM due JOIN hubspot_sync.property_outbox o
                     ON o.spot_id = due.spot_id AND o.member_id = due.member_id
                  ORDER BY o.spot_id, o.member_id
                    FOR UPDATE OF o SKIP LOCKED
             ), took AS (
                 UPDATE hubspot_sync.property_outbox o SET taken = true
                   FROM k WHERE o.spot_id = k.spot_id AND o.member_id = k.member_id
                 RETURNING o.*
             ), counted AS (
                 SELECT spot_id, count(*) AS due FROM due GROUP BY spot_id
             )
             -- One row per Spot asked even when nothing was taken, for the
             -- count of its due rows.
             SELECT a.spot_id, t.member_id, t.version, t.create_contact, t.enqueued_at, t.rewrite,
                    coalesce(c.due, 0)
               FROM asked a
               LEFT JOIN counted c ON c.spot_id = a.spot_id
               LEFT JOIN took t ON t.spot_id = a.spot_id
              ORDER BY a.spot_id, t.next_attempt_at, t.version",
        )
        .await?;
    let rows = db.query(&statement, &[&spots, &limits]).await?;
    let mut by_spot: HashMap<i64, (Vec<Marker>, i64)> = HashMap::with_capacity(spots.len());
    for r in &rows {
        let spot_id: i64 = r.get(0);
        let entry = by_spot
            .entry(spot_id)
            .or_insert_with(|| (Vec::new(), r.get(6)));
        if let Some(member_id) = r.get::<_, Option<i64>>(1) {
            entry.0.push(Marker {
                spot_id,
                member_id,
                version: r.get(2),
                create_contact: r.get(3),
                enqueued_at: r.get(4),
                rewrite: r.get(5),
            });
        }
    }
    Ok(asks
        .iter()
        .map(|(spot, _)| {
            let (markers, due) = by_spot.remove(spot).unwrap_or_default();
            let locked = usize::try_from(due)
                .unwrap_or(0)
                .saturating_sub(markers.len());
            (markers, locked)
        })
        .collect())
}

/// The Spots with a row due now in either outbox: delivery's one look for
/// the whole fleet, at a slow pace, for work it was not told of (queued by
/// another process, put off by the process before a restart, left by a
/// round that failed before it could put its rows off). It skips along the
/// due-order indexes from one Spot to the next, so it costs one index probe
/// per Spot that has rows, and one in all when none has.
pub async fn spots_with_due_work(db: &super::Conn) -> Result<Vec<i64>, DbError> {
    let statement = db
        .prepare_cached(
            "WITH RECURSIVE p AS (
                 SELECT min(spot_id) AS spot_id FROM hubspot_sync.property_outbox
                 UNION ALL
                 SELECT (SELECT min(o.spot_id) FROM hubspot_sync.property_outbox o
                          WHERE o.spot_id > p.spot_id)
                   FROM p WHERE p.spot_id IS NOT NULL
             ), a AS (
                 SELECT min(spot_id) AS spot_id FROM hubspot_sync.activity_outbox
                 UNION ALL
                 SELECT (SELECT min(o.spot_id) FROM hubspot_sync.activity_outbox o
                          WHERE o.spot_id > a.spot_id)
                   FROM a WHERE a.spot_id IS NOT NULL
             )
             SELECT p.spot_id FROM p
              WHERE p.spot_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM hubspot_sync.property_outbox o
                     WHERE o.spot_id = p.spot_id AND o.next_attempt_at <= now())
             UNION
             SELECT a.spot_id FROM a
              WHERE a.spot_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM hubspot_sync.activity_outbox o
                     WHERE o.spot_id = a.spot_id AND o.next_attempt_at <= now())",
        )
        .await?;
    Ok(db
        .query(&statement, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The longest a row of the next batch of a Spot (the first `limit` due
/// rows, in the order they are sent) has been queued, by the database's
/// clock; None when nothing is due. Reads only: a round held for a backlog
/// looks here instead of taking rows.
pub async fn next_batch_wait(
    db: &Client,
    spot_id: i64,
    limit: i64,
) -> Result<Option<std::time::Duration>, DbError> {
    let waited: Option<f64> = db
        .query_one(
            "SELECT max(greatest(extract(epoch FROM now() - enqueued_at), 0))::float8
               FROM (SELECT enqueued_at FROM hubspot_sync.property_outbox
                      WHERE spot_id = $1 AND next_attempt_at <= now()
                      ORDER BY next_attempt_at, version LIMIT $2) batch",
            &[&spot_id, &limit],
        )
        .await?
        .get(0);
    Ok(waited.map(|w| std::time::Duration::try_from_secs_f64(w).unwrap_or_default()))
}

/// Whether a Spot has fewer than `below` `hubspot_sync.property_outbox` rows
/// (paces its backfill). Counts no further than `below`: behind a large
/// transaction a Spot may have millions queued, and this runs every round
/// of a backfill.
pub async fn spot_backlog_below(db: &Client, spot_id: i64, below: i64) -> Result<bool, DbError> {
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM hubspot_sync.property_outbox
                                    WHERE spot_id = $1 LIMIT $2) queued",
            &[&spot_id, &below],
        )
        .await?
        .get(0);
    Ok(n < below)
}

/// Counts all `hubspot_sync.property_outbox` rows exactly (tests, the demo).
pub async fn backlog_size(db: &Client) -> Result<i64, DbError> {
    Ok(db
        .query_one("SELECT count(*) FROM hubspot_sync.property_outbox", &[])
        .await?
        .get(0))
}

/// Exact up to this many rows; the `properties` backlog gauge estimates above it.
const GAUGE_EXACT_UP_TO: i64 = 10_000;

/// The `properties` backlog gauge: exact up to `GAUGE_EXACT_UP_TO` rows,
/// above that the table's live-row statistic (updated as transactions end).
/// An exact count of millions of rows, twice a second, would compete with
/// the hand-offs that fill the outbox.
pub async fn backlog_estimate(db: &Client) -> Result<i64, DbError> {
    Ok(db
        .query_one(
            "SELECT CASE WHEN exact < $1 THEN exact ELSE GREATEST(exact,
                        (SELECT n_live_tup FROM pg_stat_all_tables
                          WHERE relid = 'hubspot_sync.property_outbox'::regclass)) END
               FROM (SELECT count(*) AS exact FROM (SELECT 1 FROM hubspot_sync.property_outbox
                                                      LIMIT $1) l) c",
            &[&GAUGE_EXACT_UP_TO],
        )
        .await?
        .get(0))
}

/// A member's source values, read at delivery time.
#[derive(Clone, Debug)]
pub struct MemberRecord {
    /// The member's Spot.
    pub spot_id: i64,
    /// `members.id`.
    pub member_id: i64,
    /// `members.email`.
    pub email: String,
    /// `members.first_name`.
    pub first_name: Option<String>,
    /// `members.last_name`.
    pub last_name: Option<String>,
    /// `members.status` (`invited`, `accepted`, `left`, ...).
    pub status: String,
    /// `members.role` (`admin` or `member`).
    pub role: String,
    /// Name of the member's custom role, if any.
    pub custom_role: Option<String>,
    /// `members.invited_at`.
    pub invited_at: Option<DateTime<Utc>>,
    /// `members.registered_at`.
    pub registered_at: Option<DateTime<Utc>>,
    /// Names of the groups the member belongs to.
    pub groups: Vec<String>,
    /// Names of the member's tags.
    pub tags: Vec<String>,
    /// `members.headline`.
    pub headline: Option<String>,
    /// `members.bio`.
    pub bio: Option<String>,
    /// Group memberships, tags and the custom role that belong to another
    /// Spot: left out of the values, counted.
    pub cross_spot_refs: i64,
}

/// Reads these members' current values (with group, tag and custom role names) from `public`.
pub async fn member_records(
    db: &super::Conn,
    member_ids: &[i64],
) -> Result<Vec<MemberRecord>, DbError> {
    let statement = db
        .prepare_cached(
            "SELECT m.spot_id, m.id, m.email, m.first_name, m.last_name, m.status, m.role,
                    CASE WHEN cr.spot_id = m.spot_id THEN cr.name END,
                    -- Free text is read only as far as HubSpot takes it (65,536
                    -- characters, one more to know it was cut): a 50 MB bio is
                    -- never carried into the sidecar's memory by this read.
                    m.invited_at, m.registered_at, left(m.headline, 65537), left(m.bio, 65537),
                    -- Names come only from the member's own Spot (G4): a membership,
                    -- tag or role row pointing across Spots is left out and counted.
                    ARRAY(SELECT g.name FROM public.group_members gm JOIN public.groups g ON g.id = gm.group_id
                           WHERE gm.member_id = m.id AND g.spot_id = m.spot_id),
                    ARRAY(SELECT t.name FROM public.member_tags mt JOIN public.tags t ON t.id = mt.tag_id
                           WHERE mt.member_id = m.id AND t.spot_id = m.spot_id),
                    (SELECT count(*) FROM public.group_members gm JOIN public.groups g ON g.id = gm.group_id
                      WHERE gm.member_id = m.id AND g.spot_id <> m.spot_id)
                    + (SELECT count(*) FROM public.member_tags mt JOIN public.tags t ON t.id = mt.tag_id
                        WHERE mt.member_id = m.id AND t.spot_id <> m.spot_id)
                    + (cr.id IS NOT NULL AND cr.spot_id <> m.spot_id)::int
               FROM public.members m
               LEFT JOIN public.custom_roles cr ON cr.id = m.custom_role_id
              WHERE m.id = ANY($1)",
        )
        .await?;
    let rows = db.query(&statement, &[&member_ids]).await?;
    Ok(rows
        .iter()
        .map(|r| MemberRecord {
            spot_id: r.get(0),
            member_id: r.get(1),
            email: r.get(2),
            first_name: r.get(3),
            last_name: r.get(4),
            status: r.get(5),
            role: r.get(6),
            custom_role: r.get(7),
            invited_at: r.get(8),
            registered_at: r.get(9),
            headline: r.get(10),
            bio: r.get(11),
            groups: r.get(12),
            tags: r.get(13),
            cross_spot_refs: r.get(14),
        })
        .collect())
}

/// What is known of a member's contact.
#[derive(Clone, Debug, Default)]
pub struct ContactState {
    /// E-mail the contact was looked up or written under.
    pub email: String,
    /// HubSpot record id, or None when no contact has the e-mail.
    pub contact_id: Option<String>,
    /// Property values last written to the contact, by property name.
    pub written: HashMap<String, String>,
}

/// The activation a delivery round works for. Its writes land only while it
/// is the Spot's current activation on that portal (a reconnect or
/// disconnect meanwhile fences them off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The Spot.
    pub spot_id: i64,
    /// The portal this activation delivers to.
    pub portal_id: i64,
    /// `integrations.activation`.
    pub activation: i64,
}

/// A transaction on a pooled connection: its statements are prepared once
/// per connection, like those of [`super::Conn`].
pub(super) type ConnTransaction<'a> = deadpool_postgres::Transaction<'a>;

/// Locks the integration row for share if `fence` is still current, in this
/// transaction: a reconnect or disconnect then waits for the transaction.
pub(super) async fn hold_fence(tx: &ConnTransaction<'_>, fence: Fence) -> Result<bool, DbError> {
    Ok(hold_fences(tx, &[fence]).await?.first() == Some(&true))
}

/// [`hold_fence`] for many fences at once, in the order of the Spots (the
/// hand-off's order): whether each is current, in the order of `fences`.
async fn hold_fences(tx: &ConnTransaction<'_>, fences: &[Fence]) -> Result<Vec<bool>, DbError> {
    let spots: Vec<i64> = fences.iter().map(|f| f.spot_id).collect();
    let portals: Vec<i64> = fences.iter().map(|f| f.portal_id).collect();
    let activations: Vec<i64> = fences.iter().map(|f| f.activation).collect();
    let statement = tx
        .prepare_cached(
            "SELECT f.i FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
                        WITH ORDINALITY AS f(spot_id, portal_id, activation, i)
               JOIN hubspot_sync.integrations i
                 ON i.spot_id = f.spot_id AND i.portal_id = f.portal_id
                AND i.activation = f.activation AND i.status = 'active'
              ORDER BY i.spot_id
                FOR SHARE OF i",
        )
        .await?;
    let rows = tx
        .query(&statement, &[&spots, &portals, &activations])
        .await?;
    Ok(super::asks_answered(&rows, fences.len()))
}

/// Reads the `hubspot_sync.contact_map` entries of these (portal, spot,
/// member) keys: an entry counts only on the portal it was made on. One
/// statement serves many rounds, of many portals (`deliver::shared`).
pub async fn contact_states(
    db: &super::Conn,
    keys: &[(i64, i64, i64)],
) -> Result<HashMap<(i64, i64, i64), ContactState>, DbError> {
    let portals: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let spots: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let members: Vec<i64> = keys.iter().map(|k| k.2).collect();
    let statement = db
        .prepare_cached(
            "SELECT c.portal_id, c.spot_id, c.member_id, c.email, c.contact_id, c.written
               FROM hubspot_sync.contact_map c
               JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) k(portal_id, spot_id, member_id)
                 ON k.spot_id = c.spot_id AND k.member_id = c.member_id
                AND k.portal_id = c.portal_id",
        )
        .await?;
    let rows = db.query(&statement, &[&portals, &spots, &members]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let written: serde_json::Value = r.get(5);
            let written = serde_json::from_value(written).unwrap_or_default();
            (
                (r.get(0), r.get(1), r.get(2)),
                ContactState {
                    email: r.get(3),
                    contact_id: r.get(4),
                    written,
                },
            )
        })
        .collect())
}

/// The result of delivering one member's marker.
#[derive(Clone, Debug)]
pub enum Completion {
    /// Written (or nothing to write): remember the contact and the values now in HubSpot.
    Written {
        /// The outbox row delivered.
        marker: Marker,
        /// The member's e-mail.
        email: String,
        /// HubSpot record id of the contact.
        contact_id: String,
        /// Property values now in HubSpot, by property name.
        written: HashMap<String, String>,
    },
    /// The member has no contact, or no longer exists: nothing is written.
    NoContact {
        /// The outbox row delivered.
        marker: Marker,
        /// The member's e-mail, or None when the member no longer exists.
        email: Option<String>,
    },
    /// The contact turned out to exist under another id (a 409 on creation,
    /// or a merge): remember it and deliver the row again as an update.
    Remap {
        /// The outbox row, kept for the next round.
        marker: Marker,
        /// The member's e-mail.
        email: String,
        /// Id of the existing contact.
        contact_id: String,
        /// The record it replaces (a merged-away id), if any.
        former: Option<String>,
    },
    /// HubSpot deleted the contact: forget it and look the e-mail up again
    /// in the next round; a contact is never created for it.
    Forget {
        /// The outbox row, kept for the next round.
        marker: Marker,
        /// The member's e-mail.
        email: String,
        /// The deleted record.
        former: String,
    },
    /// The contact was merged into a record another member of the Spot
    /// keeps: the member keeps none, and the conflict is recorded.
    Conflict {
        /// The outbox row, done.
        marker: Marker,
        /// The member's e-mail.
        email: String,
        /// The merged record.
        contact_id: String,
        /// The member's record before the merge.
        former: String,
        /// The member that keeps the merged record.
        kept_member_id: i64,
    },
    /// HubSpot rejected the write: dead-letter it; the next change writes again.
    DeadLetter {
        /// The outbox row rejected.
        marker: Marker,
        /// The member's e-mail.
        email: String,
        /// HubSpot record id of the contact, if known.
        contact_id: Option<String>,
        /// What was to be written (e-mail, contact id or create flag, properties).
        payload: serde_json::Value,
        /// HubSpot's reason for the rejection.
        reason: String,
    },
}

impl Completion {
    fn key(&self) -> (i64, i64) {
        let m = match self {
            Completion::Written { marker, .. }
            | Completion::NoContact { marker, .. }
            | Completion::Remap { marker, .. }
            | Completion::Forget { marker, .. }
            | Completion::Conflict { marker, .. }
            | Completion::DeadLetter { marker, .. } => marker,
        };
        (m.spot_id, m.member_id)
    }
}

/// What one round (of one activation) completed.
#[derive(Clone, Debug)]
pub struct RoundDone {
    /// The activation the round delivered for.
    pub fence: Fence,
    /// How each of its rows ended.
    pub done: Vec<Completion>,
}

/// Records completions and deletes their outbox rows, unless a newer change
/// arrived meanwhile (the version moved on), in one transaction for many
/// rounds (`deliver::shared`). Returns, per round, whether its fence was
/// current: a round whose fence is not changes nothing, so record ids of
/// another activation (maybe another portal) are never stored.
pub async fn complete(db: &mut super::Conn, rounds: &[RoundDone]) -> Result<Vec<bool>, DbError> {
    let tx = db.transaction().await?;
    let fences: Vec<Fence> = rounds.iter().map(|r| r.fence).collect();
    let current = hold_fences(&tx, &fences).await?;
    let mut done: Vec<(&Completion, i64)> = rounds
        .iter()
        .zip(&current)
        .filter(|(_, current)| **current)
        .flat_map(|(r, _)| r.done.iter().map(|c| (c, r.fence.portal_id)))
        .collect();
    // Same lock order as the hand-off (integrations, then outbox rows by
    // key), so the two never deadlock.
    done.sort_by_key(|(c, _)| c.key());
    // Set-based, a statement per kind of write rather than per member: the
    // transaction holds its locks for a few round trips, whatever the batch.
    let mut map = MapRows::default();
    let mut unmapped = (Vec::<i64>::new(), Vec::<i64>::new(), Vec::<i64>::new());
    let mut dead = (
        Vec::<i64>::new(),
        Vec::<i64>::new(),
        Vec::<serde_json::Value>::new(),
        Vec::<&str>::new(),
    );
    let mut delivered = (Vec::<i64>::new(), Vec::<i64>::new(), Vec::<i64>::new());
    let mut relook = (Vec::<i64>::new(), Vec::<i64>::new(), Vec::<i64>::new());
    let mut conflicts = Vec::new();
    for (c, portal) in done {
        let marker = match c {
            Completion::Written {
                marker,
                email,
                contact_id,
                written,
            } => {
                map.push(
                    marker,
                    portal,
                    email,
                    Some(contact_id),
                    None,
                    serde_json::to_value(written).unwrap_or_default(),
                );
                marker
            }
            Completion::NoContact { marker, email } => {
                match email {
                    Some(email) => {
                        map.push(marker, portal, email, None, None, serde_json::json!({}))
                    }
                    None => {
                        unmapped.0.push(marker.spot_id);
                        unmapped.1.push(portal);
                        unmapped.2.push(marker.member_id);
                    }
                }
                marker
            }
            Completion::Remap {
                marker,
                email,
                contact_id,
                former,
            } => {
                // The outbox row stays: the next round writes the properties.
                map.push(
                    marker,
                    portal,
                    email,
                    Some(contact_id),
                    former.as_ref(),
                    serde_json::json!({}),
                );
                continue;
            }
            Completion::Forget {
                marker,
                email,
                former,
            } => {
                // The outbox row stays, for a look-up that creates nothing.
                map.push(
                    marker,
                    portal,
                    email,
                    None,
                    Some(former),
                    serde_json::json!({}),
                );
                relook.0.push(marker.spot_id);
                relook.1.push(marker.member_id);
                relook.2.push(marker.version);
                continue;
            }
            Completion::Conflict {
                marker,
                email,
                contact_id,
                former,
                kept_member_id,
            } => {
                map.push(
                    marker,
                    portal,
                    email,
                    None,
                    Some(former),
                    serde_json::json!({}),
                );
                conflicts.push((marker, portal, contact_id, *kept_member_id));
                marker
            }
            Completion::DeadLetter {
                marker,
                email,
                contact_id,
                payload,
                reason,
            } => {
                dead.0.push(marker.spot_id);
                dead.1.push(marker.member_id);
                dead.2.push(payload.clone());
                dead.3.push(reason);
                // Keep the mapping but forget what was written, so the next
                // change sends every property again.
                map.push(
                    marker,
                    portal,
                    email,
                    contact_id.as_ref(),
                    None,
                    serde_json::json!({}),
                );
                marker
            }
        };
        delivered.0.push(marker.spot_id);
        delivered.1.push(marker.member_id);
        delivered.2.push(marker.version);
    }
    if !map.members.is_empty() {
        let statement = tx
            .prepare_cached(
                "INSERT INTO hubspot_sync.contact_map AS c (spot_id, member_id, email, contact_id, written, updated_at, portal_id, former_contact_id)
             SELECT m.spot_id, m.member_id, m.email, m.contact_id, m.written, now(), m.portal_id, m.former
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
                    AS m(spot_id, portal_id, member_id, email, contact_id, written, former)
              ORDER BY m.spot_id, m.member_id
             ON CONFLICT (spot_id, portal_id, member_id) DO UPDATE
                SET email = excluded.email, contact_id = excluded.contact_id,
                    written = excluded.written, updated_at = now(),
                    former_contact_id = COALESCE(excluded.former_contact_id, c.former_contact_id)",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &map.spots,
                &map.portals,
                &map.members,
                &map.emails,
                &map.contact_ids,
                &map.written,
                &map.formers,
            ],
        )
        .await?;
    }
    if !relook.0.is_empty() {
        // Looked up again for a deleted contact: nothing is created for it.
        tx.execute(
            "UPDATE hubspot_sync.property_outbox o SET create_contact = false
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(spot_id, member_id, version)
              WHERE o.spot_id = u.spot_id AND o.member_id = u.member_id AND o.version = u.version",
            &[&relook.0, &relook.1, &relook.2],
        )
        .await?;
    }
    for (marker, portal, contact, kept) in &conflicts {
        super::portal_changes::insert_conflict(
            &*tx,
            marker.spot_id,
            *portal,
            marker.member_id,
            contact,
            *kept,
        )
        .await?;
    }
    if !unmapped.0.is_empty() {
        tx.execute(
            "DELETE FROM hubspot_sync.contact_map c
              USING unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(spot_id, portal_id, member_id)
              WHERE c.spot_id = u.spot_id AND c.portal_id = u.portal_id AND c.member_id = u.member_id",
            &[&unmapped.0, &unmapped.1, &unmapped.2],
        )
        .await?;
    }
    if !dead.0.is_empty() {
        tx.execute(
            "INSERT INTO hubspot_sync.dead_letters (spot_id, member_id, kind, payload, reason)
             SELECT d.spot_id, d.member_id, 'contact_properties', d.payload, left(d.reason, 1000)
               FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[], $4::text[]) WITH ORDINALITY AS d(spot_id, member_id, payload, reason, n)
              ORDER BY d.n",
            &[&dead.0, &dead.1, &dead.2, &dead.3],
        )
        .await?;
    }
    if !delivered.0.is_empty() {
        // A row whose version moved on meanwhile (a newer change) stays.
        let statement = tx
            .prepare_cached(
                "WITH k AS (
                 SELECT o.spot_id, o.member_id
                   FROM hubspot_sync.property_outbox o
                   JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(spot_id, member_id, version)
                     ON o.spot_id = u.spot_id AND o.member_id = u.member_id AND o.version = u.version
                  ORDER BY o.spot_id, o.member_id
                    FOR UPDATE OF o
             )
             DELETE FROM hubspot_sync.property_outbox o
              USING k WHERE o.spot_id = k.spot_id AND o.member_id = k.member_id",
            )
            .await?;
        tx.execute(&statement, &[&delivered.0, &delivered.1, &delivered.2])
            .await?;
    }
    tx.commit().await?;
    Ok(current)
}

/// The contact-map rows a completion writes, as columns for `unnest`.
#[derive(Default)]
struct MapRows<'a> {
    spots: Vec<i64>,
    portals: Vec<i64>,
    members: Vec<i64>,
    emails: Vec<&'a str>,
    contact_ids: Vec<Option<&'a str>>,
    formers: Vec<Option<&'a str>>,
    written: Vec<serde_json::Value>,
}

impl<'a> MapRows<'a> {
    fn push(
        &mut self,
        marker: &Marker,
        portal_id: i64,
        email: &'a str,
        contact_id: Option<&'a String>,
        former: Option<&'a String>,
        written: serde_json::Value,
    ) {
        self.spots.push(marker.spot_id);
        self.portals.push(portal_id);
        self.members.push(marker.member_id);
        self.emails.push(email);
        self.contact_ids.push(contact_id.map(String::as_str));
        self.formers.push(former.map(String::as_str));
        self.written.push(written);
    }
}

/// Pushes markers back after a transient failure.
pub async fn postpone(
    db: &Client,
    markers: &[Marker],
    delay: std::time::Duration,
) -> Result<(), DbError> {
    let spots: Vec<i64> = markers.iter().map(|m| m.spot_id).collect();
    let members: Vec<i64> = markers.iter().map(|m| m.member_id).collect();
    let secs = delay.as_secs_f64();
    db.execute(
        "WITH k AS (
             SELECT o.spot_id, o.member_id
               FROM hubspot_sync.property_outbox o
               JOIN unnest($1::bigint[], $2::bigint[]) u(spot_id, member_id)
                 ON o.spot_id = u.spot_id AND o.member_id = u.member_id
              ORDER BY o.spot_id, o.member_id
                FOR UPDATE OF o
         )
         UPDATE hubspot_sync.property_outbox o
            SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $3)
           FROM k
          WHERE o.spot_id = k.spot_id AND o.member_id = k.member_id",
        &[&spots, &members, &secs],
    )
    .await?;
    Ok(())
}
