//! Leadership among replicas (SPEC §10): any number may run; one leads, i.e.
//! streams the slot and delivers; the others wait, answer `/readyz` 503 and
//! take over when the leader is gone. Before anything, the sidecar waits for
//! a primary: against a server in recovery it waits until it is promoted.
//!
//! The lock is a Postgres session-level advisory lock on a connection of its
//! own, not a Kubernetes Lease: the thing to guard is the slot and the
//! outbox, which live in this database, so the database is the one judge
//! that cannot disagree with them (a Lease can be held by a pod that lost
//! its database, or be free while an old walsender still holds the slot). It
//! also works outside Kubernetes (docker-compose, a VM).
//!
//! Timing: the lock session uses short TCP keepalives (5 s idle, 2 s × 3),
//! so the server frees the lock within about 11 s of losing the leader; the
//! leader checks its own session every 2 s with a 3 s deadline and stops at
//! once when it fails, well before the server frees the lock. A kill -9
//! closes the socket, so the lock is free at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::DatabaseConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::{Db, DbClient, DbError};

/// How often a waiting replica looks again (promotion, the leader gone).
const POLL: Duration = Duration::from_secs(2);
/// How often a waiting replica says so in the log.
const SAY_EVERY: Duration = Duration::from_secs(60);
/// The leader checks its lock session this often, with this deadline.
const CHECK_EVERY: Duration = Duration::from_secs(2);
const CHECK_DEADLINE: Duration = Duration::from_secs(3);
/// Advisory lock class of the sidecar's leadership (the key is per slot).
const LOCK_CLASS: i32 = 724_031_002;

/// Why this replica cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The database refuses us for a reason waiting cannot fix (TLS, authentication).
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// The leader's lock session failed: another replica may lead now.
    #[error("lost the leadership lock session: {0}")]
    Lost(String),
}

/// Held while this replica leads; dropping it ends the session, and the lock.
pub struct Leadership {
    session: DbClient,
    /// Which lock, held by which backend: every HubSpot call checks it.
    pub lock: LeaderLock,
}

/// The lock this replica holds, as `pg_locks` shows it: a call is made only
/// while it is still held (a restarted server or a terminated session frees
/// it at once, before this replica's own check notices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderLock {
    /// The lock session's backend pid.
    pub pid: i32,
    /// Advisory lock class and key.
    pub class: i32,
    /// Advisory lock key (per slot).
    pub key: i32,
}

/// What a connection failure at start means.
fn is_fatal(error: &DbError, db: &DatabaseConfig) -> bool {
    // The whole chain: the TLS or authentication cause is a source, not the top.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    crate::tls::explain(&text, db.tls.mode).is_some()
        || [
            "password authentication failed",
            "no pg_hba.conf entry",
            "pg_hba.conf rejects",
            "does not exist",
        ]
        .iter()
        .any(|p| text.contains(p))
}

/// The advisory lock key of `slot`: replicas of one deployment share it,
/// sidecars with other slots on the same database do not.
fn lock_key(slot: &str) -> i32 {
    // FNV-1a, folded to 31 bits: stable across versions and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in slot.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

/// Waits for a primary and for the lock, then returns the leadership; None
/// on shutdown. Says every minute what it waits for.
pub async fn lead(
    db: &DatabaseConfig,
    slot: &str,
    health: &Health,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Leadership>, LeaderError> {
    let pool = Db::with_size(db, 1).map_err(|e| LeaderError::Fatal(e.into()))?;
    let key = lock_key(slot);
    let mut last_said: Option<(Instant, &'static str)> = None;
    metrics.leader.set(0);
    loop {
        let waiting_for = match try_lead(&pool, key).await {
            Ok(Some((session, pid))) => {
                health.leader.store(true, Ordering::Relaxed);
                metrics.leader.set(1);
                info!(slot, "this replica leads: it streams the slot and delivers");
                let lock = LeaderLock {
                    pid,
                    class: LOCK_CLASS,
                    key,
                };
                return Ok(Some(Leadership { session, lock }));
            }
            Ok(None) => "another replica leads; this one stands by",
            Err(Attempt::InRecovery) => {
                "the database is a standby (in recovery); waiting until it is promoted"
            }
            Err(Attempt::Db(e)) if is_fatal(&e, db) => {
                let e = anyhow::Error::new(e).context("connecting to DATABASE_URL");
                return Err(LeaderError::Fatal(crate::tls::with_advice(e, db.tls.mode)));
            }
            Err(Attempt::Db(_)) => "the database cannot be reached; retrying",
        };
        let say = match last_said {
            Some((at, what)) => what != waiting_for || at.elapsed() >= SAY_EVERY,
            None => true,
        };
        if say {
            warn!(slot, "{waiting_for}");
            last_said = Some((Instant::now(), waiting_for));
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(None),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

enum Attempt {
    InRecovery,
    Db(DbError),
}

impl From<DbError> for Attempt {
    fn from(e: DbError) -> Self {
        Attempt::Db(e)
    }
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        Attempt::Db(e.into())
    }
}

async fn try_lead(pool: &Db, key: i32) -> Result<Option<(DbClient, i32)>, Attempt> {
    let session = pool.client().await?;
    let in_recovery: bool = session
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if in_recovery {
        return Err(Attempt::InRecovery);
    }
    // The server notices a vanished leader within ~11 s and frees the lock.
    session
        .batch_execute(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
        )
        .await?;
    let row = session
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2), pg_backend_pid()",
            &[&LOCK_CLASS, &key],
        )
        .await?;
    let (got, pid): (bool, i32) = (row.get(0), row.get(1));
    Ok(got.then_some((session, pid)))
}

impl Leadership {
    /// Returns when the lock session fails (or on shutdown, with Ok): the
    /// caller must stop streaming and delivering at once.
    pub async fn watch(
        &self,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LeaderError> {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let check = tokio::time::timeout(CHECK_DEADLINE, self.session.simple_query("SELECT 1"));
            let failure = match check.await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", CHECK_DEADLINE.as_secs()),
            };
            health.leader.store(false, Ordering::Relaxed);
            metrics.leader.set(0);
            return Err(LeaderError::Lost(failure));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_key_is_stable_and_per_slot() {
        assert_eq!(lock_key("hubspot_sidecar"), lock_key("hubspot_sidecar"));
        assert_ne!(lock_key("hubspot_sidecar"), lock_key("hubspot_sidecar_b"));
        assert!(lock_key("x") >= 0);
    }
}
