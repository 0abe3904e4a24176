//! One-time tokens (the OAuth state, the settings-page links): recorded when
//! issued, accepted once.

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::store::DbError;

/// Remembers an issued single-use token's nonce (an OAuth state, a settings link).
pub async fn issue_one_time(
    db: &Client,
    purpose: &str,
    nonce: &str,
    spot_id: i64,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hubspot_sync.one_time_tokens (purpose, nonce, spot_id, expires_at)
         VALUES ($1, $2, $3, $4)",
        &[&purpose, &nonce, &spot_id, &expires_at],
    )
    .await?;
    db.execute(
        "DELETE FROM hubspot_sync.one_time_tokens WHERE expires_at < now() - interval '1 day'",
        &[],
    )
    .await?;
    Ok(())
}

/// Accepts a single-use nonce of `purpose` once: returns its Spot, or None
/// if unknown, used or expired.
pub async fn consume_one_time(
    db: &Client,
    purpose: &str,
    nonce: &str,
) -> Result<Option<i64>, DbError> {
    Ok(db
        .query_opt(
            "UPDATE hubspot_sync.one_time_tokens SET used_at = now()
              WHERE purpose = $1 AND nonce = $2 AND used_at IS NULL AND expires_at > now()
          RETURNING spot_id",
            &[&purpose, &nonce],
        )
        .await?
        .map(|r| r.get(0)))
}
