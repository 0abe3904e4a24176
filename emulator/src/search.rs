//! CRM search on contacts: filterGroups (OR of AND-ed filters), properties, sorts, paging.
//! The search secondly rate limit is enforced in the pipeline (`http.rs`).

use std::cmp::Ordering;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contacts::{contact_json, selection};
use crate::ctx::Ctx;
use crate::errors::{id_string, iso, ApiError, ApiResult, Reply};
use crate::state::{ContactRec, Portal, State};
use crate::values::parse_datetime;

const MAX_LIMIT: usize = 200;
const MAX_RESULTS: usize = 10_000;
const MAX_BODY_CHARS: usize = 3_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SearchIn {
    filter_groups: Option<Vec<FilterGroup>>,
    properties: Option<Vec<String>>,
    limit: Option<Value>,
    after: Option<Value>,
    sorts: Option<Vec<Value>>,
    query: Option<String>,
}

#[derive(Deserialize)]
struct FilterGroup {
    #[serde(default)]
    filters: Vec<Filter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    property_name: String,
    operator: String,
    value: Option<Value>,
    high_value: Option<Value>,
    values: Option<Vec<Value>>,
}

/// A contact's value for `name` as a string (computed properties included).
fn value_of(c: &ContactRec, name: &str) -> Option<String> {
    match name {
        "hs_object_id" => Some(c.id.to_string()),
        "createdate" => Some(iso(c.created_at)),
        "lastmodifieddate" => Some(iso(c.updated_at)),
        // A cleared ("") value counts as no value for filters and sorts.
        _ => c.props.get(name).filter(|v| !v.is_empty()).cloned(),
    }
}

/// Numbers compare numerically; dates/datetimes as epoch ms (filters send epoch ms or ISO).
fn as_number(p: &Portal, name: &str, v: &str) -> Option<f64> {
    let is_time = p
        .prop(name)
        .is_some_and(|d| d.type_ == "datetime" || d.type_ == "date");
    if is_time {
        return parse_datetime(v).map(|t| t.timestamp_millis() as f64);
    }
    v.trim().parse::<f64>().ok()
}

fn compare(p: &Portal, name: &str, a: &str, b: &str) -> Ordering {
    match (as_number(p, name, a), as_number(p, name, b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => a.to_lowercase().cmp(&b.to_lowercase()),
    }
}

fn eq(p: &Portal, name: &str, a: &str, b: &str) -> bool {
    compare(p, name, a, b) == Ordering::Equal
}

fn filter_value(f: &Filter) -> Result<String, ApiError> {
    f.value.as_ref().and_then(id_string).ok_or_else(|| {
        ApiError::validation(format!(
            "Filter on {} with operator {} needs a value",
            f.property_name, f.operator
        ))
    })
}

fn matches(p: &Portal, c: &ContactRec, f: &Filter) -> Result<bool, ApiError> {
    let name = f.property_name.as_str();
    let v = value_of(c, name);
    let list = || -> Result<Vec<String>, ApiError> {
        f.values
            .as_ref()
            .map(|vs| vs.iter().filter_map(id_string).collect())
            .ok_or_else(|| ApiError::validation(format!("Operator {} needs values", f.operator)))
    };
    let ord = |op: &dyn Fn(Ordering) -> bool| -> Result<bool, ApiError> {
        let want = filter_value(f)?;
        Ok(v.as_deref().is_some_and(|x| op(compare(p, name, x, &want))))
    };
    Ok(match f.operator.as_str() {
        "EQ" => {
            let want = filter_value(f)?;
            v.as_deref().is_some_and(|x| eq(p, name, x, &want))
        }
        "NEQ" => {
            let want = filter_value(f)?;
            !v.as_deref().is_some_and(|x| eq(p, name, x, &want))
        }
        "IN" => {
            let l = list()?;
            v.as_deref()
                .is_some_and(|x| l.iter().any(|w| eq(p, name, x, w)))
        }
        "NOT_IN" => {
            let l = list()?;
            !v.as_deref()
                .is_some_and(|x| l.iter().any(|w| eq(p, name, x, w)))
        }
        "HAS_PROPERTY" => v.is_some(),
        "NOT_HAS_PROPERTY" => v.is_none(),
        "CONTAINS_TOKEN" | "NOT_CONTAINS_TOKEN" => {
            let want = filter_value(f)?.to_lowercase();
            let want = want.trim_matches('*');
            let hit = v
                .as_deref()
                .is_some_and(|x| x.to_lowercase().contains(want));
            hit == (f.operator == "CONTAINS_TOKEN")
        }
        "LT" => ord(&|o| o == Ordering::Less)?,
        "LTE" => ord(&|o| o != Ordering::Greater)?,
        "GT" => ord(&|o| o == Ordering::Greater)?,
        "GTE" => ord(&|o| o != Ordering::Less)?,
        "BETWEEN" => {
            let lo = filter_value(f)?;
            let hi = f.high_value.as_ref().and_then(id_string).ok_or_else(|| {
                ApiError::validation("Operator BETWEEN needs highValue".to_string())
            })?;
            v.as_deref().is_some_and(|x| {
                compare(p, name, x, &lo) != Ordering::Less
                    && compare(p, name, x, &hi) != Ordering::Greater
            })
        }
        other => {
            return Err(ApiError::validation(format!(
                "Unsupported filter operator {other}"
            )))
        }
    })
}

fn known_property(p: &Portal, name: &str) -> bool {
    p.prop(name).is_some()
}

/// `(property, descending)` from `[{propertyName, direction}]` or `["-createdate"]`.
fn parse_sort(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some(match s.strip_prefix('-') {
            Some(n) => (n.to_string(), true),
            None => (s.clone(), false),
        }),
        Value::Object(m) => {
            let n = m.get("propertyName")?.as_str()?.to_string();
            let desc = m.get("direction").and_then(Value::as_str) == Some("DESCENDING");
            Some((n, desc))
        }
        _ => None,
    }
}

