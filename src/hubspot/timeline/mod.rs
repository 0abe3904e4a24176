//! Timeline activities: how events reach HubSpot (SPEC §3, §9; reference §3).
//! This file holds what both APIs share (the event, the sink, batching and
//! reading answers); `app_events.rs` and `templates.rs` hold what differs.
//!
//! Two delivery APIs, chosen once by `HUBSPOT_ACTIVITY_API`:
//! * App Events (`POST /integrators/timeline/v4/events/batch`): `eventTypeName` is
//!   `HUBSPOT_APP_EVENT_PREFIX` + the activity type name; the event types themselves are
//!   declared in the app project (`deploy/hubspot-app/`). A repeated event `id` is never stored
//!   twice: HubSpot answers 409 (all repeats) or a 207 with one CONFLICT per repeat.
//! * Legacy timeline v3 (`POST /crm/v3/timeline/events/batch/create`): one template per activity
//!   type, created idempotently by name with the developer API key; a repeated event `id` is
//!   last-write-wins, so a replay overwrites instead of duplicating.
//!
//! Events always name the contact by record id (`objectId`), never by e-mail: identifying a
//! timeline event by e-mail makes HubSpot create the contact.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

mod app_events;
mod templates;

use super::{ApiError, Endpoint, HubSpotError, Portal};
use crate::config::ActivitySinkConfig;
use crate::translate::activity::ActivityType;

/// Inputs per batch call, for both APIs (App Events would take 500; v3's limit is unknown,
/// legacy v1 allowed 100).
pub const EVENT_BATCH: usize = 100;

/// One timeline event, ready to send. `id` is deterministic (the caller derives it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityEvent {
    pub id: String,
    pub activity: ActivityType,
    /// The contact's HubSpot record id.
    pub object_id: String,
    pub timestamp: DateTime<Utc>,
    pub spot_name: String,
    pub title: String,
    /// Sent only for the activity types that declare it (page_opened, link_opened).
    pub url: Option<String>,
}

/// What HubSpot did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Sent,
    /// HubSpot already has this id: success for exactly-once.
    Duplicate,
    /// HubSpot refused this event; retrying it unchanged cannot succeed.
    Rejected {
        category: String,
        message: String,
    },
}

/// How events reach HubSpot (HUBSPOT_ACTIVITY_API), one value shared by all workers.
#[derive(Clone)]
pub enum ActivitySink {
    AppEvents {
        prefix: String,
    },
    TimelineV3 {
        app_id: String,
        developer_api_key: String,
        /// Activity type -> template id, filled by `ensure_templates`.
        templates: Arc<Mutex<HashMap<ActivityType, String>>>,
    },
}

impl std::fmt::Debug for ActivitySink {
    // Hand-written so that the developer API key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActivitySink::AppEvents { prefix } => {
                f.debug_struct("AppEvents").field("prefix", prefix).finish()
            }
            ActivitySink::TimelineV3 { app_id, .. } => f
                .debug_struct("TimelineV3")
                .field("app_id", app_id)
                .finish_non_exhaustive(),
        }
    }
}

/// Names of the properties (App Events) / tokens (timeline v3) an activity type's events carry
/// (SPEC §9).
pub fn property_names(activity: ActivityType) -> &'static [&'static str] {
    if activity.has_url() {
        &["spot_name", "title", "url"]
    } else {
        &["spot_name", "title"]
    }
}

fn property_label(name: &str) -> &'static str {
    match name {
        "spot_name" => "Spot",
        "title" => "Title",
        _ => "URL",
    }
}

/// The timeline entry's body: the object's title, its link for pages and links, the Spot.
pub fn detail_template(activity: ActivityType) -> String {
    if activity.has_url() {
        "{{title}}\n\n[{{url}}]({{url}})\n\nSpot: {{spot_name}}".to_string()
    } else {
        "{{title}}\n\nSpot: {{spot_name}}".to_string()
    }
}

