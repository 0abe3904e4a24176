//! Contacts: looked up by e-mail, created, and updated by record id, in
//! batches of at most 100.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::endpoint::Endpoint;
use super::properties;
use super::{HubSpotError, Portal};

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
pub(crate) fn existing_id(message: &str) -> Option<String> {
    let rest = message.split("Existing ID:").nth(1)?.trim_start();
    let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!id.is_empty()).then_some(id)
}

/// What a batch update did.
#[derive(Debug, Default)]
pub struct UpdateOutcome {
    /// Record ids HubSpot no longer has (deleted or merged contacts).
    pub missing: Vec<String>,
    /// Record ids HubSpot rejected for good: (category, message).
    pub rejected: HashMap<String, (String, String)>,
}

/// The contact property listing the record ids merged into a record.
const MERGED_IDS_PROPERTY: &str = "hs_merged_object_ids";

/// The ids of `hs_merged_object_ids` (semicolon-separated).
fn merged_ids(value: &str) -> Vec<String> {
    value
        .split(';')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect()
}

/// What became of a record id HubSpot no longer updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// It reads as itself: still there (the refusal was something else).
    Live,
    /// It was merged: the merged record's id.
    MergedInto(String),
    /// It reads as nothing: deleted.
    Gone,
}

impl Portal {
    /// Looks contacts up by e-mail (≤100). Returns normalized email → record id.
    pub async fn read_contacts_by_email(
        &self,
        emails: &[String],
    ) -> Result<HashMap<String, String>, HubSpotError> {
        let resp = self.batch_read(Some("email"), emails, &["email"]).await?;
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

    /// Reads `properties` of contacts by record id (≤100). Returns record id →
    /// property → value (null → None); an id HubSpot does not have (deleted
    /// or merged) is absent from the map.
    pub async fn read_contact_properties(
        &self,
        ids: &[String],
        properties: &[&str],
    ) -> Result<HashMap<String, HashMap<String, Option<String>>>, HubSpotError> {
        debug_assert!(ids.len() <= super::BATCH_LIMIT);
        // No `idProperty`: the ids are record ids.
        let resp = self.batch_read(None, ids, properties).await?;
        read_lookup_errors(&resp)?;
        Ok(resp
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let id = r.get("id")?.as_str()?.to_string();
                let values = r
                    .get("properties")?
                    .as_object()?
                    .iter()
                    .map(|(name, v)| {
                        let v = match v {
                            Value::Null => None,
                            Value::String(s) => Some(s.clone()),
                            other => Some(other.to_string()),
                        };
                        (name.clone(), v)
                    })
                    .collect();
                Some((id, values))
            })
            .collect())
    }

    /// Reads record ids HubSpot answered OBJECT_NOT_FOUND to on an update
    /// (≤100) back by id, to tell a merge from a deletion. HubSpot answers a
    /// read by a merged-away id with the merged record under its new id, and
    /// lists the ids merged into it in `hs_merged_object_ids`; a deleted id
    /// is not answered at all (reference §10).
    pub async fn resolve_contact_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Resolution>, HubSpotError> {
        debug_assert!(ids.len() <= super::BATCH_LIMIT);
        let resp = self
            .batch_read(None, ids, &["email", MERGED_IDS_PROPERTY])
            .await?;
        read_lookup_errors(&resp)?;
        let answered: Vec<(String, Vec<String>)> = resp
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let id = r.get("id")?.as_str()?.to_string();
                let merged = r
                    .get("properties")
                    .and_then(|p| p.get(MERGED_IDS_PROPERTY))
                    .and_then(Value::as_str)
                    .map(merged_ids)
                    .unwrap_or_default();
                Some((id, merged))
            })
            .collect();
        Ok(ids
            .iter()
            .map(|asked| {
                let resolution = if answered.iter().any(|(id, _)| id == asked) {
                    Resolution::Live
                } else if let Some((new, _)) =
                    answered.iter().find(|(_, merged)| merged.contains(asked))
                {
                    Resolution::MergedInto(new.clone())
                } else {
                    Resolution::Gone
                };
                (asked.clone(), resolution)
            })
            .collect())
    }

    /// One batch read (≤100 inputs) by `id_property` (None: record ids); HubSpot's answer.
    async fn batch_read(
        &self,
        id_property: Option<&str>,
        ids: &[String],
        properties: &[&str],
    ) -> Result<Value, HubSpotError> {
        let inputs: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
        // `propertiesWithHistory` is required by the published definition.
        let mut body = json!({
            "properties": properties,
            "propertiesWithHistory": [],
            "inputs": inputs,
        });
        if let Some(p) = id_property {
            body["idProperty"] = json!(p);
        }
        let (_, resp) = self
            .call(
                &Endpoint::ContactsBatchRead,
                reqwest::Method::POST,
                Some(&body),
            )
            .await?;
        Ok(resp)
    }

    /// Creates contacts (≤100), each with an `objectWriteTraceId` so that HubSpot
    /// reports every input on its own (207) instead of failing the batch.
    pub async fn create_contacts(
        &self,
        inputs: &[(String, BTreeMap<String, String>)],
    ) -> Result<HashMap<String, CreateResult>, HubSpotError> {
        let body: Vec<Value> = inputs
            .iter()
            // `associations` is required per input by the published definition.
            .map(|(trace, props)| {
                json!({"objectWriteTraceId": trace, "properties": props, "associations": []})
            })
            .collect();
        let (_, resp) = self
            .call(
                &Endpoint::ContactsBatchCreate,
                reqwest::Method::POST,
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
                &Endpoint::ContactsBatchUpdate,
                reqwest::Method::POST,
                Some(&json!({"inputs": inputs})),
            )
            .await?;
        if status == 207 {
            read_update_errors(&resp)
        } else {
            Ok(UpdateOutcome::default())
        }
    }
}

