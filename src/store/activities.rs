//! The activity outbox: timeline events from the stream, resolved to their
//! Spot, filtered by the settings of their moment, and kept until HubSpot has
//! them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use super::DbError;
use crate::translate::activity::ActivityType;
use crate::translate::{ActivityCandidate, ObjectRef};

/// What an object of an activity resolves to.
struct Object {
    spot_id: i64,
    title: String,
    url: Option<String>,
    kind: Option<String>,
}

async fn objects(
    db: &impl GenericClient,
    sql: &str,
    ids: Vec<i64>,
) -> Result<HashMap<i64, Object>, DbError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = db.query(sql, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Object {
                    spot_id: r.get(1),
                    title: r.get(2),
                    url: r.get(3),
                    kind: r.get(4),
                },
            )
        })
        .collect())
}

/// Resolves the candidates of a hand-off and queues those their Spot's
/// settings let through, in the hand-off's transaction. Returns what it queued.
pub(super) async fn queue_activities(
    db: &impl GenericClient,
    cands: &[ActivityCandidate],
) -> Result<super::Queued, DbError> {
    if cands.is_empty() {
        return Ok(Default::default());
    }
    let ids = |f: fn(&ObjectRef) -> Option<i64>| -> Vec<i64> {
        let mut v: Vec<i64> = cands.iter().filter_map(|c| f(&c.object)).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let lives = objects(
        db,
        "SELECT id, spot_id, title, NULL::text, NULL::text FROM public.lives WHERE id = ANY($1)",
        ids(|o| {
            if let ObjectRef::Live(i) = o {
                Some(*i)
            } else {
                None
            }
        }),
    )
    .await?;
    let topics = objects(
        db,
        "SELECT id, spot_id, title, NULL::text, NULL::text FROM public.topics WHERE id = ANY($1)",
        ids(|o| {
            if let ObjectRef::Topic(i) = o {
                Some(*i)
            } else {
                None
            }
        }),
    )
    .await?;
    let documents = objects(
        db,
        "SELECT id, spot_id, title, url, kind FROM public.documents WHERE id = ANY($1)",
        ids(|o| {
            if let ObjectRef::Document(i) = o {
                Some(*i)
            } else {
                None
            }
        }),
    )
    .await?;
    let courses = objects(
        db,
        "SELECT id, spot_id, title, NULL::text, NULL::text FROM public.courses WHERE id = ANY($1)",
        ids(|o| {
            if let ObjectRef::Course(i) = o {
                Some(*i)
            } else {
                None
            }
        }),
    )
    .await?;

    struct Row {
        event_id: String,
        spot_id: i64,
        member_id: i64,
        activity: ActivityType,
        occurred_at: DateTime<Utc>,
        title: String,
        url: Option<String>,
    }
    let mut rows = Vec::new();
    for c in cands {
        let (spot_id, title, url, activity) = match c.object {
            ObjectRef::Spot(s) => (s, None, None, c.activity),
            ObjectRef::Live(id) | ObjectRef::Topic(id) | ObjectRef::Course(id) => {
                let map = match c.object {
                    ObjectRef::Live(_) => &lives,
                    ObjectRef::Topic(_) => &topics,
                    _ => &courses,
                };
                let Some(o) = map.get(&id) else { continue };
                (o.spot_id, Some(o.title.clone()), None, c.activity)
            }
            ObjectRef::Document(id) => {
                let Some(o) = documents.get(&id) else {
                    continue;
                };
                let activity = match o.kind.as_deref() {
                    Some("page") => ActivityType::PageOpened,
                    Some("link") => ActivityType::LinkOpened,
                    _ => continue,
                };
                (o.spot_id, Some(o.title.clone()), o.url.clone(), activity)
            }
        };
        let resolved = ActivityCandidate {
            activity,
            ..c.clone()
        };
        if !resolved.enabled_for(spot_id) {
            continue;
        }
        rows.push(Row {
            event_id: resolved.event_id(spot_id),
            spot_id,
            member_id: c.member_id,
            activity,
            occurred_at: c.occurred_at,
            title: title.unwrap_or_default(),
            url,
        });
    }
    if rows.is_empty() {
        return Ok(Default::default());
    }
    let event_ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let spots: Vec<i64> = rows.iter().map(|r| r.spot_id).collect();
    let members: Vec<i64> = rows.iter().map(|r| r.member_id).collect();
    let activities: Vec<&str> = rows.iter().map(|r| r.activity.name()).collect();
    let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.occurred_at).collect();
    let titles: Vec<&str> = rows.iter().map(|r| r.title.as_str()).collect();
    let urls: Vec<Option<&str>> = rows.iter().map(|r| r.url.as_deref()).collect();
    // The integration row is locked like the property hand-off does, so that a
    // disconnect drops these too; the Spot's name is the one of this moment.
    let touched = db.execute(
        "INSERT INTO hubspot_sync.activity_outbox
             (event_id, spot_id, member_id, activity, occurred_at, spot_name, title, url)
         SELECT e.event_id, e.spot_id, e.member_id, e.activity, e.occurred_at, s.name,
                CASE WHEN e.title = '' THEN s.name ELSE e.title END, e.url
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
                AS e(event_id, spot_id, member_id, activity, occurred_at, title, url)
           JOIN public.spots s ON s.id = e.spot_id
           JOIN hubspot_sync.integrations i ON i.spot_id = e.spot_id AND i.status IN ('active', 'failed')
          ORDER BY e.spot_id
            FOR SHARE OF i
         ON CONFLICT (event_id) DO NOTHING",
        &[&event_ids, &spots, &members, &activities, &times, &titles, &urls],
    )
    .await?;
    Ok(super::Queued {
        touched,
        spots: spots.into_iter().collect(),
    })
}

