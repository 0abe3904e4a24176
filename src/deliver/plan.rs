//! The decisions of a delivery round, without I/O: from what the database
//! and HubSpot said, which contacts to look up, create and write, which rows
//! end how, and what is dead-lettered. `round.rs` reads the inputs and
//! carries the plan out; everything here is unit-tested on plain values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::hubspot::properties::{hubspot_time, join_names, normalize_email, truncate_value};
use crate::hubspot::timeline::{ActivityEvent, EventOutcome};
use crate::hubspot::CreateResult;
use crate::internal_events::DeadLetterKind;
use crate::store::{ActivityDone, Completion, ContactState, Marker, MemberRecord, QueuedActivity};

/// A member's records by member id.
pub(super) type Records = HashMap<i64, MemberRecord>;
/// What is known of each `(spot, member)`'s contact.
pub(super) type States = HashMap<(i64, i64), ContactState>;

/// The derived property values of a member (SPEC §3). NULL becomes "" (clears
/// the value). Returns the values and how many were truncated.
pub(crate) fn derive(m: &MemberRecord) -> (BTreeMap<String, String>, usize) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let time = |t: &Option<DateTime<Utc>>| t.as_ref().map(hubspot_time).unwrap_or_default();
    let raw = [
        ("meltingspot_member_id", m.member_id.to_string()),
        ("meltingspot_member_status", m.status.clone()),
        ("meltingspot_member_role", m.role.clone()),
        ("meltingspot_member_custom_role", opt(&m.custom_role)),
        ("meltingspot_spot_invitation_date", time(&m.invited_at)),
        ("meltingspot_spot_registration_date", time(&m.registered_at)),
        ("meltingspot_groups", join_names(&m.groups)),
        ("meltingspot_tags", join_names(&m.tags)),
        ("meltingspot_headline", opt(&m.headline)),
        ("meltingspot_bio", opt(&m.bio)),
    ];
    let mut truncated = 0;
    let props = raw
        .into_iter()
        .map(|(k, v)| {
            let (v, cut) = truncate_value(&v);
            truncated += usize::from(cut);
            (k.to_string(), v)
        })
        .collect();
    (props, truncated)
}

/// The member's record, only when it belongs to the Spot the row is for: a
/// member of another Spot never reaches this Spot's portal (G4).
fn record_of(records: &Records, spot_id: i64, member_id: i64) -> Option<&MemberRecord> {
    records.get(&member_id).filter(|r| r.spot_id == spot_id)
}

/// The contact id we know for this member, if its e-mail did not change.
fn known_contact(states: &States, key: (i64, i64), email: &str) -> Option<String> {
    states
        .get(&key)
        .filter(|s| s.email == email)
        .and_then(|s| s.contact_id.clone())
}

/// The e-mails to batch-read: members (`(spot, member)` keys) whose contact is
/// not known yet or whose e-mail changed, each e-mail once.
pub(super) fn emails_to_look_up(
    records: &Records,
    states: &States,
    keys: &[(i64, i64)],
) -> Vec<String> {
    let mut lookups = Vec::new();
    let mut seen = HashSet::new();
    for &(spot_id, member_id) in keys {
        let Some(rec) = record_of(records, spot_id, member_id) else {
            continue;
        };
        let email = normalize_email(&rec.email);
        if known_contact(states, (spot_id, member_id), &email).is_none()
            && seen.insert(email.clone())
        {
            lookups.push(email);
        }
    }
    lookups
}

/// A contact write waiting for the batch update.
#[derive(Debug)]
pub(super) struct PendingUpdate {
    pub marker: usize,
    pub contact_id: String,
    /// Only the properties that differ from what HubSpot holds.
    pub diff: BTreeMap<String, String>,
    /// Every derived value, remembered once HubSpot accepted the write.
    pub desired: BTreeMap<String, String>,
}

/// A contact to create (SPEC §4.4): e-mail, names, and the properties.
#[derive(Debug)]
pub(super) struct PendingCreate {
    pub marker: usize,
    pub trace: String,
    pub properties: BTreeMap<String, String>,
    pub desired: BTreeMap<String, String>,
}

