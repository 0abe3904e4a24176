//! timeline-v3: one template per activity type, created idempotently by name
//! with the developer API key; events name the template and the contact's
//! record id, and a repeated event id overwrites instead of duplicating.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::{
    detail_template, event_timestamp, id_string, property_label, property_names, ActivityEvent,
    ActivitySink,
};
use crate::hubspot::{Auth, Endpoint, HubSpotClient, HubSpotError};
use crate::translate::activity::ActivityType;

impl ActivitySink {
    /// timeline-v3 only: lists the app's templates (developer key), creates the missing ones by
    /// name (the activity type name), adds tokens an existing one lacks, and remembers the ids.
    /// Idempotent; a no-op for App Events and once every id is known.
    pub async fn ensure_templates(&self, client: &HubSpotClient) -> Result<(), HubSpotError> {
        let ActivitySink::TimelineV3 {
            app_id,
            developer_api_key: key,
            templates,
        } = self
        else {
            return Ok(());
        };
        let mut known = templates.lock().await;
        if ActivityType::ALL.iter().all(|a| known.contains_key(a)) {
            return Ok(());
        }
        let (_, listed) = client
            .send(
                &Endpoint::TimelineTemplates { app_id },
                Auth::DeveloperKey(key),
                reqwest::Method::GET,
                None,
            )
            .await?;
        let mut existing: HashMap<String, Value> = HashMap::new();
        for t in listed
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = t.get("name").and_then(Value::as_str) {
                // Several templates with one name: the first listed wins.
                existing
                    .entry(name.to_string())
                    .or_insert_with(|| t.clone());
            }
        }
        for activity in ActivityType::ALL {
            if known.contains_key(&activity) {
                continue;
            }
            let id = match existing.get(activity.name()) {
                Some(t) => {
                    let id = t.get("id").and_then(id_string).ok_or_else(|| {
                        HubSpotError::Transient(format!(
                            "timeline.templates.list: template {} without an id",
                            activity.name()
                        ))
                    })?;
                    add_missing_tokens(client, app_id, key, activity, &id, t).await?;
                    id
                }
                None => {
                    let (_, created) = client
                        .send(
                            &Endpoint::TimelineTemplateCreate { app_id },
                            Auth::DeveloperKey(key),
                            reqwest::Method::POST,
                            Some(&template_body(activity)),
                        )
                        .await?;
                    created.get("id").and_then(id_string).ok_or_else(|| {
                        HubSpotError::Transient(format!(
                            "timeline.templates.create: answer without an id for {}",
                            activity.name()
                        ))
                    })?
                }
            };
            known.insert(activity, id);
        }
        Ok(())
    }
}

/// The body of one timeline-v3 batch: each event by its template and the
/// contact's record id (never e-mail: an unknown e-mail would create the contact).
pub(super) async fn batch_body(
    sink: &ActivitySink,
    client: &HubSpotClient,
    group: &[&ActivityEvent],
) -> Result<Value, HubSpotError> {
    let ActivitySink::TimelineV3 { templates, .. } = sink else {
        return Err(HubSpotError::Transient(
            "timeline-v3 batch without timeline-v3 settings".into(),
        ));
    };
    let mut ids = templates.lock().await.clone();
    if group.iter().any(|e| !ids.contains_key(&e.activity)) {
        sink.ensure_templates(client).await?;
        ids = templates.lock().await.clone();
    }
    let mut inputs = Vec::with_capacity(group.len());
    for e in group {
        let template = ids.get(&e.activity).ok_or_else(|| {
            HubSpotError::Transient(format!("no timeline template for {}", e.activity.name()))
        })?;
        inputs.push(json!({
            "eventTemplateId": template,
            "id": e.id,
            "objectId": e.object_id,
            "timestamp": event_timestamp(e.timestamp),
            "tokens": e.properties(),
        }));
    }
    Ok(json!({"inputs": inputs}))
}

fn token_json(name: &str) -> Value {
    json!({"name": name, "label": property_label(name), "type": "string"})
}

fn template_body(activity: ActivityType) -> Value {
    let tokens: Vec<Value> = property_names(activity)
        .iter()
        .map(|n| token_json(n))
        .collect();
    json!({
        "name": activity.name(),
        "objectType": "contacts",
        "headerTemplate": activity.header(),
        "detailTemplate": detail_template(activity),
        "tokens": tokens,
    })
}

/// An existing template lacking one of our tokens would refuse every event: add it (never
/// remove or change the others).
async fn add_missing_tokens(
    client: &HubSpotClient,
    app_id: &str,
    key: &str,
    activity: ActivityType,
    id: &str,
    template: &Value,
) -> Result<(), HubSpotError> {
    let mut tokens: Vec<Value> = template
        .get("tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| {
            // Keep only the definition fields (drop createdAt/updatedAt).
            let mut m = Map::new();
            for k in ["name", "label", "type", "options", "objectPropertyName"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    m.insert(k.to_string(), v.clone());
                }
            }
            Value::Object(m)
        })
        .collect();
    let have: HashSet<String> = tokens
        .iter()
        .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    let missing: Vec<&str> = property_names(activity)
        .iter()
        .copied()
        .filter(|n| !have.contains(*n))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    tokens.extend(missing.iter().map(|n| token_json(n)));
    // Whether an update keeps omitted header and detail templates is not
    // stated: send the existing ones (or ours), so an update never wipes them.
    let text = |k: &str, ours: String| {
        template
            .get(k)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .unwrap_or(ours)
    };
    let body = json!({
        "id": id,
        "name": activity.name(),
        "headerTemplate": text("headerTemplate", activity.header().to_string()),
        "detailTemplate": text("detailTemplate", detail_template(activity)),
        "tokens": tokens,
    });
    client
        .send(
            &Endpoint::TimelineTemplate {
                app_id,
                template_id: id,
            },
            Auth::DeveloperKey(key),
            reqwest::Method::PUT,
            Some(&body),
        )
        .await?;
    Ok(())
}
