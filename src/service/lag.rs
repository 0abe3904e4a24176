//! The lag gauges: the slot's distance and the oldest pending commit's age
//! every second, and the integrations by status every tenth.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use super::stopped;
use crate::integrations::Status;
use crate::metrics::Metrics;
use crate::store::Db;

/// Samples the slot's lag from the database, and the integrations by status.
pub(super) async fn sample_lag(
    db: Db,
    slot: String,
    metrics: Arc<Metrics>,
    oldest_pending: Arc<AtomicI64>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The slot every second; the integrations by status every tenth: that
    // count reads every Spot's row, and an idle fleet must cost the primary
    // next to nothing, whatever its size.
    const COUNT_INTEGRATIONS_EVERY: u32 = 10;
    let mut samples: u32 = 0;
    loop {
        let count_integrations = samples.is_multiple_of(COUNT_INTEGRATIONS_EVERY);
        samples = samples.wrapping_add(1);
        let oldest = oldest_pending.load(Ordering::Relaxed);
        let age = if oldest == 0 {
            0.0
        } else {
            ((Utc::now().timestamp_micros() - oldest) as f64 / 1e6).max(0.0)
        };
        metrics.replication_lag_seconds.set(age);
        if let Ok(c) = db.client().await {
            let sampled = c
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint,
                            (pg_current_wal_lsn() - restart_lsn)::bigint, active
                       FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            if let Ok(None) = sampled {
                // No slot at all: nothing reads, whatever the gauge said before.
                metrics.slot_active.set(0);
            }
            if let Ok(Some(row)) = sampled {
                metrics.slot_active.set(i64::from(row.get::<_, bool>(2)));
                metrics
                    .replication_lag_bytes
                    .set(row.get::<_, Option<i64>>(0).unwrap_or(0));
                metrics
                    .slot_retained_wal_bytes
                    .set(row.get::<_, Option<i64>>(1).unwrap_or(0));
            }
            let counted = if count_integrations {
                c.query(
                    "SELECT status, count(*) FROM hubspot_sync.integrations GROUP BY status",
                    &[],
                )
                .await
                .ok()
            } else {
                None
            };
            if let Some(rows) = counted {
                for status in Status::ALL {
                    let n = rows
                        .iter()
                        .find(|r| r.get::<_, String>(0) == status.as_str())
                        .map(|r| r.get::<_, i64>(1))
                        .unwrap_or(0);
                    metrics
                        .integrations
                        .with_label_values(&[status.as_str()])
                        .set(n);
                }
            }
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