/// What a property round does with its rows.
#[derive(Debug, Default)]
pub(super) struct PropertyPlan {
    /// Rows that end without a call.
    pub completions: Vec<Completion>,
    /// Contacts to write.
    pub updates: Vec<PendingUpdate>,
    /// Contacts to create.
    pub creates: Vec<PendingCreate>,
    /// Values cut to HubSpot's length limit.
    pub truncated: usize,
    /// Members with no contact and no contact creation.
    pub without_contact: usize,
    /// Dead letters decided by the plan (e-mails HubSpot refused to look up).
    pub tallies: Vec<Tally>,
}

/// E-mails HubSpot refused to look up, with (category, reason).
pub(super) type Refused = HashMap<String, (String, String)>;

/// Plans a property round over `markers`, given the members' current
/// records, what we know of their contacts, and the e-mails HubSpot resolved.
pub(super) fn plan_properties(
    markers: &[Marker],
    records: &Records,
    states: &States,
    found: &HashMap<String, String>,
    refused: &Refused,
) -> PropertyPlan {
    let mut plan = PropertyPlan::default();
    for (i, mk) in markers.iter().enumerate() {
        let key = (mk.spot_id, mk.member_id);
        // A row whose member is gone, or belongs to another Spot, writes nothing (G4).
        let Some(rec) = record_of(records, mk.spot_id, mk.member_id) else {
            plan.completions.push(Completion::NoContact {
                marker: mk.clone(),
                email: None,
            });
            continue;
        };
        let email = normalize_email(&rec.email);
        let state = states.get(&key);
        let contact_id = known_contact(states, key, &email).or_else(|| found.get(&email).cloned());
        let (desired, truncated) = derive(rec);
        plan.truncated += truncated;
        if let (None, Some((category, reason))) = (&contact_id, refused.get(&email)) {
            plan.tallies.push(Tally::DeadLetter {
                kind: DeadLetterKind::ContactLookup,
                member_id: mk.member_id,
                category: category.clone(),
            });
            plan.completions.push(Completion::DeadLetter {
                marker: mk.clone(),
                payload: serde_json::json!({"lookup": true, "email": email}),
                email,
                contact_id: None,
                reason: reason.clone(),
            });
            continue;
        }
        let Some(contact_id) = contact_id else {
            if mk.create_contact {
                let mut properties = desired.clone();
                properties.insert("email".into(), email.clone());
                properties.insert(
                    "firstname".into(),
                    rec.first_name.clone().unwrap_or_default(),
                );
                properties.insert("lastname".into(), rec.last_name.clone().unwrap_or_default());
                plan.creates.push(PendingCreate {
                    marker: i,
                    trace: format!("spot{}-member{}", mk.spot_id, mk.member_id),
                    properties,
                    desired,
                });
            } else {
                plan.without_contact += 1;
                plan.completions.push(Completion::NoContact {
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
            plan.completions.push(Completion::Written {
                marker: mk.clone(),
                email,
                contact_id,
                written: desired.into_iter().collect(),
            });
        } else {
            plan.updates.push(PendingUpdate {
                marker: i,
                contact_id,
                diff,
                desired,
            });
        }
    }
    plan
}

/// What a settled row counts towards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tally {
    /// Nothing to count.
    Nothing,
    /// A contact written.
    Written,
    /// A contact created (and written).
    Created,
    /// An activity delivered.
    Delivered,
    /// Rejected for good.
    DeadLetter {
        kind: DeadLetterKind,
        member_id: i64,
        category: String,
    },
}

/// How the creations of a round ended, from HubSpot's answer by trace id.
/// An input the answer does not mention stays queued for the next round.
pub(super) fn settle_creates(
    markers: &[Marker],
    creates: Vec<PendingCreate>,
    results: &HashMap<String, CreateResult>,
) -> Vec<(Completion, Tally)> {
    let mut out = Vec::with_capacity(creates.len());
    for c in creates {
        let mk = &markers[c.marker];
        let email = c.properties.get("email").cloned().unwrap_or_default();
        out.push(match results.get(&c.trace) {
            Some(CreateResult::Created(id)) => (
                Completion::Written {
                    marker: mk.clone(),
                    email,
                    contact_id: id.clone(),
                    written: c.desired.into_iter().collect(),
                },
                Tally::Created,
            ),
            // Someone created it meanwhile: use it, and write the properties next round.
            Some(CreateResult::Exists(id)) => (
                Completion::Remap {
                    marker: mk.clone(),
                    email,
                    contact_id: id.clone(),
                },
                Tally::Nothing,
            ),
            Some(CreateResult::Rejected { category, message }) => (
                Completion::DeadLetter {
                    marker: mk.clone(),
                    payload: serde_json::json!({"create": true, "email": email, "properties": c.properties}),
                    email,
                    contact_id: None,
                    reason: message.clone(),
                },
                Tally::DeadLetter {
                    kind: DeadLetterKind::ContactCreation,
                    member_id: mk.member_id,
                    category: category.clone(),
                },
            ),
            None => continue,
        });
    }
    out
}

/// How one input of a batch update ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ItemResult {
    Ok,
    /// The contact was deleted or merged.
    Missing,
    /// Rejected for good: HubSpot's category and the reason in words.
    Rejected(String, String),
}

/// How the writes of a round ended, one result per update in order.
pub(super) fn settle_updates(
    markers: &[Marker],
    records: &Records,
    updates: Vec<PendingUpdate>,
    results: Vec<ItemResult>,
) -> Vec<(Completion, Tally)> {
    let mut out = Vec::with_capacity(updates.len());
    for (u, result) in updates.into_iter().zip(results) {
        let mk = &markers[u.marker];
        let email = records
            .get(&mk.member_id)
            .map(|r| normalize_email(&r.email))
            .unwrap_or_default();
        out.push(match result {
            ItemResult::Ok => (
                Completion::Written {
                    marker: mk.clone(),
                    email,
                    contact_id: u.contact_id,
                    written: u.desired.into_iter().collect(),
                },
                Tally::Written,
            ),
            // The contact was deleted or merged: forget it; the next change resolves the e-mail again.
            ItemResult::Missing => (
                Completion::NoContact {
                    marker: mk.clone(),
                    email: Some(email),
                },
                Tally::Nothing,
            ),
            ItemResult::Rejected(category, reason) => (
                Completion::DeadLetter {
                    marker: mk.clone(),
                    payload: serde_json::json!({"contact_id": u.contact_id, "email": email, "properties": u.diff}),
                    email,
                    contact_id: Some(u.contact_id),
                    reason,
                },
                Tally::DeadLetter {
                    kind: DeadLetterKind::ContactWrite,
                    member_id: mk.member_id,
                    category,
                },
            ),
        });
    }
    out
}

/// How long an event waits for its member's contact to be created.
pub(super) const WAIT_FOR_CONTACT: Duration = Duration::from_secs(1);

/// What an activity round does with its queued events.
#[derive(Debug, Default)]
pub(super) struct ActivityPlan {
    /// Events that end without a call.
    pub done: Vec<ActivityDone>,
    /// Events to send, each by its contact's record id.
    pub events: Vec<ActivityEvent>,
    /// The queued event and its contact, by event id.
    pub sending: HashMap<String, (QueuedActivity, String)>,
    /// Events whose member has no contact.
    pub without_contact: usize,
    /// Dead letters decided by the plan (e-mails HubSpot refused to look up).
    pub tallies: Vec<Tally>,
}

/// Plans an activity round: each event needs its member's contact (by record
/// id, never by e-mail, which would create one); a member without a contact
/// yields no event, unless contact creation is still creating it.
pub(super) fn plan_activities(
    queued: Vec<QueuedActivity>,
    records: &Records,
    states: &States,
    creating: &HashSet<(i64, i64)>,
    found: &HashMap<String, String>,
    refused: &Refused,
) -> ActivityPlan {
    let mut plan = ActivityPlan::default();
    for q in queued {
        let key = (q.spot_id, q.member_id);
        let Some(rec) = record_of(records, q.spot_id, q.member_id) else {
            plan.done.push(ActivityDone::NoContact(q.event_id));
            continue;
        };
        let email = normalize_email(&rec.email);
        let contact = known_contact(states, key, &email).or_else(|| found.get(&email).cloned());
        if let (None, Some((category, reason))) = (&contact, refused.get(&email)) {
            plan.tallies.push(Tally::DeadLetter {
                kind: DeadLetterKind::Event,
                member_id: q.member_id,
                category: category.clone(),
            });
            plan.done.push(ActivityDone::Rejected {
                event: q,
                contact_id: None,
                reason: reason.clone(),
            });
            continue;
        }
        let Some(contact) = contact else {
            if creating.contains(&key) {
                plan.done
                    .push(ActivityDone::Later(q.event_id, WAIT_FOR_CONTACT));
            } else {
                plan.without_contact += 1;
                plan.done.push(ActivityDone::NoContact(q.event_id));
            }
            continue;
        };
        plan.events.push(ActivityEvent {
            id: q.event_id.clone(),
            activity: q.activity,
            object_id: contact.clone(),
            timestamp: q.occurred_at,
            spot_name: q.spot_name.clone(),
            title: q.title.clone(),
            url: q.url.clone(),
        });
        plan.sending.insert(q.event_id.clone(), (q, contact));
    }
    plan
}

/// How the sent events ended, from HubSpot's outcome by event id. An event
/// the answer does not mention is tried again shortly.
pub(super) fn settle_events(
    sending: HashMap<String, (QueuedActivity, String)>,
    outcomes: &HashMap<String, EventOutcome>,
) -> Vec<(ActivityDone, Tally, Option<QueuedActivity>)> {
    let mut out = Vec::with_capacity(sending.len());
    for (id, (q, contact)) in sending {
        out.push(match outcomes.get(&id) {
            Some(EventOutcome::Sent) | Some(EventOutcome::Duplicate) => {
                (ActivityDone::Delivered(id), Tally::Delivered, Some(q))
            }
            Some(EventOutcome::Rejected { category, message }) => {
                let tally = Tally::DeadLetter {
                    kind: DeadLetterKind::Event,
                    member_id: q.member_id,
                    category: category.clone(),
                };
                (
                    ActivityDone::Rejected {
                        event: q,
                        contact_id: Some(contact),
                        reason: message.clone(),
                    },
                    tally,
                    None,
                )
            }
            None => (
                ActivityDone::Later(id, WAIT_FOR_CONTACT),
                Tally::Nothing,
                None,
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(spot_id: i64, member_id: i64, email: &str) -> MemberRecord {
        MemberRecord {
            spot_id,
            member_id,
            email: email.into(),
            first_name: Some("Ada".into()),
            last_name: None,
            status: "accepted".into(),
            role: "member".into(),
            custom_role: None,
            invited_at: None,
            registered_at: None,
            groups: vec![],
            tags: vec![],
            headline: Some("hi".into()),
            bio: None,
            cross_spot_refs: 0,
        }
    }

    fn marker(spot_id: i64, member_id: i64, create_contact: bool) -> Marker {
        Marker {
            spot_id,
            member_id,
            version: 1,
            create_contact,
            rewrite: false,
            enqueued_at: Utc::now(),
        }
    }

    fn records(list: &[MemberRecord]) -> Records {
        list.iter().map(|r| (r.member_id, r.clone())).collect()
    }

    #[test]
    fn a_known_contact_gets_only_the_changed_properties() {
        let recs = records(&[member(1, 10, "Ada@Example.com ")]);
        let (desired, _) = derive(&recs[&10]);
        let mut written: HashMap<String, String> = desired.into_iter().collect();
        written.insert("meltingspot_headline".into(), "old".into());
        let states = States::from([(
            (1, 10),
            ContactState {
                email: "ada@example.com".into(),
                contact_id: Some("c1".into()),
                written,
            },
        )]);
        assert!(emails_to_look_up(&recs, &states, &[(1, 10)]).is_empty());
        let plan = plan_properties(
            &[marker(1, 10, false)],
            &recs,
            &states,
            &HashMap::new(),
            &Refused::new(),
        );
        assert_eq!(plan.updates.len(), 1);
        let u = &plan.updates[0];
        assert_eq!(u.contact_id, "c1");
        assert_eq!(
            u.diff,
            BTreeMap::from([("meltingspot_headline".to_string(), "hi".to_string())])
        );
    }

    #[test]
    fn another_spots_member_is_never_looked_up_or_written() {
        let recs = records(&[member(2, 10, "ada@example.com")]);
        assert!(emails_to_look_up(&recs, &States::new(), &[(1, 10)]).is_empty());
        let found = HashMap::from([("ada@example.com".to_string(), "c9".to_string())]);
        let plan = plan_properties(
            &[marker(1, 10, true)],
            &recs,
            &States::new(),
            &found,
            &Refused::new(),
        );
        assert!(plan.updates.is_empty() && plan.creates.is_empty());
        assert!(matches!(
            plan.completions[..],
            [Completion::NoContact { email: None, .. }]
        ));
    }

    #[test]
    fn no_contact_is_created_unless_asked() {
        let recs = records(&[member(1, 10, "a@x.io"), member(1, 11, "b@x.io")]);
        let plan = plan_properties(
            &[marker(1, 10, false), marker(1, 11, true)],
            &recs,
            &States::new(),
            &HashMap::new(),
            &Refused::new(),
        );
        assert_eq!(plan.without_contact, 1);
        assert_eq!(plan.creates.len(), 1);
        assert_eq!(plan.creates[0].properties["email"], "b@x.io");
        assert_eq!(plan.creates[0].properties["firstname"], "Ada");
    }

    #[test]
    fn a_rejected_creation_is_dead_lettered_and_an_unanswered_one_stays_queued() {
        let markers = [marker(1, 10, true), marker(1, 11, true)];
        let recs = records(&[member(1, 10, "a@x.io"), member(1, 11, "b@x.io")]);
        let plan = plan_properties(
            &markers,
            &recs,
            &States::new(),
            &HashMap::new(),
            &Refused::new(),
        );
        let results = HashMap::from([(
            "spot1-member10".to_string(),
            CreateResult::Rejected {
                category: "INVALID_EMAIL".into(),
                message: "bad".into(),
            },
        )]);
        let settled = settle_creates(&markers, plan.creates, &results);
        assert_eq!(settled.len(), 1);
        assert!(
            matches!(settled[0].0, Completion::DeadLetter { ref reason, .. } if reason == "bad")
        );
        assert!(matches!(
            settled[0].1,
            Tally::DeadLetter { member_id: 10, .. }
        ));
    }

    #[test]
    fn an_email_hubspot_refuses_to_look_up_is_dead_lettered_not_retried() {
        let recs = records(&[member(1, 10, "not an email"), member(1, 11, "b@x.io")]);
        let refused = Refused::from([(
            "not an email".to_string(),
            ("INVALID_EMAIL".to_string(), "bad e-mail".to_string()),
        )]);
        let plan = plan_properties(
            &[marker(1, 10, true), marker(1, 11, true)],
            &recs,
            &States::new(),
            &HashMap::new(),
            &refused,
        );
        assert!(
            matches!(plan.completions[..], [Completion::DeadLetter { ref reason, .. }] if reason == "bad e-mail")
        );
        assert_eq!(plan.creates.len(), 1, "the other member is still created");
        assert!(matches!(
            plan.tallies[..],
            [Tally::DeadLetter { member_id: 10, .. }]
        ));
    }

    #[test]
    fn an_event_waits_for_a_contact_being_created_and_is_dropped_without_one() {
        let recs = records(&[member(1, 10, "a@x.io"), member(1, 11, "b@x.io")]);
        let q = |id: &str, member_id| QueuedActivity {
            event_id: id.into(),
            spot_id: 1,
            member_id,
            activity: crate::translate::activity::ActivityType::SpotJoined,
            occurred_at: Utc::now(),
            spot_name: "S".into(),
            title: "t".into(),
            url: None,
        };
        let creating = HashSet::from([(1, 10)]);
        let plan = plan_activities(
            vec![q("e1", 10), q("e2", 11)],
            &recs,
            &States::new(),
            &creating,
            &HashMap::new(),
            &Refused::new(),
        );
        assert!(plan.events.is_empty());
        assert_eq!(plan.without_contact, 1);
        assert!(matches!(plan.done[0], ActivityDone::Later(ref id, _) if id == "e1"));
        assert!(matches!(plan.done[1], ActivityDone::NoContact(ref id) if id == "e2"));
    }
}