/// HubSpot categories that clear by themselves: the batch is retried.
const TRANSIENT_CATEGORIES: [&str; 2] = ["INTERNAL_ERROR", "TIMEOUT"];

/// An error of a 207 that fails the whole batch, whatever the call: per-item
/// throttling is flow control, never a failure (SPEC §4.7), and the
/// categories that clear by themselves are retried.
fn fails_the_batch(err: &Value, operation: &str) -> Option<HubSpotError> {
    let category = err.get("category").and_then(Value::as_str).unwrap_or("");
    if category == "RATE_LIMITS" {
        return Some(HubSpotError::RateLimited {
            retry_after: None,
            policy: "batch item".into(),
        });
    }
    if TRANSIENT_CATEGORIES.contains(&category) {
        let message = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Some(HubSpotError::Transient(format!(
            "{operation}: 207 {category}: {message}"
        )));
    }
    None
}

/// Reads a 207 of a batch update by category: only OBJECT_NOT_FOUND means the
/// contact is gone; other categories reject their inputs (or, when they clear
/// by themselves, fail the batch for a retry). An error that names no input is
/// never read as success: the batch fails and is split until it stands alone.
pub(super) fn read_update_errors(resp: &Value) -> Result<UpdateOutcome, HubSpotError> {
    let mut outcome = UpdateOutcome::default();
    for err in resp
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(e) = fails_the_batch(err, "contacts.batch_update") {
            return Err(e);
        }
        let category = err.get("category").and_then(Value::as_str).unwrap_or("");
        let message = err.get("message").and_then(Value::as_str).unwrap_or("");
        let ids: Vec<String> = ["/context/ids", "/context/id"]
            .iter()
            .filter_map(|p| err.pointer(p).and_then(Value::as_array))
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if ids.is_empty() || schema_missing(err) {
            return Err(HubSpotError::Rejected {
                status: 207,
                error: Box::new(serde_json::from_value(err.clone()).unwrap_or_default()),
            });
        }
        for id in ids {
            if category == "OBJECT_NOT_FOUND" {
                outcome.missing.push(id);
            } else {
                outcome
                    .rejected
                    .insert(id, (category.to_string(), message.to_string()));
            }
        }
    }
    Ok(outcome)
}

