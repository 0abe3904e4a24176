//! `hubspot-emulator`: a faithful local HubSpot for the `hubspot-sidecar` tests, demo and
//! docker-compose (SPEC §8).
//!
//! It serves OAuth (authorize auto-approves), property groups and properties, contacts (batch
//! read/update/create/upsert, search, single create/get/update), App Events v4 and timeline v3,
//! under both the `/crm/v3/...` and date-versioned (`/crm/{objects|properties}/YYYY-MM/...`) paths,
//! with HubSpot's error bodies, 207 multi-status shapes, a rolling per-portal burst limit,
//! expiring OAuth tokens and fault injection. Tests drive and inspect it through [`Emulator`] or
//! the unauthenticated `/_emulator/...` HTTP endpoints.
//!
//! Contacts also change under an integration, as they do at HubSpot (reference §10):
//! * merges ([`Emulator::merge_contacts`], `POST .../objects/contacts/merge`) make a new record
//!   with a new id; reads by an old id answer the merged record under its new id, writes by an
//!   old id answer OBJECT_NOT_FOUND; `hs_merged_object_ids` and `hs_additional_emails` say what
//!   was merged;
//! * deletions ([`Emulator::delete_contact`], `DELETE .../objects/contacts/{id}`) take a record
//!   out of every read, search and e-mail match until [`Emulator::restore_contact`] brings it
//!   back under the same id;
//! * privacy deletions ([`Emulator::privacy_delete_contact`],
//!   `POST .../objects/contacts/gdpr-delete`) remove it for good and blocklist its e-mail for
//!   the UI and imports only: the API may create the person again.
//!
//! Portals where the app was installed by OAuth get webhooks of these changes
//! (`contact.merge`, `contact.deletion`, `contact.privacyDeletion`, `contact.restore`) at
//! [`EmulatorConfig::webhook_target`]: batched JSON arrays signed with signature v3, retried on
//! failure; [`Emulator::webhook_attempts`] shows every attempt. [`Emulator::send_webhook`] sends
//! hand-made (also badly signed, stale or huge) batches to test a receiver's defences.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use hubspot_emulator::{Emulator, EmulatorConfig};
//! let emu = Emulator::start(EmulatorConfig::default()).await?;
//! let (portal, token) = emu.create_portal();
//! emu.add_contact(portal, "ada@example.com", &[("firstname", "Ada")]);
//! // point the client at emu.base_url() with `Authorization: Bearer {token}`
//! emu.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
mod contact_store;
mod contacts;
mod ctx;
mod errors;
mod http;
mod inspect;
mod lifecycle;
mod limits;
mod model;
mod oauth;
mod properties;
mod routes;
mod search;
mod state;
mod timeline;
mod values;
mod webhooks;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use lifecycle::MergeError;
pub use model::{
    Contact, CreatedBy, EventApi, Faults, OAuthErrorStyle, PropertyDef, PropertyGroup,
    PropertyOption, RequestStats, TimelineEvent, WebhookAttempt, WebhookSigning,
};

use state::Shared;
use webhooks::ChangeSource;

/// The default delays between a failed webhook batch and its retries: short and increasing, so
/// tests see retries within seconds. HubSpot spreads its 10 retries over 24 hours, with
/// randomized delays.
pub const DEFAULT_WEBHOOK_RETRY_DELAYS: [Duration; 10] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(30),
    Duration::from_secs(30),
    Duration::from_secs(30),
    Duration::from_secs(30),
    Duration::from_secs(30),
];

