//! Translate stage: a committed transaction becomes the work it implies.
//!
//! Property sync needs to know *which* members' derived properties may have
//! changed; the values themselves are read at delivery time, so that many
//! changes to one contact coalesce into one write of the latest values and an
//! older state can never overwrite a newer one (G7). Renames of groups, tags and
//! custom roles are recorded as fan-outs that the hand-off expands to members
//! in the same database transaction that stores the checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::replication::{Op, RowChange, Transaction, TxItem};

/// Prefix of the transactional logical messages that carry a Spot's settings
/// in commit order (written with every settings change, see `store::integrations`).
pub const SETTINGS_PREFIX: &str = "hubspot_sidecar.settings";

/// A Spot's settings as the stream has seen them so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotSettings {
    pub spot_id: i64,
    pub status: String,
    pub create_contacts: bool,
    #[serde(default)]
    pub activities: Activities,
}

/// Activity categories (SPEC §3), all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Activities {
    pub members: bool,
    pub lives: bool,
    pub discussions: bool,
    pub collections: bool,
    pub courses: bool,
}

/// Settings of every Spot, keyed by Spot id, as of the stream position.
pub type StreamSettings = HashMap<i64, SpotSettings>;

/// The tables the sidecar reads; everything else in the stream is ignored.
pub const SCHEMA: &str = "public";

/// Members whose derived properties may have changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PropertyWork {
    /// Member ids whose own row or group/tag membership changed.
    pub members: BTreeSet<i64>,
    /// Members inserted in this work (contact creation applies only to them).
    pub inserted_members: BTreeSet<i64>,
    /// Groups whose row changed (a rename changes every member's `groups`).
    pub groups: BTreeSet<i64>,
    pub tags: BTreeSet<i64>,
    pub custom_roles: BTreeSet<i64>,
    /// A truncate of a membership table: every member must be recomputed.
    pub all_members: bool,
    /// Members inserted while their Spot's contact creation was on (stream order).
    pub create_contacts: BTreeSet<i64>,
    /// The latest settings each Spot's messages carried.
    pub settings: BTreeMap<i64, SpotSettings>,
}

impl PropertyWork {
    /// Whether some member's properties may have changed.
    pub fn touches_members(&self) -> bool {
        !(self.members.is_empty()
            && self.groups.is_empty()
            && self.tags.is_empty()
            && self.custom_roles.is_empty()
            && !self.all_members)
    }

    pub fn is_empty(&self) -> bool {
        !self.touches_members() && self.settings.is_empty()
    }

    /// Coalesces another transaction's work into this one.
    pub fn merge(&mut self, other: PropertyWork) {
        self.members.extend(other.members);
        self.inserted_members.extend(other.inserted_members);
        self.groups.extend(other.groups);
        self.tags.extend(other.tags);
        self.custom_roles.extend(other.custom_roles);
        self.all_members |= other.all_members;
        self.create_contacts.extend(other.create_contacts);
        self.settings.extend(other.settings);
    }
}

/// The work one transaction implies. Settings messages update `settings` in
/// place, so a toggle governs exactly the changes after it in commit order.
pub fn translate(settings: &mut StreamSettings, tx: &Transaction) -> PropertyWork {
    let mut work = PropertyWork::default();
    for item in &tx.items {
        match item {
            TxItem::Message { prefix, content } if prefix == SETTINGS_PREFIX => {
                match serde_json::from_slice::<SpotSettings>(content) {
                    Ok(s) => {
                        settings.insert(s.spot_id, s.clone());
                        work.settings.insert(s.spot_id, s);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed settings message"),
                }
            }
            TxItem::Change(c) if &*c.schema == SCHEMA => {
                property_change(c, &mut work);
                if c.op == Op::Insert && &*c.table == "members" {
                    let new = c.new.as_ref();
                    let spot = new.and_then(|r| r.i64("spot_id"));
                    let creating = spot
                        .and_then(|s| settings.get(&s))
                        .is_some_and(|s| s.create_contacts && s.status == "active");
                    if let (true, Some(id)) = (creating, new.and_then(|r| r.i64("id"))) {
                        work.create_contacts.insert(id);
                    }
                }
            }
            TxItem::Truncate { schema, table } if &**schema == SCHEMA => {
                if matches!(
                    &**table,
                    "group_members" | "member_tags" | "groups" | "tags" | "custom_roles"
                ) {
                    work.all_members = true;
                }
            }
            _ => {}
        }
    }
    work
}

fn property_change(c: &RowChange, work: &mut PropertyWork) {
    // The row that identifies the entity: the new row, else the old key.
    let row = c.new.as_ref().or(c.old.as_ref());
    let Some(row) = row else { return };
    match &*c.table {
        "members" => {
            if let Some(id) = row.i64("id") {
                if c.op != Op::Delete {
                    work.members.insert(id);
                }
                if c.op == Op::Insert {
                    work.inserted_members.insert(id);
                }
            }
        }
        "group_members" | "member_tags" => {
            // Both keys are the primary key, so a delete's old key carries member_id.
            if let Some(id) = row.i64("member_id") {
                work.members.insert(id);
            }
            // A membership moved from one member to another: the old one changes too.
            if let Some(old) = c.old.as_ref().and_then(|o| o.i64("member_id")) {
                work.members.insert(old);
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
    use crate::replication::Assembler;
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

    fn tx(messages: Vec<Message>) -> Transaction {
        let mut a = Assembler::default();
        a.push(Message::Begin(pgoutput::Begin {
            final_lsn: 1,
            commit_time: 0,
            xid: 1,
        }))
        .unwrap();
        for m in messages {
            a.push(m).unwrap();
        }
        a.push(Message::Commit(pgoutput::Commit {
            flags: 0,
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 0,
        }))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn members_memberships_and_renames() {
        let work = translate(
            &mut StreamSettings::new(),
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
            work.members.iter().copied().collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(
            work.inserted_members.iter().copied().collect::<Vec<_>>(),
            vec![10]
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
        let work = translate(
            &mut StreamSettings::new(),
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
        let work = translate(
            &mut StreamSettings::new(),
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
        let on = serde_json::json!({"spot_id": 1, "status": "active", "create_contacts": true});
        let message = Message::LogicalMessage {
            transactional: true,
            lsn: 1,
            prefix: SETTINGS_PREFIX.into(),
            content: Bytes::from(on.to_string()),
        };
        let mut settings = StreamSettings::new();
        let work = translate(
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
}
