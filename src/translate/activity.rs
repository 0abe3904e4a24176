//! The twelve timeline activities in five categories (SPEC §3).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityType {
    SpotJoined,
    SpotJoinRequested,
    SpotLeft,
    LiveRegistered,
    LiveAttended,
    ReplayWatched,
    TopicVoted,
    TopicCreated,
    PageOpened,
    LinkOpened,
    CourseStarted,
    CourseCompleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Members,
    Lives,
    Discussions,
    Collections,
    Courses,
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Members => "members",
            Category::Lives => "lives",
            Category::Discussions => "discussions",
            Category::Collections => "collections",
            Category::Courses => "courses",
        }
    }
}

impl ActivityType {
    pub const ALL: [ActivityType; 12] = [
        ActivityType::SpotJoined,
        ActivityType::SpotJoinRequested,
        ActivityType::SpotLeft,
        ActivityType::LiveRegistered,
        ActivityType::LiveAttended,
        ActivityType::ReplayWatched,
        ActivityType::TopicVoted,
        ActivityType::TopicCreated,
        ActivityType::PageOpened,
        ActivityType::LinkOpened,
        ActivityType::CourseStarted,
        ActivityType::CourseCompleted,
    ];

    /// The activity type name: App Events `eventTypeName` (after the prefix)
    /// and the timeline-v3 template name.
    pub fn name(self) -> &'static str {
        match self {
            ActivityType::SpotJoined => "spot_joined",
            ActivityType::SpotJoinRequested => "spot_join_requested",
            ActivityType::SpotLeft => "spot_left",
            ActivityType::LiveRegistered => "live_registered",
            ActivityType::LiveAttended => "live_attended",
            ActivityType::ReplayWatched => "replay_watched",
            ActivityType::TopicVoted => "topic_voted",
            ActivityType::TopicCreated => "topic_created",
            ActivityType::PageOpened => "page_opened",
            ActivityType::LinkOpened => "link_opened",
            ActivityType::CourseStarted => "course_started",
            ActivityType::CourseCompleted => "course_completed",
        }
    }

    pub fn from_name(name: &str) -> Option<ActivityType> {
        ActivityType::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn category(self) -> Category {
        use ActivityType::*;
        match self {
            SpotJoined | SpotJoinRequested | SpotLeft => Category::Members,
            LiveRegistered | LiveAttended | ReplayWatched => Category::Lives,
            TopicVoted | TopicCreated => Category::Discussions,
            PageOpened | LinkOpened => Category::Collections,
            CourseStarted | CourseCompleted => Category::Courses,
        }
    }

    /// The seed's wording, shown as the timeline entry's header.
    pub fn header(self) -> &'static str {
        use ActivityType::*;
        match self {
            SpotJoined => "Joined the Spot",
            SpotJoinRequested => "Requested to join the Spot",
            SpotLeft => "Left the Spot",
            LiveRegistered => "Registered to a live",
            LiveAttended => "Attended a live",
            ReplayWatched => "Watched a replay",
            TopicVoted => "Voted on a topic",
            TopicCreated => "Created a topic",
            PageOpened => "Opened a page",
            LinkOpened => "Opened a link",
            CourseStarted => "Started a course",
            CourseCompleted => "Completed a course",
        }
    }

    /// Whether events carry a `url` besides `spot_name` and `title` (SPEC §9).
    pub fn has_url(self) -> bool {
        matches!(self, ActivityType::PageOpened | ActivityType::LinkOpened)
    }
}
