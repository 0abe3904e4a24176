//! `hubspot-sidecar reconcile --spot N [--fix]`: asks the running sidecar to
//! reconcile a Spot and prints what drifted. The sidecar does the reading,
//! so the calls share delivery's rate limit and its fresh token instead of
//! competing with them from a second process; this command only shows the
//! progress it streams and the report.
//!
//! Exit status: 0 when HubSpot matches the database, 1 when something
//! drifted (also with `--fix`, which queues the drift to be written again),
//! 2 when the reconciliation could not run.

use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use super::{drift_table, summary, Progress, Report};

/// Flags of `hubspot-sidecar reconcile`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// The Spot whose contacts to compare with the database.
    #[arg(long)]
    pub spot: i64,
    /// Queue the drifted contacts for delivery: every value is written again.
    #[arg(long)]
    pub fix: bool,
    /// The sidecar's admin API (the leader's address).
    #[arg(long, env = "SIDECAR_URL", default_value = "http://localhost:9187")]
    pub url: String,
    /// SIDECAR_ADMIN_TOKEN of that sidecar.
    #[arg(long, env = "SIDECAR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
}

/// One line of the admin API's answer (newline-delimited JSON).
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Progress(Progress),
    Report(Report),
    Error(String),
}

/// Runs the command; see the module's exit statuses.
pub async fn run(args: ReconcileArgs) -> ExitCode {
    match reconcile(&args).await {
        Ok(report) => {
            if !report.drift.is_empty() {
                print!("{}", drift_table(&report));
            }
            println!("{}", summary(&report));
            if report.drift.is_empty() && report.missing_in_hubspot.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("hubspot-sidecar reconcile: {e}");
            ExitCode::from(2)
        }
    }
}

async fn reconcile(args: &ReconcileArgs) -> Result<Report, String> {
    let url = format!(
        "{}/api/spots/{}/hubspot/reconcile",
        args.url.trim_end_matches('/'),
        args.spot
    );
    let mut resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&args.admin_token)
        .json(&serde_json::json!({"fix": args.fix}))
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot reach the sidecar at {} (SIDECAR_URL): {e}",
                args.url
            )
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let why = body["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the sidecar answered {status}: {why}"));
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} contacts read back ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| format!("the sidecar's answer broke off: {e}"))?;
        let Some(chunk) = chunk else {
            bar.abandon();
            return Err("the sidecar's answer ended without a report".into());
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Progress(p)) => {
                    bar.set_length(p.total as u64);
                    bar.set_position(p.checked as u64);
                }
                Ok(Line::Report(r)) => {
                    bar.finish_and_clear();
                    return Ok(r);
                }
                Ok(Line::Error(e)) => {
                    bar.abandon();
                    return Err(e);
                }
                Err(e) => return Err(format!("the sidecar's answer is not understood: {e}")),
            }
        }
    }
}
