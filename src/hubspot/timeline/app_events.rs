//! App Events: `eventTypeName` is HUBSPOT_APP_EVENT_PREFIX + the activity
//! type name; the event types are declared in the app project
//! (`deploy/hubspot-app/`).

use serde_json::{json, Value};

use super::{event_timestamp, ActivityEvent};

/// The body of one App Events batch.
pub(super) fn batch_body(prefix: &str, group: &[&ActivityEvent]) -> Value {
    let inputs: Vec<Value> = group
        .iter()
        .map(|e| {
            json!({
                "eventTypeName": format!("{prefix}{}", e.activity.name()),
                "objectId": e.object_id,
                "id": e.id,
                "timestamp": event_timestamp(e.timestamp),
                "properties": e.properties(),
            })
        })
        .collect();
    json!({"inputs": inputs})
}
