//! Timeline activity: App Events v4 and legacy timeline v3 (templates + events).
//!
//! App Events choices (the reference marks these UNCONFIRMED):
//! * any non-empty `eventTypeName` is accepted: the emulator cannot know which event types the
//!   app project declares;
//! * a batch holds at most 500 inputs and is validated atomically: a missing field, a bad
//!   timestamp or an `objectId` that is not a contact of the portal fails the whole request (400,
//!   `context.ids` lists unknown object ids);
//! * a repeated `id` (same portal, same `eventTypeName`) is never stored twice. As HubSpot's
//!   published definitions say, a batch is atomic: if any input repeats a stored id (or another
//!   input of the same request), the answer is 409 and NOTHING is stored, new inputs included;
//!   the 409 body names no ids (the definitions give it no schema, so a client cannot rely on it);
//! * success is 200 for a batch (the standard batch envelope, never 207) and 201 for one event;
//!   a single event whose id exists answers 409.
//!
//! Timeline v3 (documented): a repeated event `id` for the same template is last-write-wins; the
//! emulator overwrites the stored event and answers success (201), never storing a duplicate.

use std::collections::{BTreeMap, HashSet};

use axum::http::StatusCode;
use chrono::DateTime;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::ctx::{no_content, Ctx};
use crate::errors::{
    batch_error, batch_reply, id_string, iso, parse_body, scalar_string, ApiError, ApiResult, Reply,
};
use crate::model::{CreatedBy, EventApi, TimelineEvent};
use crate::routes::Endpoint;
use crate::state::{uuid, ContactRec, EventRec, State, TemplateRec, TemplateToken};
use crate::values::{parse_datetime, valid_email, validate_value};

const MAX_APP_EVENTS: usize = 500;
const MAX_V3_EVENTS: usize = 100;

/// `timestamp`: ISO 8601 (UTC) or epoch ms, default now; stored as ISO with milliseconds.
fn timestamp(v: Option<&Value>, now: DateTime<Utc>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Ok(iso(now)),
        Some(v) => id_string(v)
            .and_then(|s| parse_datetime(&s))
            .map(iso)
            .ok_or_else(|| {
                format!("Invalid timestamp {v}: use ISO 8601 UTC or epoch milliseconds")
            }),
    }
}

fn string_map(
    m: Option<&Map<String, Value>>,
    what: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in m.into_iter().flatten() {
        let s = scalar_string(v).ok_or_else(|| format!("{what} {k} must be a scalar value"))?;
        out.insert(k.clone(), s);
    }
    Ok(out)
}

// ---------------------------------------------------------------- App Events v4

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppEventIn {
    event_type_name: Option<String>,
    object_id: Option<Value>,
    id: Option<Value>,
    timestamp: Option<Value>,
    properties: Option<Map<String, Value>>,
}

struct AppEventOk {
    event: TimelineEvent,
}

fn app_event_json(e: &TimelineEvent) -> Value {
    json!({
        "id": e.id,
        "eventTypeName": e.event_type,
        "objectId": e.object_id,
        "objectType": "contacts",
        "timestamp": e.timestamp,
        "properties": e.properties,
    })
}