/// ISO 8601 UTC with milliseconds, truncated (SPEC §9).
pub fn event_timestamp(t: DateTime<Utc>) -> String {
    DateTime::<Utc>::from_timestamp_millis(t.timestamp_millis())
        .unwrap_or(t)
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl ActivityEvent {
    pub(super) fn properties(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("spot_name".into(), json!(self.spot_name));
        m.insert("title".into(), json!(self.title));
        if self.activity.has_url() {
            if let Some(url) = &self.url {
                m.insert("url".into(), json!(url));
            }
        }
        m
    }
}

impl ActivitySink {
    /// The sink for validated settings (`HubSpotConfig::activity_sink`).
    pub fn new(cfg: ActivitySinkConfig) -> ActivitySink {
        match cfg {
            ActivitySinkConfig::AppEvents { prefix } => ActivitySink::AppEvents { prefix },
            ActivitySinkConfig::TimelineV3 {
                app_id,
                developer_api_key,
            } => ActivitySink::TimelineV3 {
                app_id,
                developer_api_key,
                templates: Arc::new(Mutex::new(HashMap::new())),
            },
        }
    }

    pub(super) async fn forget_templates(&self) {
        if let ActivitySink::TimelineV3 { templates, .. } = self {
            templates.lock().await.clear();
        }
    }
}

/// A string or number id as a string.
pub(super) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One error of a batch answer or of a refused request.
struct NamedError {
    category: String,
    message: String,
    /// Event ids or object ids the error names (`context.ids` / `context.id`).
    ids: HashSet<String>,
}

impl NamedError {
    fn from_value(v: &Value) -> NamedError {
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut ids = HashSet::new();
        collect_ids(v.get("context"), &mut ids);
        NamedError {
            category: text("category"),
            message: text("message"),
            ids,
        }
    }

    fn from_api(e: &ApiError) -> NamedError {
        let mut ids = HashSet::new();
        collect_ids(e.context.as_ref(), &mut ids);
        for sub in &e.errors {
            collect_ids(sub.get("context"), &mut ids);
        }
        NamedError {
            category: e.category.clone(),
            message: e.message.clone(),
            ids,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self.category.as_str(), "CONFLICT" | "OBJECT_ALREADY_EXISTS")
            || self.message.to_ascii_lowercase().contains("already exist")
    }

    /// The error is about the event template (deleted, or lacking a token): the cached ids
    /// are stale.
    fn is_template_problem(&self) -> bool {
        self.message.to_ascii_lowercase().contains("event template")
    }

    /// The events of `group` it names: by event id, else by contact record id.
    fn names<'e>(&self, group: &[&'e ActivityEvent]) -> Vec<&'e ActivityEvent> {
        let by_id: Vec<&ActivityEvent> = group
            .iter()
            .copied()
            .filter(|e| self.ids.contains(&e.id))
            .collect();
        if !by_id.is_empty() {
            return by_id;
        }
        group
            .iter()
            .copied()
            .filter(|e| self.ids.contains(&e.object_id))
            .collect()
    }

    fn rejected(&self) -> EventOutcome {
        EventOutcome::Rejected {
            category: if self.category.is_empty() {
                "UNKNOWN".into()
            } else {
                self.category.clone()
            },
            message: if self.message.is_empty() {
                self.category.clone()
            } else {
                self.message.clone()
            },
        }
    }
}

fn collect_ids(ctx: Option<&Value>, out: &mut HashSet<String>) {
    let Some(ctx) = ctx else {
        return;
    };
    for key in ["ids", "id"] {
        match ctx.get(key) {
            Some(Value::Array(a)) => out.extend(a.iter().filter_map(id_string)),
            Some(v) => out.extend(id_string(v)),
            None => {}
        }
    }
}

