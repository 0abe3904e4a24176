//! The whole emulated HubSpot lives in one `State` behind one mutex: simplicity over
//! concurrency (a test emulator never needs more). The lock is never held across an await.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::contact_store::ContactStore;
use crate::errors::ApiError;
use crate::model::{
    Contact, CreatedBy, Faults, PropertyDef, PropertyGroup, PropertyOption, RequestStats,
    TimelineEvent, WebhookAttempt,
};
use crate::webhooks::Outgoing;
use crate::EmulatorConfig;

/// What the HTTP handlers and the `Emulator` handle share.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Woken whenever faults change, so hung requests re-check whether to go on.
    pub faults_changed: Notify,
    pub shutting_down: AtomicBool,
    /// Requests held by a `hang` fault right now (a test waits for a call
    /// to be in flight before it changes what the call was built from).
    pub hung: AtomicUsize,
}

impl Shared {
    pub fn new(cfg: EmulatorConfig) -> Shared {
        Shared {
            state: Mutex::new(State::new(cfg)),
            faults_changed: Notify::new(),
            shutting_down: AtomicBool::new(false),
            hung: AtomicUsize::new(0),
        }
    }

    /// A panic while holding the lock must not turn every later request into a panic.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_faults(&self, portal: Option<u64>, faults: Faults) {
        {
            let mut st = self.lock();
            match portal {
                // "All portals": one global setting, and per-portal overrides are dropped so that
                // `set_faults(None, Faults::default())` really clears everything.
                None => {
                    st.faults_global = faults;
                    st.faults_portal.clear();
                }
                Some(p) => {
                    st.faults_portal.insert(p, faults);
                }
            }
        }
        self.faults_changed.notify_waiters();
    }

    pub fn stop(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.faults_changed.notify_waiters();
    }

    pub fn is_stopping(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// OAuth access token of the public app: expires, may create timeline events.
    OAuth,
    /// Static service key / private-app token (`pat-na1-…`): never expires, no timeline.
    ServiceKey,
}

pub(crate) struct TokenRec {
    pub portal: u64,
    pub kind: TokenKind,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: bool,
}

pub(crate) struct RefreshRec {
    pub portal: u64,
    pub scopes: Vec<String>,
    pub revoked: bool,
}

