//! hubspot-sidecar: keeps MeltingSpot members in HubSpot CRM from Postgres
//! logical replication.
//!
//! Data flows through the modules in this order:
//! `replication` -> `translate` -> `store` -> `deliver` -> `hubspot`,
//! with `http` (admin API, pages, metrics, health) and `config` beside them,
//! and the operator tools `doctor` and `reconcile`.

// The public surface is what the binary, the tests and the benchmark use;
// every stage is private behind it (rust-postgres keeps its codec the same way).
pub(crate) mod backoff;
pub mod config;
pub(crate) mod deliver;
pub mod demo;
pub mod doctor;
pub mod failpoints;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod hubspot;
pub(crate) mod integrations;
pub(crate) mod internal_events;
pub(crate) mod leader;
pub mod metrics;
pub mod pg_cluster;
pub mod reconcile;
pub(crate) mod replication;
pub mod service;
pub mod store;
pub mod tls;
pub(crate) mod translate;

/// Installs the log subscriber: JSON (default) or text, filtered by RUST_LOG
/// (else by `default_filter`).
pub fn init_logging(format: config::LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
