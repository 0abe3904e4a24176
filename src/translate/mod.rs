//! Translate stage: a committed transaction becomes the work it implies.
//!
//! Property sync needs to know *which* members' derived properties may have
//! changed; the values themselves are read at delivery time, so that many
//! changes to one contact coalesce into one write of the latest values and an
//! older state can never overwrite a newer one (G7). Renames of groups, tags and
//! custom roles are recorded as fan-outs that the hand-off expands to members
//! in the same database transaction that stores the checkpoint.

pub mod activity;
pub mod markers;
mod settings;
mod work;

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::replication::{Field, Op, Row, RowChange, TxItem, TxMeta};
use activity::ActivityType;

pub use markers::{MarkerKey, RejectedMarker, SETTINGS_PREFIX};
pub use settings::*;
pub use work::*;

/// The tables the sidecar reads; everything else in the stream is ignored.
pub const SCHEMA: &str = "public";

/// Published tables whose UPDATEs must carry the old row (REPLICA IDENTITY
/// FULL), so that a status or a timestamp that *became* set can be told from
/// an edit of a row where it already was.
pub const FULL_IDENTITY_TABLES: [&str; 3] = ["members", "live_registrations", "course_progress"];

/// Folds one item of a transaction into `work` as it is decoded, so that
/// nothing of the transaction itself is kept. `ordinal` is the item's
/// position in its transaction. Settings messages update `settings` in place,
/// so a toggle governs exactly the changes after it in commit order.
pub fn translate_item(
    settings: &mut Arc<StreamSettings>,
    key: &MarkerKey,
    tx: &TxMeta,
    ordinal: usize,
    item: &TxItem,
    work: &mut Work,
) {
    match item {
        TxItem::Message { prefix, content } if prefix == SETTINGS_PREFIX => {
            match key.open(content) {
                Ok(s) => match settings.get(&s.spot_id) {
                    // The same marker again (the stream resumed before it): nothing changes.
                    Some(last) if *last == s => {}
                    // A genuine marker, but not newer than the one applied: a replay.
                    Some(last) if s.version <= last.version => {
                        work.rejected_markers.push(RejectedMarker {
                            spot_id: Some(s.spot_id),
                            reason: markers::MarkerRejection::Replayed,
                        })
                    }
                    _ => {
                        // Copy on write: activities already seen keep the settings of their time.
                        Arc::make_mut(settings).insert(s.spot_id, s.clone());
                        work.settings.insert(s.spot_id, s);
                    }
                },
                Err(rejected) => work.rejected_markers.push(rejected),
            }
        }
        TxItem::Change(c) if &*c.schema == SCHEMA => {
            if let Some(t) = FULL_IDENTITY_TABLES.iter().find(|t| **t == &*c.table) {
                work.identity_full.insert(t, c.identity_full);
            }
            property_change(c, work);
            activity_change(c, tx, ordinal, settings, work);
            if c.op == Op::Insert && &*c.table == "members" {
                let new = c.new.as_ref();
                let spot = new.and_then(|r| r.i64("spot_id"));
                let creating = spot
                    .and_then(|s| settings.get(&s))
                    // While failed the work is retained for the reconnect (SPEC §4.7).
                    .is_some_and(|s| {
                        s.create_contacts && (s.status == "active" || s.status == "failed")
                    });
                if let (true, Some(id)) = (creating, new.and_then(|r| r.i64("id"))) {
                    work.create_contacts.insert(id);
                }
            }
        }
        TxItem::Truncate(tables)
            if tables.iter().any(|(schema, table)| {
                &**schema == SCHEMA
                    && matches!(
                        &**table,
                        "group_members" | "member_tags" | "groups" | "tags" | "custom_roles"
                    )
            }) =>
        {
            work.all_members = true;
        }
        _ => {}
    }
}