#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Requests per portal per rolling window (HubSpot: 110 per 10 s for OAuth apps).
    pub rate_limit_per_10s: u32,
    /// CRM search requests per portal per rolling second.
    pub search_rate_per_s: u32,
    /// Lifetime of OAuth access tokens (`expires_in`).
    pub token_ttl: Duration,
    /// Whether a refresh answers with a new refresh token and invalidates
    /// the one used (the strictest client test); off (the default, as
    /// HubSpot's definitions only promise a `refresh_token` in every answer),
    /// the refresh token stays valid and is answered again.
    pub rotate_refresh_tokens: bool,
    /// Token answers without `hub_id` (optional in the published definitions).
    pub omit_hub_id: bool,
    /// How refusals of the token endpoint are worded.
    pub oauth_error_style: OAuthErrorStyle,
    pub client_id: String,
    pub client_secret: String,
    pub app_id: u64,
    /// Developer API key (`?hapikey=`) for timeline v3 templates.
    pub developer_api_key: String,
    /// Length of the rolling rate-limit window: 10 s like HubSpot; tests may shorten it.
    #[doc(hidden)]
    pub rate_window: Duration,
    /// The app's webhook target URL; `None` (the default): no webhooks are sent. Signatures
    /// cover this string exactly as given.
    pub webhook_target: Option<String>,
    /// Delay before each retry of a failed webhook batch: the n-th retry waits the n-th delay
    /// (the last one once the list runs out); at most 10 retries; an empty list: no retries.
    /// Defaults to [`DEFAULT_WEBHOOK_RETRY_DELAYS`] (about 3 minutes in all, where HubSpot
    /// spreads its retries over 24 hours).
    pub webhook_retry_delays: Vec<Duration>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            rate_limit_per_10s: 110,
            search_rate_per_s: 5,
            token_ttl: Duration::from_secs(1800),
            rotate_refresh_tokens: false,
            omit_hub_id: false,
            oauth_error_style: OAuthErrorStyle::default(),
            client_id: "emulator-client-id".into(),
            client_secret: "emulator-client-secret".into(),
            app_id: 4242,
            developer_api_key: "emulator-developer-key".into(),
            rate_window: Duration::from_secs(10),
            webhook_target: None,
            webhook_retry_delays: DEFAULT_WEBHOOK_RETRY_DELAYS.to_vec(),
        }
    }
}