/// Validates every input first (atomic), then stores the new ones.
fn app_events(st: &mut State, ctx: &Ctx, inputs: Vec<AppEventIn>, single: bool) -> ApiResult {
    if inputs.is_empty() {
        return Err(ApiError::validation("inputs must not be empty"));
    }
    if inputs.len() > MAX_APP_EVENTS {
        return Err(ApiError::validation(format!(
            "Too many inputs: {}. A batch accepts at most {MAX_APP_EVENTS} events.",
            inputs.len()
        )));
    }
    let p = st.portal_mut(ctx.portal)?;
    let mut problems = Vec::new();
    let mut unknown_ids = Vec::new();
    let mut ok = Vec::new();
    for (i, inp) in inputs.iter().enumerate() {
        let name = inp.event_type_name.clone().unwrap_or_default();
        if name.trim().is_empty() {
            problems.push(format!("inputs[{i}]: eventTypeName is required"));
        }
        let object_id = inp
            .object_id
            .as_ref()
            .and_then(id_string)
            .unwrap_or_default();
        if object_id.is_empty() {
            problems.push(format!("inputs[{i}]: objectId is required"));
        } else if !object_id
            .parse::<u64>()
            .is_ok_and(|n| p.contacts.contains_key(&n))
        {
            unknown_ids.push(object_id.clone());
        }
        let ts = timestamp(inp.timestamp.as_ref(), ctx.now)
            .map_err(|e| problems.push(format!("inputs[{i}]: {e}")))
            .unwrap_or_default();
        let props = string_map(inp.properties.as_ref(), "property")
            .map_err(|e| problems.push(format!("inputs[{i}]: {e}")))
            .unwrap_or_default();
        let id = match &inp.id {
            None | Some(Value::Null) => uuid(),
            Some(v) => match id_string(v).filter(|s| !s.is_empty()) {
                Some(s) => s,
                None => {
                    problems.push(format!("inputs[{i}]: id must be a non-empty string"));
                    String::new()
                }
            },
        };
        ok.push(AppEventOk {
            event: TimelineEvent {
                id,
                api: EventApi::AppEvents,
                event_type: name,
                object_id,
                timestamp: ts,
                properties: props,
            },
        });
    }
    if !unknown_ids.is_empty() {
        // GUESS: message wording; no event ever creates a contact.
        problems.push(format!(
            "Could not find CONTACT objects with ids: [{}]",
            unknown_ids.join(", ")
        ));
    }
    if !problems.is_empty() {
        let mut e = ApiError::validation(problems.join("; "));
        if !unknown_ids.is_empty() {
            e = e.with("context", json!({ "ids": unknown_ids }));
        }
        return Err(e);
    }
    let mut seen: HashSet<(String, String)> = p
        .events
        .iter()
        .filter(|e| e.event.api == EventApi::AppEvents)
        .map(|e| (e.event.event_type.clone(), e.event.id.clone()))
        .collect();
    // Atomic: one repeat rejects the whole request, and nothing is stored.
    let repeats = ok
        .iter()
        .filter(|o| !seen.insert((o.event.event_type.clone(), o.event.id.clone())))
        .count();
    if repeats > 0 {
        return Err(ApiError::conflict(
            "One or more occurrences in the batch already exist; the batch was rejected and none were accepted",
        ));
    }
    let mut results = Vec::new();
    for o in ok {
        results.push(app_event_json(&o.event));
        p.events.push(EventRec {
            event: o.event,
            template_id: None,
            extra: Map::new(),
        });
    }
    if single {
        return Ok(Reply::created(results.remove(0)));
    }
    Ok(batch_reply(StatusCode::OK, results, Vec::new(), ctx.now))
}

pub(crate) fn app_event_single(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: AppEventIn = parse_body(body)?;
    app_events(st, ctx, vec![input], true)
}

pub(crate) fn app_event_batch(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    #[derive(Deserialize)]
    struct In {
        inputs: Option<Vec<AppEventIn>>,
    }
    let input: In = parse_body(body)?;
    let inputs = input
        .inputs
        .ok_or_else(|| ApiError::validation("inputs is required"))?;
    app_events(st, ctx, inputs, false)
}

// ---------------------------------------------------------------- v3 templates

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateIn {
    name: Option<String>,
    object_type: Option<String>,
    header_template: Option<String>,
    detail_template: Option<String>,
    tokens: Option<Vec<TemplateToken>>,
}

fn template_json(t: &TemplateRec) -> Value {
    let tokens: Vec<Value> = t
        .tokens
        .iter()
        .map(|k| {
            let mut v = serde_json::to_value(k).unwrap_or(Value::Null);
            v["createdAt"] = json!(iso(t.created_at));
            v["updatedAt"] = json!(iso(t.updated_at));
            v
        })
        .collect();
    json!({
        "id": t.id.to_string(),
        "name": t.name,
        "objectType": t.object_type,
        "headerTemplate": t.header_template,
        "detailTemplate": t.detail_template,
        "tokens": tokens,
        "createdAt": iso(t.created_at),
        "updatedAt": iso(t.updated_at),
    })
}

