//! HubSpot stage: the REST client, per-portal rate limiting and the schema
//! (property group and properties) the sidecar writes into.

pub mod oauth;
pub mod properties;
pub mod ratelimit;
pub mod timeline;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::Metrics;
use properties::{GROUP_LABEL, GROUP_NAME, PROPERTIES};
use ratelimit::RateLimiter;

/// HubSpot's limit on inputs per batch call.
pub const BATCH_LIMIT: usize = 100;

/// HubSpot's standard error body; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub sub_category: Option<String>,
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
}

/// A stateless REST client; `Portal` adds a token and a limiter.
#[derive(Clone)]
pub struct HubSpotClient {
    http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) version: String,
    metrics: Arc<Metrics>,
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
            version: version.to_string(),
            metrics,
        }
    }

    pub(crate) fn dated(&self) -> bool {
        self.version != "v3"
    }

    /// `/crm/v3/objects/contacts{rest}` or `/crm/objects/2026-03/contacts{rest}`.
    pub fn contacts_path(&self, rest: &str) -> String {
        if self.dated() {
            format!("{}/crm/objects/{}/contacts{rest}", self.base, self.version)
        } else {
            format!("{}/crm/v3/objects/contacts{rest}", self.base)
        }
    }

    pub fn properties_path(&self, rest: &str) -> String {
        if self.dated() {
            format!(
                "{}/crm/properties/{}/contacts{rest}",
                self.base, self.version
            )
        } else {
            format!("{}/crm/v3/properties/contacts{rest}", self.base)
        }
    }

    /// Sends one JSON request with a bearer token and classifies the answer.
    /// 207 is a success with errors.
    async fn send(
        &self,
        operation: &'static str,
        token: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HubSpotError> {
        let mut req = self.http.request(method, url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.execute(operation, req).await
    }

    /// Sends a form-encoded request (the OAuth endpoints).
    pub(crate) async fn send_form(
        &self,
        operation: &'static str,
        method: reqwest::Method,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<(u16, Value), HubSpotError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let req = self
            .http
            .request(method, url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        match self.execute(operation, req).await {
            // The token endpoint answers a refused grant with 400 invalid_grant:
            // that is an authorization failure, not bad input.
            Err(HubSpotError::Rejected { status: 400, error })
                if matches!(
                    error.error.as_deref(),
                    Some("invalid_grant" | "invalid_client")
                ) =>
            {
                Err(HubSpotError::Auth {
                    status: 400,
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
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp
            .text()
            .await
            .map_err(|e| HubSpotError::Transient(format!("{operation}: reading body: {e}")))?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let error = || {
            let mut e = serde_json::from_value::<ApiError>(json.clone()).unwrap_or_default();
            // OAuth errors carry the HubSpot category in `status` (e.g. BAD_REFRESH_TOKEN).
            if e.category.is_empty() {
                if let Some(s) = json.get("status").and_then(Value::as_str) {
                    e.category = s.to_string();
                }
            }
            e
        };
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
        let url = if self.dated() {
            format!("{}/account-info/{}/details", self.base, self.version)
        } else {
            format!("{}/account-info/v3/details", self.base)
        };
        let (_, body) = self
            .send("account.details", token, reqwest::Method::GET, &url, None)
            .await?;
        body.get("portalId")
            .and_then(Value::as_i64)
            .ok_or_else(|| HubSpotError::Transient("account details without portalId".into()))
    }
}

/// One portal: its token and its share of HubSpot's rate limit.
pub struct Portal {
    pub client: HubSpotClient,
    pub token: String,
    pub limiter: Arc<RateLimiter>,
}

/// What happened to one input of a batch create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateResult {
    Created(String),
    /// A contact with that e-mail exists already: its record id.
    Exists(String),
    Rejected {
        category: String,
        message: String,
    },
}

/// The record id in HubSpot's "Contact already exists. Existing ID: 123".
fn existing_id(message: &str) -> Option<String> {
    let rest = message.split("Existing ID:").nth(1)?.trim_start();
    let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!id.is_empty()).then_some(id)
}

/// What a batch update did.
#[derive(Debug, Default)]
pub struct UpdateOutcome {
    /// Record ids HubSpot no longer has (deleted or merged contacts).
    pub missing: Vec<String>,
}

impl Portal {
    async fn call(
        &self,
        operation: &'static str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HubSpotError> {
        let waited = self.limiter.acquire().await;
        if !waited.is_zero() {
            self.client
                .metrics
                .rate_limit_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
        let result = self
            .client
            .send(operation, &self.token, method, url, body)
            .await;
        if let Err(HubSpotError::RateLimited { .. }) = &result {
            // Someone else shares the portal's budget: treat the window as spent.
            self.limiter.saturate().await;
        }
        result
    }

    /// Creates the MeltingSpot group and the ten properties where missing, and
    /// adds any option an existing enumeration lacks. Idempotent; 409 is success.
    pub async fn ensure_schema(&self) -> Result<(), HubSpotError> {
        let c = &self.client;
        match self
            .call(
                "properties.groups.read",
                reqwest::Method::GET,
                &c.properties_path(&format!("/groups/{GROUP_NAME}")),
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(HubSpotError::Rejected { status: 404, .. }) => {
                let body = json!({"name": GROUP_NAME, "label": GROUP_LABEL, "displayOrder": -1});
                match self
                    .call(
                        "properties.groups.create",
                        reqwest::Method::POST,
                        &c.properties_path("/groups"),
                        Some(&body),
                    )
                    .await
                {
                    Ok(_) | Err(HubSpotError::Rejected { status: 409, .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }

        let names: Vec<Value> = PROPERTIES.iter().map(|p| json!({"name": p.name})).collect();
        let (_, existing) = self
            .call(
                "properties.batch_read",
                reqwest::Method::POST,
                &c.properties_path("/batch/read"),
                Some(&json!({"archived": false, "inputs": names})),
            )
            .await?;
        let existing: HashMap<String, Value> = existing
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get("name")?.as_str()?.to_string(), p.clone())))
            .collect();

        let missing: Vec<Value> = PROPERTIES
            .iter()
            .enumerate()
            .filter(|(_, p)| !existing.contains_key(p.name))
            .map(|(i, p)| properties::create_body(p, i))
            .collect();
        if !missing.is_empty() {
            let (_, body) = self
                .call(
                    "properties.batch_create",
                    reqwest::Method::POST,
                    &c.properties_path("/batch/create"),
                    Some(&json!({"inputs": missing})),
                )
                .await?;
            // A 207 names the inputs that failed; a name that already exists is fine.
            for err in body
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let category = err.get("category").and_then(Value::as_str).unwrap_or("");
                if category != "OBJECT_ALREADY_EXISTS" && category != "CONFLICT" {
                    return Err(HubSpotError::Rejected {
                        status: 207,
                        error: Box::new(serde_json::from_value(err.clone()).unwrap_or_default()),
                    });
                }
            }
        }

        // An existing enumeration that lacks one of our options gets it added (never removed).
        for p in PROPERTIES.iter().filter(|p| !p.options.is_empty()) {
            let Some(def) = existing.get(p.name) else {
                continue;
            };
            let mut options: Vec<Value> = def
                .get("options")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let have: Vec<String> = options
                .iter()
                .filter_map(|o| o.get("value").and_then(Value::as_str).map(str::to_string))
                .collect();
            let mut changed = false;
            for (i, v) in p.options.iter().enumerate() {
                if !have.iter().any(|h| h == v) {
                    options.push(properties::option_json(v, options.len().max(i)));
                    changed = true;
                }
            }
            if changed {
                self.call(
                    "properties.update",
                    reqwest::Method::PATCH,
                    &c.properties_path(&format!("/{}", p.name)),
                    Some(&json!({"options": options})),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Looks contacts up by e-mail (≤100). Returns normalized email → record id.
    pub async fn read_contacts_by_email(
        &self,
        emails: &[String],
    ) -> Result<HashMap<String, String>, HubSpotError> {
        let inputs: Vec<Value> = emails.iter().map(|e| json!({"id": e})).collect();
        let body = json!({"idProperty": "email", "properties": ["email"], "inputs": inputs});
        let (_, resp) = self
            .call(
                "contacts.batch_read",
                reqwest::Method::POST,
                &self.client.contacts_path("/batch/read"),
                Some(&body),
            )
            .await?;
        // Results do not echo the input id: map them back through their email.
        Ok(resp
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let id = r.get("id")?.as_str()?.to_string();
                let email = r.get("properties")?.get("email")?.as_str()?;
                Some((properties::normalize_email(email), id))
            })
            .collect())
    }

    /// Creates contacts (≤100), each with an `objectWriteTraceId` so that HubSpot
    /// reports every input on its own (207) instead of failing the batch.
    pub async fn create_contacts(
        &self,
        inputs: &[(String, BTreeMap<String, String>)],
    ) -> Result<HashMap<String, CreateResult>, HubSpotError> {
        let body: Vec<Value> = inputs
            .iter()
            .map(|(trace, props)| json!({"objectWriteTraceId": trace, "properties": props}))
            .collect();
        let (_, resp) = self
            .call(
                "contacts.batch_create",
                reqwest::Method::POST,
                &self.client.contacts_path("/batch/create"),
                Some(&json!({"inputs": body})),
            )
            .await?;
        let mut out = HashMap::new();
        for r in resp
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(trace)) = (
                r.get("id").and_then(Value::as_str),
                r.get("objectWriteTraceId").and_then(Value::as_str),
            ) else {
                continue;
            };
            out.insert(trace.to_string(), CreateResult::Created(id.to_string()));
        }
        for e in resp
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let category = e
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let traces = e
                .pointer("/context/objectWriteTraceId")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str);
            for trace in traces {
                let result = match existing_id(&message) {
                    Some(id) => CreateResult::Exists(id),
                    None => CreateResult::Rejected {
                        category: category.clone(),
                        message: message.clone(),
                    },
                };
                out.insert(trace.to_string(), result);
            }
        }
        Ok(out)
    }

    /// Updates contacts by record id (≤100).
    pub async fn update_contacts(
        &self,
        inputs: &[(String, BTreeMap<String, String>)],
    ) -> Result<UpdateOutcome, HubSpotError> {
        let inputs: Vec<Value> = inputs
            .iter()
            .map(|(id, props)| json!({"id": id, "properties": props}))
            .collect();
        let (status, resp) = self
            .call(
                "contacts.batch_update",
                reqwest::Method::POST,
                &self.client.contacts_path("/batch/update"),
                Some(&json!({"inputs": inputs})),
            )
            .await?;
        let mut outcome = UpdateOutcome::default();
        if status == 207 {
            for err in resp
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ids = err
                    .pointer("/context/ids")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string));
                outcome.missing.extend(ids);
            }
        }
        Ok(outcome)
    }
}
