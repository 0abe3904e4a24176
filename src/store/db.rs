//! The one way the sidecar reaches Postgres over SQL.
//!
//! Every stage (the hand-off, delivery, the mailer, the lag sampler, the
//! admin API) takes a [`Db`] built once from [`DatabaseConfig`]; nothing else
//! opens a SQL connection. The pool (deadpool-postgres) hands out a live
//! connection and reopens one that the server closed, so a restart of
//! Postgres costs each stage one failed call, not a reconnect loop of its own.
//! TLS (`crate::tls`, from DATABASE_URL's `sslmode` and files) is chosen here,
//! in [`Db::with_size`], for every SQL connection at once.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

/// Connections the pool opens at most. Each portal worker holds one for a
/// phase of its round, the hand-off one, the admin API a few: well above what
/// a sidecar needs, well below a server's `max_connections`.
const POOL_SIZE: usize = 32;
/// How long a stage waits for a connection (to open one, or for a free one)
/// before the call fails and its caller's retry policy takes over.
const WAIT: Duration = Duration::from_secs(15);

/// A database error: from the server, or no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server or the connection failed a statement.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be opened or taken from the pool in time.
    #[error("no database connection: {0}")]
    Unavailable(String),
    /// A statement that answered many delivery rounds at once failed (each
    /// of them gets the same error).
    #[error("{0}")]
    Shared(std::sync::Arc<DbError>),
}

impl From<PoolError> for DbError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => DbError::Postgres(e),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}

/// A pooled connection: derefs to [`Conn`], and `transaction()` opens a
/// transaction on it.
pub type DbClient = deadpool_postgres::Object;

/// The client of a pooled connection: a `tokio_postgres::Client` with a
/// statement cache of its own. Statements run on every delivery round
/// take it and use `prepare_cached`, so each is parsed and planned once per
/// connection and then costs one round trip, not two.
pub type Conn = deadpool_postgres::ClientWrapper;

/// The handle to Postgres every stage shares; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    /// Builds the shared pool; no connection is opened until one is asked for.
    pub fn new(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        Db::with_size(cfg, POOL_SIZE)
    }

    /// A pool of its own, of `size` connections, for a stage that must never
    /// wait behind the others (the hand-off, on which the slot's progress
    /// depends, G3).
    pub fn with_size(cfg: &DatabaseConfig, size: usize) -> Result<Db, DbError> {
        let manager_config = ManagerConfig {
            // Fast: a connection the server closed is noticed by
            // `is_closed` and replaced; no round trip per checkout.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match cfg.tls.sql_connector() {
            Some(tls) => Manager::from_config(cfg.pg.clone(), tls, manager_config),
            None => Manager::from_config(cfg.pg.clone(), NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Db { pool })
    }

    /// A live connection, opened anew when the previous one was closed.
    pub async fn client(&self) -> Result<DbClient, DbError> {
        Ok(self.pool.get().await?)
    }
}
