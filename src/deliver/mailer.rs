//! E-mail notifications (SPEC §4.7): when SMTP_URL is set, the sidecar mails
//! the `email` notifications itself; otherwise MeltingSpot's app reads them
//! from `hubspot_sync.notifications`.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::{watch, Notify};
use tracing::warn;

use crate::backoff::Backoff;
use crate::internal_events::{MailAttempted, MailOutcome};
use crate::metrics::Metrics;
use crate::store::{self, Db, DbError, PendingEmail};

/// How often pending notifications are looked for without being woken.
const POLL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("SMTP_URL is invalid: {0}")]
    Url(String),
    #[error("SMTP_FROM is not a valid address: {0}")]
    From(String),
    #[error("SMTP: {0}")]
    Smtp(String),
    #[error("database: {0}")]
    Db(#[from] DbError),
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
        db: Db,
        metrics: Arc<Metrics>,
        notify: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::delivery();
        loop {
            let pause = match self.send_pending(&db, &metrics).await {
                Ok(()) => {
                    backoff.reset();
                    POLL
                }
                Err(e) => {
                    let pause = backoff.next().max(Duration::from_secs(1));
                    warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "could not send pending notifications");
                    pause
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = notify.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends what is pending. A recipient refused for good is marked and
    /// skipped; any other SMTP failure stops the batch (the server is
    /// probably down) and is retried with the shared backoff.
    async fn send_pending(&self, db: &Db, metrics: &Metrics) -> Result<(), MailError> {
        // No connection is held across SMTP sends (each may take 20 s).
        let pending = store::pending_emails(&*db.client().await?, 50).await?;
        for n in pending {
            let notification = n.id;
            let Some(message) = self.message(&n) else {
                // A bad address is permanent: mark it, never block the others.
                MailAttempted {
                    notification,
                    outcome: MailOutcome::InvalidAddress,
                }
                .emit(metrics);
                store::mark_rejected(
                    &*db.client().await?,
                    notification,
                    "not a valid e-mail address",
                )
                .await?;
                continue;
            };
            match self.transport.send(message).await {
                Ok(_) => {
                    MailAttempted {
                        notification,
                        outcome: MailOutcome::Sent,
                    }
                    .emit(metrics);
                    store::mark_delivered(&*db.client().await?, notification).await?;
                }
                // A permanent refusal (5xx: no such mailbox, policy) belongs to
                // this recipient: mark it with the reason and go on with the others.
                Err(e) if recipient_refused(&e) => {
                    let reason = e.to_string();
                    MailAttempted {
                        notification,
                        outcome: MailOutcome::Rejected(&reason),
                    }
                    .emit(metrics);
                    store::mark_rejected(&*db.client().await?, notification, &reason).await?;
                }
                // Anything else is the server or the network: retry the batch later.
                Err(e) => {
                    let error = e.to_string();
                    MailAttempted {
                        notification,
                        outcome: MailOutcome::Failed(&error),
                    }
                    .emit(metrics);
                    return Err(MailError::Smtp(error));
                }
            }
        }
        Ok(())
    }
}

/// Whether the SMTP server refused this recipient for good (no such mailbox,
/// mailbox not local, bad mailbox name). Other permanent replies (535 bad
/// credentials, 530, 554 at MAIL FROM) are the sidecar's own SMTP settings:
/// they are retried, never pinned on the recipient.
fn recipient_refused(e: &lettre::transport::smtp::Error) -> bool {
    e.is_permanent()
        && e.status()
            .is_some_and(|c| matches!(c.to_string().as_str(), "550" | "551" | "553"))
}
