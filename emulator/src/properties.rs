//! Contact property groups and property definitions (Properties API v3 / date-versioned).

use std::collections::HashSet;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ctx::{no_content, Ctx};
use crate::errors::{batch_error, batch_reply, iso, parse_body, ApiError, ApiResult, Reply};
use crate::model::PropertyOption;
use crate::state::{GroupRec, Portal, PropRec, State};

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn group_json(g: &GroupRec) -> Value {
    json!({"name": g.name, "label": g.label, "displayOrder": g.display_order, "archived": g.archived})
}

// ---------------------------------------------------------------- groups

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupIn {
    name: Option<String>,
    label: Option<String>,
    display_order: Option<i32>,
}

pub(crate) fn groups_create(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: GroupIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    let name = input.name.unwrap_or_default();
    if !valid_name(&name) {
        return Err(ApiError::validation(format!(
            "Property group name '{name}' is invalid: use lowercase letters, digits and underscores"
        )));
    }
    let label = input.label.unwrap_or_default();
    if label.trim().is_empty() {
        return Err(ApiError::validation("Property group label is required"));
    }
    if let Some(g) = p.groups.get_mut(&name) {
        if !g.archived {
            // The reference expects 409 OBJECT_ALREADY_EXISTS (UNCONFIRMED category for v3).
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "OBJECT_ALREADY_EXISTS",
                format!("A property group named '{name}' already exists."),
            ));
        }
    }
    let g = GroupRec {
        name: name.clone(),
        label,
        display_order: input.display_order.unwrap_or(-1),
        archived: false,
        builtin: false,
    };
    let out = group_json(&g);
    p.groups.insert(name, g);
    Ok(Reply::created(out))
}

pub(crate) fn groups_list(st: &mut State, ctx: &Ctx) -> ApiResult {
    let p = st.portal_mut(ctx.portal)?;
    let results: Vec<Value> = p
        .groups
        .values()
        .filter(|g| !g.archived)
        .map(group_json)
        .collect();
    Ok(Reply::ok(json!({ "results": results })))
}

fn group_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Unable to find property group with name {name}"))
}

pub(crate) fn groups_read(st: &mut State, ctx: &Ctx, name: &str) -> ApiResult {
    let p = st.portal_mut(ctx.portal)?;
    match p.groups.get(name).filter(|g| !g.archived) {
        Some(g) => Ok(Reply::ok(group_json(g))),
        None => Err(group_not_found(name)),
    }
}

pub(crate) fn groups_update(st: &mut State, ctx: &Ctx, name: &str, body: &[u8]) -> ApiResult {
    let input: GroupIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    let g = p
        .groups
        .get_mut(name)
        .filter(|g| !g.archived)
        .ok_or_else(|| group_not_found(name))?;
    if let Some(l) = input.label {
        if l.trim().is_empty() {
            return Err(ApiError::validation("Property group label cannot be empty"));
        }
        g.label = l;
    }
    if let Some(o) = input.display_order {
        g.display_order = o;
    }
    Ok(Reply::ok(group_json(g)))
}

pub(crate) fn groups_archive(st: &mut State, ctx: &Ctx, name: &str) -> ApiResult {
    let p = st.portal_mut(ctx.portal)?;
    let active = p
        .props
        .values()
        .any(|d| d.group_name == name && !d.archived);
    let g = p
        .groups
        .get_mut(name)
        .filter(|g| !g.archived)
        .ok_or_else(|| group_not_found(name))?;
    if g.builtin {
        return Err(ApiError::validation(format!(
            "Property group {name} is HubSpot defined and cannot be archived"
        )));
    }
    if active {
        // OBSERVED subCategory.
        return Err(ApiError::validation(format!(
            "Property group {name} still contains active properties"
        ))
        .with(
            "subCategory",
            json!("PropertyGroupError.GROUP_WITH_ACTIVE_PROPERTIES"),
        ));
    }
    g.archived = true;
    no_content()
}