pub(crate) struct CodeRec {
    pub portal: u64,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

pub(crate) struct ContactRec {
    pub id: u64,
    pub props: BTreeMap<String, String>,
    pub created_by: CreatedBy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ContactRec {
    pub fn email(&self) -> Option<&str> {
        self.props.get("email").map(String::as_str)
    }

    /// Every e-mail of the record: the primary `email`, then its `hs_additional_emails`
    /// (semicolon-separated; a merge puts the merged-away e-mails there).
    pub fn emails(&self) -> impl Iterator<Item = &str> {
        let additional = self
            .props
            .get(ADDITIONAL_EMAILS)
            .map(String::as_str)
            .unwrap_or("");
        self.email()
            .into_iter()
            .chain(additional.split(';'))
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }

    pub fn to_public(&self) -> Contact {
        Contact {
            id: self.id.to_string(),
            properties: self.props.clone(),
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

pub(crate) struct GroupRec {
    pub name: String,
    pub label: String,
    pub display_order: i32,
    pub archived: bool,
    pub builtin: bool,
}

#[derive(Clone)]
pub(crate) struct PropRec {
    pub name: String,
    pub label: String,
    pub type_: String,
    pub field_type: String,
    pub group_name: String,
    pub description: String,
    pub options: Vec<PropertyOption>,
    pub display_order: i32,
    pub hidden: bool,
    pub form_field: bool,
    pub has_unique_value: bool,
    /// HubSpot-defined (built-in) property.
    pub builtin: bool,
    /// Value computed by HubSpot; writes are refused.
    pub read_only_value: bool,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl PropRec {
    pub fn to_public(&self) -> PropertyDef {
        PropertyDef {
            name: self.name.clone(),
            label: self.label.clone(),
            type_: self.type_.clone(),
            field_type: self.field_type.clone(),
            group_name: self.group_name.clone(),
            options: self.options.clone(),
        }
    }
}

/// A timeline v3 event template; belongs to the app (not to a portal).
#[derive(Clone)]
pub(crate) struct TemplateRec {
    pub id: u64,
    pub name: String,
    pub object_type: String,
    pub header_template: Option<String>,
    pub detail_template: Option<String>,
    pub tokens: Vec<TemplateToken>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TemplateToken {
    pub name: String,
    pub label: String,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<TokenOption>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_property_name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TokenOption {
    pub value: String,
    pub label: String,
}

pub(crate) struct EventRec {
    pub event: TimelineEvent,
    /// Set for timeline v3 events: their id is unique per template.
    pub template_id: Option<u64>,
    /// Extra fields echoed back for v3 (`email`, `extraData`, `timelineIFrame`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The first record id of every portal.
const FIRST_CONTACT_ID: u64 = 5001;

/// The e-mails a record has besides its primary one (read-only; filled by merges).
pub(crate) const ADDITIONAL_EMAILS: &str = "hs_additional_emails";
/// The record ids merged into a record (read-only; filled by merges).
pub(crate) const MERGED_OBJECT_IDS: &str = "hs_merged_object_ids";

pub(crate) struct Portal {
    pub id: u64,
    /// Live contacts, indexed by e-mail (see `contact_store`).
    pub contacts: ContactStore,
    pub groups: BTreeMap<String, GroupRec>,
    pub props: BTreeMap<String, PropRec>,
    pub events: Vec<EventRec>,
    pub stats: RequestStats,
    /// Admission times of the rolling ten-secondly window.
    pub window: VecDeque<Instant>,
    /// Admission times of the search secondly window.
    pub search_window: VecDeque<Instant>,
    /// Record ids are unique within a portal only, as in HubSpot: two
    /// portals hand out the same ids, so an id used on the wrong portal
    /// names somebody else's contact there.
    pub next_contact_id: u64,
    /// Deleted (archived) contacts, kept aside so that a restore brings them back under the
    /// same id; they are in no read, search or e-mail match.
    pub archived: BTreeMap<u64, ContactRec>,
    /// Record id merged away -> the id of the record it became (which may have been merged
    /// again since: reads follow the chain).
    pub merged_into: HashMap<u64, u64>,
    /// E-mails (trimmed, lower-cased) of privacy-deleted contacts. HubSpot blocks them for the
    /// UI and imports only; the API still creates contacts with them.
    pub privacy_blocklist: BTreeSet<String>,
    /// The public app was installed here by OAuth: only such portals get webhooks (service
    /// keys and private apps get none).
    pub app_installed: bool,
}

impl Portal {
    fn new(id: u64, now: DateTime<Utc>) -> Portal {
        let mut p = Portal {
            id,
            contacts: ContactStore::default(),
            groups: BTreeMap::new(),
            props: BTreeMap::new(),
            events: Vec::new(),
            stats: RequestStats::default(),
            window: VecDeque::new(),
            search_window: VecDeque::new(),
            next_contact_id: FIRST_CONTACT_ID,
            archived: BTreeMap::new(),
            merged_into: HashMap::new(),
            privacy_blocklist: BTreeSet::new(),
            app_installed: false,
        };
        p.groups.insert(
            "contactinformation".into(),
            GroupRec {
                name: "contactinformation".into(),
                label: "Contact information".into(),
                display_order: -1,
                archived: false,
                builtin: true,
            },
        );
        // The built-in properties the emulator knows; HubSpot has hundreds more.
        let builtins: [(&str, &str, &str, &str, bool); 8] = [
            ("email", "Email", "string", "text", false),
            ("firstname", "First Name", "string", "text", false),
            ("lastname", "Last Name", "string", "text", false),
            ("hs_object_id", "Record ID", "number", "number", true),
            ("createdate", "Create Date", "datetime", "date", true),
            (
                "lastmodifieddate",
                "Last Modified Date",
                "datetime",
                "date",
                true,
            ),
            // GUESS: HubSpot's type/fieldType of these two; semicolon-separated values either way.
            (
                ADDITIONAL_EMAILS,
                "Additional email addresses",
                "enumeration",
                "checkbox",
                true,
            ),
            (
                MERGED_OBJECT_IDS,
                "Merged Contact IDs",
                "enumeration",
                "checkbox",
                true,
            ),
        ];
        for (i, (name, label, type_, field_type, ro)) in builtins.into_iter().enumerate() {
            p.props.insert(
                name.into(),
                PropRec {
                    name: name.into(),
                    label: label.into(),
                    type_: type_.into(),
                    field_type: field_type.into(),
                    group_name: "contactinformation".into(),
                    description: String::new(),
                    options: Vec::new(),
                    display_order: i as i32,
                    hidden: false,
                    form_field: !ro,
                    has_unique_value: false,
                    builtin: true,
                    read_only_value: ro,
                    archived: false,
                    created_at: now,
                    updated_at: now,
                },
            );
        }
        p
    }

    /// Active (non-archived) property definition.
    pub fn prop(&self, name: &str) -> Option<&PropRec> {
        self.props.get(name).filter(|p| !p.archived)
    }

    /// Contact whose email matches, trimmed and case-insensitively (the lowest id if several).
    pub fn find_by_email(&self, email: &str) -> Option<u64> {
        self.contacts.find_by_email(email)
    }

    /// Contact holding `email` as its primary or as an additional e-mail. HubSpot keeps both
    /// unique across contacts, so this is the conflict check of creates and e-mail changes;
    /// lookups by `idProperty=email` match the primary e-mail only ([`Portal::find_by_email`]).
    pub fn find_by_any_email(&self, email: &str) -> Option<u64> {
        self.contacts.find_by_any_email(email)
    }

    /// The live record a read by `id` answers: the record itself, or the one it was merged
    /// into (following later merges). `None` for deleted and unknown ids.
    pub fn resolve_read(&self, id: u64) -> Option<u64> {
        let mut cur = id;
        // Each hop goes to a newer id, so a chain is at most as long as the map.
        for _ in 0..=self.merged_into.len() {
            if self.contacts.contains_key(&cur) {
                return Some(cur);
            }
            cur = *self.merged_into.get(&cur)?;
        }
        None
    }
}

pub(crate) struct State {
    pub cfg: EmulatorConfig,
    pub next_portal_id: u64,
    pub next_template_id: u64,
    pub portals: BTreeMap<u64, Portal>,
    /// Access tokens and service keys.
    pub tokens: HashMap<String, TokenRec>,
    pub refresh_tokens: HashMap<String, RefreshRec>,
    pub codes: HashMap<String, CodeRec>,
    pub next_grant_portal: Option<u64>,
    pub faults_global: Faults,
    pub faults_portal: HashMap<u64, Faults>,
    pub templates: BTreeMap<u64, TemplateRec>,
    /// Requests authenticated by the developer API key (templates) are app-level: counted here
    /// and exposed as the stats of pseudo-portal 0.
    pub dev_stats: RequestStats,
    /// Webhook events waiting for the delivery task (which drains it).
    pub outbox: Vec<Outgoing>,
    /// Wakes the delivery task when the outbox gets something. Survives `reset`: the task
    /// holds a clone.
    pub webhook_wake: Arc<Notify>,
    /// Every delivery attempt so far.
    pub webhook_log: Vec<WebhookAttempt>,
    pub next_webhook_batch: u64,
}

/// Scopes given to static service keys: everything CRM, but not `timeline`.
pub(crate) const SERVICE_KEY_SCOPES: [&str; 5] = [
    "oauth",
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.schemas.contacts.read",
    "crm.schemas.contacts.write",
];

impl State {
    pub fn new(cfg: EmulatorConfig) -> State {
        State {
            cfg,
            next_portal_id: 1000,
            next_template_id: 1_000_001,
            portals: BTreeMap::new(),
            tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            codes: HashMap::new(),
            next_grant_portal: None,
            faults_global: Faults::default(),
            faults_portal: HashMap::new(),
            templates: BTreeMap::new(),
            dev_stats: RequestStats::default(),
            outbox: Vec::new(),
            webhook_wake: Arc::new(Notify::new()),
            webhook_log: Vec::new(),
            next_webhook_batch: 1,
        }
    }

    /// Everything goes except the configuration; id counters keep counting so that ids handed
    /// out before a reset are never reused by a different portal or contact.
    pub fn reset(&mut self) {
        let fresh = State::new(self.cfg.clone());
        let (np, nt) = (self.next_portal_id, self.next_template_id);
        let (wake, nb) = (self.webhook_wake.clone(), self.next_webhook_batch);
        *self = fresh;
        self.next_portal_id = np;
        self.next_template_id = nt;
        self.webhook_wake = wake;
        self.next_webhook_batch = nb;
    }

    pub fn new_portal(&mut self) -> u64 {
        let id = self.next_portal_id;
        self.next_portal_id = id.saturating_add(1);
        self.portals.insert(id, Portal::new(id, Utc::now()));
        id
    }

    /// The portal a handler works on; one that does not exist answers as bad credentials.
    pub fn portal_mut(&mut self, id: u64) -> Result<&mut Portal, ApiError> {
        self.portals.get_mut(&id).ok_or_else(ApiError::invalid_auth)
    }

    /// The portal, created on the fly if a caller of the Rust API names one that does not exist.
    pub fn ensure_portal(&mut self, id: u64) -> &mut Portal {
        if id >= self.next_portal_id {
            self.next_portal_id = id.saturating_add(1);
        }
        self.portals
            .entry(id)
            .or_insert_with(|| Portal::new(id, Utc::now()))
    }

    pub fn create_portal_with_key(&mut self) -> (u64, String) {
        let id = self.new_portal();
        (id, self.create_service_key(id))
    }

    /// Another static service key for an existing portal.
    pub fn create_service_key(&mut self, id: u64) -> String {
        self.ensure_portal(id);
        let token = format!("pat-na1-{}", uuid());
        self.tokens.insert(
            token.clone(),
            TokenRec {
                portal: id,
                kind: TokenKind::ServiceKey,
                scopes: SERVICE_KEY_SCOPES.iter().map(|s| s.to_string()).collect(),
                expires_at: None,
                revoked: false,
            },
        );
        token
    }

    /// This one token (access token, service key or refresh token) stops working.
    pub fn revoke_token(&mut self, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            t.revoked = true;
        }
        if let Some(r) = self.refresh_tokens.get_mut(token) {
            r.revoked = true;
        }
    }

    /// Refresh tokens of the portal that still work.
    pub fn live_refresh_tokens(&self, portal: u64) -> usize {
        self.refresh_tokens
            .values()
            .filter(|r| r.portal == portal && !r.revoked)
            .count()
    }

    /// The next record id of the portal's contacts.
    pub fn next_contact_id(&mut self, portal: u64) -> u64 {
        let p = self.ensure_portal(portal);
        let id = p.next_contact_id;
        p.next_contact_id += 1;
        id
    }

    /// Seeds a contact without validation (test set-up). An existing email is updated instead.
    pub fn seed_contact(&mut self, portal: u64, email: &str, props: &[(&str, &str)]) -> String {
        let existing = self.ensure_portal(portal).find_by_email(email);
        let id = match existing {
            Some(id) => id,
            None => self.next_contact_id(portal),
        };
        let now = Utc::now();
        let p = self.ensure_portal(portal);
        let fill = |rec: &mut ContactRec| {
            rec.props.insert("email".into(), email.trim().to_string());
            for (k, v) in props {
                rec.props.insert((*k).to_string(), (*v).to_string());
            }
            rec.updated_at = now;
        };
        if p.contacts.update(id, fill).is_none() {
            let mut rec = ContactRec {
                id,
                props: BTreeMap::new(),
                created_by: CreatedBy::Seed,
                created_at: now,
                updated_at: now,
            };
            fill(&mut rec);
            p.contacts.insert(id, rec);
        }
        id.to_string()
    }

    /// Every token of the portal stops working: the app counts as uninstalled there (no more
    /// webhooks until a new OAuth grant).
    pub fn revoke_portal(&mut self, portal: u64) {
        if let Some(p) = self.portals.get_mut(&portal) {
            p.app_installed = false;
        }
        for t in self.tokens.values_mut().filter(|t| t.portal == portal) {
            t.revoked = true;
        }
        for r in self
            .refresh_tokens
            .values_mut()
            .filter(|r| r.portal == portal)
        {
            r.revoked = true;
        }
        self.codes.retain(|_, c| c.portal != portal);
    }

    pub fn expire_access_tokens(&mut self, portal: u64) {
        let now = Utc::now();
        for t in self.tokens.values_mut() {
            if t.portal == portal && t.kind == TokenKind::OAuth {
                t.expires_at = Some(now);
            }
        }
    }

    pub fn faults_for(&self, portal: Option<u64>) -> Faults {
        portal
            .and_then(|p| self.faults_portal.get(&p))
            .unwrap_or(&self.faults_global)
            .clone()
    }

    pub fn stats_mut(&mut self, portal: u64) -> Option<&mut RequestStats> {
        if portal == 0 {
            return Some(&mut self.dev_stats);
        }
        self.portals.get_mut(&portal).map(|p| &mut p.stats)
    }

    pub fn request_stats(&self, portal: u64) -> RequestStats {
        if portal == 0 {
            return self.dev_stats.clone();
        }
        self.portals
            .get(&portal)
            .map(|p| p.stats.clone())
            .unwrap_or_default()
    }

    pub fn contacts(&self, portal: u64) -> Vec<Contact> {
        self.portals
            .get(&portal)
            .map(|p| p.contacts.values().map(ContactRec::to_public).collect())
            .unwrap_or_default()
    }

    pub fn contact_by_email(&self, portal: u64, email: &str) -> Option<Contact> {
        let p = self.portals.get(&portal)?;
        let id = p.find_by_email(email)?;
        p.contacts.get(&id).map(ContactRec::to_public)
    }

    pub fn property_groups(&self, portal: u64) -> Vec<PropertyGroup> {
        self.portals
            .get(&portal)
            .map(|p| {
                p.groups
                    .values()
                    .filter(|g| !g.builtin && !g.archived)
                    .map(|g| PropertyGroup {
                        name: g.name.clone(),
                        label: g.label.clone(),
                        display_order: g.display_order,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn properties(&self, portal: u64) -> Vec<PropertyDef> {
        self.portals
            .get(&portal)
            .map(|p| {
                p.props
                    .values()
                    .filter(|d| !d.builtin && !d.archived)
                    .map(PropRec::to_public)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn timeline_events(&self, portal: u64) -> Vec<TimelineEvent> {
        self.portals
            .get(&portal)
            .map(|p| p.events.iter().map(|e| e.event.clone()).collect())
            .unwrap_or_default()
    }
}

/// Random hex string of `n` characters.
pub(crate) fn rand_hex(n: usize) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    let mut rng = rand::thread_rng();
    (0..n).map(|_| HEX[rng.gen_range(0..16)] as char).collect()
}

/// A v4-looking UUID (correlation ids, generated event ids, tokens).
pub(crate) fn uuid() -> String {
    let h = rand_hex(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