fn check_tokens(tokens: &[TemplateToken]) -> Result<(), ApiError> {
    let mut names = HashSet::new();
    for t in tokens {
        let valid = !t.name.is_empty()
            && t.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid || t.name == "log" || t.name == "lookup" {
            return Err(ApiError::validation(format!(
                "Invalid token name '{}'",
                t.name
            )));
        }
        if !names.insert(t.name.as_str()) {
            return Err(ApiError::validation(format!(
                "Duplicate token name '{}'",
                t.name
            )));
        }
        if t.label.trim().is_empty() {
            return Err(ApiError::validation(format!(
                "Token '{}' needs a label",
                t.name
            )));
        }
        match t.type_.as_str() {
            "string" | "number" | "date" => {}
            "enumeration" if t.options.as_ref().is_some_and(|o| !o.is_empty()) => {}
            "enumeration" => {
                return Err(ApiError::validation(format!(
                    "Enumeration token '{}' needs options",
                    t.name
                )))
            }
            other => {
                return Err(ApiError::validation(format!(
                    "Invalid token type '{other}' (string, number, date, enumeration)"
                )))
            }
        }
    }
    Ok(())
}

fn template_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Event template {id} not found"))
}

/// Developer-key template endpoints (auth done by the pipeline).
pub(crate) fn templates(st: &mut State, ctx: &Ctx, ep: &Endpoint, body: &[u8]) -> ApiResult {
    match ep {
        Endpoint::TemplatesCreate(_) => {
            let input: TemplateIn = parse_body(body)?;
            let name = input.name.unwrap_or_default();
            if name.trim().is_empty() {
                return Err(ApiError::validation("name is required"));
            }
            let object_type = input.object_type.unwrap_or_default();
            if !object_type.eq_ignore_ascii_case("contacts") {
                return Err(ApiError::validation(format!(
                    "objectType '{object_type}' is not supported by the emulator (contacts only)"
                )));
            }
            let tokens = input.tokens.unwrap_or_default();
            check_tokens(&tokens)?;
            let id = st.next_template_id;
            st.next_template_id += 1;
            let t = TemplateRec {
                id,
                name,
                object_type: "contacts".into(),
                header_template: input.header_template,
                detail_template: input.detail_template,
                tokens,
                created_at: ctx.now,
                updated_at: ctx.now,
            };
            let out = template_json(&t);
            st.templates.insert(id, t);
            Ok(Reply::created(out))
        }
        Endpoint::TemplatesList(_) => {
            let results: Vec<Value> = st.templates.values().map(template_json).collect();
            Ok(Reply::ok(json!({ "results": results })))
        }
        Endpoint::TemplatesGet(_, id) => id
            .parse::<u64>()
            .ok()
            .and_then(|n| st.templates.get(&n))
            .map(|t| Reply::ok(template_json(t)))
            .ok_or_else(|| template_not_found(id)),
        Endpoint::TemplatesUpdate(_, id) => {
            let input: TemplateIn = parse_body(body)?;
            let t = id
                .parse::<u64>()
                .ok()
                .and_then(|n| st.templates.get_mut(&n))
                .ok_or_else(|| template_not_found(id))?;
            if let Some(tokens) = input.tokens {
                check_tokens(&tokens)?;
                t.tokens = tokens;
            }
            if let Some(n) = input.name.filter(|n| !n.trim().is_empty()) {
                t.name = n;
            }
            if input.header_template.is_some() {
                t.header_template = input.header_template;
            }
            if input.detail_template.is_some() {
                t.detail_template = input.detail_template;
            }
            t.updated_at = ctx.now;
            Ok(Reply::ok(template_json(t)))
        }
        Endpoint::TemplatesDelete(_, id) => {
            let n = id
                .parse::<u64>()
                .ok()
                .filter(|n| st.templates.contains_key(n));
            let Some(n) = n else {
                return Err(template_not_found(id));
            };
            st.templates.remove(&n);
            // Documented: deleting a template deletes its events.
            for p in st.portals.values_mut() {
                p.events.retain(|e| e.template_id != Some(n));
            }
            no_content()
        }
        _ => Err(ApiError::route_not_found(ep.op())),
    }
}