/// A queued timeline event.
#[derive(Clone, Debug)]
pub struct QueuedActivity {
    /// Deterministic id (`ms-{spot}-{type}-{source row id}`): a replay never adds a second event.
    pub event_id: String,
    /// The Spot the event belongs to.
    pub spot_id: i64,
    /// The member whose contact's timeline gets the event.
    pub member_id: i64,
    /// Which of the timeline activities it is.
    pub activity: ActivityType,
    /// When it happened: the source row's own time, else the commit time.
    pub occurred_at: DateTime<Utc>,
    /// The Spot's name when the event was queued.
    pub spot_name: String,
    /// Title of the object (live, topic, document, course), or the Spot's name.
    pub title: String,
    /// Link to the object, if it has one.
    pub url: Option<String>,
}

/// Reads up to `limit` due `hubspot_sync.activity_outbox` rows of each Spot
/// asked, `asks` being `(spot_id, limit)` pairs, in the order they are sent
/// (read along `*_due_order_idx`, so it costs the batches, not the backlog).
/// One statement serves many rounds (`deliver::shared`); the answers come in
/// the order of `asks`.
pub async fn due_activities(
    db: &super::Conn,
    asks: &[(i64, i64)],
) -> Result<Vec<Vec<QueuedActivity>>, DbError> {
    let spots: Vec<i64> = asks.iter().map(|a| a.0).collect();
    let limits: Vec<i64> = asks.iter().map(|a| a.1).collect();
    let statement = db
        .prepare_cached(
            "SELECT a.i, d.event_id, d.spot_id, d.member_id, d.activity, d.occurred_at,
                    d.spot_name, d.title, d.url
               FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS a(spot_id, lim, i)
              CROSS JOIN LATERAL (
                    SELECT * FROM hubspot_sync.activity_outbox o
                     WHERE o.spot_id = a.spot_id AND o.next_attempt_at <= now()
                     ORDER BY o.next_attempt_at, o.occurred_at LIMIT a.lim) d
              ORDER BY a.i, d.next_attempt_at, d.occurred_at",
        )
        .await?;
    let rows = db.query(&statement, &[&spots, &limits]).await?;
    let mut answers: Vec<Vec<QueuedActivity>> = vec![Vec::new(); asks.len()];
    for r in &rows {
        let Some(answer) = super::ask_of(r).and_then(|i| answers.get_mut(i)) else {
            continue;
        };
        if let Some(activity) = ActivityType::from_name(r.get(4)) {
            answer.push(QueuedActivity {
                event_id: r.get(1),
                spot_id: r.get(2),
                member_id: r.get(3),
                activity,
                occurred_at: r.get(5),
                spot_name: r.get(6),
                title: r.get(7),
                url: r.get(8),
            });
        }
    }
    Ok(answers)
}

