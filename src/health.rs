//! Liveness and readiness flags: set by the stream, the leader election and
//! the start, read by `/healthz`, `/readyz` and the pages. A leaf: every
//! stage may set them without reaching up into `http`.

use std::sync::atomic::AtomicBool;

/// Liveness and readiness flags that the loops set.
#[derive(Default)]
pub struct Health {
    /// The schema migrations ran.
    pub migrated: AtomicBool,
    /// The replication stream is reading.
    pub streaming: AtomicBool,
    /// This replica holds the leadership (only the leader streams and delivers).
    pub leader: AtomicBool,
}
