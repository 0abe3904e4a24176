//! E-mail notifications (SPEC §4.7): when SMTP_URL is set, the sidecar mails
//! the `email` notifications itself; otherwise MeltingSpot's app reads them
//! from `hubspot_sync.notifications`.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::store::{self, PendingEmail};

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("SMTP_URL is invalid: {0}")]
    Url(String),
    #[error("SMTP_FROM is not a valid address: {0}")]
    From(String),
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(smtp_url: &str, from: Option<&str>) -> Result<Self, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url)
            .map_err(|e| MailError::Url(e.to_string()))?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let from = from
            .unwrap_or("MeltingSpot <no-reply@meltingspot.invalid>")
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::From(e.to_string()))?;
        Ok(Mailer { transport, from })
    }

    fn message(&self, n: &PendingEmail) -> Option<Message> {
        let spot = n
            .payload
            .get("spot_name")
            .and_then(|v| v.as_str())
            .unwrap_or("your Spot");
        let error = n
            .payload
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let body = format!(
            "Hello,\n\nThe HubSpot integration of {spot} has stopped working and is now marked as failed.\n\
             Nothing is sent to HubSpot until it is reconnected; changes made meanwhile are kept and sent\n\
             after the reconnection.\n\nTo repair it, open the Integrations page of the Spot settings, \
             choose the HubSpot tab and click \"Reconnect HubSpot\".\n\nWhat HubSpot answered: {error}\n"
        );
        Message::builder()
            .from(self.from.clone())
            .to(n.to.parse().ok()?)
            .subject(format!("HubSpot integration of {spot} failed"))
            .body(body)
            .ok()
    }

    /// Sends pending e-mails until shutdown; woken when a failure queued some.
    pub async fn run(
        self,
        url: String,
        metrics: Arc<Metrics>,
        notify: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut db = None;
        loop {
            if db
                .as_ref()
                .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
            {
                db = store::connect(&url).await.ok();
            }
            if let Some(c) = &db {
                match store::pending_emails(c, 50).await {
                    Ok(pending) => {
                        for n in pending {
                            let Some(message) = self.message(&n) else {
                                // A bad address is permanent: skip it, never block the others.
                                metrics
                                    .notifications_sent
                                    .with_label_values(&["invalid_address"])
                                    .inc();
                                warn!(
                                    notification = n.id,
                                    "failure e-mail has an invalid recipient; skipped"
                                );
                                continue;
                            };
                            let sent = self
                                .transport
                                .send(message)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string());
                            match sent {
                                Ok(()) => {
                                    metrics
                                        .notifications_sent
                                        .with_label_values(&["sent"])
                                        .inc();
                                    info!(notification = n.id, "failure e-mail sent");
                                    let _ = store::mark_delivered(c, n.id).await;
                                }
                                Err(e) => {
                                    metrics
                                        .notifications_sent
                                        .with_label_values(&["error"])
                                        .inc();
                                    warn!(notification = n.id, error = %e, "failure e-mail not sent; will retry");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "could not read pending notifications"),
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    }
}
