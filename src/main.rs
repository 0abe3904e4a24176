//! `hubspot-sidecar` binary: parses the command line and runs `run`, `demo`, `doctor` or
//! `reconcile`.
//!
//! `run` reads its configuration from the environment (see `config::RunArgs`), stops on
//! SIGTERM or Ctrl-C, and exits 2 on a configuration error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hubspot_sidecar::{config, demo, doctor, reconcile, service};

#[derive(Parser)]
#[command(
    name = "hubspot-sidecar",
    version,
    about = "Postgres CDC sidecar that keeps MeltingSpot members in HubSpot"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run(Box<config::RunArgs>),
    /// Run a self-contained demo: throwaway Postgres, HubSpot emulator, a seeded Spot.
    Demo(demo::DemoArgs),
    /// Check that the database is ready for the sidecar; prints PASS/WARN/FAIL with fixes.
    Doctor(doctor::DoctorArgs),
    /// Compare a Spot's contacts in HubSpot with the database; exit 1 if anything drifted.
    Reconcile(reconcile::cli::ReconcileArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Crash tests arm named crash points through FAILPOINTS (feature builds only).
    #[cfg(feature = "failpoints")]
    let _crash_points = hubspot_sidecar::failpoints::arm_from_env();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hubspot-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => {
            let cfg = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("hubspot-sidecar: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            hubspot_sidecar::init_logging(cfg.log_format, "info");
            rt.block_on(async {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutdown requested");
                    let _ = tx.send(true);
                });
                service::run(cfg, rx, None).await
            })
        }
        Command::Demo(args) => rt.block_on(demo::run(args)),
        Command::Doctor(args) => return rt.block_on(doctor::run(args)),
        Command::Reconcile(args) => return rt.block_on(reconcile::cli::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubspot-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
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