pub(crate) fn search(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    if String::from_utf8_lossy(body).chars().count() > MAX_BODY_CHARS {
        return Err(ApiError::validation(format!(
            "Search request body exceeds {MAX_BODY_CHARS} characters"
        )));
    }
    let input: SearchIn = crate::errors::parse_body(body)?;
    let groups = input.filter_groups.unwrap_or_default();
    let total_filters: usize = groups.iter().map(|g| g.filters.len()).sum();
    if groups.len() > 5 || groups.iter().any(|g| g.filters.len() > 6) || total_filters > 18 {
        return Err(ApiError::validation(
            "Too many filters: at most 5 filterGroups of 6 filters, 18 filters in total",
        ));
    }
    let limit = match input.limit.as_ref() {
        None => 10,
        Some(v) => id_string(v)
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| ApiError::validation("limit must be a number"))?,
    };
    if limit > MAX_LIMIT {
        return Err(ApiError::validation(format!(
            "limit must be at most {MAX_LIMIT}"
        )));
    }
    let after = match input.after.as_ref() {
        None => 0,
        Some(v) => id_string(v)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .transpose()
            .map_err(|_| ApiError::validation("after must be a paging cursor"))?
            .unwrap_or(0),
    };
    if after.saturating_add(limit) > MAX_RESULTS {
        return Err(ApiError::validation(format!(
            "Paging beyond {MAX_RESULTS} results is not allowed"
        )));
    }
    let names = selection(input.properties.as_deref());
    let p = st.portal_mut(ctx.portal)?;
    for f in groups.iter().flat_map(|g| g.filters.iter()) {
        if !known_property(p, &f.property_name) {
            return Err(ApiError::validation(format!(
                "There was a problem with the request: property {} does not exist",
                f.property_name
            )));
        }
    }
    let query = input.query.map(|q| q.trim().to_lowercase());
    let mut hits: Vec<&ContactRec> = Vec::new();
    for c in p.contacts.values() {
        let mut ok = groups.is_empty();
        for g in &groups {
            let mut all = true;
            for f in &g.filters {
                if !matches(p, c, f)? {
                    all = false;
                    break;
                }
            }
            if all {
                ok = true;
                break;
            }
        }
        if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
            // HubSpot's default text search covers the additional e-mails too (reference §2.5).
            let text = ["email", "hs_additional_emails", "firstname", "lastname"]
                .iter()
                .filter_map(|n| c.props.get(*n))
                .any(|v| v.to_lowercase().contains(q));
            ok = ok && text;
        }
        if ok {
            hits.push(c);
        }
    }
    if let Some((prop, desc)) = input
        .sorts
        .as_ref()
        .and_then(|s| s.first())
        .and_then(parse_sort)
    {
        hits.sort_by(|a, b| {
            let (x, y) = (value_of(a, &prop), value_of(b, &prop));
            let o = match (x.as_deref(), y.as_deref()) {
                (Some(x), Some(y)) => compare(p, &prop, x, y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            if desc {
                o.reverse()
            } else {
                o
            }
        });
    }
    let total = hits.len();
    let page: Vec<Value> = hits
        .iter()
        .skip(after)
        .take(limit)
        .map(|c| contact_json(p, c, &names))
        .collect();
    let mut out = json!({ "total": total, "results": page });
    if after.saturating_add(limit) < total {
        out["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    Ok(Reply::ok(out))
}
