//! `hubspot-emulator` binary: serves the emulator until Ctrl-C / SIGTERM (docker-compose, demos).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use hubspot_emulator::{Emulator, EmulatorConfig};

#[derive(Parser, Debug)]
#[command(
    name = "hubspot-emulator",
    about = "A local HubSpot API emulator",
    version
)]
struct Args {
    /// Port to listen on.
    #[arg(long, env = "EMULATOR_PORT", default_value_t = 8090)]
    port: u16,
    /// Address to bind (use 0.0.0.0 inside a container).
    #[arg(long, env = "EMULATOR_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Requests per portal per rolling 10 seconds.
    #[arg(long, env = "EMULATOR_RATE_LIMIT", default_value_t = 110)]
    rate_limit: u32,
    /// CRM search requests per portal per second.
    #[arg(long, env = "EMULATOR_SEARCH_RATE", default_value_t = 5)]
    search_rate: u32,
    /// OAuth access token lifetime in seconds.
    #[arg(long, env = "EMULATOR_TOKEN_TTL_SECS", default_value_t = 1800)]
    token_ttl_secs: u64,
    #[arg(long, env = "HUBSPOT_CLIENT_ID", default_value = "emulator-client-id")]
    client_id: String,
    #[arg(
        long,
        env = "HUBSPOT_CLIENT_SECRET",
        default_value = "emulator-client-secret"
    )]
    client_secret: String,
    #[arg(long, env = "HUBSPOT_APP_ID", default_value_t = 4242)]
    app_id: u64,
    #[arg(
        long,
        env = "HUBSPOT_DEVELOPER_API_KEY",
        default_value = "emulator-developer-key"
    )]
    developer_api_key: String,
    /// Where the app's webhooks go (none when unset).
    #[arg(long, env = "EMULATOR_WEBHOOK_TARGET")]
    webhook_target: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let cfg = EmulatorConfig {
        rate_limit_per_10s: args.rate_limit,
        search_rate_per_s: args.search_rate,
        token_ttl: Duration::from_secs(args.token_ttl_secs),
        client_id: args.client_id,
        client_secret: args.client_secret,
        app_id: args.app_id,
        developer_api_key: args.developer_api_key,
        webhook_target: args.webhook_target,
        ..EmulatorConfig::default()
    };
    let emu = Emulator::start_on(cfg, SocketAddr::new(args.host, args.port)).await?;
    tracing::info!(base_url = %emu.base_url(), "hubspot emulator ready");
    wait_for_signal().await;
    tracing::info!("shutting down");
    emu.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
