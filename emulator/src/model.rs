//! Public data types handed out by the Rust inspection API (and, as JSON, by `/_emulator/`).
//!
//! These are snapshots: mutating them changes nothing in the emulator.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A contact record as the emulator stores it.
///
/// `properties` holds the values written through the API or seeded (normalised the way HubSpot
/// returns them: datetimes as `YYYY-MM-DDTHH:MM:SS.mmmZ`, dates as `YYYY-MM-DD`). A property
/// cleared with `""` holds `""`; a property never written is absent.
/// The computed read-only properties (`hs_object_id`, `createdate`, `lastmodifieddate`) are not
/// in the map; they are derived from `id`, `created_at` and `updated_at` when served over HTTP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Contact {
    pub id: String,
    pub properties: BTreeMap<String, String>,
    pub created_by: CreatedBy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What made a contact exist: lets tests check §4.4/G5 (no contact created outside consent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreatedBy {
    /// `Emulator::add_contact` or `POST /_emulator/portals/{id}/contacts`.
    Seed,
    /// A contacts API call (create, batch create, upsert).
    Api,
    /// A timeline v3 event identified by `email` for which no contact existed.
    TimelineEvent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyGroup {
    pub name: String,
    pub label: String,
    pub display_order: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyOption {
    pub label: String,
    pub value: String,
    pub display_order: i32,
    pub hidden: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyDef {
    pub name: String,
    pub label: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub field_type: String,
    pub group_name: String,
    pub options: Vec<PropertyOption>,
}

/// Which HubSpot API delivered a timeline event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventApi {
    /// App Events (`/integrators/timeline/v4/events[/batch]`).
    AppEvents,
    /// Legacy timeline v3 (`/crm/v3/timeline/events[/batch/create]`).
    TimelineV3,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEvent {
    pub id: String,
    pub api: EventApi,
    /// The App Event's `eventTypeName`, or the v3 template's `name`.
    pub event_type: String,
    pub object_id: String,
    /// ISO 8601 UTC with milliseconds.
    pub timestamp: String,
    /// App Event `properties` or v3 `tokens`, values as strings.
    pub properties: BTreeMap<String, String>,
}

/// Per-portal request accounting (`/_emulator/` requests are never counted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestStats {
    pub total: u64,
    /// operation name -> HTTP status -> count.
    pub by_operation: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Number of 429 answers (ten-secondly and search secondly limits).
    pub rate_limited: u64,
    /// Highest number of admitted (non-search) requests inside one rolling rate window.
    pub peak_in_10s: u32,
}

impl RequestStats {
    /// Count of answers with `status` for `operation` (0 when none).
    pub fn count(&self, operation: &str, status: u16) -> u64 {
        self.by_operation
            .get(operation)
            .and_then(|m| m.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Count of all answers for `operation`, whatever their status.
    pub fn count_op(&self, operation: &str) -> u64 {
        self.by_operation
            .get(operation)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }
}

/// Fault injection for API routes (not `/_emulator/`, not `/oauth/authorize`).
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Sleep this long before answering.
    pub latency: Option<Duration>,
    /// Probability (0..=1) of answering 500 (3 times in 4) or 503 instead of doing the work.
    pub error_rate: f64,
    /// Accept the request but never answer until the faults are changed (or the emulator stops).
    pub hang: bool,
    /// Probability (0..=1) of doing the work and then losing the answer: the
    /// status line goes out, the body breaks off (the client sees a reset
    /// while reading it). The call was applied all the same.
    pub lose_answer_rate: f64,
}

/// How the OAuth token endpoint words a refusal. HubSpot has been seen
/// answering in each of these; a client must understand all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OAuthErrorStyle {
    /// `{"status":"BAD_REFRESH_TOKEN","message":…}`: HubSpot's own, no `error` field.
    #[default]
    StatusOnly,
    /// The same with `"error":"invalid_request"`.
    InvalidRequest,
    /// OAuth 2 style: `error` (`invalid_grant`, …), `error_description`, plus `status`.
    OAuth2,
}

/// One POST of a webhook batch to the app's target URL, as the delivery task made it: what a
/// test waits on ("the batch was answered 2xx") and inspects (retries, attempt numbers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WebhookAttempt {
    /// The same for every attempt of one batch, so retries can be told apart from new batches.
    pub batch_id: u64,
    /// The portal whose events these are (a request carries one portal's events).
    pub portal_id: u64,
    /// The target URL exactly as configured (and signed).
    pub url: String,
    /// `0` for the first attempt, `+1` per retry (the events' `attemptNumber`).
    pub attempt_number: u32,
    /// The JSON array sent, `attemptNumber` included.
    pub events: serde_json::Value,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why there was no usable answer (connection refused, timeout, ...).
    pub error: Option<String>,
    /// When the answer (or the failure) came.
    pub at: DateTime<Utc>,
}

impl WebhookAttempt {
    /// Answered 2xx. (A 3xx is not retried either, as HubSpot retries only failures to
    /// connect, timeouts and 4xx/5xx; redirects are not followed.)
    pub fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// How `Emulator::send_webhook` signs a hand-made batch, so tests can check what a receiver
/// refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookSigning {
    /// A correct v3 signature and a fresh timestamp, like HubSpot's own deliveries.
    Valid,
    /// No `X-HubSpot-Signature-v3` header (the timestamp header is still sent).
    Unsigned,
    /// Signed with a secret that is not the app's client secret.
    WrongSecret,
    /// Correctly signed, but with a timestamp this long ago (HubSpot's receivers must refuse
    /// timestamps older than 5 minutes).
    Stale(Duration),
}