/// How a queued event ended.
#[derive(Debug)]
pub enum ActivityDone {
    /// In the timeline (sent now, or HubSpot had it already).
    Delivered(String),
    /// The member has no contact: no event, no contact (SPEC §4.5).
    NoContact(String),
    /// HubSpot refused it: dead-lettered with its reason.
    Rejected {
        /// The refused event.
        event: QueuedActivity,
        /// HubSpot record id of the member's contact, if known.
        contact_id: Option<String>,
        /// HubSpot's reason for refusing it.
        reason: String,
    },
    /// Not yet: e.g. its contact is still being created.
    Later(String, std::time::Duration),
}

/// In one transaction: deletes finished events (dead-lettering refused ones), reschedules the rest.
pub async fn complete_activities(
    db: &mut super::Conn,
    fence: super::Fence,
    done: &[ActivityDone],
) -> Result<bool, DbError> {
    let tx = db.transaction().await?;
    if !super::outbox::hold_fence(&tx, fence).await? {
        return Ok(false);
    }
    let mut delete: Vec<&str> = Vec::new();
    for d in done {
        match d {
            ActivityDone::Delivered(id) | ActivityDone::NoContact(id) => delete.push(id),
            ActivityDone::Rejected {
                event,
                contact_id,
                reason,
            } => {
                let payload = serde_json::json!({
                    "event_id": event.event_id, "activity": event.activity.name(),
                    "contact_id": contact_id, "title": event.title, "url": event.url,
                    "occurred_at": event.occurred_at,
                });
                tx.execute(
                    "INSERT INTO hubspot_sync.dead_letters (spot_id, member_id, kind, payload, reason)
                     VALUES ($1, $2, 'activity', $3, left($4, 1000))",
                    &[&event.spot_id, &event.member_id, &payload, reason],
                )
                .await?;
                delete.push(&event.event_id);
            }
            ActivityDone::Later(id, delay) => {
                tx.execute(
                    "UPDATE hubspot_sync.activity_outbox
                        SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
                      WHERE event_id = $1",
                    &[id, &delay.as_secs_f64()],
                )
                .await?;
            }
        }
    }
    tx.execute(
        "DELETE FROM hubspot_sync.activity_outbox WHERE event_id = ANY($1)",
        &[&delete],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Pushes these `hubspot_sync.activity_outbox` events back by `delay` after a transient failure.
pub async fn postpone_activities(
    db: &Client,
    ids: &[String],
    delay: std::time::Duration,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.activity_outbox
            SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
          WHERE event_id = ANY($1)",
        &[&ids, &delay.as_secs_f64()],
    )
    .await?;
    Ok(())
}

/// Members whose contact creation is still pending (their events wait for it).
pub async fn pending_creations(
    db: &super::Conn,
    keys: &[(i64, i64)],
) -> Result<Vec<(i64, i64)>, DbError> {
    let spots: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let members: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let statement = db
        .prepare_cached(
            "SELECT o.spot_id, o.member_id FROM hubspot_sync.property_outbox o
               JOIN unnest($1::bigint[], $2::bigint[]) k(spot_id, member_id)
                 ON k.spot_id = o.spot_id AND k.member_id = o.member_id
              WHERE o.create_contact",
        )
        .await?;
    Ok(db
        .query(&statement, &[&spots, &members])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
