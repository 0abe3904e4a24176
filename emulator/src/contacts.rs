//! Contacts: batch read / update / create / upsert, single create / get / update, list.
//!
//! Reads by record id follow merges (an old id answers the merged record under its new id);
//! writes by record id do not (OBJECT_NOT_FOUND, like an id that never existed). Lookups by
//! `idProperty=email` match the primary e-mail only, while creates and e-mail changes conflict
//! with primary and additional e-mails alike (both are unique at HubSpot). Merges, deletions
//! and privacy deletions themselves live in `lifecycle`.
//!
//! Batch error policy (documented choices):
//! * batch update and batch create: when *every* failing input carries an `objectWriteTraceId`,
//!   the valid inputs are written and the failures come back one by one in a 207 (documented by
//!   HubSpot for create; applied to update by analogy). Otherwise one invalid input fails the whole
//!   batch: 400 VALIDATION_ERROR whose `errors[]` has one element per bad value with
//!   `context.id` (update) or `context.index` (create), `context.propertyName` and, if sent,
//!   `context.objectWriteTraceId`; the top-level `context.ids` lists the failing record ids.
//! * batch upsert by email is all-or-nothing ("partial upserts are not supported when using email
//!   as the idProperty", read as all-or-nothing: UNCONFIRMED).

use std::collections::{HashMap, HashSet};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::ctx::Ctx;
use crate::errors::{
    batch_error, batch_reply, id_string, iso, parse_body, property_values_error,
    property_values_message, ApiError, ApiResult, Reply, ValueError,
};
use crate::model::CreatedBy;
use crate::state::{ContactRec, Portal, State};
use crate::values::{valid_email, validate_properties};

pub(crate) const MAX_BATCH: usize = 100;

/// What HubSpot returns when no `properties` are requested.
const DEFAULT_PROPS: [&str; 6] = [
    "createdate",
    "email",
    "firstname",
    "hs_object_id",
    "lastmodifieddate",
    "lastname",
];
/// Always returned alongside requested properties.
const ALWAYS_PROPS: [&str; 3] = ["createdate", "hs_object_id", "lastmodifieddate"];

const NOT_FOUND_MSG: &str =
    "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.";

/// Property names to return: the defaults, or the requested ones plus the always-present ones.
pub(crate) fn selection(requested: Option<&[String]>) -> Vec<String> {
    match requested {
        Some(list) if !list.is_empty() => {
            let mut out: Vec<String> = Vec::new();
            for n in list.iter().map(String::as_str).chain(ALWAYS_PROPS) {
                if !out.iter().any(|o| o == n) {
                    out.push(n.to_string());
                }
            }
            out
        }
        _ => DEFAULT_PROPS.iter().map(|s| s.to_string()).collect(),
    }
}

fn prop_value(c: &ContactRec, name: &str) -> Value {
    match name {
        "hs_object_id" => json!(c.id.to_string()),
        "createdate" => json!(iso(c.created_at)),
        "lastmodifieddate" => json!(iso(c.updated_at)),
        _ => c.props.get(name).map_or(Value::Null, |v| json!(v)),
    }
}

/// The SimplePublicObject shape. Unknown names are skipped; known but unset ones are `null`.
pub(crate) fn contact_json(p: &Portal, c: &ContactRec, names: &[String]) -> Value {
    let mut props = Map::new();
    for n in names {
        if p.prop(n).is_some() || c.props.contains_key(n) {
            props.insert(n.clone(), prop_value(c, n));
        }
    }
    json!({
        "id": c.id.to_string(),
        "properties": props,
        "createdAt": iso(c.created_at),
        "updatedAt": iso(c.updated_at),
        "archived": false,
    })
}

/// Names echoed after a write: what was written plus the always-present ones.
fn written_names(values: &[(String, String)]) -> Vec<String> {
    let names: Vec<String> = values.iter().map(|(k, _)| k.clone()).collect();
    selection(Some(&names))
}

/// Writes values; `""` is stored as an empty value (the property is cleared, and reads return
/// `""`), so that "cleared" and "never set" (absent / `null`) stay distinguishable for tests.
fn apply(c: &mut ContactRec, values: &[(String, String)], now: DateTime<Utc>) {
    for (k, v) in values {
        c.props.insert(k.clone(), v.clone());
    }
    c.updated_at = now;
}