impl Portal {
    /// Sends events in batches of at most `EVENT_BATCH` (one call each when HubSpot accepts
    /// them) and reports each event id's outcome. A refused batch is narrowed down (the inputs
    /// it names, else halves) until every refused event stands alone, so one bad event never
    /// holds back the others. Transient, auth and rate-limit failures are returned as errors:
    /// resending is safe (App Events answer Duplicate, timeline v3 overwrites).
    pub async fn send_events(
        &self,
        sink: &ActivitySink,
        events: &[ActivityEvent],
    ) -> Result<HashMap<String, EventOutcome>, HubSpotError> {
        let mut out = HashMap::new();
        let mut pending: Vec<Vec<&ActivityEvent>> = events
            .chunks(EVENT_BATCH)
            .map(|c| c.iter().collect())
            .collect();
        pending.reverse();
        let mut templates_refreshed = false;
        while let Some(group) = pending.pop() {
            if group.is_empty() {
                continue;
            }
            let (endpoint, body) = self.batch_request(sink, &group).await?;
            match self
                .call(&endpoint, reqwest::Method::POST, Some(&body))
                .await
            {
                Ok((_, resp)) => {
                    let errors: Vec<NamedError> = resp
                        .get("errors")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(NamedError::from_value)
                        .collect();
                    if retry_with_fresh_templates(sink, &errors, &mut templates_refreshed).await {
                        pending.push(group);
                        continue;
                    }
                    read_batch_answer(&group, &resp, &errors, &mut out);
                }
                // App Events batches are atomic: a 409 means one or more ids
                // exist and NONE of the batch was stored, and its body need not
                // name them. Only a lone event's 409 proves that event is there.
                Err(HubSpotError::Rejected { status: 409, error }) => {
                    if group.len() == 1 {
                        out.insert(group[0].id.clone(), EventOutcome::Duplicate);
                        continue;
                    }
                    let named = NamedError::from_api(&error).names(&group);
                    self.split_call(endpoint.operation());
                    if named.is_empty() || named.len() == group.len() {
                        let (a, b) = group.split_at(group.len() / 2);
                        pending.push(b.to_vec());
                        pending.push(a.to_vec());
                    } else {
                        // The named ones exist; the rest must be sent again.
                        let named_ids: HashSet<&str> =
                            named.iter().map(|e| e.id.as_str()).collect();
                        let (dup, rest): (Vec<&ActivityEvent>, Vec<&ActivityEvent>) = group
                            .into_iter()
                            .partition(|ev| named_ids.contains(ev.id.as_str()));
                        pending.push(rest);
                        pending.extend(dup.into_iter().map(|ev| vec![ev]));
                    }
                }
                // A route or request-shape refusal is not about any event:
                // fail the batch (retried with backoff), never dead-letter it.
                Err(e @ HubSpotError::Rejected { .. }) if !is_input_refusal(&e) => return Err(e),
                Err(HubSpotError::Rejected { error, .. }) => {
                    let e = NamedError::from_api(&error);
                    if retry_with_fresh_templates(
                        sink,
                        std::slice::from_ref(&e),
                        &mut templates_refreshed,
                    )
                    .await
                    {
                        pending.push(group);
                        continue;
                    }
                    if group.len() == 1 {
                        out.insert(group[0].id.clone(), e.rejected());
                        continue;
                    }
                    let named = e.names(&group);
                    self.split_call(endpoint.operation());
                    if named.is_empty() {
                        // Nothing named: halve until the bad input stands alone.
                        let (a, b) = group.split_at(group.len() / 2);
                        pending.push(b.to_vec());
                        pending.push(a.to_vec());
                    } else {
                        let named_ids: HashSet<&str> =
                            named.iter().map(|e| e.id.as_str()).collect();
                        for ev in &named {
                            out.insert(ev.id.clone(), e.rejected());
                        }
                        // The batch was refused as a whole: send the others again.
                        pending.push(
                            group
                                .into_iter()
                                .filter(|ev| !named_ids.contains(ev.id.as_str()))
                                .collect(),
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The endpoint and body of one batch call.
    async fn batch_request(
        &self,
        sink: &ActivitySink,
        group: &[&ActivityEvent],
    ) -> Result<(Endpoint<'static>, Value), HubSpotError> {
        match sink {
            ActivitySink::AppEvents { prefix } => Ok((
                Endpoint::AppEventsBatch,
                app_events::batch_body(prefix, group),
            )),
            ActivitySink::TimelineV3 { .. } => Ok((
                Endpoint::TimelineEventsBatch,
                templates::batch_body(sink, &self.client, group).await?,
            )),
        }
    }
}

/// Whether a refusal can be about the inputs (400, 409, 422), not the route
/// or the request's shape (404, 405, 413, 414, 415, …).
pub(crate) fn is_input_refusal(e: &HubSpotError) -> bool {
    matches!(
        e,
        HubSpotError::Rejected {
            status: 400 | 409 | 422 | 207,
            ..
        }
    )
}

/// timeline v3: once per `send_events`, an error about the event template makes the cached
/// template ids stale: forget them, re-ensure (recreates a deleted template, adds a missing
/// token) and send the batch again. Returns whether to resend.
async fn retry_with_fresh_templates(
    sink: &ActivitySink,
    errors: &[NamedError],
    refreshed: &mut bool,
) -> bool {
    if *refreshed
        || !matches!(sink, ActivitySink::TimelineV3 { .. })
        || !errors.iter().any(NamedError::is_template_problem)
    {
        return false;
    }
    *refreshed = true;
    sink.forget_templates().await;
    true
}

/// A 2xx (201 or 207) batch answer: ids in `results` are Sent; ids an error names are Duplicate
/// (CONFLICT) or Rejected; the rest are Sent, or Rejected when an error named nobody.
fn read_batch_answer(
    group: &[&ActivityEvent],
    resp: &Value,
    errors: &[NamedError],
    out: &mut HashMap<String, EventOutcome>,
) {
    let mut decided: HashSet<&str> = HashSet::new();
    let in_group: HashSet<&str> = group.iter().map(|e| e.id.as_str()).collect();
    for r in resp
        .get("results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(id) = r.get("id").and_then(id_string) {
            if let Some(&known) = in_group.get(id.as_str()) {
                out.insert(id, EventOutcome::Sent);
                decided.insert(known);
            }
        }
    }
    let mut unnamed: Option<&NamedError> = None;
    for e in errors {
        let named = e.names(group);
        if named.is_empty() {
            unnamed = unnamed.or(Some(e));
            continue;
        }
        for ev in named {
            let outcome = if e.is_conflict() {
                EventOutcome::Duplicate
            } else {
                e.rejected()
            };
            out.insert(ev.id.clone(), outcome);
            decided.insert(ev.id.as_str());
        }
    }
    for ev in group {
        if decided.contains(ev.id.as_str()) {
            continue;
        }
        let outcome = match unnamed {
            Some(e) if e.is_conflict() => EventOutcome::Duplicate,
            Some(e) => e.rejected(),
            None => EventOutcome::Sent,
        };
        out.insert(ev.id.clone(), outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hubspot::oauth::OAuthApp;
    use crate::hubspot::ratelimit::RateLimiter;
    use crate::hubspot::HubSpotClient;
    use crate::metrics::Metrics;
    use chrono::TimeZone;
    use hubspot_emulator::{CreatedBy, EmulatorConfig, EventApi};

    const DEV_KEY: &str = "emulator-developer-key";
    const APP_ID: &str = "4242";

    struct Setup {
        emu: hubspot_emulator::Emulator,
        portal: Portal,
        portal_id: u64,
        contacts: Vec<String>,
    }

    /// An emulator, a portal connected through the OAuth flow, and three seeded contacts.
    async fn setup() -> Setup {
        let emu = hubspot_emulator::Emulator::start(EmulatorConfig::default())
            .await
            .expect("emulator starts");
        let client = HubSpotClient::new(&emu.base_url(), "2026-03", Arc::new(Metrics::new()));
        let app = OAuthApp {
            client_id: "emulator-client-id".into(),
            client_secret: "emulator-client-secret".into(),
            redirect_uri: "http://localhost:9187/oauth/hubspot/callback".into(),
            start_uri: "http://localhost:9187/oauth/hubspot/start".into(),
            auth_base: emu.base_url(),
        };
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let resp = browser
            .get(app.authorize_url("state-1"))
            .send()
            .await
            .expect("authorize");
        assert_eq!(resp.status().as_u16(), 302);
        let location = resp.headers()["location"].to_str().expect("location");
        let code = url::Url::parse(location)
            .expect("redirect url")
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("code");
        let tokens = app.exchange_code(&client, &code).await.expect("tokens");
        let portal_id = tokens.hub_id.expect("hub id") as u64;
        let contacts = ["ada@example.com", "bob@example.com", "cyd@example.com"]
            .iter()
            .map(|e| emu.add_contact(portal_id, e, &[]))
            .collect();
        let portal = Portal {
            client,
            token: tokens.access_token,
            limiter: Arc::new(RateLimiter::new(100)),
            fence: None,
        };
        Setup {
            emu,
            portal,
            portal_id,
            contacts,
        }
    }

    fn event(id: &str, activity: ActivityType, object_id: &str, title: &str) -> ActivityEvent {
        ActivityEvent {
            id: id.into(),
            activity,
            object_id: object_id.into(),
            timestamp: Utc
                .with_ymd_and_hms(2026, 3, 18, 15, 30, 32)
                .single()
                .expect("valid date")
                + chrono::Duration::nanoseconds(123_999_999),
            spot_name: "Growth Club".into(),
            title: title.into(),
            url: activity
                .has_url()
                .then(|| format!("https://example.com/{id}")),
        }
    }

    fn v3_sink() -> ActivitySink {
        ActivitySink::TimelineV3 {
            app_id: APP_ID.into(),
            developer_api_key: DEV_KEY.into(),
            templates: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn list_templates(emu: &hubspot_emulator::Emulator) -> Vec<Value> {
        let v: Value = reqwest::get(format!(
            "{}/crm/v3/timeline/{APP_ID}/event-templates?hapikey={DEV_KEY}",
            emu.base_url()
        ))
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
        v["results"].as_array().cloned().unwrap_or_default()
    }

    fn all_sent(out: &HashMap<String, EventOutcome>, ids: &[&str]) {
        for id in ids {
            assert_eq!(out.get(*id), Some(&EventOutcome::Sent), "{id}: {out:?}");
        }
    }

    #[test]
    fn timestamps_are_utc_millis_truncated() {
        let t = Utc
            .with_ymd_and_hms(2026, 3, 18, 15, 30, 32)
            .single()
            .expect("valid date")
            + chrono::Duration::nanoseconds(999_999_999);
        assert_eq!(event_timestamp(t), "2026-03-18T15:30:32.999Z");
    }

    #[tokio::test]
    async fn app_events_batch_sends_prefixed_types_with_properties() {
        let s = setup().await;
        let sink = ActivitySink::AppEvents {
            prefix: "ms_".into(),
        };
        let events = vec![
            event(
                "e1",
                ActivityType::SpotJoined,
                &s.contacts[0],
                "Growth Club",
            ),
            event("e2", ActivityType::PageOpened, &s.contacts[1], "Onboarding"),
        ];
        let out = s.portal.send_events(&sink, &events).await.expect("sent");
        all_sent(&out, &["e1", "e2"]);
        let stored = s.emu.timeline_events(s.portal_id);
        assert_eq!(stored.len(), 2);
        let e1 = stored.iter().find(|e| e.id == "e1").expect("e1");
        assert_eq!(e1.api, EventApi::AppEvents);
        assert_eq!(e1.event_type, "ms_spot_joined");
        assert_eq!(e1.object_id, s.contacts[0]);
        assert_eq!(e1.timestamp, "2026-03-18T15:30:32.123Z");
        assert_eq!(e1.properties["spot_name"], "Growth Club");
        assert_eq!(e1.properties["title"], "Growth Club");
        assert!(!e1.properties.contains_key("url"));
        let e2 = stored.iter().find(|e| e.id == "e2").expect("e2");
        assert_eq!(e2.event_type, "ms_page_opened");
        assert_eq!(e2.properties["url"], "https://example.com/e2");
        let stats = s.emu.request_stats(s.portal_id);
        assert_eq!(stats.count_op("app_events.batch"), 1, "{stats:?}");
    }

    #[tokio::test]
    async fn app_events_resent_ids_are_duplicates_never_stored_twice() {
        let s = setup().await;
        let sink = ActivitySink::AppEvents {
            prefix: String::new(),
        };
        let first = vec![
            event("d1", ActivityType::TopicVoted, &s.contacts[0], "Roadmap"),
            event("d2", ActivityType::TopicCreated, &s.contacts[1], "Ideas"),
        ];
        s.portal.send_events(&sink, &first).await.expect("first");
        // All repeats: 409.
        let out = s.portal.send_events(&sink, &first).await.expect("again");
        assert_eq!(out.get("d1"), Some(&EventOutcome::Duplicate));
        assert_eq!(out.get("d2"), Some(&EventOutcome::Duplicate));
        // Some repeats: 207.
        let mixed = vec![
            first[0].clone(),
            event("d3", ActivityType::ReplayWatched, &s.contacts[2], "Live #3"),
        ];
        let out = s.portal.send_events(&sink, &mixed).await.expect("mixed");
        assert_eq!(out.get("d1"), Some(&EventOutcome::Duplicate));
        assert_eq!(out.get("d3"), Some(&EventOutcome::Sent));
        let stored = s.emu.timeline_events(s.portal_id);
        assert_eq!(stored.len(), 3, "{stored:?}");
    }

    #[tokio::test]
    async fn app_events_unknown_contact_is_rejected_and_the_others_sent() {
        let s = setup().await;
        let sink = ActivitySink::AppEvents {
            prefix: String::new(),
        };
        let events = vec![
            event("u1", ActivityType::LiveRegistered, &s.contacts[0], "Live"),
            event("u2", ActivityType::LiveRegistered, "999999", "Live"),
            event("u3", ActivityType::LiveAttended, &s.contacts[1], "Live"),
        ];
        let out = s.portal.send_events(&sink, &events).await.expect("sent");
        all_sent(&out, &["u1", "u3"]);
        assert!(
            matches!(out.get("u2"), Some(EventOutcome::Rejected { message, .. }) if message.contains("999999")),
            "{out:?}"
        );
        let stored: Vec<String> = s
            .emu
            .timeline_events(s.portal_id)
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(stored.len(), 2);
        assert!(!stored.contains(&"u2".to_string()));
    }

    #[tokio::test]
    async fn app_events_unnamed_refusal_is_isolated_by_halving() {
        let s = setup().await;
        let sink = ActivitySink::AppEvents {
            prefix: String::new(),
        };
        // An empty id fails the whole batch with a message that names no id.
        let events = vec![
            event("h1", ActivityType::CourseStarted, &s.contacts[0], "Rust"),
            event("h2", ActivityType::CourseStarted, &s.contacts[1], "Rust"),
            event("", ActivityType::CourseCompleted, &s.contacts[2], "Rust"),
            event("h4", ActivityType::CourseCompleted, &s.contacts[0], "Rust"),
            event("h5", ActivityType::LinkOpened, &s.contacts[1], "Docs"),
        ];
        let out = s.portal.send_events(&sink, &events).await.expect("sent");
        all_sent(&out, &["h1", "h2", "h4", "h5"]);
        assert!(
            matches!(out.get(""), Some(EventOutcome::Rejected { .. })),
            "{out:?}"
        );
        assert_eq!(s.emu.timeline_events(s.portal_id).len(), 4);
    }

    #[tokio::test]
    async fn timeline_v3_templates_are_created_once_by_name() {
        let s = setup().await;
        let sink = v3_sink();
        sink.ensure_templates(&s.portal.client)
            .await
            .expect("ensure");
        let templates = list_templates(&s.emu).await;
        assert_eq!(templates.len(), 12);
        for a in ActivityType::ALL {
            let t = templates
                .iter()
                .find(|t| t["name"] == a.name())
                .unwrap_or_else(|| panic!("template {}", a.name()));
            assert_eq!(t["headerTemplate"], a.header());
            assert_eq!(t["objectType"], "contacts");
            let detail = t["detailTemplate"].as_str().unwrap_or_default();
            assert!(detail.contains("{{title}}"));
            assert_eq!(detail.contains("{{url}}"), a.has_url());
            let mut tokens: Vec<&str> = t["tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k["name"].as_str())
                .collect();
            tokens.sort_unstable();
            let mut want = property_names(a).to_vec();
            want.sort_unstable();
            assert_eq!(tokens, want, "{}", a.name());
        }
        // A second call, and a fresh sink (restart), create nothing.
        sink.ensure_templates(&s.portal.client)
            .await
            .expect("again");
        v3_sink()
            .ensure_templates(&s.portal.client)
            .await
            .expect("restart");
        assert_eq!(list_templates(&s.emu).await.len(), 12);
        let stats = s.emu.request_stats(0);
        assert_eq!(
            stats.count("timeline.templates.create", 201),
            12,
            "{stats:?}"
        );
        assert_eq!(stats.count_op("timeline.templates.update"), 0);
        // App Events: nothing to do.
        ActivitySink::AppEvents {
            prefix: String::new(),
        }
        .ensure_templates(&s.portal.client)
        .await
        .expect("no-op");
    }

    #[tokio::test]
    async fn timeline_v3_events_go_by_object_id_and_repeats_overwrite() {
        let s = setup().await;
        let sink = v3_sink();
        let events = vec![
            event(
                "v1",
                ActivityType::SpotJoined,
                &s.contacts[0],
                "Growth Club",
            ),
            event("v2", ActivityType::LinkOpened, &s.contacts[1], "Pricing"),
            event("v3", ActivityType::SpotLeft, "999999", "Growth Club"),
        ];
        // Templates are ensured on first use.
        let out = s.portal.send_events(&sink, &events).await.expect("sent");
        all_sent(&out, &["v1", "v2"]);
        assert!(
            matches!(out.get("v3"), Some(EventOutcome::Rejected { .. })),
            "{out:?}"
        );
        let mut again = events[1].clone();
        again.title = "Pricing (new)".into();
        let out = s.portal.send_events(&sink, &[again]).await.expect("again");
        all_sent(&out, &["v2"]);
        let stored = s.emu.timeline_events(s.portal_id);
        assert_eq!(stored.len(), 2, "{stored:?}");
        let v1 = stored.iter().find(|e| e.id == "v1").expect("v1");
        assert_eq!(v1.api, EventApi::TimelineV3);
        assert_eq!(v1.event_type, "spot_joined");
        assert_eq!(v1.object_id, s.contacts[0]);
        assert_eq!(v1.timestamp, "2026-03-18T15:30:32.123Z");
        assert_eq!(v1.properties["spot_name"], "Growth Club");
        let v2 = stored.iter().find(|e| e.id == "v2").expect("v2");
        assert_eq!(v2.properties["title"], "Pricing (new)");
        assert_eq!(v2.properties["url"], "https://example.com/v2");
        let contacts = s.emu.contacts(s.portal_id);
        assert_eq!(contacts.len(), 3);
        assert!(contacts.iter().all(|c| c.created_by == CreatedBy::Seed));
    }

    #[tokio::test]
    async fn timeline_v3_deleted_template_is_recreated() {
        let s = setup().await;
        let sink = v3_sink();
        sink.ensure_templates(&s.portal.client)
            .await
            .expect("ensure");
        let id = list_templates(&s.emu)
            .await
            .into_iter()
            .find(|t| t["name"] == "course_completed")
            .and_then(|t| t["id"].as_str().map(str::to_string))
            .expect("template");
        let status = reqwest::Client::new()
            .delete(format!(
                "{}/crm/v3/timeline/{APP_ID}/event-templates/{id}?hapikey={DEV_KEY}",
                s.emu.base_url()
            ))
            .send()
            .await
            .expect("delete")
            .status();
        assert!(status.is_success(), "{status}");
        let ev = event("r1", ActivityType::CourseCompleted, &s.contacts[0], "Rust");
        let out = s.portal.send_events(&sink, &[ev]).await.expect("sent");
        all_sent(&out, &["r1"]);
        assert_eq!(list_templates(&s.emu).await.len(), 12);
        assert_eq!(s.emu.timeline_events(s.portal_id).len(), 1);
    }

    #[test]
    fn deploy_app_events_declare_every_activity_type() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/hubspot-app/src/app/app-events");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("app-events dir") {
            let path = entry.expect("entry").path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default()
                .to_string();
            let Some(name) = file.strip_suffix("-hsmeta.json") else {
                continue;
            };
            let text = std::fs::read_to_string(&path).expect("readable");
            let v: Value = serde_json::from_str(&text).expect("valid JSON");
            let activity = ActivityType::from_name(name)
                .unwrap_or_else(|| panic!("{file}: not an activity type"));
            assert_eq!(v["uid"], name, "{file}");
            assert_eq!(v["type"], "app-event", "{file}");
            let cfg = &v["config"];
            assert_eq!(cfg["objectType"], "CONTACT", "{file}");
            let header = cfg["headerTemplate"].as_str().unwrap_or_default();
            assert!(header.contains(activity.header()), "{file}: {header}");
            let detail = cfg["detailTemplate"].as_str().unwrap_or_default();
            assert!(detail.contains("{{title}}"), "{file}");
            let mut props: Vec<&str> = cfg["properties"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    assert_eq!(p["type"], "string", "{file}");
                    p["name"].as_str()
                })
                .collect();
            props.sort_unstable();
            let mut want = property_names(activity).to_vec();
            want.sort_unstable();
            assert_eq!(props, want, "{file}");
            // What the sender puts in `properties` is declared.
            let sent = event("x", activity, "1", "t").properties();
            assert!(sent.keys().all(|k| props.contains(&k.as_str())), "{file}");
            seen.push(activity);
        }
        seen.sort_unstable();
        let mut all = ActivityType::ALL.to_vec();
        all.sort_unstable();
        assert_eq!(seen, all);
    }
}