/// A timestamp column as pgoutput renders it (ISO style, UTC session).
fn time(row: &Row, column: &str) -> Option<DateTime<Utc>> {
    let s = row.text(column)?;
    DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Whether `column` became non-null in this change: an insert with a value,
/// or an update from NULL (SPEC §9). Without the whole old row (identity not
/// FULL; a key-only old tuple lacks the column) any non-null value counts:
/// the event id is deterministic, so a repeat is the same event, never a new one.
fn became_non_null(c: &RowChange, column: &str) -> Option<DateTime<Utc>> {
    let new = c.new.as_ref()?;
    let value = time(new, column)?;
    match (c.op, c.full_old()) {
        (Op::Insert, _) => Some(value),
        (Op::Update, Some(old)) if old.get(column) != Field::Null => None,
        (Op::Update, _) => Some(value),
        _ => None,
    }
}

fn activity_change(
    c: &RowChange,
    tx: &TxMeta,
    ordinal: usize,
    settings: &Arc<StreamSettings>,
    work: &mut Work,
) {
    if c.op == Op::Delete {
        return;
    }
    let Some(new) = c.new.as_ref() else { return };
    let Some(id) = new.i64("id") else { return };
    let mut push = |activity: ActivityType,
                    member_id: Option<i64>,
                    object: Option<ObjectRef>,
                    at: Option<DateTime<Utc>>| {
        if let (Some(member_id), Some(object)) = (member_id, object) {
            work.activities.push(ActivityCandidate {
                activity,
                member_id,
                object,
                source_id: id,
                occurred_at: at.unwrap_or(tx.commit_time),
                commit_lsn: tx.commit_lsn,
                ordinal,
                settings: settings.clone(),
            });
        }
    };
    let member = new.i64("member_id");
    match &*c.table {
        "members" => {
            let Some(status) = new.text("status") else {
                return;
            };
            let activity = match status {
                "accepted" => ActivityType::SpotJoined,
                "pending" => ActivityType::SpotJoinRequested,
                "left" => ActivityType::SpotLeft,
                _ => return,
            };
            // "Becomes": an insert, or an update from another status. Without the
            // whole old row (members not REPLICA IDENTITY FULL) an update cannot
            // tell a status change from an edit: no event, counted instead. (The
            // event id includes the commit LSN, so a guess would repeat.)
            let became = match (c.op, c.full_old()) {
                (Op::Insert, _) => true,
                (Op::Update, Some(old)) => old.text("status") != Some(status),
                (Op::Update, None) => {
                    work.undecidable_status_changes += 1;
                    false
                }
                _ => false,
            };
            if became {
                push(
                    activity,
                    Some(id),
                    new.i64("spot_id").map(ObjectRef::Spot),
                    None,
                );
            }
        }
        "live_registrations" => {
            let live = new.i64("live_id").map(ObjectRef::Live);
            if c.op == Op::Insert {
                push(
                    ActivityType::LiveRegistered,
                    member,
                    live,
                    time(new, "registered_at"),
                );
            }
            if let Some(at) = became_non_null(c, "attended_at") {
                push(ActivityType::LiveAttended, member, live, Some(at));
            }
        }
        "replay_views" if c.op == Op::Insert => {
            let live = new.i64("live_id").map(ObjectRef::Live);
            push(
                ActivityType::ReplayWatched,
                member,
                live,
                time(new, "watched_at"),
            );
        }
        "topic_votes" if c.op == Op::Insert => {
            let topic = new.i64("topic_id").map(ObjectRef::Topic);
            push(
                ActivityType::TopicVoted,
                member,
                topic,
                time(new, "created_at"),
            );
        }
        "topics" if c.op == Op::Insert => {
            push(
                ActivityType::TopicCreated,
                new.i64("author_member_id"),
                Some(ObjectRef::Topic(id)),
                time(new, "created_at"),
            );
        }
        "document_opens" if c.op == Op::Insert => {
            let doc = new.i64("document_id").map(ObjectRef::Document);
            // Page or link is decided by the document's kind, at the hand-off.
            push(
                ActivityType::PageOpened,
                member,
                doc,
                time(new, "opened_at"),
            );
        }
        "course_progress" => {
            let course = new.i64("course_id").map(ObjectRef::Course);
            if let Some(at) = became_non_null(c, "started_at") {
                push(ActivityType::CourseStarted, member, course, Some(at));
            }
            if let Some(at) = became_non_null(c, "completed_at") {
                push(ActivityType::CourseCompleted, member, course, Some(at));
            }
        }
        _ => {}
    }
}

fn property_change(c: &RowChange, work: &mut Work) {
    // The row that identifies the entity: the new row, else the old key.
    let row = c.new.as_ref().or(c.old.as_ref());
    let Some(row) = row else { return };
    match &*c.table {
        "members" => {
            if let Some(id) = row.i64("id") {
                if c.op != Op::Delete {
                    work.note_member(id, row.i64("spot_id"));
                }
            }
        }
        "group_members" | "member_tags" => {
            // Both keys are the primary key, so a delete's old key carries member_id.
            if let Some(id) = row.i64("member_id") {
                work.note_member(id, None);
            }
            // A membership moved from one member to another: the old one changes too.
            if let Some(old) = c.old.as_ref().and_then(|o| o.i64("member_id")) {
                work.note_member(old, None);
            }
        }
        // Only updates matter: a new group has no members yet, and deleting one
        // cascades to group_members rows, which arrive as their own deletes.
        "groups" if c.op == Op::Update => {
            row.i64("id").map(|id| work.groups.insert(id));
        }
        "tags" if c.op == Op::Update => {
            row.i64("id").map(|id| work.tags.insert(id));
        }
        "custom_roles" if c.op == Op::Update => {
            row.i64("id").map(|id| work.custom_roles.insert(id));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::{
        self, Message, OldKind, OldTuple, Relation, RelationColumn, Tuple, Value,
    };
    use crate::replication::{Assembler, Decoded};
    use bytes::Bytes;

    fn relation(id: u32, table: &str, cols: &[&str]) -> Message {
        Message::Relation(Relation {
            id,
            namespace: "public".into(),
            name: table.into(),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|c| RelationColumn {
                    flags: 0,
                    name: c.to_string(),
                    type_oid: 20,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn t(vals: &[&str]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| Value::Text(Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        )
    }

    fn key() -> MarkerKey {
        MarkerKey::new(&[9; 32])
    }

    /// A decoded transaction: its Begin and its items.
    type Tx = (TxMeta, Vec<TxItem>);

    fn run(settings: &mut Arc<StreamSettings>, (meta, items): &Tx) -> Work {
        let mut work = Work::default();
        for (ordinal, item) in items.iter().enumerate() {
            translate_item(settings, &key(), meta, ordinal, item, &mut work);
        }
        work
    }

    fn marker(content: String) -> Message {
        Message::LogicalMessage {
            transactional: true,
            lsn: 1,
            prefix: SETTINGS_PREFIX.into(),
            content: Bytes::from(content),
        }
    }

    fn signed(version: i64, create_contacts: bool) -> Message {
        marker(key().seal(&SpotSettings {
            spot_id: 1,
            version,
            status: "active".into(),
            create_contacts,
            activities: Activities::default(),
        }))
    }

    fn members_insert(id: &str) -> Message {
        Message::Insert {
            relation_id: 1,
            new: t(&[id, "1"]),
        }
    }

    fn tx(messages: Vec<Message>) -> Tx {
        let mut a = Assembler::default();
        let Some(Decoded::Begin(meta)) = a
            .push(Message::Begin(pgoutput::Begin {
                final_lsn: 1,
                commit_time: 0,
                xid: 1,
            }))
            .unwrap()
        else {
            panic!("a Begin starts a transaction")
        };
        let mut items = Vec::new();
        for m in messages {
            if let Some(Decoded::Item(item)) = a.push(m).unwrap() {
                items.push(item);
            }
        }
        let end = a
            .push(Message::Commit(pgoutput::Commit {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                commit_time: 0,
            }))
            .unwrap();
        assert!(matches!(end, Some(Decoded::Commit { end_lsn: 2 })));
        (meta, items)
    }

    #[test]
    fn members_memberships_and_renames() {
        let work = run(
            &mut Arc::new(StreamSettings::new()),
            &tx(vec![
                relation(1, "members", &["id", "spot_id"]),
                relation(2, "group_members", &["group_id", "member_id"]),
                relation(3, "groups", &["id", "spot_id", "name"]),
                relation(4, "custom_roles", &["id", "spot_id", "name"]),
                relation(5, "lives", &["id"]),
                Message::Insert {
                    relation_id: 1,
                    new: t(&["10", "1"]),
                },
                Message::Update {
                    relation_id: 1,
                    old: None,
                    new: t(&["11", "1"]),
                },
                Message::Delete {
                    relation_id: 2,
                    old: OldTuple {
                        kind: OldKind::Key,
                        tuple: t(&["7", "12"]),
                    },
                },
                Message::Update {
                    relation_id: 3,
                    old: None,
                    new: t(&["7", "1", "Renamed"]),
                },
                Message::Insert {
                    relation_id: 3,
                    new: t(&["8", "1", "New group"]),
                },
                Message::Update {
                    relation_id: 4,
                    old: None,
                    new: t(&["3", "1", "Champion"]),
                },
                Message::Insert {
                    relation_id: 5,
                    new: t(&["99"]),
                },
            ]),
        );
        assert_eq!(
            // A member's own row carries its Spot; a membership row does not.
            work.members
                .iter()
                .map(|(m, s)| (*m, *s))
                .collect::<Vec<_>>(),
            vec![(10, Some(1)), (11, Some(1)), (12, None)]
        );
        assert_eq!(work.groups.iter().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(
            work.custom_roles.iter().copied().collect::<Vec<_>>(),
            vec![3]
        );
        assert!(!work.all_members);
    }

    #[test]
    fn a_deleted_member_needs_no_write_and_other_schemas_are_ignored() {
        let mut other = relation(9, "members", &["id", "spot_id"]);
        if let Message::Relation(r) = &mut other {
            r.namespace = "archive".into();
        }
        let work = run(
            &mut Arc::new(StreamSettings::new()),
            &tx(vec![
                relation(1, "members", &["id", "spot_id"]),
                other,
                Message::Delete {
                    relation_id: 1,
                    old: OldTuple {
                        kind: OldKind::Key,
                        tuple: t(&["10"]),
                    },
                },
                Message::Insert {
                    relation_id: 9,
                    new: t(&["11", "1"]),
                },
            ]),
        );
        assert!(work.is_empty());
    }

    #[test]
    fn truncating_a_membership_table_recomputes_everyone() {
        let work = run(
            &mut Arc::new(StreamSettings::new()),
            &tx(vec![
                relation(2, "member_tags", &["member_id", "tag_id"]),
                Message::Truncate {
                    options: 0,
                    relation_ids: vec![2],
                },
            ]),
        );
        assert!(work.all_members);
        assert!(!work.is_empty());
    }

    #[test]
    fn contact_creation_follows_the_toggle_in_commit_order() {
        let message = signed(1, true);
        let mut settings = Arc::new(StreamSettings::new());
        let work = run(
            &mut settings,
            &tx(vec![
                relation(1, "members", &["id", "spot_id"]),
                Message::Insert {
                    relation_id: 1,
                    new: t(&["10", "1"]),
                },
                message,
                Message::Insert {
                    relation_id: 1,
                    new: t(&["11", "1"]),
                },
                Message::Insert {
                    relation_id: 1,
                    new: t(&["12", "2"]),
                },
            ]),
        );
        assert_eq!(
            work.create_contacts.iter().copied().collect::<Vec<_>>(),
            vec![11]
        );
        assert!(settings[&1].create_contacts);
        assert_eq!(settings[&1].activities, Activities::default());
        assert!(work.settings.contains_key(&1));
    }

    #[test]
    fn forged_and_replayed_markers_change_nothing() {
        let mut settings = Arc::new(StreamSettings::new());
        let forged = serde_json::json!({"spot_id": 1, "version": 99, "status": "active",
                                        "create_contacts": true, "mac": "00"});
        let work = run(
            &mut settings,
            &tx(vec![
                relation(1, "members", &["id", "spot_id"]),
                // Genuine: version 1 on, version 2 off.
                signed(1, true),
                signed(2, false),
                // A replay of version 1, an unsigned and a forged marker.
                signed(1, true),
                marker(r#"{"spot_id":1,"status":"active","create_contacts":true}"#.into()),
                marker(forged.to_string()),
                members_insert("10"),
            ]),
        );
        assert!(
            work.create_contacts.is_empty(),
            "{:?}",
            work.create_contacts
        );
        assert_eq!(settings[&1].version, 2);
        assert!(!settings[&1].create_contacts);
        let reasons: Vec<&str> = work
            .rejected_markers
            .iter()
            .map(|r| r.reason.as_str())
            .collect();
        assert_eq!(reasons, ["replayed", "malformed", "bad_signature"]);
        assert!(work.rejected_markers.iter().all(|r| r.spot_id == Some(1)));
    }

    #[test]
    fn the_same_marker_seen_again_is_not_a_replay() {
        let mut settings = Arc::new(StreamSettings::new());
        let work = run(
            &mut settings,
            &tx(vec![
                relation(1, "members", &["id", "spot_id"]),
                signed(1, true),
                signed(1, true),
                members_insert("10"),
            ]),
        );
        assert!(work.rejected_markers.is_empty());
        assert_eq!(work.create_contacts.len(), 1);
    }

    fn activities_of(messages: Vec<Message>) -> Vec<(ActivityType, i64)> {
        run(&mut Arc::new(StreamSettings::new()), &tx(messages))
            .activities
            .iter()
            .map(|a| (a.activity, a.source_id))
            .collect()
    }

    fn text_or_null(v: &[Option<&str>]) -> Tuple {
        Tuple(
            v.iter()
                .map(|x| match x {
                    Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Value::Null,
                })
                .collect(),
        )
    }

    #[test]
    fn activities_fire_when_a_value_becomes_what_triggers_them() {
        let regs = relation(
            3,
            "live_registrations",
            &["id", "live_id", "member_id", "registered_at", "attended_at"],
        );
        let members = relation(1, "members", &["id", "spot_id", "status", "headline"]);
        let t0 = Some("2026-05-01 10:00:00.123456+00");
        let got = activities_of(vec![
            regs,
            members,
            // Registered and attended in one insert: both.
            Message::Insert {
                relation_id: 3,
                new: text_or_null(&[Some("1"), Some("9"), Some("5"), t0, t0]),
            },
            // attended_at from NULL: attended; already set: nothing.
            Message::Update {
                relation_id: 3,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: text_or_null(&[Some("2"), Some("9"), Some("5"), t0, None]),
                }),
                new: text_or_null(&[Some("2"), Some("9"), Some("5"), t0, t0]),
            },
            Message::Update {
                relation_id: 3,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: text_or_null(&[Some("3"), Some("9"), Some("5"), t0, t0]),
                }),
                new: text_or_null(&[Some("3"), Some("9"), Some("5"), t0, t0]),
            },
            // A status that changes to accepted joins; a headline edit of an accepted member does not.
            Message::Update {
                relation_id: 1,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: text_or_null(&[Some("5"), Some("1"), Some("pending"), None]),
                }),
                new: text_or_null(&[Some("5"), Some("1"), Some("accepted"), None]),
            },
            Message::Update {
                relation_id: 1,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: text_or_null(&[Some("5"), Some("1"), Some("accepted"), None]),
                }),
                new: text_or_null(&[Some("5"), Some("1"), Some("accepted"), Some("hi")]),
            },
        ]);
        assert_eq!(
            got,
            vec![
                (ActivityType::LiveRegistered, 1),
                (ActivityType::LiveAttended, 1),
                (ActivityType::LiveAttended, 2),
                (ActivityType::SpotJoined, 5),
            ]
        );
    }

    #[test]
    fn event_ids_are_deterministic_and_member_events_include_their_position() {
        let members = relation(1, "members", &["id", "spot_id", "status"]);
        let work = run(
            &mut Arc::new(StreamSettings::new()),
            &tx(vec![
                members,
                Message::Insert {
                    relation_id: 1,
                    new: t(&["5", "1", "accepted"]),
                },
            ]),
        );
        let a = &work.activities[0];
        assert_eq!(
            a.event_id(1),
            format!("ms-1-spot_joined-5-{:x}-0", a.commit_lsn)
        );
        assert!(!a.enabled_for(1), "no category is on by default");
    }
}
