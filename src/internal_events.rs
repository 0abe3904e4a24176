//! Observability as code: every failure path is one typed event that writes
//! its log line and moves its counter together, so a reviewer sees both side
//! by side and no path logs without counting (or counts without logging).
//! Label values are enums here, never string literals at the call site.

use std::time::Duration;

use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::replication::slot::ResyncCause;
use crate::translate::markers::MarkerRejection;

/// Why a delivery round is retried (`delivery_retries_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// HubSpot answered 5xx, timed out or reset: runs the clock towards `failed`.
    HubSpot,
    /// Our own database failed: never fails an integration.
    Database,
    /// A 401 earns one token refresh before anything else.
    Auth,
    /// A 429: flow control, never a failure.
    RateLimited,
    /// This sidecar's configuration (a token no key opens): never fails a Spot.
    Configuration,
}

impl RetryCause {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::HubSpot => "hubspot",
            RetryCause::Database => "database",
            RetryCause::Auth => "auth",
            RetryCause::RateLimited => "rate_limited",
            RetryCause::Configuration => "configuration",
        }
    }
}

/// Why an integration entered `failed` (`integration_failures_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCause {
    /// HubSpot refused the credentials (or they cannot be used here).
    Auth,
    /// HubSpot stayed unreachable for SIDECAR_FAIL_AFTER.
    Unreachable,
}

impl FailCause {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailCause::Auth => "auth",
            FailCause::Unreachable => "unreachable",
        }
    }
}

/// What was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterKind {
    /// A batch update of one contact.
    ContactWrite,
    /// A contact creation.
    ContactCreation,
    /// The look-up of a member's e-mail.
    ContactLookup,
    /// A timeline event.
    Event,
}

impl DeadLetterKind {
    fn text(self) -> &'static str {
        match self {
            DeadLetterKind::ContactWrite => "a contact write",
            DeadLetterKind::ContactCreation => "a contact creation",
            DeadLetterKind::ContactLookup => "a contact look-up",
            DeadLetterKind::Event => "an event",
        }
    }
}

/// The `reason` label of `dead_letters_total`: HubSpot's category when it is
/// one we know, else `other`, so the label set stays small and never carries
/// free text.
pub fn dead_letter_reason(category: &str) -> &'static str {
    match category {
        "VALIDATION_ERROR" => "VALIDATION_ERROR",
        "INVALID_EMAIL" => "INVALID_EMAIL",
        "INVALID_OPTION" => "INVALID_OPTION",
        "PROPERTY_DOESNT_EXIST" => "PROPERTY_DOESNT_EXIST",
        "CONFLICT" => "CONFLICT",
        "OBJECT_NOT_FOUND" => "OBJECT_NOT_FOUND",
        _ => "other",
    }
}

/// A text from HubSpot or an SMTP server, fit for a log line: e-mail
/// addresses and quoted values (HubSpot echoes the values it refused) are
/// replaced, quoted identifiers (property names, JSON keys, error
/// categories) are kept, and it is cut at 500 characters. The dead letter
/// and the notification row keep the whole text for the operator.
pub fn scrub_personal(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len().min(600));
    let mut i = 0;
    while i < chars.len() && out.chars().count() < 500 {
        let c = chars[i];
        if c == '"' || c == '\'' {
            if let Some(len) = chars[i + 1..].iter().position(|&d| d == c) {
                let inner: String = chars[i + 1..i + 1 + len].iter().collect();
                let is_key = chars.get(i + len + 2) == Some(&':');
                out.push(c);
                if is_key || is_identifier(&inner) {
                    out.push_str(&inner);
                } else {
                    out.push('…');
                }
                out.push(c);
                i += len + 2;
                continue;
            }
        }
        if c == '@' {
            let local = out
                .chars()
                .rev()
                .take_while(|d| d.is_alphanumeric() || "._%+-".contains(*d))
                .count();
            let domain = chars[i + 1..]
                .iter()
                .take_while(|d| d.is_alphanumeric() || ".-".contains(**d))
                .count();
            let domain_text: String = chars[i + 1..i + 1 + domain].iter().collect();
            if local > 0 && domain_text.contains('.') {
                for _ in 0..local {
                    out.pop();
                }
                out.push_str("<e-mail>");
                i += 1 + domain;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    if i < chars.len() {
        out.push('…');
    }
    out
}

/// A property name (`meltingspot_bio`) or an error category (`INVALID_EMAIL`).
fn is_identifier(s: &str) -> bool {
    let snake = s.contains('_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let category = s.len() > 1
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    snake || category
}

/// The replication stream failed; it resumes from the checkpoint.
pub struct StreamFailed<'a> {
    /// What failed.
    pub error: &'a anyhow::Error,
    /// When the stream is reopened.
    pub retry_in: Duration,
}

impl StreamFailed<'_> {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.stream_errors.inc();
        warn!(
            error = format!("{:#}", self.error),
            retry_in_ms = self.retry_in.as_millis() as u64,
            "replication stream failed; resuming from the checkpoint"
        );
    }
}