// ---------------------------------------------------------------- v3 events

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V3EventIn {
    event_template_id: Option<Value>,
    id: Option<Value>,
    object_id: Option<Value>,
    email: Option<String>,
    utk: Option<String>,
    timestamp: Option<Value>,
    tokens: Option<Map<String, Value>>,
    extra_data: Option<Value>,
    #[serde(rename = "timelineIFrame")]
    timeline_iframe: Option<Value>,
}

/// Validates and stores one v3 event; returns its JSON or a batch-style error item.
fn v3_one(st: &mut State, ctx: &Ctx, inp: V3EventIn) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::validation(m);
    let tid_str = inp
        .event_template_id
        .as_ref()
        .and_then(id_string)
        .ok_or_else(|| bad("eventTemplateId is required".into()))?;
    let template = tid_str
        .parse::<u64>()
        .ok()
        .and_then(|n| st.templates.get(&n))
        .cloned()
        .ok_or_else(|| {
            bad(format!(
                "Event template {tid_str} does not exist for app {}",
                st.cfg.app_id
            ))
        })?;
    let tokens = string_map(inp.tokens.as_ref(), "token").map_err(bad)?;
    for (k, v) in &tokens {
        let Some(def) = template.tokens.iter().find(|t| &t.name == k) else {
            return Err(bad(format!(
                "Token '{k}' is not defined in event template {}",
                template.id
            )));
        };
        let ok = match def.type_.as_str() {
            "number" => v.trim().parse::<f64>().is_ok(),
            "date" => parse_datetime(v).is_some(),
            "enumeration" => def
                .options
                .as_ref()
                .is_some_and(|o| o.iter().any(|opt| &opt.value == v)),
            _ => true,
        };
        if !ok && !v.is_empty() {
            return Err(bad(format!(
                "Value '{v}' is not valid for {} token '{k}'",
                def.type_
            )));
        }
    }
    let ts = timestamp(inp.timestamp.as_ref(), ctx.now).map_err(bad)?;
    let p = st.portal_mut(ctx.portal)?;
    // Identification priority (documented): objectId > utk > email.
    let object_id = if let Some(oid) = inp.object_id.as_ref().and_then(id_string) {
        oid.parse::<u64>()
            .ok()
            .filter(|n| p.contacts.contains_key(n))
            .ok_or_else(|| bad(format!("Could not find CONTACT object with id {oid}")))?
    } else if inp.utk.is_some() {
        return Err(bad(
            "Identification by utk is not supported by the emulator; use objectId or email".into(),
        ));
    } else if let Some(email) = inp.email.as_deref().filter(|e| !e.trim().is_empty()) {
        if !valid_email(email) {
            return Err(bad(format!("Email address {email} is invalid")));
        }
        match p.find_by_email(email) {
            Some(id) => id,
            None => {
                // Documented: "If there isn't an existing contact, a new contact will be created".
                let id = st.next_contact_id(ctx.portal);
                let p = st.portal_mut(ctx.portal)?;
                let mut props = BTreeMap::new();
                props.insert("email".to_string(), email.trim().to_string());
                p.contacts.insert(
                    id,
                    ContactRec {
                        id,
                        props,
                        created_by: CreatedBy::TimelineEvent,
                        created_at: ctx.now,
                        updated_at: ctx.now,
                    },
                );
                id
            }
        }
    } else {
        return Err(bad("One of objectId, utk or email is required".into()));
    };
    let p = st.portal_mut(ctx.portal)?;
    // objectPropertyName stamps the token value onto the contact property (when it exists).
    for def in &template.tokens {
        let (Some(prop), Some(v)) = (&def.object_property_name, tokens.get(&def.name)) else {
            continue;
        };
        let value = p.prop(prop).and_then(|d| validate_value(d, v).ok());
        if let Some(value) = value {
            // Through `update`: a token may stamp `email`, which the e-mail index must see.
            p.contacts.update(object_id, |c| {
                c.props.insert(prop.clone(), value);
                c.updated_at = ctx.now;
            });
        }
    }
    let id = match inp
        .id
        .as_ref()
        .and_then(id_string)
        .filter(|s| !s.is_empty())
    {
        Some(s) => s,
        None => uuid(),
    };
    let mut extra = Map::new();
    if let Some(e) = inp.email.filter(|e| !e.trim().is_empty()) {
        extra.insert("email".into(), json!(e));
    }
    if let Some(v) = inp.extra_data {
        extra.insert("extraData".into(), v);
    }
    if let Some(v) = inp.timeline_iframe {
        extra.insert("timelineIFrame".into(), v);
    }
    let rec = EventRec {
        event: TimelineEvent {
            id: id.clone(),
            api: EventApi::TimelineV3,
            event_type: template.name.clone(),
            object_id: object_id.to_string(),
            timestamp: ts,
            properties: tokens,
        },
        template_id: Some(template.id),
        extra,
    };
    let out = v3_json(&rec);
    // Last write wins: one event per (template, id).
    match p
        .events
        .iter_mut()
        .find(|e| e.template_id == Some(template.id) && e.event.id == id)
    {
        Some(existing) => *existing = rec,
        None => p.events.push(rec),
    }
    Ok(out)
}

