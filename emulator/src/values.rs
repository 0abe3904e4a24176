//! Validation and normalisation of record property values against their definitions, so that
//! the sidecar meets the same rejections (G8 dead letters) it would meet at HubSpot.

use chrono::{DateTime, NaiveDate, NaiveTime, Timelike, Utc};
use serde_json::{Map, Value};

use crate::errors::{iso, scalar_string, ValueError};
use crate::state::{Portal, PropRec};

/// HubSpot's documented maximum for string values (counted in Unicode scalar values, SPEC §9).
pub(crate) const MAX_STRING_CHARS: usize = 65_536;

/// Validates a whole `properties` object; returns the normalised values (`""` = clear) or every
/// problem found.
pub(crate) fn validate_properties(
    portal: &Portal,
    input: &Map<String, Value>,
) -> Result<Vec<(String, String)>, Vec<ValueError>> {
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for (name, raw) in input {
        let Some(value) = scalar_string(raw) else {
            errs.push(ValueError::new(
                name,
                "INVALID_PROPERTY_VALUE", // GUESS: code for a non-scalar JSON value.
                format!("Property \"{name}\" must be a string, number or boolean"),
            ));
            continue;
        };
        let Some(def) = portal.prop(name) else {
            errs.push(ValueError::new(
                name,
                "PROPERTY_DOESNT_EXIST",
                format!("Property \"{name}\" does not exist"),
            ));
            continue;
        };
        match validate_value(def, &value) {
            Ok(v) => ok.push((name.clone(), v)),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() {
        Ok(ok)
    } else {
        Err(errs)
    }
}

/// One value against its definition. `""` always passes (it clears the property).
pub(crate) fn validate_value(def: &PropRec, value: &str) -> Result<String, ValueError> {
    let name = def.name.as_str();
    if def.read_only_value {
        // GUESS: HubSpot's code for writing a read-only property is not documented.
        return Err(ValueError::new(
            name,
            "READ_ONLY_VALUE",
            format!("Property \"{name}\" is a read only property; its value cannot be set."),
        ));
    }
    if value.is_empty() {
        return Ok(String::new());
    }
    match def.type_.as_str() {
        "string" => {
            if value.chars().count() > MAX_STRING_CHARS {
                // GUESS: the error code for an over-long string is not documented.
                return Err(ValueError::new(
                    name,
                    "INVALID_LENGTH",
                    format!(
                        "Property \"{name}\" value is too long ({} characters); the maximum is {MAX_STRING_CHARS}",
                        value.chars().count()
                    ),
                ));
            }
            if name == "email" && !valid_email(value) {
                return Err(ValueError::new(
                    name,
                    "INVALID_EMAIL",
                    format!("Email address {value} is invalid"),
                ));
            }
            Ok(value.to_string())
        }
        "enumeration" => {
            let allowed = |v: &str| def.options.iter().any(|o| o.value == v);
            let parts: Vec<&str> = if def.field_type == "checkbox" {
                value.split(';').filter(|p| !p.is_empty()).collect()
            } else {
                vec![value]
            };
            if let Some(bad) = parts.iter().find(|p| !allowed(p)) {
                let list: Vec<&str> = def.options.iter().map(|o| o.value.as_str()).collect();
                return Err(ValueError::new(
                    name,
                    "INVALID_OPTION",
                    format!(
                        "{bad} was not one of the allowed options: [{}]",
                        list.join(", ")
                    ),
                ));
            }
            Ok(value.to_string())
        }
        "number" => {
            let t = value.trim();
            if t.parse::<f64>().map(f64::is_finite).unwrap_or(false) {
                Ok(t.to_string())
            } else {
                Err(ValueError::new(
                    name,
                    "INVALID_INTEGER",
                    format!("{value} was not a valid number"),
                ))
            }
        }
        "bool" => match value.trim().to_ascii_lowercase().as_str() {
            v @ ("true" | "false") => Ok(v.to_string()),
            // GUESS: code name for a bad boolean.
            _ => Err(ValueError::new(
                name,
                "INVALID_BOOLEAN",
                format!("{value} is not a valid boolean (true/false)"),
            )),
        },
        "datetime" => match parse_datetime(value) {
            Some(t) => Ok(iso(t)),
            // GUESS: HubSpot's code for a bad datetime is not documented; INVALID_DATETIME.
            None => Err(ValueError::new(
                name,
                "INVALID_DATETIME",
                format!(
                    "{value} is not a valid datetime: send ISO 8601 in UTC (e.g. 2020-02-29T03:30:17.000Z) or epoch milliseconds"
                ),
            )),
        },
        "date" => validate_date(name, value),
        _ => Ok(value.to_string()),
    }
}

/// Simple structural check: one `@`, non-empty local part, a dotted domain, no spaces.
pub(crate) fn valid_email(v: &str) -> bool {
    let v = v.trim();
    if v.chars().any(char::is_whitespace) || v.matches('@').count() != 1 {
        return false;
    }
    let Some((local, domain)) = v.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// ISO 8601 in UTC (`Z` or `+00:00`), a bare `YYYY-MM-DD` (midnight), or epoch milliseconds.
pub(crate) fn parse_datetime(v: &str) -> Option<DateTime<Utc>> {
    let v = v.trim();
    if let Some(ms) = parse_epoch_ms(v) {
        return DateTime::from_timestamp_millis(ms);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        if t.offset().local_minus_utc() != 0 {
            return None;
        }
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_time(NaiveTime::MIN).and_utc())
}

fn parse_epoch_ms(v: &str) -> Option<i64> {
    let digits = v.strip_prefix('-').unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn validate_date(name: &str, value: &str) -> Result<String, ValueError> {
    let v = value.trim();
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.format("%Y-%m-%d").to_string());
    }
    let t = parse_epoch_ms(v)
        .and_then(DateTime::from_timestamp_millis)
        .or_else(|| {
            DateTime::parse_from_rfc3339(v)
                .ok()
                .filter(|t| t.offset().local_minus_utc() == 0)
                .map(|t| t.with_timezone(&Utc))
        });
    match t {
        Some(t) if t.num_seconds_from_midnight() == 0 && t.nanosecond() == 0 => {
            Ok(t.format("%Y-%m-%d").to_string())
        }
        // OBSERVED message shape: "1635535865 is at 22:18:55.865 UTC, not midnight!"
        Some(t) => Err(ValueError::new(
            name,
            "INVALID_DATE",
            format!("{value} is at {} UTC, not midnight!", t.format("%H:%M:%S%.3f")),
        )),
        None => Err(ValueError::new(
            name,
            "INVALID_DATE",
            format!("{value} is not a valid date: send YYYY-MM-DD or epoch milliseconds at midnight UTC"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(valid_email("ada@example.com"));
        assert!(valid_email("a.b+c@sub.example.co"));
        assert!(!valid_email("example.lcom"));
        assert!(!valid_email("@example.com"));
        assert!(!valid_email("a@b@example.com"));
        assert!(!valid_email("a b@example.com"));
        assert!(!valid_email("a@localhost"));
    }

    #[test]
    fn datetimes() {
        assert!(parse_datetime("2020-02-29T03:30:17.000Z").is_some());
        assert!(parse_datetime("2020-02-29T03:30:17+00:00").is_some());
        assert!(parse_datetime("1582947017000").is_some());
        assert!(parse_datetime("2020-02-29").is_some());
        assert!(parse_datetime("2020-02-29T03:30:17+02:00").is_none());
        assert!(parse_datetime("yesterday").is_none());
    }

    #[test]
    fn dates() {
        assert_eq!(
            validate_date("d", "1582934400000").ok().as_deref(),
            Some("2020-02-29")
        );
        let e = validate_date("d", "1635535865").err();
        assert_eq!(e.map(|e| e.code), Some("INVALID_DATE"));
    }
}
