//! What a settings session is checked against on every request: the
//! member's standing in the Spot (still an accepted admin?) and the
//! session epochs an operator bumps to end sessions.

use tokio_postgres::Client;

use super::{ChangeSource, DbError};

/// Where a member stands, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The Spot's session epoch.
    pub spot_epoch: i64,
    /// The epoch of every Spot's sessions (row 0).
    pub global_epoch: i64,
    /// The member is an accepted admin of the Spot.
    pub admin: bool,
}

/// The member's standing in the Spot and the current epochs, in one statement.
pub async fn standing(db: &Client, spot_id: i64, member_id: i64) -> Result<Standing, DbError> {
    let row = db
        .query_one(
            "SELECT COALESCE((SELECT epoch FROM hubspot_sync.session_epochs WHERE spot_id = $1), 0),
                    COALESCE((SELECT epoch FROM hubspot_sync.session_epochs WHERE spot_id = 0), 0),
                    EXISTS (SELECT 1 FROM public.members m
                             WHERE m.id = $2 AND m.spot_id = $1
                               AND m.status = 'accepted' AND m.role = 'admin')",
            &[&spot_id, &member_id],
        )
        .await?;
    Ok(Standing {
        spot_epoch: row.get(0),
        global_epoch: row.get(1),
        admin: row.get(2),
    })
}

/// Ends every settings session of the Spot (`Some`), or of every Spot
/// (`None`), from now on; audited on the Spot.
pub async fn end_sessions(
    db: &mut Client,
    spot_id: Option<i64>,
    source: ChangeSource,
) -> Result<(), DbError> {
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO hubspot_sync.session_epochs (spot_id, epoch) VALUES ($1, 1)
         ON CONFLICT (spot_id) DO UPDATE
            SET epoch = hubspot_sync.session_epochs.epoch + 1, updated_at = now()",
        &[&spot_id.unwrap_or(0)],
    )
    .await?;
    if let Some(spot) = spot_id {
        super::integrations::record_event(
            &tx,
            spot,
            "sessions_ended",
            source,
            serde_json::json!({}),
            None,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