/// A delivery round failed and is retried after `retry_in`.
pub struct DeliveryRetried<'a> {
    /// Why.
    pub cause: RetryCause,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
    /// When the round runs again.
    pub retry_in: Duration,
}

impl DeliveryRetried<'_> {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.delivery_retries
            .with_label_values(&[self.cause.as_str()])
            .inc();
        let retry_in_ms = self.retry_in.as_millis() as u64;
        // HubSpot's error text echoes e-mails and values.
        let error = scrub_personal(&self.error.to_string());
        match self.cause {
            RetryCause::RateLimited => {
                info!(error, retry_in_ms, "HubSpot asked us to slow down")
            }
            RetryCause::Auth => {
                info!(
                    error,
                    "HubSpot refused the access token; refreshing it once"
                )
            }
            RetryCause::HubSpot | RetryCause::Database => {
                warn!(error, retry_in_ms, "delivery failed")
            }
            RetryCause::Configuration => {
                tracing::error!(
                    error,
                    retry_in_ms,
                    "delivery cannot run: this sidecar's configuration"
                )
            }
        }
    }
}

/// An integration entered `failed`; its admins are notified.
pub struct IntegrationFailed<'a> {
    /// The Spot.
    pub spot_id: i64,
    /// Why.
    pub cause: FailCause,
    /// HubSpot's answer, in words.
    pub error: &'a str,
}

impl IntegrationFailed<'_> {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.integrations_failed
            .with_label_values(&[self.cause.as_str()])
            .inc();
        warn!(
            spot_id = self.spot_id,
            cause = self.cause.as_str(),
            error = %scrub_personal(self.error),
            "integration failed; admins are notified"
        );
    }
}

/// HubSpot rejected one item for good; it is in `hubspot_sync.dead_letters`.
pub struct DeadLettered<'a> {
    /// What was rejected.
    pub kind: DeadLetterKind,
    /// The member it was for.
    pub member_id: i64,
    /// HubSpot's error category.
    pub category: &'a str,
}

impl DeadLettered<'_> {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.dead_letters
            .with_label_values(&[dead_letter_reason(self.category)])
            .inc();
        warn!(
            member_id = self.member_id,
            category = self.category,
            "HubSpot rejected {}; dead-lettered",
            self.kind.text()
        );
    }
}

/// An OAuth token refresh, answered or not.
pub struct TokenRefreshed {
    /// The Spot whose token it was.
    pub spot_id: i64,
    /// Whether HubSpot issued new tokens.
    pub ok: bool,
}

impl TokenRefreshed {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        let label = if self.ok { "ok" } else { "error" };
        m.token_refreshes.with_label_values(&[label]).inc();
        if self.ok {
            info!(spot_id = self.spot_id, "refreshed the OAuth access token");
        } else {
            warn!(spot_id = self.spot_id, "the OAuth token refresh failed");
        }
    }
}

/// How sending one failure e-mail ended (`notification_emails_total{result}`).
pub enum MailOutcome<'a> {
    /// Handed to the SMTP server.
    Sent,
    /// The recipient is not an address: skipped for good.
    InvalidAddress,
    /// The SMTP server refused this recipient for good: marked, never retried.
    Rejected(&'a str),
    /// The SMTP server failed: retried later.
    Failed(&'a str),
}

/// One failure e-mail.
pub struct MailAttempted<'a> {
    /// The notification row.
    pub notification: i64,
    /// How it ended.
    pub outcome: MailOutcome<'a>,
}

impl MailAttempted<'_> {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        let label = match self.outcome {
            MailOutcome::Sent => "sent",
            MailOutcome::InvalidAddress => "invalid_address",
            MailOutcome::Rejected(_) => "rejected",
            MailOutcome::Failed(_) => "error",
        };
        m.notifications_sent.with_label_values(&[label]).inc();
        if matches!(self.outcome, MailOutcome::Rejected(_)) {
            m.notifications_rejected.inc();
        }
        match self.outcome {
            MailOutcome::Sent => info!(notification = self.notification, "failure e-mail sent"),
            MailOutcome::InvalidAddress => warn!(
                notification = self.notification,
                "failure e-mail has an invalid recipient; skipped"
            ),
            MailOutcome::Rejected(reason) => warn!(
                notification = self.notification,
                reason = %scrub_personal(reason),
                "failure e-mail refused for good by the SMTP server; marked, not retried"
            ),
            MailOutcome::Failed(error) => warn!(
                notification = self.notification,
                error = %scrub_personal(error),
                "failure e-mail not sent; will retry"
            ),
        }
    }
}

