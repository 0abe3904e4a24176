//! The decisions of a delivery round, without I/O: from what the database
//! and HubSpot said, which contacts to look up, create and write, which rows
//! end how, and what is dead-lettered. `round.rs` reads the inputs and
//! carries the plan out; everything here is unit-tested on plain values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::hubspot::contacts::Resolution;
use crate::hubspot::properties::{hubspot_time, join_names, normalize_email, truncate_value};
use crate::hubspot::timeline::{ActivityEvent, EventOutcome};
use crate::hubspot::CreateResult;
use crate::internal_events::DeadLetterKind;
use crate::store::portal_changes::Mapped;
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
    /// Members whose e-mail is suppressed on the portal.
    pub suppressed: usize,
    /// Dead letters decided by the plan (e-mails HubSpot refused to look up).
    pub tallies: Vec<Tally>,
}

/// E-mails suppressed on the portal (deleted there for privacy), among
/// those the round would look up: never looked up, created or sent events.
pub(super) type Suppressed = HashSet<String>;

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
    suppressed: &Suppressed,
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
        let known = known_contact(states, key, &email);
        if known.is_none() && suppressed.contains(&email) {
            plan.suppressed += 1;
            plan.completions.push(Completion::NoContact {
                marker: mk.clone(),
                email: Some(email),
            });
            continue;
        }
        let contact_id = known.or_else(|| found.get(&email).cloned());
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
    /// Moved to the record its contact was merged into.
    Remapped,
    /// Its contact was deleted: forgotten, the e-mail is looked up again.
    Forgotten,
    /// Its contact was merged into a record another member keeps.
    Conflict,
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
                    former: None,
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

/// What HubSpot said of the record ids it answered OBJECT_NOT_FOUND to on
/// an update: read back by id (`Portal::resolve_contact_ids`), and which
/// member of the Spot is already on each merged record.
#[derive(Debug, Default)]
pub(super) struct Missing {
    pub resolved: HashMap<String, Resolution>,
    /// Merged record id → the member of this Spot already mapped to it.
    pub taken: HashMap<String, i64>,
}