/// A running emulator. Dropping it (or [`Emulator::shutdown`]) stops the server.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The webhook delivery task (aborted on stop, which drops its pending retries).
    webhooks: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts on `127.0.0.1` with an ephemeral port.
    pub async fn start(cfg: EmulatorConfig) -> std::io::Result<Emulator> {
        Self::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(cfg: EmulatorConfig, addr: SocketAddr) -> std::io::Result<Emulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared::new(cfg));
        let app = http::router(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "hubspot emulator server stopped with an error");
            }
        });
        let webhooks = tokio::spawn(webhooks::run(shared.clone()));
        tracing::info!(addr = %local, "hubspot emulator listening");
        Ok(Emulator {
            shared,
            addr: local,
            stop: Some(tx),
            task: Some(task),
            webhooks: Some(webhooks),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash); an unspecified bind address maps to loopback.
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// A new portal and a static service-key token (`pat-na1-…`) that never expires. Service keys
    /// carry every CRM contacts scope but cannot create timeline events / app events (403).
    pub fn create_portal(&self) -> (u64, String) {
        self.shared.lock().create_portal_with_key()
    }

    /// An OAuth access and refresh token for `portal`, as an install of the
    /// app would get them, without the browser round trip (for benchmarks
    /// that seed thousands of connected Spots).
    pub fn grant_oauth_tokens(&self, portal: u64) -> (String, String) {
        oauth::grant(&mut self.shared.lock(), portal, chrono::Utc::now())
    }

    /// Another static service key (`pat-na1-…`) for an existing portal, as a
    /// second private app or service key of the same account would be.
    pub fn create_service_key(&self, portal: u64) -> String {
        self.shared.lock().create_service_key(portal)
    }

    /// This one token stops working (access token, service key or refresh
    /// token); the portal's other tokens keep working.
    pub fn revoke_token(&self, token: &str) {
        self.shared.lock().revoke_token(token);
    }

    /// How many of the portal's refresh tokens still work (revoked ones, by
    /// the app or by `revoke_portal`, do not count).
    pub fn live_refresh_tokens(&self, portal: u64) -> usize {
        self.shared.lock().live_refresh_tokens(portal)
    }

    /// Seeds a contact (created_by `Seed`, not validated); an existing email is updated instead.
    /// Returns the record id.
    pub fn add_contact(&self, portal: u64, email: &str, props: &[(&str, &str)]) -> String {
        self.shared.lock().seed_contact(portal, email, props)
    }

    pub fn contacts(&self, portal: u64) -> Vec<Contact> {
        self.shared.lock().contacts(portal)
    }

    /// Trimmed, case-insensitive match.
    pub fn contact_by_email(&self, portal: u64, email: &str) -> Option<Contact> {
        self.shared.lock().contact_by_email(portal, email)
    }

    /// Custom (non-HubSpot-defined) groups only.
    pub fn property_groups(&self, portal: u64) -> Vec<PropertyGroup> {
        self.shared.lock().property_groups(portal)
    }

    /// Custom properties only (not the built-in email/firstname/lastname/...).
    pub fn properties(&self, portal: u64) -> Vec<PropertyDef> {
        self.shared.lock().properties(portal)
    }

    pub fn timeline_events(&self, portal: u64) -> Vec<TimelineEvent> {
        self.shared.lock().timeline_events(portal)
    }

    /// Accounting of the portal's requests. Portal `0` holds the app-level requests made with the
    /// developer API key (timeline v3 templates).
    pub fn request_stats(&self, portal: u64) -> RequestStats {
        self.shared.lock().request_stats(portal)
    }

    /// `None` = all portals (also drops per-portal settings); `Faults::default()` clears.
    pub fn set_faults(&self, portal: Option<u64>, faults: Faults) {
        self.shared.set_faults(portal, faults);
    }

    /// How many requests a `hang` fault holds right now, over all portals.
    pub fn hung_requests(&self) -> usize {
        self.shared.hung.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every token the portal has (access, refresh, service key) stops working: 401
    /// INVALID_AUTHENTICATION / `invalid_grant` BAD_REFRESH_TOKEN. A later OAuth grant to the
    /// portal (reinstall) gets fresh working tokens.
    pub fn revoke_portal(&self, portal: u64) {
        self.shared.lock().revoke_portal(portal);
    }

    /// The portal every following OAuth grant goes to (sticky until changed); `None`: a new
    /// portal per grant.
    pub fn set_next_grant_portal(&self, portal: Option<u64>) {
        self.shared.lock().next_grant_portal = portal;
    }

    /// The portal's current OAuth access tokens expire now (401 EXPIRED_AUTHENTICATION).
    pub fn expire_access_tokens(&self, portal: u64) {
        self.shared.lock().expire_access_tokens(portal);
    }

    /// Merges contact `secondary_id` into `primary_id`, as a person would in HubSpot's UI
    /// (`changeSource` `CRM_UI`): a new record with a new id (returned) takes the secondary's
    /// properties overlaid by the primary's, the primary's `email`, the other e-mails in
    /// `hs_additional_emails` and the merged ids in `hs_merged_object_ids`. Reads by either old
    /// id answer the new record; writes by them answer OBJECT_NOT_FOUND.
    ///
    /// # Panics
    /// When either id names no live contact of the portal, or both name the same one (a test
    /// set-up mistake); [`Emulator::try_merge_contacts`] reports these instead.
    pub fn merge_contacts(&self, portal: u64, primary_id: &str, secondary_id: &str) -> String {
        match self.try_merge_contacts(portal, primary_id, secondary_id) {
            Ok(id) => id,
            Err(e) => panic!("merge_contacts: {e}"),
        }
    }

    /// [`Emulator::merge_contacts`], refusing bad ids with an error instead of a panic.
    pub fn try_merge_contacts(
        &self,
        portal: u64,
        primary_id: &str,
        secondary_id: &str,
    ) -> Result<String, MergeError> {
        self.shared
            .lock()
            .merge_contacts(
                portal,
                primary_id,
                secondary_id,
                ChangeSource::CrmUi,
                chrono::Utc::now(),
            )
            .map(|id| id.to_string())
    }

    /// Deletes (archives) a live contact: it leaves every read, search and e-mail match, writes
    /// by its id answer OBJECT_NOT_FOUND, and its e-mail is free for a new contact. False when
    /// `id` names no live contact.
    pub fn delete_contact(&self, portal: u64, id: &str) -> bool {
        let Ok(id) = id.trim().parse() else {
            return false;
        };
        self.shared
            .lock()
            .delete_contact(portal, id, ChangeSource::CrmUi, chrono::Utc::now())
    }

    /// Brings a deleted contact back with the same id and properties. False when it is not
    /// deleted (or was privacy-deleted), or when a live contact now holds one of its e-mails.
    pub fn restore_contact(&self, portal: u64, id: &str) -> bool {
        let Ok(id) = id.trim().parse() else {
            return false;
        };
        self.shared
            .lock()
            .restore_contact(portal, id, ChangeSource::CrmUi, chrono::Utc::now())
    }

    /// Privacy (GDPR) deletion of a contact, live or deleted: gone for good (no restore), its
    /// e-mails blocklisted for the UI and imports (see [`Emulator::is_privacy_blocked`]); the
    /// API may still create a contact with them, as at HubSpot. False when `id` names neither
    /// a live nor a deleted contact.
    pub fn privacy_delete_contact(&self, portal: u64, id: &str) -> bool {
        let Ok(id) = id.trim().parse() else {
            return false;
        };
        self.shared.lock().privacy_delete_contact(
            portal,
            id,
            ChangeSource::CrmUi,
            chrono::Utc::now(),
        )
    }

    /// Whether a privacy deletion put `email` (trimmed, case-insensitive) on the portal's
    /// blocklist. It blocks nothing the emulator serves: HubSpot applies it to the UI and
    /// imports, which the emulator does not have; tests check it here.
    pub fn is_privacy_blocked(&self, portal: u64, email: &str) -> bool {
        self.shared.lock().is_privacy_blocked(portal, email)
    }

    /// Changes the webhook target (`None`: webhooks off). Events already waiting keep the
    /// target they were made for.
    pub fn set_webhook_target(&self, url: Option<String>) {
        self.shared.lock().cfg.webhook_target = url;
    }

    /// Changes the delays between webhook retries (see [`EmulatorConfig::webhook_retry_delays`]);
    /// a retry already waiting keeps its delay.
    pub fn set_webhook_retry_delays(&self, delays: Vec<Duration>) {
        self.shared.lock().cfg.webhook_retry_delays = delays;
    }

    /// Every webhook POST the delivery task made so far, oldest first.
    pub fn webhook_attempts(&self) -> Vec<WebhookAttempt> {
        self.shared.lock().webhook_log.clone()
    }

    /// POSTs a hand-made batch (`events`, normally a JSON array) to `url`, signed as `signing`
    /// says with the app's client secret, the way HubSpot would (5 s timeout). The receiver's
    /// HTTP status, or why there was none. Not recorded in [`Emulator::webhook_attempts`].
    pub async fn send_webhook(
        &self,
        url: &str,
        events: &serde_json::Value,
        signing: WebhookSigning,
    ) -> Result<u16, String> {
        self.send_webhook_raw(url, events.to_string().into_bytes(), signing)
            .await
    }

    /// [`Emulator::send_webhook`] with any body (a 5 MB one, broken JSON, ...), signed over
    /// exactly these bytes.
    pub async fn send_webhook_raw(
        &self,
        url: &str,
        body: Vec<u8>,
        signing: WebhookSigning,
    ) -> Result<u16, String> {
        let secret = self.shared.lock().cfg.client_secret.clone();
        webhooks::send_hostile(&secret, url, body, signing).await
    }

    /// One event as the delivery task makes it (new random `eventId`, `occurredAt` now,
    /// `attemptNumber` 0, `changeSource` `CRM_UI`), for hand-made batches. A numeric
    /// `object_id` becomes a JSON number.
    pub fn webhook_event(
        &self,
        portal: u64,
        subscription_type: &str,
        object_id: &str,
    ) -> serde_json::Value {
        let st = self.shared.lock();
        webhooks::event_json(
            &st.cfg,
            portal,
            subscription_type,
            webhooks::object_id_value(object_id),
            ChangeSource::CrmUi,
            chrono::Utc::now(),
        )
    }

    /// A `contact.merge` event of `merged` into `primary` that became `new_id` (also its
    /// `objectId`), with `numberOfPropertiesMoved` 0.
    pub fn webhook_merge_event(
        &self,
        portal: u64,
        primary: &str,
        merged: &[&str],
        new_id: &str,
    ) -> serde_json::Value {
        let mut e = self.webhook_event(portal, "contact.merge", new_id);
        webhooks::add_merge_fields(&mut e, primary, merged, new_id, 0);
        e
    }

    /// Forgets all portals, tokens, templates and faults (ids keep counting up).
    pub fn reset(&self) {
        self.shared.lock().reset();
        self.shared.set_faults(None, Faults::default());
    }

    /// Stops accepting, answers hung requests with 503 and waits (up to 5 s) for the server.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn signal_stop(&mut self) {
        self.shared.stop();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(w) = self.webhooks.take() {
            w.abort();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.signal_stop();
    }
}
