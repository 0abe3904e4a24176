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
    /// Looks contacts up by e-mail (≤100). Returns normalized email → record id.
    pub async fn read_contacts_by_email(
        &self,
        emails: &[String],
    ) -> Result<HashMap<String, String>, HubSpotError> {
        let inputs: Vec<Value> = emails.iter().map(|e| json!({"id": e})).collect();
        let body = json!({"idProperty": "email", "properties": ["email"], "inputs": inputs});
        let (_, resp) = self
            .call(
                &Endpoint::ContactsBatchRead,
                reqwest::Method::POST,
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