// ---------------------------------------------------------------- properties

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OptionIn {
    label: Option<String>,
    value: Option<String>,
    display_order: Option<i32>,
    hidden: Option<bool>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PropIn {
    name: Option<String>,
    label: Option<String>,
    #[serde(rename = "type")]
    type_: Option<String>,
    field_type: Option<String>,
    group_name: Option<String>,
    description: Option<String>,
    display_order: Option<i32>,
    options: Option<Vec<OptionIn>>,
    hidden: Option<bool>,
    form_field: Option<bool>,
    has_unique_value: Option<bool>,
}

/// The type -> fieldType table of the current Properties guide.
fn valid_pair(type_: &str, field_type: &str) -> bool {
    let allowed: &[&str] = match type_ {
        "string" => &[
            "text",
            "textarea",
            "html",
            "phonenumber",
            "file",
            "calculation_equation",
        ],
        "enumeration" => &[
            "select",
            "radio",
            "checkbox",
            "booleancheckbox",
            "calculation_equation",
        ],
        "date" | "datetime" => &["date"],
        "number" => &["number", "calculation_equation"],
        "bool" => &["booleancheckbox", "calculation_equation"],
        _ => &[],
    };
    allowed.contains(&field_type)
}

/// The older v3 guide spelled the type `dateTime`.
fn normalize_type(t: &str) -> String {
    if t == "dateTime" {
        "datetime".into()
    } else {
        t.to_string()
    }
}

fn convert_options(opts: &[OptionIn]) -> Result<Vec<PropertyOption>, ApiError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, o) in opts.iter().enumerate() {
        let label = o.label.clone().unwrap_or_default();
        let value = o.value.clone().unwrap_or_default();
        if label.is_empty() || value.is_empty() {
            return Err(ApiError::validation(format!(
                "Option {i} needs a non-empty label and value"
            )));
        }
        if !seen.insert(value.clone()) {
            return Err(ApiError::validation(format!(
                "Duplicate option value '{value}'"
            )));
        }
        out.push(PropertyOption {
            label,
            value,
            display_order: o.display_order.unwrap_or(i as i32),
            hidden: o.hidden.unwrap_or(false),
        });
    }
    Ok(out)
}

fn check_definition(
    p: &Portal,
    type_: &str,
    field_type: &str,
    group: &str,
    options: &[PropertyOption],
) -> Result<(), ApiError> {
    if p.groups.get(group).is_none_or(|g| g.archived) {
        return Err(ApiError::validation(format!(
            "Property group '{group}' does not exist"
        )));
    }
    if !valid_pair(type_, field_type) {
        return Err(ApiError::validation(format!(
            "Invalid combination of type '{type_}' and fieldType '{field_type}'"
        )));
    }
    if type_ == "enumeration" && field_type != "calculation_equation" && options.is_empty() {
        return Err(ApiError::validation(
            "Enumeration properties need at least one option",
        ));
    }
    Ok(())
}

/// Validates a create input into a definition (no duplicate check).
fn build(p: &Portal, input: &PropIn, now: DateTime<Utc>) -> Result<PropRec, ApiError> {
    let mut missing = Vec::new();
    let req = |v: &Option<String>, n: &'static str, missing: &mut Vec<&'static str>| match v
        .as_deref()
        .map(str::trim)
    {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => {
            missing.push(n);
            String::new()
        }
    };
    let name = req(&input.name, "name", &mut missing);
    let label = req(&input.label, "label", &mut missing);
    let type_ = normalize_type(&req(&input.type_, "type", &mut missing));
    let field_type = req(&input.field_type, "fieldType", &mut missing);
    let group = req(&input.group_name, "groupName", &mut missing);
    if !missing.is_empty() {
        return Err(ApiError::validation(format!(
            "Missing required field(s): {}",
            missing.join(", ")
        )));
    }
    if !valid_name(&name) {
        return Err(ApiError::validation(format!(
            "Property name '{name}' is invalid: use lowercase letters, digits and underscores"
        )));
    }
    let options = convert_options(input.options.as_deref().unwrap_or(&[]))?;
    check_definition(p, &type_, &field_type, &group, &options)?;
    Ok(PropRec {
        name,
        label,
        type_,
        field_type,
        group_name: group,
        description: input.description.clone().unwrap_or_default(),
        options,
        display_order: input.display_order.unwrap_or(-1),
        hidden: input.hidden.unwrap_or(false),
        form_field: input.form_field.unwrap_or(false),
        has_unique_value: input.has_unique_value.unwrap_or(false),
        builtin: false,
        read_only_value: false,
        archived: false,
        created_at: now,
        updated_at: now,
    })
}

