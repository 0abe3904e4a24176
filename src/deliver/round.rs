//! One delivery round for up to 100 outbox rows of one portal: read the
//! members' current values, resolve their contacts, create the contacts that
//! contact creation asks for, write only what changed, and say how each row
//! ended.

use std::collections::{BTreeMap, HashMap, HashSet};

use tracing::warn;

use super::DeliverError;
use crate::hubspot::properties::{derive, normalize_email};
use crate::hubspot::{CreateResult, HubSpotError, Portal};
use crate::metrics::Metrics;
use crate::store::{self, Completion, Marker, MemberRecord};

/// A contact write waiting for the batch update.
struct PendingUpdate {
    marker: usize,
    contact_id: String,
    /// Only the properties that differ from what HubSpot holds.
    diff: BTreeMap<String, String>,
    /// Every derived value, remembered once HubSpot accepted the write.
    desired: BTreeMap<String, String>,
}

/// A contact to create (SPEC §4.4): e-mail, names, and the properties.
struct PendingCreate {
    marker: usize,
    trace: String,
    properties: BTreeMap<String, String>,
    desired: BTreeMap<String, String>,
}

pub(super) async fn deliver(
    metrics: &Metrics,
    db: &tokio_postgres::Client,
    portal: &Portal,
    markers: &[Marker],
) -> Result<Vec<Completion>, DeliverError> {
    let member_ids: Vec<i64> = markers.iter().map(|m| m.member_id).collect();
    let records: HashMap<i64, MemberRecord> = store::member_records(db, &member_ids)
        .await?
        .into_iter()
        .map(|r| (r.member_id, r))
        .collect();
    let keys: Vec<(i64, i64)> = markers.iter().map(|m| (m.spot_id, m.member_id)).collect();
    let states = store::contact_states(db, &keys).await?;

    // Resolve e-mails we do not know yet, or that changed, in one batch read.
    let found = lookup_unknown(portal, &records, &states, &keys).await?;

    let mut completions = Vec::with_capacity(markers.len());
    let mut updates: Vec<PendingUpdate> = Vec::new();
    let mut creates: Vec<PendingCreate> = Vec::new();
    for (i, mk) in markers.iter().enumerate() {
        // A row whose member is gone, or belongs to another Spot, writes nothing (G4).
        let Some(rec) = records
            .get(&mk.member_id)
            .filter(|r| r.spot_id == mk.spot_id)
        else {
            completions.push(Completion::NoContact {
                marker: mk.clone(),
                email: None,
            });
            continue;
        };
        let email = normalize_email(&rec.email);
        let state = states.get(&(mk.spot_id, mk.member_id));
        let contact_id = match state
            .filter(|s| s.email == email)
            .and_then(|s| s.contact_id.clone())
        {
            Some(id) => Some(id),
            None => found.get(&email).cloned(),
        };
        let (desired, truncated) = derive(rec);
        metrics.values_truncated.inc_by(truncated as u64);
        let Some(contact_id) = contact_id else {
            if mk.create_contact {
                let mut properties = desired.clone();
                properties.insert("email".into(), email.clone());
                properties.insert(
                    "firstname".into(),
                    rec.first_name.clone().unwrap_or_default(),
                );
                properties.insert("lastname".into(), rec.last_name.clone().unwrap_or_default());
                creates.push(PendingCreate {
                    marker: i,
                    trace: format!("spot{}-member{}", mk.spot_id, mk.member_id),
                    properties,
                    desired,
                });
            } else {
                metrics.members_without_contact.inc();
                completions.push(Completion::NoContact {
                    marker: mk.clone(),
                    email: Some(email),
                });
            }
            continue;
        };
        // What HubSpot holds for this very contact; anything else starts from nothing.
        let written: BTreeMap<String, String> = state
            .filter(|s| s.email == email && s.contact_id.as_deref() == Some(contact_id.as_str()))
            .map(|s| s.written.clone().into_iter().collect())
            .unwrap_or_default();
        let diff: BTreeMap<String, String> = desired
            .iter()
            .filter(|(k, v)| written.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if diff.is_empty() {
            completions.push(Completion::Written {
                marker: mk.clone(),
                email,
                contact_id,
                written: desired.into_iter().collect(),
            });
        } else {
            updates.push(PendingUpdate {
                marker: i,
                contact_id,
                diff,
                desired,
            });
        }
    }

    if !creates.is_empty() {
        let inputs: Vec<(String, BTreeMap<String, String>)> = creates
            .iter()
            .map(|c| (c.trace.clone(), c.properties.clone()))
            .collect();
        let results = portal.create_contacts(&inputs).await?;
        for c in creates {
            let mk = &markers[c.marker];
            let email = c.properties.get("email").cloned().unwrap_or_default();
            completions.push(match results.get(&c.trace) {
                Some(CreateResult::Created(id)) => {
                    metrics.contacts_created.inc();
                    metrics.contacts_written.inc();
                    Completion::Written {
                        marker: mk.clone(),
                        email,
                        contact_id: id.clone(),
                        written: c.desired.into_iter().collect(),
                    }
                }
                // Someone created it meanwhile: use it, and write the properties next round.
                Some(CreateResult::Exists(id)) => Completion::Remap {
                    marker: mk.clone(),
                    email,
                    contact_id: id.clone(),
                },
                Some(CreateResult::Rejected { category, message }) => {
                    metrics.dead_letters.with_label_values(&[&reason_label(category)]).inc();
                    warn!(member_id = mk.member_id, %category, "HubSpot rejected a contact creation; dead-lettered");
                    Completion::DeadLetter {
                        marker: mk.clone(),
                        payload: serde_json::json!({"create": true, "email": email, "properties": c.properties}),
                        email,
                        contact_id: None,
                        reason: message.clone(),
                    }
                }
                // Not mentioned in the answer: leave the row for the next round.
                None => continue,
            });
        }
    }

    let inputs: Vec<(String, BTreeMap<String, String>)> = updates
        .iter()
        .map(|u| (u.contact_id.clone(), u.diff.clone()))
        .collect();
    let results = update_isolating_rejects(portal, inputs).await?;
    for (u, result) in updates.into_iter().zip(results) {
        let mk = &markers[u.marker];
        let email = records
            .get(&mk.member_id)
            .map(|r| normalize_email(&r.email))
            .unwrap_or_default();
        completions.push(match result {
            ItemResult::Ok => {
                metrics.contacts_written.inc();
                Completion::Written {
                    marker: mk.clone(),
                    email,
                    contact_id: u.contact_id,
                    written: u.desired.into_iter().collect(),
                }
            }
            // The contact was deleted or merged: forget it; the next change resolves the e-mail again.
            ItemResult::Missing => Completion::NoContact {
                marker: mk.clone(),
                email: Some(email),
            },
            ItemResult::Rejected(category, reason) => {
                metrics.dead_letters.with_label_values(&[&reason_label(&category)]).inc();
                warn!(member_id = mk.member_id, %category, "HubSpot rejected a contact write; dead-lettered");
                Completion::DeadLetter {
                    marker: mk.clone(),
                    payload: serde_json::json!({"contact_id": u.contact_id, "email": email, "properties": u.diff}),
                    email,
                    contact_id: Some(u.contact_id),
                    reason,
                }
            }
        });
    }
    Ok(completions)
}

/// Batch-reads, in one call, the e-mails of the members (`(spot, member)`
/// keys) whose contact is not known yet or whose e-mail changed.
async fn lookup_unknown(
    portal: &Portal,
    records: &HashMap<i64, MemberRecord>,
    states: &HashMap<(i64, i64), store::ContactState>,
    keys: &[(i64, i64)],
) -> Result<HashMap<String, String>, DeliverError> {
    let mut lookups: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for key in keys {
        // Never look up another Spot's member in this portal (G4).
        let Some(rec) = records.get(&key.1).filter(|r| r.spot_id == key.0) else {
            continue;
        };
        let email = normalize_email(&rec.email);
        let known = states
            .get(key)
            .is_some_and(|s| s.contact_id.is_some() && s.email == email);
        if !known && seen.insert(email.clone()) {
            lookups.push(email);
        }
    }
    if lookups.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(portal.read_contacts_by_email(&lookups).await?)
}

/// How one input of a batch update ended.
enum ItemResult {
    Ok,
    Missing,
    Rejected(String, String),
}

/// Labels stay a small fixed set: HubSpot's category, never free text.
fn reason_label(category: &str) -> String {
    match category {
        "VALIDATION_ERROR"
        | "INVALID_EMAIL"
        | "INVALID_OPTION"
        | "PROPERTY_DOESNT_EXIST"
        | "CONFLICT"
        | "OBJECT_NOT_FOUND" => category.to_string(),
        _ => "other".to_string(),
    }
}

/// Batch update; when HubSpot rejects the batch, the inputs it names (or, when
/// it names none, halves of the batch) are retried apart until each bad input
/// stands alone and can be dead-lettered without holding back the others.
async fn update_isolating_rejects(
    portal: &Portal,
    inputs: Vec<(String, BTreeMap<String, String>)>,
) -> Result<Vec<ItemResult>, HubSpotError> {
    let mut results: Vec<Option<ItemResult>> = (0..inputs.len()).map(|_| None).collect();
    let mut pending: Vec<Vec<usize>> = if inputs.is_empty() {
        Vec::new()
    } else {
        vec![(0..inputs.len()).collect()]
    };
    while let Some(group) = pending.pop() {
        let batch: Vec<_> = group.iter().map(|&i| inputs[i].clone()).collect();
        match portal.update_contacts(&batch).await {
            Ok(outcome) => {
                for &i in &group {
                    results[i] = Some(if outcome.missing.contains(&inputs[i].0) {
                        ItemResult::Missing
                    } else {
                        ItemResult::Ok
                    });
                }
            }
            Err(HubSpotError::Rejected { error, .. }) if group.len() == 1 => {
                let reason = if error.message.is_empty() {
                    error.category.clone()
                } else {
                    error.message.clone()
                };
                results[group[0]] = Some(ItemResult::Rejected(error.category.clone(), reason));
            }
            Err(HubSpotError::Rejected { error, .. }) => {
                let named = named_ids(&error);
                let (bad, good): (Vec<usize>, Vec<usize>) =
                    group.iter().partition(|&&i| named.contains(&inputs[i].0));
                if !bad.is_empty() && bad.len() < group.len() {
                    pending.extend(bad.into_iter().map(|i| vec![i]));
                    pending.push(good);
                } else {
                    let (a, b) = group.split_at(group.len() / 2);
                    pending.push(a.to_vec());
                    pending.push(b.to_vec());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(ItemResult::Ok))
        .collect())
}

/// Record ids a 400 body names in `context.ids`/`context.id`, at the top or per error.
fn named_ids(error: &crate::hubspot::ApiError) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut collect = |ctx: Option<&serde_json::Value>| {
        for key in ["ids", "id"] {
            if let Some(arr) = ctx.and_then(|c| c.get(key)).and_then(|v| v.as_array()) {
                out.extend(arr.iter().filter_map(|v| v.as_str().map(str::to_string)));
            }
        }
    };
    collect(error.context.as_ref());
    for e in &error.errors {
        collect(e.get("context"));
    }
    out
}

/// Delivers up to 100 queued timeline events: each needs its member's contact
/// (by record id, never by e-mail, which would create one); a member without
/// a contact yields no event, unless contact creation is still creating it.
pub(super) async fn deliver_activities(
    metrics: &Metrics,
    db: &tokio_postgres::Client,
    portal: &Portal,
    sink: &crate::hubspot::timeline::ActivitySink,
    queued: Vec<store::QueuedActivity>,
) -> Result<Vec<store::ActivityDone>, DeliverError> {
    use crate::hubspot::timeline::{ActivityEvent, EventOutcome};
    use store::ActivityDone;

    let mut member_ids: Vec<i64> = queued.iter().map(|q| q.member_id).collect();
    member_ids.sort_unstable();
    member_ids.dedup();
    let records: HashMap<i64, MemberRecord> = store::member_records(db, &member_ids)
        .await?
        .into_iter()
        .map(|r| (r.member_id, r))
        .collect();
    let keys: Vec<(i64, i64)> = queued.iter().map(|q| (q.spot_id, q.member_id)).collect();
    let states = store::contact_states(db, &keys).await?;
    let creating: HashSet<(i64, i64)> = store::pending_creations(db, &keys)
        .await?
        .into_iter()
        .collect();

    let found = lookup_unknown(portal, &records, &states, &keys).await?;

    let mut done = Vec::with_capacity(queued.len());
    let mut events = Vec::new();
    let mut by_id: HashMap<String, (store::QueuedActivity, String)> = HashMap::new();
    for q in queued {
        // A member of another Spot never reaches this Spot's portal (G4).
        let Some(rec) = records.get(&q.member_id).filter(|r| r.spot_id == q.spot_id) else {
            done.push(ActivityDone::NoContact(q.event_id));
            continue;
        };
        let email = normalize_email(&rec.email);
        let contact = states
            .get(&(q.spot_id, q.member_id))
            .filter(|s| s.email == email)
            .and_then(|s| s.contact_id.clone())
            .or_else(|| found.get(&email).cloned());
        let Some(contact) = contact else {
            if creating.contains(&(q.spot_id, q.member_id)) {
                done.push(ActivityDone::Later(
                    q.event_id,
                    std::time::Duration::from_secs(1),
                ));
            } else {
                metrics.activities_without_contact.inc();
                done.push(ActivityDone::NoContact(q.event_id));
            }
            continue;
        };
        events.push(ActivityEvent {
            id: q.event_id.clone(),
            activity: q.activity,
            object_id: contact.clone(),
            timestamp: q.occurred_at,
            spot_name: q.spot_name.clone(),
            title: q.title.clone(),
            url: q.url.clone(),
        });
        by_id.insert(q.event_id.clone(), (q, contact));
    }
    if events.is_empty() {
        return Ok(done);
    }
    let outcomes = portal.send_events(sink, &events).await?;
    for (id, (q, contact)) in by_id {
        match outcomes.get(&id) {
            Some(EventOutcome::Sent) | Some(EventOutcome::Duplicate) => {
                metrics
                    .activities
                    .with_label_values(&[q.activity.category().name(), q.activity.name()])
                    .inc();
                done.push(ActivityDone::Delivered(id));
            }
            Some(EventOutcome::Rejected { category, message }) => {
                metrics
                    .dead_letters
                    .with_label_values(&[&reason_label(category)])
                    .inc();
                warn!(member_id = q.member_id, activity = q.activity.name(), %category, "HubSpot rejected an event; dead-lettered");
                done.push(ActivityDone::Rejected {
                    event: q,
                    contact_id: Some(contact),
                    reason: message.clone(),
                });
            }
            None => done.push(ActivityDone::Later(id, std::time::Duration::from_secs(1))),
        }
    }
    Ok(done)
}
