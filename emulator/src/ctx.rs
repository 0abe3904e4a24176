//! What a handler knows about a request besides its body (`Ctx`), and the small reply
//! helpers the handlers share. The dispatcher (`http`) builds a `Ctx` and calls the handlers;
//! the handlers depend on this module, never on the dispatcher.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};

use crate::errors::{ApiResult, Reply};

/// What a handler knows about the request besides its body.
pub(crate) struct Ctx {
    pub portal: u64,
    pub query: Vec<(String, String)>,
    pub now: DateTime<Utc>,
}

impl Ctx {
    pub fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All values of a repeatable query parameter, also split on commas (`properties=a,b`).
    pub fn q_list(&self, key: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

/// Helper for handlers answering a fixed empty body.
pub(crate) fn no_content() -> ApiResult {
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}
