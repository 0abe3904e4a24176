//! Named crash points: the windows where a crash tests the guarantees most.
//!
//! Built only with the `failpoints` cargo feature (the `fail` crate compiles
//! `fail_point!` to nothing otherwise). A crash test starts the real binary
//! with `FAILPOINTS=<name>=return` and the process kills itself with SIGKILL
//! exactly there: no destructor, no flush, no graceful anything, the same as
//! `kill -9` from outside, but at a known instruction instead of a loop index.

/// The hand-off transaction (outbox rows and checkpoint) committed; the slot
/// is not yet acknowledged. A restart must resume from the checkpoint and
/// queue nothing twice that delivery could not absorb (G1, G3).
pub const HANDOFF_COMMITTED: &str = "handoff_committed";
/// Part of a large transaction was handed off ahead of its commit (outbox
/// rows, no checkpoint). A restart replays the whole transaction and its
/// upserts absorb the repeat.
pub const HANDOFF_AHEAD_COMMITTED: &str = "handoff_ahead_committed";
/// HubSpot accepted a batch update or an event batch; the outbox rows are not
/// yet deleted. A restart resends them and HubSpot absorbs the repeat (G2).
pub const HUBSPOT_ACCEPTED: &str = "hubspot_accepted";
/// The OAuth token endpoint answered a refresh; the new tokens are not yet
/// stored. A restart refreshes again with the refresh token it has (G6).
pub const TOKEN_REFRESHED: &str = "token_refreshed";
/// HubSpot created contacts; the contact map is not yet written. A restart
/// finds them by e-mail (or HubSpot's 409 names them) and creates none twice.
pub const CONTACT_CREATED: &str = "contact_created";

/// HubSpot webhook events are stored; HubSpot has no answer yet and they
/// are not applied. A restart applies them, and HubSpot's retry of the
/// batch is recognised as a repeat: each applied once.
pub const WEBHOOK_ACCEPTED: &str = "webhook_accepted";

/// Every crash point, for the tests and the docs.
pub const ALL: [&str; 6] = [
    HANDOFF_COMMITTED,
    HANDOFF_AHEAD_COMMITTED,
    HUBSPOT_ACCEPTED,
    TOKEN_REFRESHED,
    CONTACT_CREATED,
    WEBHOOK_ACCEPTED,
];

/// Kills the process with SIGKILL here when the crash point `name` is armed.
#[cfg(feature = "failpoints")]
pub fn crash_point(name: &str) {
    fail::fail_point!(name, |_| {
        tracing::warn!(
            crash_point = name,
            "crash point reached: killing the process"
        );
        // SAFETY: kill(2) on our own pid with a signal number has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    });
}

/// Without the `failpoints` feature a crash point costs nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Reads `FAILPOINTS` from the environment (the `fail` crate's syntax); the
/// returned guard keeps them armed for the life of the process.
#[cfg(feature = "failpoints")]
pub fn arm_from_env() -> Option<fail::FailScenario<'static>> {
    std::env::var_os("FAILPOINTS").map(|_| fail::FailScenario::setup())
}