fn new_contact(
    st: &mut State,
    ctx: &Ctx,
    values: &[(String, String)],
    by: CreatedBy,
) -> Result<u64, ApiError> {
    let id = st.next_contact_id(ctx.portal);
    let p = st.portal_mut(ctx.portal)?;
    let mut c = ContactRec {
        id,
        props: Default::default(),
        created_by: by,
        created_at: ctx.now,
        updated_at: ctx.now,
    };
    apply(&mut c, values, ctx.now);
    p.contacts.insert(id, c);
    Ok(id)
}

fn email_of(values: &[(String, String)]) -> Option<&str> {
    values
        .iter()
        .find(|(k, v)| k == "email" && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

fn has_identity(values: &[(String, String)]) -> bool {
    values
        .iter()
        .any(|(k, v)| matches!(k.as_str(), "email" | "firstname" | "lastname") && !v.is_empty())
}

fn identity_error() -> ValueError {
    // GUESS: code/message for a create without email, firstname or lastname.
    ValueError::new(
        "email",
        "MISSING_REQUIRED_PROPERTY",
        "A contact needs at least one of the properties email, firstname or lastname",
    )
}

fn exists_message(id: u64) -> String {
    format!("Contact already exists. Existing ID: {id}")
}

fn too_many(n: usize, max: usize) -> ApiError {
    // GUESS: wording of the batch-size error.
    ApiError::validation(format!(
        "Too many inputs: {n}. A batch accepts at most {max} inputs."
    ))
}

fn required_inputs<T>(inputs: Option<Vec<T>>) -> Result<Vec<T>, ApiError> {
    let v = inputs.ok_or_else(|| ApiError::validation("inputs is required"))?;
    if v.len() > MAX_BATCH {
        return Err(too_many(v.len(), MAX_BATCH));
    }
    Ok(v)
}

fn non_unique_error() -> ApiError {
    // OBSERVED (hubspot-api-nodejs#548).
    ApiError::validation("Unable to perform update/upsert by non-unique 0-1 property")
}

fn duplicate_ids(ids: &[String], fold_case: bool) -> Option<ApiError> {
    let mut seen = HashSet::new();
    let mut dups = Vec::new();
    for id in ids {
        let key = if fold_case {
            id.trim().to_lowercase()
        } else {
            id.clone()
        };
        if !seen.insert(key) && !dups.contains(id) {
            dups.push(id.clone());
        }
    }
    // Remembered from HubSpot's answers, not from the reference: GUESS on the exact wording.
    (!dups.is_empty()).then(|| {
        ApiError::validation(format!(
            "Duplicate IDs found in batch input: [{}]. IDs must be unique",
            dups.join(", ")
        ))
    })
}

// ---------------------------------------------------------------- batch read

#[derive(Deserialize)]
struct IdIn {
    id: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchReadIn {
    id_property: Option<String>,
    properties: Option<Vec<String>>,
    inputs: Option<Vec<IdIn>>,
}

/// Resolves an input id for a write: by primary email (trimmed, case-insensitive) or by the
/// id of a live record. A merged-away or deleted id resolves to nothing (OBJECT_NOT_FOUND).
fn lookup(p: &Portal, id: &str, by_email: bool) -> Option<u64> {
    if by_email {
        p.find_by_email(id)
    } else {
        id.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| p.contacts.contains_key(n))
    }
}

/// Resolves an input id for a read: like [`lookup`], except that a merged-away id answers the
/// record it was merged into ("fetching any records using the original IDs will return the
/// new merged record with the new ID"). Additional e-mails are not matched (UNCONFIRMED
/// either way; the reference says plan for "no").
fn lookup_read(p: &Portal, id: &str, by_email: bool) -> Option<u64> {
    if by_email {
        p.find_by_email(id)
    } else {
        id.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| p.resolve_read(n))
    }
}

fn id_mode(id_property: Option<&str>) -> Result<bool, ApiError> {
    match id_property {
        None => Ok(false),
        Some(s) if s.eq_ignore_ascii_case("hs_object_id") || s.is_empty() => Ok(false),
        Some(s) if s.eq_ignore_ascii_case("email") => Ok(true),
        Some(s) => Err(ApiError::validation(format!(
            "{s} is not a unique identifier property of contacts"
        ))),
    }
}

pub(crate) fn batch_read(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: BatchReadIn = parse_body(body)?;
    let list = required_inputs(input.inputs)?;
    let by_email = id_mode(input.id_property.as_deref())?;
    let names = selection(input.properties.as_deref());
    let p = st.portal_mut(ctx.portal)?;
    let mut results = Vec::new();
    let mut seen = HashSet::new();
    let mut missing = Vec::new();
    for i in &list {
        let id = i.id.as_ref().and_then(id_string).unwrap_or_default();
        match lookup_read(p, &id, by_email) {
            Some(rid) => {
                if seen.insert(rid) {
                    if let Some(c) = p.contacts.get(&rid) {
                        results.push(contact_json(p, c, &names));
                    }
                }
            }
            None => missing.push(id),
        }
    }
    let errors = if missing.is_empty() {
        Vec::new()
    } else {
        vec![batch_error(
            "OBJECT_NOT_FOUND",
            NOT_FOUND_MSG,
            json!({ "ids": missing }),
        )]
    };
    Ok(batch_reply(StatusCode::OK, results, errors, ctx.now))
}

// ---------------------------------------------------------------- batch update

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriteIn {
    id: Option<Value>,
    id_property: Option<String>,
    properties: Option<Map<String, Value>>,
    object_write_trace_id: Option<String>,
}

#[derive(Deserialize)]
struct Batch<T> {
    inputs: Option<Vec<T>>,
}

/// Result of checking one write input.
struct Checked {
    id: String,
    trace: Option<String>,
    values: Vec<(String, String)>,
    errs: Vec<ValueError>,
    /// Record id already holding the email this input wants.
    conflict: Option<u64>,
}

impl Checked {
    fn failed(&self) -> bool {
        !self.errs.is_empty() || self.conflict.is_some()
    }

    fn context(&self, key: &str) -> Value {
        let mut m = Map::new();
        m.insert(key.into(), json!([self.id]));
        if let Some(t) = &self.trace {
            m.insert("objectWriteTraceId".into(), json!([t]));
        }
        Value::Object(m)
    }

    /// This input's element of a 207's `errors[]`.
    fn item(&self, ctx_key: &str) -> Value {
        if !self.errs.is_empty() {
            let mut v = batch_error(
                "VALIDATION_ERROR",
                property_values_message(&self.errs),
                self.context(ctx_key),
            );
            v["errors"] = Value::Array(self.errs.iter().map(|e| e.detail_json(&[])).collect());
            v
        } else {
            batch_error(
                "CONFLICT",
                exists_message(self.conflict.unwrap_or_default()),
                self.context(ctx_key),
            )
        }
    }
}

/// The whole-batch failure: 400 for invalid values, else 409 for an email conflict.
fn whole_batch_error(checked: &[Checked], ctx_key: &str) -> ApiError {
    let bad: Vec<&Checked> = checked.iter().filter(|c| !c.errs.is_empty()).collect();
    if bad.is_empty() {
        let first = checked.iter().find(|c| c.conflict.is_some());
        let id = first.and_then(|c| c.conflict).unwrap_or_default();
        let ids: Vec<&String> = checked
            .iter()
            .filter(|c| c.conflict.is_some())
            .map(|c| &c.id)
            .collect();
        return ApiError::conflict(exists_message(id)).with("context", json!({ "ids": ids }));
    }
    let all: Vec<ValueError> = bad.iter().flat_map(|c| c.errs.iter().cloned()).collect();
    let details: Vec<Value> = bad
        .iter()
        .flat_map(|c| {
            let mut extra = vec![(ctx_key, c.id.clone())];
            if let Some(t) = &c.trace {
                extra.push(("objectWriteTraceId", t.clone()));
            }
            c.errs
                .iter()
                .map(|e| e.detail_json(&extra))
                .collect::<Vec<_>>()
        })
        .collect();
    let ids: Vec<&String> = bad.iter().map(|c| &c.id).collect();
    let ctx = if ctx_key == "id" {
        json!({ "ids": ids })
    } else {
        json!({ "index": ids })
    };
    ApiError::validation(property_values_message(&all))
        .with("errors", Value::Array(details))
        .with("context", ctx)
}

/// True when the failures must fail the whole batch (some failing input has no trace id).
fn fails_whole(checked: &[Checked]) -> bool {
    checked.iter().any(|c| c.failed() && c.trace.is_none())
}

pub(crate) fn batch_update(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let b: Batch<WriteIn> = parse_body(body)?;
    let list = required_inputs(b.inputs)?;
    if list.iter().any(|i| {
        i.id_property
            .as_deref()
            .is_some_and(|p| !p.eq_ignore_ascii_case("hs_object_id"))
    }) {
        return Err(non_unique_error());
    }
    let ids: Vec<String> = list
        .iter()
        .map(|i| i.id.as_ref().and_then(id_string).unwrap_or_default())
        .collect();
    if let Some(e) = duplicate_ids(&ids, false) {
        return Err(e);
    }
    let p = st.portal_mut(ctx.portal)?;
    let mut claimed: HashMap<String, u64> = HashMap::new();
    let mut checked = Vec::new();
    for (i, id) in list.iter().zip(ids) {
        let rid = lookup(p, &id, false);
        let mut c = Checked {
            id,
            trace: i.object_write_trace_id.clone(),
            values: Vec::new(),
            errs: Vec::new(),
            conflict: None,
        };
        match validate_properties(p, &i.properties.clone().unwrap_or_default()) {
            Ok(v) => c.values = v,
            Err(e) => c.errs = e,
        }
        if let Some(email) = email_of(&c.values) {
            let key = email.trim().to_lowercase();
            let holder = p
                .find_by_any_email(email)
                .or_else(|| claimed.get(&key).copied());
            match holder {
                Some(h) if Some(h) != rid => c.conflict = Some(h),
                _ => {
                    if let Some(r) = rid {
                        claimed.insert(key, r);
                    }
                }
            }
        }
        checked.push(c);
    }
    if fails_whole(&checked) {
        return Err(whole_batch_error(&checked, "id"));
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let mut missing = Vec::new();
    let mut missing_traces = Vec::new();
    for c in &checked {
        if c.failed() {
            errors.push(c.item("ids"));
            continue;
        }
        let Some(rid) = lookup(p, &c.id, false) else {
            missing.push(c.id.clone());
            if let Some(t) = &c.trace {
                missing_traces.push(t.clone());
            }
            continue;
        };
        p.contacts.update(rid, |rec| apply(rec, &c.values, ctx.now));
        if let Some(rec) = p.contacts.get(&rid) {
            results.push(contact_json(p, rec, &written_names(&c.values)));
        }
    }
    if !missing.is_empty() {
        let mut context = json!({ "ids": missing });
        if !missing_traces.is_empty() {
            context["objectWriteTraceId"] = json!(missing_traces);
        }
        errors.push(batch_error("OBJECT_NOT_FOUND", NOT_FOUND_MSG, context));
    }
    Ok(batch_reply(StatusCode::OK, results, errors, ctx.now))
}

// ---------------------------------------------------------------- batch create

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateIn {
    properties: Option<Map<String, Value>>,
    object_write_trace_id: Option<String>,
    // Accepted and ignored: the emulator models no other objects to associate with.
    #[allow(dead_code)]
    associations: Option<Value>,
}

pub(crate) fn batch_create(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let b: Batch<CreateIn> = parse_body(body)?;
    let list = required_inputs(b.inputs)?;
    let p = st.portal_mut(ctx.portal)?;
    // Emails claimed by earlier valid inputs of this batch -> their input index.
    let mut claimed: HashMap<String, usize> = HashMap::new();
    let mut in_batch_dup: HashMap<usize, usize> = HashMap::new();
    let mut checked = Vec::new();
    for (idx, i) in list.iter().enumerate() {
        let mut c = Checked {
            id: idx.to_string(),
            trace: i.object_write_trace_id.clone(),
            values: Vec::new(),
            errs: Vec::new(),
            conflict: None,
        };
        match validate_properties(p, &i.properties.clone().unwrap_or_default()) {
            Ok(v) => c.values = v,
            Err(e) => c.errs = e,
        }
        if c.errs.is_empty() && !has_identity(&c.values) {
            c.errs.push(identity_error());
        }
        if c.errs.is_empty() {
            if let Some(email) = email_of(&c.values) {
                let key = email.trim().to_lowercase();
                if let Some(existing) = p.find_by_any_email(email) {
                    c.conflict = Some(existing);
                } else if let Some(&earlier) = claimed.get(&key) {
                    in_batch_dup.insert(idx, earlier);
                } else {
                    claimed.insert(key, idx);
                }
            }
        }
        checked.push(c);
    }
    let whole = checked
        .iter()
        .enumerate()
        .any(|(i, c)| (c.failed() || in_batch_dup.contains_key(&i)) && c.trace.is_none());
    if whole {
        if checked.iter().any(Checked::failed) {
            return Err(whole_batch_error(&checked, "index"));
        }
        let emails: Vec<&str> = in_batch_dup
            .keys()
            .filter_map(|i| checked.get(*i).and_then(|c| email_of(&c.values)))
            .collect();
        // GUESS: HubSpot's answer to the same new email twice in one batch.
        return Err(ApiError::validation(format!(
            "Duplicate emails found in batch input: [{}]",
            emails.join(", ")
        )));
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let mut created: HashMap<usize, u64> = HashMap::new();
    for (idx, c) in checked.iter_mut().enumerate() {
        if let Some(earlier) = in_batch_dup.get(&idx) {
            c.conflict = created.get(earlier).copied();
        }
        if c.failed() {
            errors.push(c.item("objectWriteTraceId"));
            continue;
        }
        let id = new_contact(st, ctx, &c.values, CreatedBy::Api)?;
        created.insert(idx, id);
        let p = st.portal_mut(ctx.portal)?;
        if let Some(rec) = p.contacts.get(&id) {
            let mut v = contact_json(p, rec, &written_names(&c.values));
            if let Some(t) = &c.trace {
                v["objectWriteTraceId"] = json!(t);
            }
            results.push(v);
        }
    }
    // Per-input errors are keyed by objectWriteTraceId only (HubSpot's documented shape).
    for e in errors.iter_mut() {
        if let Some(ctx) = e.get_mut("context").and_then(Value::as_object_mut) {
            ctx.retain(|k, _| k == "objectWriteTraceId");
        }
    }
    Ok(batch_reply(StatusCode::CREATED, results, errors, ctx.now))
}

// ---------------------------------------------------------------- batch upsert

pub(crate) fn batch_upsert(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let b: Batch<WriteIn> = parse_body(body)?;
    let list = required_inputs(b.inputs)?;
    if list.iter().any(|i| {
        !i.id_property
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("email"))
    }) {
        return Err(non_unique_error());
    }
    let ids: Vec<String> = list
        .iter()
        .map(|i| {
            i.id.as_ref()
                .and_then(id_string)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    if let Some(e) = duplicate_ids(&ids, true) {
        return Err(e);
    }
    let p = st.portal_mut(ctx.portal)?;
    let mut checked = Vec::new();
    for (i, id) in list.iter().zip(ids) {
        let mut c = Checked {
            id: id.clone(),
            trace: i.object_write_trace_id.clone(),
            values: Vec::new(),
            errs: Vec::new(),
            conflict: None,
        };
        if !valid_email(&id) {
            c.errs.push(ValueError::new(
                "email",
                "INVALID_EMAIL",
                format!("Email address {id} is invalid"),
            ));
        }
        match validate_properties(p, &i.properties.clone().unwrap_or_default()) {
            Ok(v) => c.values = v,
            Err(e) => c.errs.extend(e),
        }
        if let Some(e) = email_of(&c.values) {
            if !e.trim().eq_ignore_ascii_case(&id) {
                // GUESS: the emulator refuses an email property that contradicts the id.
                c.errs.push(ValueError::new(
                    "email",
                    "INVALID_EMAIL",
                    format!("properties.email {e} does not match the input id {id}"),
                ));
            }
        }
        c.values.retain(|(k, _)| k != "email");
        // An e-mail held as another contact's additional e-mail is not matched (see
        // `lookup_read`) and cannot be created again either (additional e-mails are unique).
        if c.errs.is_empty() && p.find_by_email(&id).is_none() {
            c.conflict = p.find_by_any_email(&id);
        }
        checked.push(c);
    }
    if checked.iter().any(Checked::failed) {
        // All-or-nothing, whatever the objectWriteTraceIds.
        return Err(whole_batch_error(&checked, "id"));
    }
    let mut results = Vec::new();
    for c in &checked {
        let existing = st.portal_mut(ctx.portal)?.find_by_email(&c.id);
        let (rid, is_new) = match existing {
            Some(rid) => {
                let p = st.portal_mut(ctx.portal)?;
                p.contacts.update(rid, |rec| apply(rec, &c.values, ctx.now));
                (rid, false)
            }
            None => {
                let mut values = vec![("email".to_string(), c.id.clone())];
                values.extend(c.values.iter().cloned());
                (new_contact(st, ctx, &values, CreatedBy::Api)?, true)
            }
        };
        let p = st.portal_mut(ctx.portal)?;
        if let Some(rec) = p.contacts.get(&rid) {
            let mut names = written_names(&c.values);
            names.push("email".into());
            let mut v = contact_json(p, rec, &names);
            v["new"] = json!(is_new);
            if let Some(t) = &c.trace {
                v["objectWriteTraceId"] = json!(t);
            }
            results.push(v);
        }
    }
    Ok(batch_reply(StatusCode::OK, results, Vec::new(), ctx.now))
}

// ---------------------------------------------------------------- single object

#[derive(Deserialize)]
struct SingleIn {
    properties: Option<Map<String, Value>>,
}

fn not_found() -> ApiError {
    ApiError::not_found("Object not found.  objectId are usually numeric.")
}

/// `{id}` with `?idProperty=email` support; `read` follows merges (see `lookup_read`).
fn resolve_path_id(p: &Portal, ctx: &Ctx, id: &str, read: bool) -> Result<u64, ApiError> {
    let by_email = id_mode(ctx.q("idProperty"))?;
    let found = if read {
        lookup_read(p, id, by_email)
    } else {
        lookup(p, id, by_email)
    };
    found.ok_or_else(not_found)
}

pub(crate) fn create(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: SingleIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    let values = validate_properties(p, &input.properties.unwrap_or_default())
        .map_err(|e| property_values_error(&e))?;
    if !has_identity(&values) {
        return Err(property_values_error(&[identity_error()]));
    }
    if let Some(existing) = email_of(&values).and_then(|e| p.find_by_any_email(e)) {
        return Err(ApiError::conflict(exists_message(existing)));
    }
    let id = new_contact(st, ctx, &values, CreatedBy::Api)?;
    let p = st.portal_mut(ctx.portal)?;
    let rec = p.contacts.get(&id).ok_or_else(not_found)?;
    Ok(Reply::created(contact_json(
        p,
        rec,
        &written_names(&values),
    )))
}

pub(crate) fn get(st: &mut State, ctx: &Ctx, id: &str) -> ApiResult {
    let names = selection(Some(&ctx.q_list("properties")));
    let p = st.portal_mut(ctx.portal)?;
    let rid = resolve_path_id(p, ctx, id, true)?;
    let rec = p.contacts.get(&rid).ok_or_else(not_found)?;
    Ok(Reply::ok(contact_json(p, rec, &names)))
}

pub(crate) fn update(st: &mut State, ctx: &Ctx, id: &str, body: &[u8]) -> ApiResult {
    let input: SingleIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    let rid = resolve_path_id(p, ctx, id, false)?;
    let values = validate_properties(p, &input.properties.unwrap_or_default())
        .map_err(|e| property_values_error(&e))?;
    if let Some(holder) = email_of(&values).and_then(|e| p.find_by_any_email(e)) {
        if holder != rid {
            return Err(ApiError::conflict(exists_message(holder)));
        }
    }
    p.contacts
        .update(rid, |rec| apply(rec, &values, ctx.now))
        .ok_or_else(not_found)?;
    let rec = p.contacts.get(&rid).ok_or_else(not_found)?;
    Ok(Reply::ok(contact_json(p, rec, &written_names(&values))))
}

/// `GET .../contacts?limit&after&properties`; `after` is a record-id cursor.
pub(crate) fn list(st: &mut State, ctx: &Ctx) -> ApiResult {
    let names = selection(Some(&ctx.q_list("properties")));
    let limit = ctx
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let after = ctx
        .q("after")
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(0);
    let p = st.portal_mut(ctx.portal)?;
    let mut page: Vec<&ContactRec> = p.contacts.range(after..).map(|(_, c)| c).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let results: Vec<Value> = page.iter().map(|c| contact_json(p, c, &names)).collect();
    let mut out = json!({ "results": results });
    if more {
        if let Some(last) = page.last() {
            out["paging"] = json!({"next": {"after": (last.id + 1).to_string()}});
        }
    }
    Ok(Reply::ok(out))
}
