//! The work a transaction implies: the members whose properties may have
//! changed, the fan-outs of renames, and the timeline events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::activity::{self, ActivityType};
use super::markers::RejectedMarker;
use super::{SpotSettings, StreamSettings};

/// Members whose derived properties may have changed.
#[derive(Debug, Default, Clone)]
pub struct Work {
    /// Member ids whose own row or group/tag membership changed, each with
    /// its Spot when the stream carried it (the member's own row), so that
    /// the hand-off need not look it up (a membership row lacks it: None).
    pub members: BTreeMap<i64, Option<i64>>,
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
    /// Activities that occurred, in stream order, before the Spot and
    /// category filters (the hand-off resolves each one's Spot).
    pub activities: Vec<ActivityCandidate>,
    /// Settings markers that were forged, replayed or malformed, and ignored.
    pub rejected_markers: Vec<RejectedMarker>,
    /// For each `FULL_IDENTITY_TABLES` table changed: whether its replica
    /// identity was FULL (from its latest Relation message).
    pub identity_full: BTreeMap<&'static str, bool>,
    /// Member status updates whose old status the stream did not carry: no
    /// event is sent for them (it could be an edit), they are counted.
    pub undecidable_status_changes: u64,
}

/// What an activity is about, to be looked up by the hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectRef {
    /// The member's Spot itself (member status activities).
    Spot(i64),
    Live(i64),
    Topic(i64),
    /// A document open: its kind decides page_opened, link_opened or nothing.
    Document(i64),
    Course(i64),
}

/// An activity seen in the stream.
#[derive(Debug, Clone)]
pub struct ActivityCandidate {
    pub activity: ActivityType,
    pub member_id: i64,
    pub object: ObjectRef,
    /// The row the activity comes from (its id makes the event id).
    pub source_id: i64,
    /// When it happened: the row's own column, else the commit time (SPEC §9).
    pub occurred_at: DateTime<Utc>,
    /// Member status activities can repeat: their event id includes the
    /// commit LSN and the change's position in its transaction.
    pub commit_lsn: u64,
    pub ordinal: usize,
    /// The settings in force at this point of the stream.
    pub settings: Arc<StreamSettings>,
}

impl ActivityCandidate {
    /// Deterministic: a replay produces the same id, so HubSpot never shows it twice.
    pub fn event_id(&self, spot_id: i64) -> String {
        let base = format!("ms-{spot_id}-{}-{}", self.activity.name(), self.source_id);
        if self.activity.category() == activity::Category::Members {
            format!("{base}-{:x}-{}", self.commit_lsn, self.ordinal)
        } else {
            base
        }
    }

    /// Whether the Spot's settings at this point let the activity through.
    pub fn enabled_for(&self, spot_id: i64) -> bool {
        let Some(s) = self.settings.get(&spot_id) else {
            return false;
        };
        let a = &s.activities;
        let on = match self.activity.category() {
            activity::Category::Members => a.members,
            activity::Category::Lives => a.lives,
            activity::Category::Discussions => a.discussions,
            activity::Category::Collections => a.collections,
            activity::Category::Courses => a.courses,
        };
        // While failed the work is retained for the reconnect (SPEC §4.7).
        on && (s.status == "active" || s.status == "failed")
    }
}

impl Work {
    /// Whether some member's properties may have changed.
    pub fn touches_members(&self) -> bool {
        !(self.members.is_empty()
            && self.groups.is_empty()
            && self.tags.is_empty()
            && self.custom_roles.is_empty()
            && !self.all_members)
    }

    /// Whether handing it off queues outbox rows for delivery.
    pub fn queues_rows(&self) -> bool {
        self.touches_members() || !self.activities.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        !self.touches_members()
            && self.settings.is_empty()
            && self.activities.is_empty()
            && self.rejected_markers.is_empty()
    }

    /// How many ids and events it holds: what its memory grows with.
    pub fn size(&self) -> usize {
        self.members.len()
            + self.groups.len()
            + self.tags.len()
            + self.custom_roles.len()
            + self.create_contacts.len()
            + self.activities.len()
            + self.rejected_markers.len()
    }

    /// Takes out the part that can be handed off before its transaction's
    /// commit is read (the outbox rows are idempotent upserts); the settings
    /// stay, to be stored with the checkpoint when the transaction is done.
    pub fn take_rows(&mut self) -> Work {
        Work {
            members: std::mem::take(&mut self.members),
            groups: std::mem::take(&mut self.groups),
            tags: std::mem::take(&mut self.tags),
            custom_roles: std::mem::take(&mut self.custom_roles),
            all_members: std::mem::take(&mut self.all_members),
            create_contacts: std::mem::take(&mut self.create_contacts),
            activities: std::mem::take(&mut self.activities),
            ..Work::default()
        }
    }

    /// Notes a member whose properties may have changed; `spot_id` when
    /// the stream carried it. The latest known Spot wins (a member moved to
    /// another Spot is delivered there; delivery checks it again, G4).
    pub fn note_member(&mut self, member_id: i64, spot_id: Option<i64>) {
        let known = self.members.entry(member_id).or_insert(spot_id);
        if spot_id.is_some() {
            *known = spot_id;
        }
    }

    /// Coalesces another transaction's work into this one.
    pub fn merge(&mut self, other: Work) {
        for (member_id, spot_id) in other.members {
            self.note_member(member_id, spot_id);
        }
        self.groups.extend(other.groups);
        self.tags.extend(other.tags);
        self.custom_roles.extend(other.custom_roles);
        self.all_members |= other.all_members;
        self.create_contacts.extend(other.create_contacts);
        self.settings.extend(other.settings);
        self.activities.extend(other.activities);
        self.rejected_markers.extend(other.rejected_markers);
        self.identity_full.extend(other.identity_full);
        self.undecidable_status_changes += other.undecidable_status_changes;
    }
}