/// A settings marker the stream ignored (`translate::markers`): a forged,
/// replayed or malformed message with our prefix.
pub struct SettingsMarkerRejected {
    /// The Spot the marker claimed to be for, if it named one.
    pub spot_id: Option<i64>,
    /// Why it was ignored.
    pub reason: MarkerRejection,
}

impl SettingsMarkerRejected {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.settings_markers_rejected
            .with_label_values(&[self.reason.as_str()])
            .inc();
        warn!(
            spot_id = self.spot_id,
            reason = self.reason.as_str(),
            "ignored a settings marker that the sidecar did not sign, or signed for an older \
             version: someone with database access emitted it (see README, Security)"
        );
    }
}

/// An activity table's replica identity, as its Relation message says,
/// changed from what the sidecar saw last (or is not FULL at first sight).
pub struct ReplicaIdentityChanged {
    /// The table (one of `translate::FULL_IDENTITY_TABLES`).
    pub table: &'static str,
    /// Whether it is FULL now.
    pub full: bool,
}

impl ReplicaIdentityChanged {
    /// Logs and sets the gauge.
    pub fn emit(self, m: &Metrics) {
        m.replica_identity_drift
            .with_label_values(&[self.table])
            .set(i64::from(!self.full));
        if self.full {
            info!(
                table = self.table,
                "replica identity is FULL again; activities of this table are decided again"
            );
        } else {
            error!(
                table = self.table,
                fix = %format!("ALTER TABLE public.{} REPLICA IDENTITY FULL;", self.table),
                "replica identity is not FULL: UPDATEs no longer carry the old row, so member \
                 status activities are held back (counted in activities_unknown_total) and \
                 timestamp activities may repeat; run the fix as the table owner"
            );
        }
    }
}

/// The slot was recreated and every Spot resynchronised (`replication::slot`).
pub struct Resynced {
    /// Which check failed.
    pub cause: ResyncCause,
    /// How many Spots are backfilled again.
    pub spots: usize,
}

impl Resynced {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.resyncs.with_label_values(&[self.cause.as_str()]).inc();
        error!(
            cause = self.cause.as_str(),
            spots = self.spots,
            "the replication slot could not continue from the checkpoint ({}): it was recreated, \
             and every active Spot is being backfilled from current values; activities in the gap \
             cannot be recovered from the stream (see the runbook, HubSpotSidecarResync)",
            self.cause.as_str()
        );
    }
}

/// Group memberships, tags or custom roles of a member that belong to
/// another Spot, left out of the member's values (G4).
pub struct CrossSpotReferencesIgnored {
    /// How many, in one round.
    pub count: i64,
}

impl CrossSpotReferencesIgnored {
    /// Logs and counts.
    pub fn emit(self, m: &Metrics) {
        m.cross_spot_references.inc_by(self.count.max(0) as u64);
        warn!(
            count = self.count,
            "left out group, tag or custom-role rows that belong to another Spot than the member's"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_data_is_scrubbed_from_logged_errors() {
        let hubspot = r#"rejected (400 VALIDATION_ERROR): Property values were not valid: [{"isValid":false,"message":"Email address ada.lovelace+x@example.co.uk is invalid","error":"INVALID_EMAIL","name":"meltingspot_bio","propertyValue":"Born in London"}]"#;
        let s = scrub_personal(hubspot);
        assert!(!s.contains("ada.lovelace"), "{s}");
        assert!(!s.contains("Born in London"), "{s}");
        assert!(s.contains("\"name\":\"meltingspot_bio\""), "{s}");
        assert!(s.contains("INVALID_EMAIL"), "{s}");
        let smtp = "permanent error (550): 5.1.1 <grace@example.com>: Recipient address rejected";
        let s = scrub_personal(smtp);
        assert_eq!(
            s,
            "permanent error (550): 5.1.1 <<e-mail>>: Recipient address rejected"
        );
        assert!(scrub_personal(&"x".repeat(2000)).chars().count() <= 501);
    }

    #[test]
    fn each_event_moves_its_counter() {
        let m = Metrics::new();
        DeliveryRetried {
            cause: RetryCause::HubSpot,
            error: &"HTTP 503",
            retry_in: Duration::from_secs(1),
        }
        .emit(&m);
        IntegrationFailed {
            spot_id: 1,
            cause: FailCause::Auth,
            error: "revoked",
        }
        .emit(&m);
        DeadLettered {
            kind: DeadLetterKind::ContactWrite,
            member_id: 7,
            category: "SOMETHING_NEW",
        }
        .emit(&m);
        let text = m.render();
        assert!(
            text.contains("delivery_retries_total{cause=\"hubspot\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("integration_failures_total{cause=\"auth\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dead_letters_total{reason=\"other\"} 1"),
            "{text}"
        );
    }
}