fn v3_json(e: &EventRec) -> Value {
    let mut v = json!({
        "id": e.event.id,
        "eventTemplateId": e.template_id.map(|t| t.to_string()),
        "objectType": "contacts",
        "objectId": e.event.object_id,
        "timestamp": e.event.timestamp,
        "tokens": e.event.properties,
    });
    for (k, x) in &e.extra {
        v[k.as_str()] = x.clone();
    }
    v
}

pub(crate) fn v3_event_single(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: V3EventIn = parse_body(body)?;
    v3_one(st, ctx, input).map(Reply::created)
}

/// 201 when every input was stored, else 207 with one error per failed input
/// (`context.ids` = the input's event id when it had one).
pub(crate) fn v3_event_batch(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    #[derive(Deserialize)]
    struct In {
        inputs: Option<Vec<Value>>,
    }
    let input: In = parse_body(body)?;
    let inputs = input
        .inputs
        .ok_or_else(|| ApiError::validation("inputs is required"))?;
    if inputs.is_empty() {
        return Err(ApiError::validation("inputs must not be empty"));
    }
    if inputs.len() > MAX_V3_EVENTS {
        // GUESS: v3 batch limit is undocumented; legacy v1 allowed 100.
        return Err(ApiError::validation(format!(
            "Too many inputs: {}. A batch accepts at most {MAX_V3_EVENTS} events.",
            inputs.len()
        )));
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for raw in inputs {
        let event_id = raw.get("id").and_then(id_string);
        let outcome = serde_json::from_value::<V3EventIn>(raw)
            .map_err(|e| ApiError::validation(format!("Invalid input: {e}")))
            .and_then(|i| v3_one(st, ctx, i));
        match outcome {
            Ok(v) => results.push(v),
            Err(e) => {
                let msg = e
                    .body
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("invalid input")
                    .to_string();
                let cat = e
                    .body
                    .get("category")
                    .and_then(Value::as_str)
                    .unwrap_or("VALIDATION_ERROR")
                    .to_string();
                let ctx_v = match event_id {
                    Some(id) => json!({ "ids": [id] }),
                    None => json!({}),
                };
                errors.push(batch_error(&cat, msg, ctx_v));
            }
        }
    }
    Ok(batch_reply(StatusCode::CREATED, results, errors, ctx.now))
}