pub(crate) fn prop_json(d: &PropRec) -> Value {
    let options: Vec<Value> = d
        .options
        .iter()
        .map(|o| json!({"label": o.label, "value": o.value, "displayOrder": o.display_order, "hidden": o.hidden}))
        .collect();
    json!({
        "name": d.name,
        "label": d.label,
        "type": d.type_,
        "fieldType": d.field_type,
        "description": d.description,
        "groupName": d.group_name,
        "options": options,
        "displayOrder": d.display_order,
        "calculated": d.field_type == "calculation_equation",
        "externalOptions": false,
        "hasUniqueValue": d.has_unique_value,
        "hidden": d.hidden,
        "hubspotDefined": d.builtin,
        "modificationMetadata": {
            "archivable": !d.builtin,
            "readOnlyDefinition": d.builtin,
            "readOnlyValue": d.read_only_value,
        },
        "formField": d.form_field,
        "createdAt": iso(d.created_at),
        "updatedAt": iso(d.updated_at),
        "archived": d.archived,
    })
}

/// OBSERVED shape of the duplicate-name conflict.
fn exists_error(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "OBJECT_ALREADY_EXISTS",
        format!("A property named '{name}' already exists."),
    )
    .with("subCategory", json!("Properties.PROPERTY_WITH_NAME_EXISTS"))
}

/// Creates one definition; an archived property of that name is restored (OBSERVED).
fn create_one(p: &mut Portal, input: &PropIn, now: DateTime<Utc>) -> Result<Value, ApiError> {
    let rec = build(p, input, now)?;
    if p.props.get(&rec.name).is_some_and(|d| !d.archived) {
        return Err(exists_error(&rec.name));
    }
    let out = prop_json(&rec);
    p.props.insert(rec.name.clone(), rec);
    Ok(out)
}

pub(crate) fn create(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: PropIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    create_one(p, &input, ctx.now).map(Reply::created)
}

fn want_archived(ctx: &Ctx) -> bool {
    ctx.q("archived") == Some("true")
}

pub(crate) fn list(st: &mut State, ctx: &Ctx) -> ApiResult {
    let archived = want_archived(ctx);
    let p = st.portal_mut(ctx.portal)?;
    let results: Vec<Value> = p
        .props
        .values()
        .filter(|d| d.archived == archived)
        .map(prop_json)
        .collect();
    Ok(Reply::ok(json!({ "results": results })))
}

fn prop_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Unable to find property with name {name}"))
}

pub(crate) fn read(st: &mut State, ctx: &Ctx, name: &str) -> ApiResult {
    let archived = want_archived(ctx);
    let p = st.portal_mut(ctx.portal)?;
    match p.props.get(name).filter(|d| d.archived == archived) {
        Some(d) => Ok(Reply::ok(prop_json(d))),
        None => Err(prop_not_found(name)),
    }
}