/// Reads the errors of a batch read (a 207): OBJECT_NOT_FOUND only says which
/// ids HubSpot does not have; any other error fails the read, so that an id
/// HubSpot failed to read is never taken for one it does not have.
fn read_lookup_errors(resp: &Value) -> Result<(), HubSpotError> {
    for err in resp
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(e) = fails_the_batch(err, "contacts.batch_read") {
            return Err(e);
        }
        if err.get("category").and_then(Value::as_str) != Some("OBJECT_NOT_FOUND") {
            return Err(HubSpotError::Rejected {
                status: 207,
                error: Box::new(serde_json::from_value(err.clone()).unwrap_or_default()),
            });
        }
    }
    Ok(())
}

/// `schema_missing` for a parsed error body.
pub(crate) fn schema_missing_in(e: &super::ApiError) -> bool {
    e.category == "PROPERTY_DOESNT_EXIST"
        || e.message.contains("PROPERTY_DOESNT_EXIST")
        || e.errors.iter().any(schema_missing)
}

/// Whether an error says one of the properties written does not exist (the
/// MeltingSpot schema was deleted in HubSpot): checked at the top, per error
/// and per inner value error.
pub(crate) fn schema_missing(v: &Value) -> bool {
    let hit = |e: &Value| {
        ["category", "code", "subCategory"]
            .iter()
            .any(|k| e.get(*k).and_then(Value::as_str) == Some("PROPERTY_DOESNT_EXIST"))
    };
    hit(v)
        || v.get("errors")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|e| hit(e) || schema_missing(e)))
        || v.get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| m.contains("PROPERTY_DOESNT_EXIST"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_207_is_read_by_category() {
        let resp = json!({"status": "COMPLETE", "results": [], "errors": [
            {"category": "OBJECT_NOT_FOUND", "message": "gone", "context": {"ids": ["1"]}},
            {"category": "VALIDATION_ERROR", "message": "bad option", "context": {"ids": ["2"]}},
        ]});
        let out = read_update_errors(&resp).expect("read");
        assert_eq!(out.missing, vec!["1".to_string()]);
        assert_eq!(out.rejected["2"].0, "VALIDATION_ERROR");
    }

    #[test]
    fn an_error_naming_no_input_is_never_success() {
        let resp = json!({"errors": [{"category": "VALIDATION_ERROR", "message": "?"}]});
        assert!(matches!(
            read_update_errors(&resp),
            Err(HubSpotError::Rejected { status: 207, .. })
        ));
        let resp = json!({"errors": [{"category": "INTERNAL_ERROR", "context": {"ids": ["1"]}}]});
        assert!(matches!(
            read_update_errors(&resp),
            Err(HubSpotError::Transient(_))
        ));
    }

    #[test]
    fn a_batch_read_fails_on_any_error_but_not_found() {
        let missing =
            json!({"errors": [{"category": "OBJECT_NOT_FOUND", "context": {"ids": ["9"]}}]});
        assert!(read_lookup_errors(&missing).is_ok());
        let failed = json!({"errors": [{"category": "INTERNAL_ERROR", "context": {"ids": ["9"]}}]});
        assert!(matches!(
            read_lookup_errors(&failed),
            Err(HubSpotError::Transient(_))
        ));
    }

    #[test]
    fn a_deleted_property_is_recognised_at_any_depth() {
        let e = json!({"category": "VALIDATION_ERROR", "errors": [
            {"message": "Property \"meltingspot_bio\" does not exist", "code": "PROPERTY_DOESNT_EXIST"}
        ]});
        assert!(schema_missing(&e));
        assert!(!schema_missing(
            &json!({"category": "VALIDATION_ERROR", "errors": [{"code": "INVALID_OPTION"}]})
        ));
    }
}
