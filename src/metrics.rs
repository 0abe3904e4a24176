//! Prometheus metrics. One registry per sidecar instance (tests run several in
//! one process). No label ever carries a Spot id, an e-mail or a token.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The kinds of statement delivery rounds share (`deliver::shared`), as
/// `delivery_shared_*_total` label them.
pub const SHARED_KINDS: [&str; 7] = [
    "take",
    "activities",
    "members",
    "contacts",
    "fence",
    "complete",
    "success",
];

/// All Prometheus metrics of one sidecar instance, registered in their own registry.
pub struct Metrics {
    /// Registry holding every metric below; rendered by `/metrics`.
    pub registry: Registry,
    /// Bytes between `pg_current_wal_lsn()` and the slot's `confirmed_flush_lsn`.
    pub replication_lag_bytes: IntGauge,
    /// Age of the oldest committed transaction not yet handed off; 0 when caught up.
    pub replication_lag_seconds: Gauge,
    /// WAL the slot retains on the primary (`pg_current_wal_lsn()` minus `restart_lsn`).
    pub slot_retained_wal_bytes: IntGauge,
    /// Work handed off but not yet delivered, labelled by `kind` (`properties`, `activities`).
    pub backlog_items: IntGaugeVec,
    /// HubSpot API requests by `operation` and HTTP `status` (or error/timeout).
    pub hubspot_requests: IntCounterVec,
    /// HubSpot request duration by `operation`.
    pub hubspot_request_seconds: HistogramVec,
    /// Number of integrations in each `status` (`inactive`, `active`, `failed`).
    pub integrations: IntGaugeVec,
    /// Timeline activities delivered, by `category` and `activity`.
    pub activities: IntCounterVec,
    /// Items HubSpot rejected and moved to the dead-letter table, by `reason`.
    pub dead_letters: IntCounterVec,
    /// String values cut to HubSpot's 65,536-character limit.
    pub values_truncated: IntCounter,
    /// Committed transactions decoded from the replication slot.
    pub transactions: IntCounter,
    /// Row changes decoded from the replication slot.
    pub row_changes: IntCounter,
    /// Hand-off transactions committed (outbox rows plus checkpoint).
    pub handoffs: IntCounter,
    /// Row changes of the transaction being read (0 between transactions):
    /// a large transaction in progress shows here before its commit is reached.
    pub transaction_rows_in_flight: IntGauge,
    /// Duration of one hand-off transaction.
    pub handoff_seconds: Histogram,
    /// Last LSN acknowledged to the replication slot.
    pub acked_lsn: IntGauge,
    /// Contact property writes accepted by HubSpot.
    pub contacts_written: IntCounter,
    /// Member changes skipped because no HubSpot contact has the member's e-mail.
    pub members_without_contact: IntCounter,
    /// Contacts created under contact creation (SPEC §4.4).
    pub contacts_created: IntCounter,
    /// Activities dropped because the member has no HubSpot contact.
    pub activities_without_contact: IntCounter,
    /// Members queued by initialization backfills.
    pub backfill_queued: IntCounter,
    /// Spots whose backfill is still queueing members.
    pub backfills_running: IntGauge,
    /// Connected Spots delivery serves (idle ones cost nothing).
    pub delivery_spots: IntGauge,
    /// Delivery rounds in flight across the fleet (at most 1,024).
    pub delivery_rounds_in_flight: IntGauge,
    /// Asks of delivery rounds for a shared statement, by `kind`.
    pub delivery_shared_asks: IntCounterVec,
    /// Statements that answered those asks, by `kind`: asks per statement is
    /// how many rounds one statement served.
    pub delivery_shared_statements: IntCounterVec,
    /// OAuth token refreshes, by `result`.
    pub token_refreshes: IntCounterVec,
    /// Integrations that entered `failed`, by `cause`.
    pub integrations_failed: IntCounterVec,
    /// Failure e-mails sent through `SMTP_URL`, by `result`.
    pub notifications_sent: IntCounterVec,
    /// 1 while the replication slot is active (a reader is attached), else 0.
    pub slot_active: IntGauge,
    /// Delivery attempts postponed, by `cause`.
    pub delivery_retries: IntCounterVec,
    /// Latency from hand-off to HubSpot acceptance.
    pub delivery_seconds: Histogram,
    /// Total time spent waiting for the per-portal rate limit.
    pub rate_limit_wait_seconds: prometheus::Counter,
    /// Replication stream failures, each followed by a reconnect.
    pub stream_errors: IntCounter,
    /// Extra batch calls made to isolate rejected inputs, by `operation`.
    pub batch_split_calls: IntCounterVec,
    /// Mail rows given up on for good (a permanent SMTP rejection).
    pub notifications_rejected: IntCounter,
    /// Refresh tokens HubSpot rotated that could not be stored.
    pub refresh_tokens_lost: IntCounter,
    /// Settings markers ignored (forged, replayed, malformed), by `reason`.
    pub settings_markers_rejected: IntCounterVec,
    /// Group memberships, tags and custom roles pointing across Spots, left out of the values.
    pub cross_spot_references: IntCounter,
    /// 1 for each activity table whose replica identity is not FULL, by `table`.
    pub replica_identity_drift: IntGaugeVec,
    /// Member status changes whose old status the stream did not carry (no event sent).
    pub activities_unknown: IntCounterVec,
    /// Time hand-offs waited for decoded commits to become visible, beyond the first second.
    pub visibility_wait_seconds: prometheus::Counter,
    /// 1 while this replica leads (streams the slot and delivers), else 0.
    pub leader: IntGauge,
    /// Slots recreated with every Spot resynchronised, by `cause`.
    pub resyncs: IntCounterVec,
    /// Webhook requests by outcome (accepted, or why refused).
    pub webhook_requests: IntCounterVec,
    /// Webhook events by type and outcome.
    pub webhook_events: IntCounterVec,
    /// Members moved to a merged contact, by how the merge was learnt.
    pub contacts_remapped: IntCounterVec,
    /// Members whose contact was deleted in HubSpot, by how it was learnt.
    pub contacts_forgotten: IntCounterVec,
    /// Members left without a contact another member of their Spot keeps.
    pub contact_conflicts: IntCounter,
    /// Suppressions recorded and lifted.
    pub suppressions: IntCounterVec,
    /// Members not looked up, created or sent events: e-mail suppressed.
    pub members_suppressed: IntCounter,
    /// Wrong admin tokens, by surface and outcome.
    pub auth_failures: IntCounterVec,
    /// Connections closed at once because `MAX_CONNECTIONS` were open.
    pub http_connections_refused: IntCounter,
    /// Stored tokens not yet sealed under the current SIDECAR_SECRET_KEY.
    pub tokens_sealed_with_previous_key: IntGauge,
    /// Stored tokens no key of the ring opens.
    pub tokens_undecryptable: IntGauge,
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m.expect("metric definitions are static and valid");
        $r.register(Box::new(m.clone()))
            .expect("each metric is registered once");
        m
    }};
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry, with the backlog and integration gauges preset to 0.
    pub fn new() -> Self {
        let r = Registry::new();
        let p = |n: &str| format!("hubspot_sidecar_{n}");
        let m = Metrics {
            replication_lag_bytes: reg!(
                r,
                IntGauge::new(
                    p("replication_lag_bytes"),
                    "pg_current_wal_lsn() minus the slot's confirmed_flush_lsn"
                )
            ),
            replication_lag_seconds: reg!(
                r,
                Gauge::new(
                    p("replication_lag_seconds"),
                    "Age of the oldest committed transaction not yet handed off; 0 when caught up"
                )
            ),
            slot_retained_wal_bytes: reg!(
                r,
                IntGauge::new(
                    p("slot_retained_wal_bytes"),
                    "WAL the slot holds on the primary (pg_current_wal_lsn() minus restart_lsn)"
                )
            ),
            backlog_items: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        p("backlog_items"),
                        "Work handed off but not yet delivered (exact up to 10,000, then the table statistics' estimate)"
                    ),
                    &["kind"]
                )
            ),
            hubspot_requests: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("hubspot_requests_total"),
                        "HubSpot API requests by operation and HTTP status (or error/timeout)"
                    ),
                    &["operation", "status"]
                )
            ),
            hubspot_request_seconds: reg!(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        p("hubspot_request_duration_seconds"),
                        "HubSpot request duration"
                    ),
                    &["operation"]
                )
            ),
            integrations: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(p("integrations"), "Integrations by status"),
                    &["status"]
                )
            ),
            activities: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(p("activities_total"), "Timeline activities delivered"),
                    &["category", "activity"]
                )
            ),
            dead_letters: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(p("dead_letters_total"), "Items HubSpot rejected, by reason"),
                    &["reason"]
                )
            ),
            values_truncated: reg!(
                r,
                IntCounter::new(
                    p("values_truncated_total"),
                    "String values cut to HubSpot's 65,536-character limit"
                )
            ),
            transactions: reg!(
                r,
                IntCounter::new(
                    p("transactions_total"),
                    "Committed transactions decoded from the slot"
                )
            ),
            row_changes: reg!(
                r,
                IntCounter::new(p("row_changes_total"), "Row changes decoded from the slot")
            ),
            handoffs: reg!(
                r,
                IntCounter::new(
                    p("handoffs_total"),
                    "Hand-off transactions committed (outbox + checkpoint)"
                )
            ),
            transaction_rows_in_flight: reg!(
                r,
                IntGauge::new(
                    p("transaction_rows_in_flight"),
                    "Row changes read of the transaction being read (0 between transactions)"
                )
            ),
            handoff_seconds: reg!(
                r,
                Histogram::with_opts(HistogramOpts::new(
                    p("handoff_duration_seconds"),
                    "Duration of one hand-off transaction"
                ))
            ),
            acked_lsn: reg!(
                r,
                IntGauge::new(p("acknowledged_lsn"), "Last LSN acknowledged to the slot")
            ),
            contacts_written: reg!(
                r,
                IntCounter::new(
                    p("contacts_written_total"),
                    "Contact property writes accepted by HubSpot"
                )
            ),
            members_without_contact: reg!(
                r,
                IntCounter::new(
                    p("members_without_contact_total"),
                    "Member changes skipped because no HubSpot contact has the member's e-mail"
                )
            ),
            batch_split_calls: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("batch_split_calls_total"),
                        "Extra batch calls made to isolate rejected inputs (atomic batches, unnamed errors)"
                    ),
                    &["operation"]
                )
            ),
            notifications_rejected: reg!(
                r,
                IntCounter::new(
                    p("notification_emails_rejected_total"),
                    "Failure e-mails the SMTP server rejected permanently (marked, not retried)"
                )
            ),
            refresh_tokens_lost: reg!(
                r,
                IntCounter::new(
                    p("refresh_tokens_lost_total"),
                    "Rotated refresh tokens that could not be stored after a refresh"
                )
            ),
            settings_markers_rejected: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("settings_markers_rejected_total"),
                        "Settings markers ignored: forged (bad_signature), replayed, or malformed"
                    ),
                    &["reason"]
                )
            ),
            cross_spot_references: reg!(
                r,
                IntCounter::new(
                    p("cross_spot_references_total"),
                    "Group memberships, tags and custom roles of another Spot, left out of a member's values"
                )
            ),
            replica_identity_drift: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        p("replica_identity_drift"),
                        "1 while an activity table's replica identity is not FULL (its activities are held back)"
                    ),
                    &["table"]
                )
            ),
            resyncs: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("resyncs_total"),
                        "Replication slot recreated and every Spot resynchronised, by cause"
                    ),
                    &["cause"]
                )
            ),
            leader: reg!(
                r,
                IntGauge::new(
                    p("leader"),
                    "1 while this replica leads (streams the slot and delivers), 0 while it stands by"
                )
            ),
            visibility_wait_seconds: reg!(
                r,
                prometheus::Counter::new(
                    p("visibility_wait_seconds_total"),
                    "Time hand-offs waited for decoded commits to become visible (a lagging synchronous standby)"
                )
            ),
            activities_unknown: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("activities_unknown_total"),
                        "Possible activities the stream could not decide (no old row), never sent"
                    ),
                    &["table"]
                )
            ),
            delivery_retries: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("delivery_retries_total"),
                        "Delivery attempts postponed, by cause"
                    ),
                    &["cause"]
                )
            ),
            delivery_seconds: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        p("delivery_latency_seconds"),
                        "From hand-off to HubSpot acceptance"
                    )
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
                    ])
                )
            ),
            rate_limit_wait_seconds: reg!(
                r,
                prometheus::Counter::new(
                    p("rate_limit_wait_seconds_total"),
                    "Time spent waiting for the per-portal rate limit"
                )
            ),
            stream_errors: reg!(
                r,
                IntCounter::new(
                    p("replication_stream_errors_total"),
                    "Replication stream failures (each followed by a reconnect)"
                )
            ),
            contacts_created: reg!(
                r,
                IntCounter::new(
                    p("contacts_created_total"),
                    "Contacts created under contact creation (SPEC §4.4)"
                )
            ),
            backfill_queued: reg!(
                r,
                IntCounter::new(
                    p("backfill_members_queued_total"),
                    "Members queued by initialization backfills"
                )
            ),
            backfills_running: reg!(
                r,
                IntGauge::new(
                    p("backfills_running"),
                    "Spots whose backfill is still queueing members"
                )
            ),
            delivery_spots: reg!(
                r,
                IntGauge::new(p("delivery_spots"), "Connected Spots delivery serves")
            ),
            delivery_rounds_in_flight: reg!(
                r,
                IntGauge::new(
                    p("delivery_rounds_in_flight"),
                    "Delivery rounds in flight across all Spots"
                )
            ),
            delivery_shared_asks: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("delivery_shared_asks_total"),
                        "Asks of delivery rounds for a statement they share, by kind (take, activities, members, contacts, fence, complete, success)"
                    ),
                    &["kind"]
                )
            ),
            delivery_shared_statements: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("delivery_shared_statements_total"),
                        "Statements that answered the asks of delivery rounds, by kind; a burst over many Spots runs few"
                    ),
                    &["kind"]
                )
            ),
            token_refreshes: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("token_refreshes_total"),
                        "OAuth token refreshes by result"
                    ),
                    &["result"]
                )
            ),
            integrations_failed: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("integration_failures_total"),
                        "Integrations that entered `failed`, by cause"
                    ),
                    &["cause"]
                )
            ),
            notifications_sent: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("notification_emails_total"),
                        "Failure e-mails sent through SMTP_URL, by result"
                    ),
                    &["result"]
                )
            ),
            slot_active: reg!(
                r,
                IntGauge::new(
                    p("slot_active"),
                    "1 while the replication slot is active (a reader is attached)"
                )
            ),
            activities_without_contact: reg!(
                r,
                IntCounter::new(
                    p("activities_without_contact_total"),
                    "Activities dropped because the member has no HubSpot contact"
                )
            ),
            webhook_requests: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("webhook_requests_total"),
                        "HubSpot webhook requests by outcome (accepted, unsigned, bad_signature, stale, too_large, malformed, not_configured, standby, database)"
                    ),
                    &["outcome"]
                )
            ),
            webhook_events: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("webhook_events_total"),
                        "HubSpot webhook events by type and outcome (accepted, repeated, ignored_portal, not_handled)"
                    ),
                    &["type", "outcome"]
                )
            ),
            contacts_remapped: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("contacts_remapped_total"),
                        "Members moved to the record their contact was merged into, by source (webhook, update)"
                    ),
                    &["source"]
                )
            ),
            contacts_forgotten: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("contacts_forgotten_total"),
                        "Members whose contact HubSpot deleted, by source (webhook, update)"
                    ),
                    &["source"]
                )
            ),
            contact_conflicts: reg!(
                r,
                IntCounter::new(
                    p("contact_conflicts_total"),
                    "Members left without a contact after a merge because another member of the Spot keeps the merged record"
                )
            ),
            suppressions: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("suppressions_total"),
                        "Privacy suppressions by action (recorded, lifted)"
                    ),
                    &["action"]
                )
            ),
            members_suppressed: reg!(
                r,
                IntCounter::new(
                    p("members_suppressed_total"),
                    "Members not looked up, created or sent events because their e-mail is suppressed on the portal"
                )
            ),
            auth_failures: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        p("auth_failures_total"),
                        "Wrong admin tokens by surface (bearer, login) and outcome (refused, throttled)"
                    ),
                    &["surface", "outcome"]
                )
            ),
            http_connections_refused: reg!(
                r,
                IntCounter::new(
                    p("http_connections_refused_total"),
                    "HTTP connections closed as they were accepted because 512 were open"
                )
            ),
            tokens_sealed_with_previous_key: reg!(
                r,
                IntGauge::new(
                    p("tokens_sealed_with_previous_key"),
                    "Stored tokens not sealed under the current SIDECAR_SECRET_KEY after the start's re-seal pass (0: SIDECAR_SECRET_KEY_PREVIOUS can be dropped)"
                )
            ),
            tokens_undecryptable: reg!(
                r,
                IntGauge::new(
                    p("tokens_undecryptable"),
                    "Stored tokens no key opens (SIDECAR_SECRET_KEY changed without SIDECAR_SECRET_KEY_PREVIOUS)"
                )
            ),
            registry: r,
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        for kind in ["properties", "activities"] {
            m.backlog_items.with_label_values(&[kind]).set(0);
        }
        for status in ["inactive", "active", "failed"] {
            m.integrations.with_label_values(&[status]).set(0);
        }
        for kind in SHARED_KINDS {
            m.delivery_shared_asks.with_label_values(&[kind]).inc_by(0);
            m.delivery_shared_statements
                .with_label_values(&[kind])
                .inc_by(0);
        }
        for source in ["webhook", "update"] {
            m.contacts_remapped.with_label_values(&[source]).inc_by(0);
            m.contacts_forgotten.with_label_values(&[source]).inc_by(0);
        }
        for action in ["recorded", "lifted"] {
            m.suppressions.with_label_values(&[action]).inc_by(0);
        }
        for table in crate::translate::FULL_IDENTITY_TABLES {
            m.replica_identity_drift.with_label_values(&[table]).set(0);
        }
        m
    }

    /// Renders the registry in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
