//! A Spot's settings as the stream applies them: contact creation and the
//! activity categories, in commit order.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A Spot's settings as the stream has seen them so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotSettings {
    pub spot_id: i64,
    /// `integrations.settings_version` when the marker was written: a marker
    /// applies only if it is newer than the one applied before.
    #[serde(default)]
    pub version: i64,
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

impl Activities {
    /// Whether any category is on.
    pub fn any(&self) -> bool {
        self.named().iter().any(|(_, on)| *on)
    }

    /// Each category with its API name, in the seed's order.
    pub fn named(&self) -> [(&'static str, bool); 5] {
        [
            ("members", self.members),
            ("lives", self.lives),
            ("discussions", self.discussions),
            ("collections", self.collections),
            ("courses", self.courses),
        ]
    }
}

/// A change of some activity categories; the ones left out keep their value.
/// Unknown categories are refused when the patch is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivitiesPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lives: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discussions: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collections: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub courses: Option<bool>,
}

impl ActivitiesPatch {
    /// Whether the patch turns any category on.
    pub fn enables_any(&self) -> bool {
        [
            self.members,
            self.lives,
            self.discussions,
            self.collections,
            self.courses,
        ]
        .contains(&Some(true))
    }
}

/// Settings of every Spot, keyed by Spot id, as of the stream position.
pub type StreamSettings = HashMap<i64, SpotSettings>;
