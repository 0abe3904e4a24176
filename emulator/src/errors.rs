//! HubSpot-shaped answers: the standard error body, batch envelopes, replies and the
//! timestamp format they are written in.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// A successful (or deliberately non-error) answer.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    /// For the OAuth authorize redirect.
    pub location: Option<String>,
}

impl Reply {
    pub fn json(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
            location: None,
        }
    }

    pub fn ok(body: Value) -> Reply {
        Reply::json(StatusCode::OK, body)
    }

    pub fn created(body: Value) -> Reply {
        Reply::json(StatusCode::CREATED, body)
    }

    pub fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            body: None,
            location: None,
        }
    }

    pub fn redirect(location: String) -> Reply {
        Reply {
            status: StatusCode::FOUND,
            body: None,
            location: Some(location),
        }
    }
}

/// An error answer; its body is HubSpot's standard error object (or an OAuth error object).
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub body: Value,
}

pub(crate) type ApiResult = Result<Reply, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, category: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({"status": "error", "message": message.into(), "category": category}),
        }
    }

    /// Adds (or replaces) a top-level field of the body.
    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        if let Value::Object(m) = &mut self.body {
            m.insert(key.to_string(), value);
        }
        self
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "CONFLICT", message)
    }

    pub fn invalid_auth() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found. This API supports OAuth 2.0 authentication and \
             you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
        )
    }

    /// GUESS: the exact body HubSpot sends when a service key / private-app token calls a timeline
    /// endpoint is not documented; we answer the documented MISSING_SCOPES shape.
    pub fn missing_scopes(required: &[&str]) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "MISSING_SCOPES",
            "This app hasn't been granted all required scopes to make this call. Read more about \
             required scopes here: https://developers.hubspot.com/scopes.",
        )
        .with(
            "errors",
            json!([{
                "message": "One or more of the following scopes are required.",
                "context": {"requiredScopes": required}
            }]),
        )
        .with(
            "links",
            json!({"scopes": "https://developers.hubspot.com/scopes"}),
        )
    }

    /// The OAuth endpoints use `{error, error_description, status, message}`.
    pub fn oauth(error: &str, status_code: &str, description: &str) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({
                "error": error,
                "error_description": description,
                "status": status_code,
                "message": description,
            }),
        }
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "VALIDATION_ERROR",
            "HTTP method not allowed for this path",
        )
    }

    pub fn route_not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "OBJECT_NOT_FOUND",
            format!("No such endpoint in the HubSpot emulator: {path}"),
        )
    }
}

/// One invalid property value, as HubSpot reports it inside "Property values were not valid".
#[derive(Clone, Debug)]
pub(crate) struct ValueError {
    pub name: String,
    pub code: &'static str,
    pub message: String,
}

impl ValueError {
    pub fn new(name: &str, code: &'static str, message: impl Into<String>) -> ValueError {
        ValueError {
            name: name.to_string(),
            code,
            message: message.into(),
        }
    }

    fn inner_json(&self) -> Value {
        json!({"isValid": false, "message": self.message, "error": self.code, "name": self.name})
    }

    /// Element of the standard error's `errors[]`, with extra context (e.g. the record id).
    pub fn detail_json(&self, extra_context: &[(&str, String)]) -> Value {
        let mut ctx = Map::new();
        for (k, v) in extra_context {
            ctx.insert((*k).to_string(), json!([v]));
        }
        ctx.insert("propertyName".into(), json!([self.name]));
        json!({"message": self.message, "code": self.code, "context": ctx})
    }
}

/// `Property values were not valid: [{"isValid":false,...}]` (the inner list is JSON in a string).
pub(crate) fn property_values_message(errs: &[ValueError]) -> String {
    let inner: Vec<Value> = errs.iter().map(ValueError::inner_json).collect();
    format!("Property values were not valid: {}", Value::Array(inner))
}

/// The single-object 400 for invalid property values.
pub(crate) fn property_values_error(errs: &[ValueError]) -> ApiError {
    ApiError::validation(property_values_message(errs)).with(
        "errors",
        Value::Array(errs.iter().map(|e| e.detail_json(&[])).collect()),
    )
}

/// An element of a batch response's `errors[]`.
pub(crate) fn batch_error(category: &str, message: impl Into<String>, context: Value) -> Value {
    json!({"status": "error", "category": category, "message": message.into(), "context": context})
}

/// HubSpot's timestamp format: ISO 8601, UTC, milliseconds.
pub(crate) fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// HubSpot's batch response envelope; `numErrors`/`errors` only when there are errors.
pub(crate) fn batch_envelope(
    results: Vec<Value>,
    errors: Vec<Value>,
    started: DateTime<Utc>,
) -> Value {
    let mut m = Map::new();
    m.insert("status".into(), json!("COMPLETE"));
    m.insert("results".into(), Value::Array(results));
    if !errors.is_empty() {
        m.insert("numErrors".into(), json!(errors.len()));
        m.insert("errors".into(), Value::Array(errors));
    }
    m.insert("startedAt".into(), json!(iso(started)));
    m.insert("completedAt".into(), json!(iso(Utc::now())));
    Value::Object(m)
}

/// 200/201 when clean, 207 Multi-Status when some inputs failed.
pub(crate) fn batch_reply(
    ok_status: StatusCode,
    results: Vec<Value>,
    errors: Vec<Value>,
    started: DateTime<Utc>,
) -> Reply {
    let status = if errors.is_empty() {
        ok_status
    } else {
        StatusCode::MULTI_STATUS
    };
    Reply::json(status, batch_envelope(results, errors, started))
}

/// Parses a JSON request body; an empty body counts as `{}`.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::validation(format!(
            "Invalid input JSON on line {}, column {}: {}",
            e.line(),
            e.column(),
            e
        ))
    })
}

/// A JSON id given as a string or a number.
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Scalar JSON value as HubSpot stores it (everything is a string); `null` clears.
pub(crate) fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// Builds the HTTP response; error bodies get the request's `correlationId`.
pub(crate) fn into_response(res: ApiResult, corr: &str) -> Response {
    let (status, body, location) = match res {
        Ok(r) => (r.status, r.body, r.location),
        Err(mut e) => {
            if let Value::Object(m) = &mut e.body {
                m.entry("correlationId")
                    .or_insert_with(|| Value::String(corr.to_string()));
            }
            (e.status, Some(e.body), None)
        }
    };
    let mut builder = Response::builder().status(status);
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        builder = builder.header(header::LOCATION, loc);
    }
    let built = match body {
        Some(v) => builder
            .header(header::CONTENT_TYPE, "application/json;charset=utf-8")
            .body(Body::from(v.to_string())),
        None => builder.body(Body::empty()),
    };
    built.unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}
