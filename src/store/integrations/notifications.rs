//! The queue of failure e-mails to Spot admins, as the mailer drains it.

use tokio_postgres::Client;

use crate::store::DbError;

/// An e-mail notification waiting to be sent.
#[derive(Clone, Debug)]
pub struct PendingEmail {
    /// `hubspot_sync.notifications` row id.
    pub id: i64,
    /// The admin's e-mail address (`members.email`).
    pub to: String,
    /// Notification payload (`spot_name`, `error`, the admin's name and e-mail).
    pub payload: serde_json::Value,
}

/// Reads up to `limit` undelivered `email` rows of `hubspot_sync.notifications`, oldest first.
pub async fn pending_emails(db: &Client, limit: i64) -> Result<Vec<PendingEmail>, DbError> {
    let rows = db
        .query(
            "SELECT n.id, m.email, n.payload FROM hubspot_sync.notifications n
               JOIN public.members m ON m.id = n.member_id
              WHERE n.channel = 'email' AND n.delivered_at IS NULL AND n.rejected_at IS NULL
              ORDER BY n.id LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PendingEmail {
            id: r.get(0),
            to: r.get(1),
            payload: r.get(2),
        })
        .collect())
}

/// Marks a `hubspot_sync.notifications` row delivered, so it is not mailed again.
pub async fn mark_delivered(db: &Client, id: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.notifications SET delivered_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Marks a failure e-mail the SMTP server refused for good, with the reason;
/// it is never sent again.
pub async fn mark_rejected(db: &Client, id: i64, reason: &str) -> Result<(), DbError> {
    db.execute(
        "UPDATE hubspot_sync.notifications SET rejected_at = now(), rejected_reason = $2 WHERE id = $1",
        &[&id, &reason],
    )
    .await?;
    Ok(())
}