/// PATCH: `options`, when sent, replace the whole list (documented).
pub(crate) fn update(st: &mut State, ctx: &Ctx, name: &str, body: &[u8]) -> ApiResult {
    let input: PropIn = parse_body(body)?;
    let p = st.portal_mut(ctx.portal)?;
    let current = p
        .props
        .get(name)
        .filter(|d| !d.archived)
        .ok_or_else(|| prop_not_found(name))?;
    if current.builtin {
        return Err(ApiError::validation(format!(
            "Property {name} is HubSpot defined; its definition is read only in the emulator"
        )));
    }
    let mut d = current.clone();
    if let Some(l) = &input.label {
        if l.trim().is_empty() {
            return Err(ApiError::validation("label cannot be empty"));
        }
        d.label = l.clone();
    }
    if let Some(v) = &input.description {
        d.description = v.clone();
    }
    if let Some(v) = &input.group_name {
        d.group_name = v.clone();
    }
    if let Some(v) = &input.type_ {
        d.type_ = normalize_type(v);
    }
    if let Some(v) = &input.field_type {
        d.field_type = v.clone();
    }
    if let Some(o) = &input.options {
        d.options = convert_options(o)?;
    }
    if let Some(v) = input.display_order {
        d.display_order = v;
    }
    if let Some(v) = input.hidden {
        d.hidden = v;
    }
    if let Some(v) = input.form_field {
        d.form_field = v;
    }
    check_definition(p, &d.type_, &d.field_type, &d.group_name, &d.options)?;
    d.updated_at = ctx.now;
    let out = prop_json(&d);
    p.props.insert(d.name.clone(), d);
    Ok(Reply::ok(out))
}

pub(crate) fn archive(st: &mut State, ctx: &Ctx, name: &str) -> ApiResult {
    let p = st.portal_mut(ctx.portal)?;
    let d = p
        .props
        .get_mut(name)
        .filter(|d| !d.archived)
        .ok_or_else(|| prop_not_found(name))?;
    if d.builtin {
        return Err(ApiError::validation(format!(
            "Property {name} is HubSpot defined and cannot be archived"
        )));
    }
    d.archived = true;
    d.updated_at = ctx.now;
    no_content()
}

#[derive(Deserialize)]
struct BatchIn<T> {
    inputs: Option<Vec<T>>,
}

#[derive(Deserialize)]
struct NameIn {
    name: Option<String>,
}

fn inputs<T>(b: BatchIn<T>) -> Result<Vec<T>, ApiError> {
    b.inputs
        .ok_or_else(|| ApiError::validation("inputs is required"))
}

/// 201 when all were created, 207 with one error per failed input (GUESS for duplicates: the
/// reference expects, UNCONFIRMED, a 207 item rather than a whole-request 409).
pub(crate) fn batch_create(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let list: Vec<PropIn> = inputs(parse_body(body)?)?;
    let p = st.portal_mut(ctx.portal)?;
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for input in &list {
        match create_one(p, input, ctx.now) {
            Ok(v) => results.push(v),
            Err(e) => {
                let mut item = e.body;
                item["context"] = json!({"name": [input.name.clone().unwrap_or_default()]});
                errors.push(item);
            }
        }
    }
    Ok(batch_reply(StatusCode::CREATED, results, errors, ctx.now))
}

/// 200 when all were found, else 207 with one OBJECT_NOT_FOUND error per missing name (GUESS:
/// per-name errors; the exact grouping is undocumented).
pub(crate) fn batch_read(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    #[derive(Deserialize)]
    struct In {
        archived: Option<bool>,
        inputs: Option<Vec<NameIn>>,
    }
    let input: In = parse_body(body)?;
    let archived = input.archived.unwrap_or(false);
    let names = input
        .inputs
        .ok_or_else(|| ApiError::validation("inputs is required"))?;
    let p = st.portal_mut(ctx.portal)?;
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for n in names {
        let name = n.name.unwrap_or_default();
        match p.props.get(&name).filter(|d| d.archived == archived) {
            Some(d) => results.push(prop_json(d)),
            None => errors.push(batch_error(
                "OBJECT_NOT_FOUND",
                format!("Unable to find property with name {name}"),
                json!({"name": [name]}),
            )),
        }
    }
    Ok(batch_reply(StatusCode::OK, results, errors, ctx.now))
}

/// Documented: 204 even for already archived or non-existent names.
pub(crate) fn batch_archive(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let names: Vec<NameIn> = inputs(parse_body(body)?)?;
    let p = st.portal_mut(ctx.portal)?;
    for n in names {
        if let Some(d) = n
            .name
            .and_then(|name| p.props.get_mut(&name))
            .filter(|d| !d.builtin)
        {
            d.archived = true;
            d.updated_at = ctx.now;
        }
    }
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}
