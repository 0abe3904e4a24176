//! How a request reaches HubSpot and how its answer is classified: one
//! client, three ways to authenticate (a portal's bearer token, an OAuth
//! form post, the developer API key), one error type. Paths come from
//! `Endpoint`; nothing here knows contacts, properties or events.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::endpoint::{ApiVersion, Endpoint};
use super::ratelimit::RateLimiter;
use crate::metrics::Metrics;

/// How a request authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// A portal's access token (OAuth) or static token, as a bearer token.
    Bearer(&'a str),
    /// The developer API key of the app, as `hapikey` (timeline-v3 templates).
    /// (The OAuth endpoints take the client credentials in the form: `send_form`.)
    DeveloperKey(&'a str),
}

/// HubSpot's standard error body; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub policy_name: Option<String>,
    #[serde(default)]
    pub errors: Vec<Value>,
    #[serde(default)]
    pub context: Option<Value>,
    /// OAuth endpoints: `invalid_grant`, `invalid_client`, ...
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubSpotError {
    /// 429: flow control, never a failure of the integration.
    #[error("rate limited ({policy})")]
    RateLimited {
        retry_after: Option<Duration>,
        policy: String,
    },
    /// 401/403: the token is expired, revoked or lacks scopes.
    #[error("authorization refused ({status} {category}): {message}")]
    Auth {
        status: u16,
        category: String,
        message: String,
    },
    /// 4xx that retrying cannot fix: the input is wrong.
    #[error("rejected ({status} {}): {}", .error.category, .error.message)]
    Rejected { status: u16, error: Box<ApiError> },
    /// 5xx, timeouts, resets: retry with backoff.
    #[error("transient failure: {0}")]
    Transient(String),
    /// A property the sidecar writes does not exist (deleted in HubSpot): the
    /// schema is ensured again, nothing is dead-lettered for it.
    #[error("the MeltingSpot properties are missing in HubSpot: {0}")]
    SchemaMissing(String),
    /// The call was not made: the Spot was reconnected or disconnected since
    /// the round began (see `Portal::fence`).
    #[error("the integration was reconnected or disconnected; the call was not made")]
    Fenced,
    /// The call was not made: whether the round's activation is still
    /// current could not be checked (the database failed).
    #[error("the call was not made: the integration could not be checked ({0})")]
    FenceUnchecked(String),
}

/// A stateless REST client; `Portal` adds a token and a limiter.
#[derive(Clone)]
pub struct HubSpotClient {
    http: reqwest::Client,
    base: String,
    version: ApiVersion,
    pub(super) metrics: Arc<Metrics>,
}

impl HubSpotClient {
    pub fn new(base: &str, version: &str, metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("hubspot-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        HubSpotClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            version: ApiVersion::parse(version),
            metrics,
        }
    }

    /// The full URL of an endpoint.
    pub fn url(&self, endpoint: &Endpoint<'_>) -> String {
        format!("{}{}", self.base, endpoint.path(&self.version))
    }

    /// Sends one JSON request to `endpoint` and classifies the answer.
    /// 207 is a success with errors.
    pub async fn send(
        &self,
        endpoint: &Endpoint<'_>,
        auth: Auth<'_>,
        method: reqwest::Method,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HubSpotError> {
        self.send_observed(endpoint, auth, method, body, None).await
    }

    /// `send`, telling `limiter` what HubSpot's rate-limit headers say of
    /// the portal's window (so a restart or another client sharing the
    /// portal never makes us overspend).
    pub async fn send_observed(
        &self,
        endpoint: &Endpoint<'_>,
        auth: Auth<'_>,
        method: reqwest::Method,
        body: Option<&Value>,
        limiter: Option<&RateLimiter>,
    ) -> Result<(u16, Value), HubSpotError> {
        let operation = endpoint.operation();
        let mut req = self.http.request(method, self.url(endpoint));
        match auth {
            Auth::Bearer(token) => req = req.bearer_auth(token),
            Auth::DeveloperKey(key) => req = req.query(&[("hapikey", key)]),
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let result = self.execute(operation, req, limiter).await;
        match auth {
            // The key travels in the URL: scrub it from any error text. A
            // refused key is the sidecar's configuration, not the portal's
            // token: never an Auth error that would ask for a token refresh.
            Auth::DeveloperKey(key) => result.map_err(|e| match scrub(e, key) {
                HubSpotError::Auth {
                    status, message, ..
                } => HubSpotError::Rejected {
                    status,
                    error: Box::new(ApiError {
                        message: format!("HUBSPOT_DEVELOPER_API_KEY was refused: {message}"),
                        category: "INVALID_DEVELOPER_KEY".into(),
                        ..ApiError::default()
                    }),
                },
                other => other,
            }),
            Auth::Bearer(_) => result,
        }
    }

    /// Sends a form-encoded request (the OAuth endpoints).
    pub async fn send_form(
        &self,
        endpoint: &Endpoint<'_>,
        method: reqwest::Method,
        form: &[(&str, &str)],
    ) -> Result<(u16, Value), HubSpotError> {
        let operation = endpoint.operation();
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let req = self
            .http
            .request(method, self.url(endpoint))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        match self.execute(operation, req, None).await {
            // A refused grant or client is an authorization failure, not bad input.
            Err(HubSpotError::Rejected { status, error }) if is_oauth_refusal(&error) => {
                Err(HubSpotError::Auth {
                    status,
                    category: error.category.clone(),
                    message: error.message.clone(),
                })
            }
            other => other,
        }
    }

    async fn execute(
        &self,
        operation: &'static str,
        req: reqwest::RequestBuilder,
        limiter: Option<&RateLimiter>,
    ) -> Result<(u16, Value), HubSpotError> {
        let started = std::time::Instant::now();
        let result = req.send().await;
        self.metrics
            .hubspot_request_seconds
            .with_label_values(&[operation])
            .observe(started.elapsed().as_secs_f64());
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() { "timeout" } else { "error" };
                self.metrics
                    .hubspot_requests
                    .with_label_values(&[operation, kind])
                    .inc();
                // Without the URL: a revocation path carries a refresh token.
                return Err(HubSpotError::Transient(format!(
                    "{operation}: {}",
                    e.without_url()
                )));
            }
        };
        let status = resp.status().as_u16();
        self.metrics
            .hubspot_requests
            .with_label_values(&[operation, &status.to_string()])
            .inc();
        if let (Some(limiter), Some((max, remaining))) = (limiter, window_use(resp.headers())) {
            limiter.observe(max, remaining).await;
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = read_capped(resp, status).await.map_err(|e| {
            HubSpotError::Transient(format!("{operation}: reading the answer: {e}"))
        })?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let error = || parse_error(&json);
        match status {
            200..=299 => Ok((status, json)),
            429 => Err(HubSpotError::RateLimited {
                retry_after,
                policy: error().policy_name.unwrap_or_else(|| "unknown".into()),
            }),
            401 | 403 => {
                let e = error();
                Err(HubSpotError::Auth {
                    status,
                    category: e.category,
                    message: e.message,
                })
            }
            // 423 (locked) and 477 (migrating) clear by themselves.
            408 | 423 | 477 | 500..=599 => Err(HubSpotError::Transient(format!(
                "{operation}: HTTP {status}: {}",
                error().message
            ))),
            _ => Err(HubSpotError::Rejected {
                status,
                error: Box::new(error()),
            }),
        }
    }

    /// The portal (hub) id a token belongs to.
    pub async fn portal_id(&self, token: &str) -> Result<i64, HubSpotError> {
        let (_, body) = self
            .send(
                &Endpoint::AccountDetails,
                Auth::Bearer(token),
                reqwest::Method::GET,
                None,
            )
            .await?;
        body.get("portalId")
            .and_then(Value::as_i64)
            .ok_or_else(|| HubSpotError::Transient("account details without portalId".into()))
    }
}

/// The largest successful answer read. HubSpot's largest legitimate one is
/// a batch read of 100 contacts with every `meltingspot_*` value at its
/// 65,536-character limit, about 66 MB; anything larger is not read whole.
pub const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;
/// The most of an error answer read: HubSpot's error bodies are a few
/// hundred bytes; the rest is cut, never buffered.
pub const MAX_ERROR_BYTES: usize = 64 * 1024;

/// Reads an answer's body, never more than its cap: a successful answer
/// over `MAX_ANSWER_BYTES` is an error; an error answer is cut at
/// `MAX_ERROR_BYTES`.
async fn read_capped(mut resp: reqwest::Response, status: u16) -> Result<String, String> {
    let cap = if (200..300).contains(&status) {
        MAX_ANSWER_BYTES
    } else {
        MAX_ERROR_BYTES
    };
    if resp
        .content_length()
        .is_some_and(|n| n > cap as u64 && cap == MAX_ANSWER_BYTES)
    {
        return Err(format!("HubSpot announced more than {cap} bytes"));
    }
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        let room = cap - body.len();
        if chunk.len() > room {
            if cap == MAX_ANSWER_BYTES {
                return Err(format!("HubSpot answered more than {cap} bytes"));
            }
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Removes the developer key from an error's text.
fn scrub(e: HubSpotError, key: &str) -> HubSpotError {
    let scrub = |s: String| {
        if key.is_empty() {
            s
        } else {
            s.replace(key, "***")
        }
    };
    match e {
        HubSpotError::Transient(m) => HubSpotError::Transient(scrub(m)),
        HubSpotError::Auth {
            status,
            category,
            message,
        } => HubSpotError::Auth {
            status,
            category,
            message: scrub(message),
        },
        HubSpotError::Rejected { status, mut error } => {
            error.message = scrub(std::mem::take(&mut error.message));
            HubSpotError::Rejected { status, error }
        }
        other => other,
    }
}

/// HubSpot's view of the portal's ten-second window, from the rate-limit
/// headers: (max, remaining). Other windows (daily) are ignored.
fn window_use(headers: &reqwest::header::HeaderMap) -> Option<(u32, u32)> {
    let num = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    if num("x-hubspot-ratelimit-interval-milliseconds")? != 10_000 {
        return None;
    }
    let max = num("x-hubspot-ratelimit-max")?;
    let remaining = num("x-hubspot-ratelimit-remaining")?;
    Some((u32::try_from(max).ok()?, u32::try_from(remaining).ok()?))
}

/// An error body as `ApiError`; every field is optional. OAuth errors carry
/// HubSpot's category in `status` (e.g. BAD_REFRESH_TOKEN).
fn parse_error(json: &Value) -> ApiError {
    let mut e = serde_json::from_value::<ApiError>(json.clone()).unwrap_or_default();
    if e.category.is_empty() {
        if let Some(s) = json.get("status").and_then(Value::as_str) {
            e.category = s.to_string();
        }
    }
    e
}

/// Whether an OAuth endpoint's error body refuses the grant or the client.
/// HubSpot answers in two styles: `{"status":"BAD_REFRESH_TOKEN","message":…}`
/// (the status lands in `category`), sometimes with `"error":"invalid_request"`,
/// or the OAuth 2 style `{"error":"invalid_grant",…}`.
pub(super) fn is_oauth_refusal(error: &ApiError) -> bool {
    matches!(
        error.category.as_str(),
        "BAD_REFRESH_TOKEN"
            | "EXPIRED_AUTH_CODE"
            | "BAD_AUTH_CODE"
            | "BAD_CLIENT_ID"
            | "BAD_CLIENT_SECRET"
    ) || matches!(
        error.error.as_deref(),
        Some("invalid_grant" | "invalid_client")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers one request with `head` and `body` as they are, from a local port.
    async fn answer_once(head: String, body: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
        });
        url
    }

    #[tokio::test]
    async fn an_error_answer_is_cut_and_a_huge_announced_answer_is_refused_unread() {
        let big = vec![b'x'; 100 * 1024];
        let url = answer_once(
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n",
                big.len()
            ),
            big,
        )
        .await;
        let resp = reqwest::get(&url).await.unwrap();
        let text = read_capped(resp, 400).await.unwrap();
        assert_eq!(text.len(), MAX_ERROR_BYTES);

        let url = answer_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 209715200\r\n\r\n".into(),
            Vec::new(),
        )
        .await;
        let resp = reqwest::get(&url).await.unwrap();
        let refused = read_capped(resp, 200).await.unwrap_err();
        assert!(refused.contains("more than"), "{refused}");
    }

    fn body(v: Value) -> ApiError {
        parse_error(&v)
    }

    #[test]
    fn oauth_refusals_in_both_styles_are_auth_failures() {
        use serde_json::json;
        for v in [
            json!({"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token"}),
            json!({"status": "BAD_REFRESH_TOKEN", "message": "x", "error": "invalid_request"}),
            json!({"status": "EXPIRED_AUTH_CODE", "message": "expired"}),
            json!({"error": "invalid_grant", "error_description": "refused"}),
            json!({"error": "invalid_client"}),
        ] {
            assert!(is_oauth_refusal(&body(v.clone())), "{v}");
        }
        for v in [
            json!({"error": "invalid_request", "message": "missing parameter"}),
            json!({"status": "error", "message": "Internal error"}),
        ] {
            assert!(!is_oauth_refusal(&body(v.clone())), "{v}");
        }
    }
}
