//! The MeltingSpot property group and its ten contact properties (SPEC §3),
//! and how a member's values become property values.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::endpoint::Endpoint;
use super::{HubSpotError, Portal};

pub const GROUP_NAME: &str = "meltingspot";
pub const GROUP_LABEL: &str = "MeltingSpot";
/// HubSpot's limit for string values, in characters (Unicode scalar values).
pub const MAX_STRING_CHARS: usize = 65_536;

pub const STATUSES: [&str; 6] = [
    "invited",
    "accepted",
    "pending",
    "left",
    "declined",
    "deactivated",
];
pub const ROLES: [&str; 2] = ["admin", "member"];

pub struct PropertySpec {
    pub name: &'static str,
    pub label: &'static str,
    pub type_: &'static str,
    pub field_type: &'static str,
    pub options: &'static [&'static str],
}

pub const PROPERTIES: [PropertySpec; 10] = [
    spec("meltingspot_member_id", "Member Id", "string", "text", &[]),
    spec(
        "meltingspot_member_status",
        "Member status",
        "enumeration",
        "select",
        &STATUSES,
    ),
    spec(
        "meltingspot_member_role",
        "Member role",
        "enumeration",
        "select",
        &ROLES,
    ),
    spec(
        "meltingspot_member_custom_role",
        "Member custom role",
        "string",
        "text",
        &[],
    ),
    spec(
        "meltingspot_spot_invitation_date",
        "Spot invitation date",
        "datetime",
        "date",
        &[],
    ),
    spec(
        "meltingspot_spot_registration_date",
        "Spot registration date",
        "datetime",
        "date",
        &[],
    ),
    spec("meltingspot_groups", "Groups", "string", "textarea", &[]),
    spec("meltingspot_tags", "Tags", "string", "textarea", &[]),
    spec("meltingspot_headline", "Headline", "string", "text", &[]),
    spec("meltingspot_bio", "Bio", "string", "textarea", &[]),
];

const fn spec(
    name: &'static str,
    label: &'static str,
    type_: &'static str,
    field_type: &'static str,
    options: &'static [&'static str],
) -> PropertySpec {
    PropertySpec {
        name,
        label,
        type_,
        field_type,
        options,
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

pub fn option_json(value: &str, order: usize) -> Value {
    json!({"label": capitalised(value), "value": value, "displayOrder": order, "hidden": false})
}

/// The create body of a property.
pub fn create_body(p: &PropertySpec, order: usize) -> Value {
    let mut body = json!({
        "name": p.name,
        "label": p.label,
        "type": p.type_,
        "fieldType": p.field_type,
        "groupName": GROUP_NAME,
        "displayOrder": order,
    });
    if !p.options.is_empty() {
        body["options"] = p
            .options
            .iter()
            .enumerate()
            .map(|(i, v)| option_json(v, i))
            .collect();
    }
    body
}

/// ISO 8601 UTC with millisecond precision, as HubSpot's datetime properties take.
pub fn hubspot_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Cuts a value to HubSpot's limit at a character boundary. Returns whether it cut.
pub(crate) fn truncate_value(s: &str) -> (String, bool) {
    match s.char_indices().nth(MAX_STRING_CHARS) {
        Some((byte, _)) => (s[..byte].to_string(), true),
        None => (s.to_string(), false),
    }
}

/// Names sorted by code point and joined with ";"; a ";" inside a name becomes ",".
pub fn join_names(names: &[String]) -> String {
    let mut v: Vec<String> = names.iter().map(|n| n.replace(';', ",")).collect();
    v.sort();
    v.join(";")
}

/// Lower-cased and trimmed, as every lookup and creation uses it.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl Portal {
    /// Creates the MeltingSpot group and the ten properties where missing, and
    /// adds any option an existing enumeration lacks. Idempotent; 409 is success.
    pub async fn ensure_schema(&self) -> Result<(), HubSpotError> {
        match self
            .call(
                &Endpoint::PropertyGroup(GROUP_NAME),
                reqwest::Method::GET,
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(HubSpotError::Rejected { status: 404, .. }) => {
                let body = json!({"name": GROUP_NAME, "label": GROUP_LABEL, "displayOrder": -1});
                match self
                    .call(
                        &Endpoint::PropertyGroups,
                        reqwest::Method::POST,
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
                &Endpoint::PropertiesBatchRead,
                reqwest::Method::POST,
                // `dataSensitivity` is required by the published definition.
                Some(&json!({"archived": false, "dataSensitivity": "non_sensitive", "inputs": names})),
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
            .map(|(i, p)| create_body(p, i))
            .collect();
        if !missing.is_empty() {
            let (_, body) = self
                .call(
                    &Endpoint::PropertiesBatchCreate,
                    reqwest::Method::POST,
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
                    options.push(option_json(v, options.len().max(i)));
                    changed = true;
                }
            }
            if changed {
                self.call(
                    &Endpoint::Property(p.name),
                    reqwest::Method::PATCH,
                    Some(&json!({"options": options})),
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_code_point_and_escape_semicolons() {
        let names = vec![
            "beta".to_string(),
            "Alpha".into(),
            "é;x".into(),
            "alpha".into(),
        ];
        assert_eq!(join_names(&names), "Alpha;alpha;beta;é,x");
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let s = "é".repeat(MAX_STRING_CHARS + 3);
        let (v, cut) = truncate_value(&s);
        assert!(cut);
        assert_eq!(v.chars().count(), MAX_STRING_CHARS);
        assert!(!truncate_value("short").1);
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        let t = DateTime::parse_from_rfc3339("2026-03-18T15:30:32.123456+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(hubspot_time(&t), "2026-03-18T13:30:32.123Z");
    }
}
