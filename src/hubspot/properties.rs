//! The MeltingSpot property group and its ten contact properties (SPEC §3),
//! and how a member's values become property values.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::store::MemberRecord;

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
fn limit(s: &str) -> (String, bool) {
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

/// The derived property values of a member. NULL becomes "" (clears the value).
/// Returns the values and how many were truncated.
pub fn derive(m: &MemberRecord) -> (BTreeMap<String, String>, usize) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let time = |t: &Option<DateTime<Utc>>| t.as_ref().map(hubspot_time).unwrap_or_default();
    let raw = [
        ("meltingspot_member_id", m.member_id.to_string()),
        ("meltingspot_member_status", m.status.clone()),
        ("meltingspot_member_role", m.role.clone()),
        ("meltingspot_member_custom_role", opt(&m.custom_role)),
        ("meltingspot_spot_invitation_date", time(&m.invited_at)),
        ("meltingspot_spot_registration_date", time(&m.registered_at)),
        ("meltingspot_groups", join_names(&m.groups)),
        ("meltingspot_tags", join_names(&m.tags)),
        ("meltingspot_headline", opt(&m.headline)),
        ("meltingspot_bio", opt(&m.bio)),
    ];
    let mut truncated = 0;
    let props = raw
        .into_iter()
        .map(|(k, v)| {
            let (v, cut) = limit(&v);
            truncated += usize::from(cut);
            (k.to_string(), v)
        })
        .collect();
    (props, truncated)
}

/// Lower-cased and trimmed, as every lookup and creation uses it.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
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
        let (v, cut) = limit(&s);
        assert!(cut);
        assert_eq!(v.chars().count(), MAX_STRING_CHARS);
        assert!(!limit("short").1);
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        let t = DateTime::parse_from_rfc3339("2026-03-18T15:30:32.123456+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(hubspot_time(&t), "2026-03-18T13:30:32.123Z");
    }
}