/// How the writes of a round ended, one result per update in order. A
/// record HubSpot no longer updates was merged (the member moves to the
/// merged record and is written there in the next round, unless another
/// member keeps it: a conflict) or deleted (forgotten; the e-mail is looked
/// up again, and nothing is created for it).
pub(super) fn settle_updates(
    markers: &[Marker],
    records: &Records,
    updates: Vec<PendingUpdate>,
    results: Vec<ItemResult>,
    missing: &Missing,
) -> Vec<(Completion, Tally)> {
    // Who keeps each merged record: the member already on it, else the
    // lowest member id of this round merged into it.
    let mut claims: HashMap<&str, Vec<Mapped>> = HashMap::new();
    for (u, result) in updates.iter().zip(&results) {
        if let (ItemResult::Missing, Some(Resolution::MergedInto(new))) =
            (result, missing.resolved.get(&u.contact_id))
        {
            let mk = &markers[u.marker];
            claims.entry(new.as_str()).or_default().push(Mapped {
                spot_id: mk.spot_id,
                member_id: mk.member_id,
                contact_id: u.contact_id.clone(),
            });
        }
    }
    for (new, list) in claims.iter_mut() {
        if let Some(&member_id) = missing.taken.get(*new) {
            list.push(Mapped {
                spot_id: 0,
                member_id,
                contact_id: (*new).to_string(),
            });
        }
    }
    let keepers: HashMap<&str, i64> = claims
        .iter()
        .filter_map(|(new, list)| Some((*new, super::portal_changes::keeper(list, None, new)?)))
        .collect();

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
            ItemResult::Missing => match missing.resolved.get(&u.contact_id) {
                Some(Resolution::MergedInto(new)) => {
                    match keepers.get(new.as_str()) {
                        Some(&kept) if kept != mk.member_id => (
                            Completion::Conflict {
                                marker: mk.clone(),
                                email,
                                contact_id: new.clone(),
                                former: u.contact_id,
                                kept_member_id: kept,
                            },
                            Tally::Conflict,
                        ),
                        _ => (
                            Completion::Remap {
                                marker: mk.clone(),
                                email,
                                contact_id: new.clone(),
                                former: Some(u.contact_id),
                            },
                            Tally::Remapped,
                        ),
                    }
                }
                Some(Resolution::Gone) => (
                    Completion::Forget {
                        marker: mk.clone(),
                        email,
                        former: u.contact_id,
                    },
                    Tally::Forgotten,
                ),
                // It still reads as itself: forget it; the next change
                // resolves the e-mail again.
                Some(Resolution::Live) | None => (
                    Completion::NoContact {
                        marker: mk.clone(),
                        email: Some(email),
                    },
                    Tally::Nothing,
                ),
            },
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
    /// Events whose member's e-mail is suppressed on the portal.
    pub suppressed: usize,
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
    suppressed: &Suppressed,
) -> ActivityPlan {
    let mut plan = ActivityPlan::default();
    for q in queued {
        let key = (q.spot_id, q.member_id);
        let Some(rec) = record_of(records, q.spot_id, q.member_id) else {
            plan.done.push(ActivityDone::NoContact(q.event_id));
            continue;
        };
        let email = normalize_email(&rec.email);
        let known = known_contact(states, key, &email);
        if known.is_none() && suppressed.contains(&email) {
            plan.suppressed += 1;
            plan.done.push(ActivityDone::NoContact(q.event_id));
            continue;
        }
        let contact = known.or_else(|| found.get(&email).cloned());
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
            &Suppressed::new(),
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
            &Suppressed::new(),
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
            &Suppressed::new(),
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
            &Suppressed::new(),
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
            &Suppressed::new(),
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
            &Suppressed::new(),
        );
        assert!(plan.events.is_empty());
        assert_eq!(plan.without_contact, 1);
        assert!(matches!(plan.done[0], ActivityDone::Later(ref id, _) if id == "e1"));
        assert!(matches!(plan.done[1], ActivityDone::NoContact(ref id) if id == "e2"));
    }

    fn update(marker: usize, contact: &str) -> PendingUpdate {
        PendingUpdate {
            marker,
            contact_id: contact.into(),
            diff: BTreeMap::from([("meltingspot_headline".to_string(), "hi".to_string())]),
            desired: BTreeMap::new(),
        }
    }

    #[test]
    fn a_merged_contact_is_followed_a_deleted_one_forgotten_and_a_taken_one_reported() {
        let markers = [
            marker(1, 10, false),
            marker(1, 11, false),
            marker(1, 12, true),
            marker(1, 13, false),
        ];
        let recs = records(&[
            member(1, 10, "a@x.io"),
            member(1, 11, "b@x.io"),
            member(1, 12, "c@x.io"),
            member(1, 13, "d@x.io"),
        ]);
        let updates = vec![
            update(0, "100"),
            update(1, "101"),
            update(2, "102"),
            update(3, "103"),
        ];
        let results = vec![
            ItemResult::Missing,
            ItemResult::Missing,
            ItemResult::Missing,
            ItemResult::Ok,
        ];
        let missing = Missing {
            resolved: HashMap::from([
                ("100".to_string(), Resolution::MergedInto("900".into())),
                ("101".to_string(), Resolution::MergedInto("901".into())),
                ("102".to_string(), Resolution::Gone),
            ]),
            // Member 20 already writes record 901.
            taken: HashMap::from([("901".to_string(), 20)]),
        };
        let settled = settle_updates(&markers, &recs, updates, results, &missing);
        assert!(matches!(
            &settled[0],
            (Completion::Remap { contact_id, former: Some(f), .. }, Tally::Remapped)
                if contact_id == "900" && f == "100"
        ));
        assert!(matches!(
            &settled[1],
            (Completion::Conflict { contact_id, kept_member_id: 20, .. }, Tally::Conflict)
                if contact_id == "901"
        ));
        assert!(matches!(
            &settled[2],
            (Completion::Forget { former, .. }, Tally::Forgotten) if former == "102"
        ));
        assert!(matches!(
            &settled[3],
            (Completion::Written { .. }, Tally::Written)
        ));
    }

    #[test]
    fn two_members_merged_into_one_record_in_a_round_are_not_both_written_there() {
        let markers = [marker(1, 11, false), marker(1, 10, false)];
        let recs = records(&[member(1, 10, "a@x.io"), member(1, 11, "b@x.io")]);
        let missing = Missing {
            resolved: HashMap::from([
                ("100".to_string(), Resolution::MergedInto("900".into())),
                ("101".to_string(), Resolution::MergedInto("900".into())),
            ]),
            taken: HashMap::new(),
        };
        let settled = settle_updates(
            &markers,
            &recs,
            vec![update(0, "101"), update(1, "100")],
            vec![ItemResult::Missing, ItemResult::Missing],
            &missing,
        );
        assert!(matches!(
            &settled[0],
            (
                Completion::Conflict {
                    kept_member_id: 10,
                    ..
                },
                Tally::Conflict
            )
        ));
        assert!(matches!(
            &settled[1],
            (Completion::Remap { .. }, Tally::Remapped)
        ));
    }

    #[test]
    fn a_suppressed_email_is_neither_created_nor_sent_events_unless_already_mapped() {
        let recs = records(&[member(1, 10, "gone@x.io"), member(1, 11, "b@x.io")]);
        let suppressed = Suppressed::from(["gone@x.io".to_string()]);
        let found = HashMap::from([("gone@x.io".to_string(), "5".to_string())]);
        let plan = plan_properties(
            &[marker(1, 10, true), marker(1, 11, true)],
            &recs,
            &States::new(),
            &found,
            &Refused::new(),
            &suppressed,
        );
        assert_eq!(plan.suppressed, 1);
        assert!(plan.updates.is_empty());
        assert_eq!(plan.creates.len(), 1);
        assert_eq!(plan.creates[0].properties["email"], "b@x.io");
        let q = QueuedActivity {
            event_id: "e1".into(),
            spot_id: 1,
            member_id: 10,
            activity: crate::translate::activity::ActivityType::SpotJoined,
            occurred_at: Utc::now(),
            spot_name: "S".into(),
            title: "t".into(),
            url: None,
        };
        let plan = plan_activities(
            vec![q],
            &recs,
            &States::new(),
            &HashSet::new(),
            &found,
            &Refused::new(),
            &suppressed,
        );
        assert!(plan.events.is_empty());
        assert_eq!(plan.suppressed, 1);
    }
}
