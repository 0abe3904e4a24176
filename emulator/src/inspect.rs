//! `/_emulator/...`: unauthenticated JSON inspection and control, mirroring the Rust API (same
//! `State`/`Shared` methods underneath). Never counted, never faulted.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{into_response, parse_body, scalar_string, ApiError, ApiResult, Reply};
use crate::model::Faults;
use crate::state::Shared;
use crate::webhooks::ChangeSource;

fn ok<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Reply::ok(serde_json::to_value(v).unwrap_or(Value::Null)))
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError {
        status,
        body: json!({ "error": msg.into() }),
    }
}

pub(crate) fn handle(shared: &Shared, method: &Method, segs: &[String], body: &[u8]) -> Response {
    into_response(route(shared, method, segs, body), "emulator")
}

fn route(shared: &Shared, method: &Method, segs: &[String], body: &[u8]) -> ApiResult {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method.clone(), s.as_slice()) {
        (Method::POST, ["portals"]) => {
            let (portal_id, token) = shared.lock().create_portal_with_key();
            ok(json!({ "portal_id": portal_id, "token": token }))
        }
        (Method::GET, ["portals"]) => {
            let ids: Vec<u64> = shared.lock().portals.keys().copied().collect();
            ok(ids)
        }
        (Method::GET, ["portals", id, what]) => {
            // Pseudo-portal 0 holds the developer-key (template) stats.
            let id = match (*id, *what) {
                ("0", "stats") => 0,
                _ => portal_id(shared, id)?,
            };
            let st = shared.lock();
            match *what {
                "contacts" => ok(st.contacts(id)),
                "groups" => ok(st.property_groups(id)),
                "properties" => ok(st.properties(id)),
                "events" => ok(st.timeline_events(id)),
                "stats" => ok(st.request_stats(id)),
                _ => Err(err(StatusCode::NOT_FOUND, "unknown inspection path")),
            }
        }
        (Method::POST, ["portals", id, "contacts"]) => {
            #[derive(Deserialize)]
            struct Seed {
                email: String,
                #[serde(default)]
                properties: serde_json::Map<String, Value>,
            }
            let id = portal_id(shared, id)?;
            let seed: Seed = parse_body(body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.body["message"].to_string()))?;
            let props: Vec<(String, String)> = seed
                .properties
                .iter()
                .filter_map(|(k, v)| scalar_string(v).map(|s| (k.clone(), s)))
                .collect();
            let refs: Vec<(&str, &str)> = props
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let cid = shared.lock().seed_contact(id, &seed.email, &refs);
            ok(json!({ "id": cid }))
        }
        (Method::POST, ["portals", id, "merge"]) => {
            #[derive(Deserialize)]
            struct In {
                primary: String,
                secondary: String,
            }
            let id = portal_id(shared, id)?;
            let i: In = parse_body(body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.body["message"].to_string()))?;
            let merged = shared.lock().merge_contacts(
                id,
                &i.primary,
                &i.secondary,
                ChangeSource::CrmUi,
                chrono::Utc::now(),
            );
            match merged {
                Ok(new_id) => ok(json!({ "id": new_id.to_string() })),
                Err(e) => Err(err(StatusCode::NOT_FOUND, e.to_string())),
            }
        }
        (Method::POST, ["portals", id, "contacts", cid, action]) => {
            let id = portal_id(shared, id)?;
            let cid: u64 = cid
                .parse()
                .map_err(|_| err(StatusCode::BAD_REQUEST, "contact id must be a number"))?;
            let (src, now) = (ChangeSource::CrmUi, chrono::Utc::now());
            let mut st = shared.lock();
            let done = match *action {
                "delete" => st.delete_contact(id, cid, src, now),
                "restore" => st.restore_contact(id, cid, src, now),
                "privacy-delete" => st.privacy_delete_contact(id, cid, src, now),
                _ => return Err(err(StatusCode::NOT_FOUND, "unknown inspection path")),
            };
            ok(json!({ "ok": done }))
        }
        (Method::GET, ["webhooks"]) => ok(shared.lock().webhook_log.clone()),
        (Method::POST, ["webhook-target"]) => {
            #[derive(Deserialize)]
            struct In {
                url: Option<String>,
            }
            let i: In = parse_body(body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.body["message"].to_string()))?;
            shared.lock().cfg.webhook_target = i.url;
            ok(json!({}))
        }
        (Method::POST, ["portals", id, "revoke"]) => {
            let id = portal_id(shared, id)?;
            shared.lock().revoke_portal(id);
            ok(json!({}))
        }
        (Method::POST, ["portals", id, "expire-tokens"]) => {
            let id = portal_id(shared, id)?;
            shared.lock().expire_access_tokens(id);
            ok(json!({}))
        }
        (Method::POST, ["faults"]) => {
            #[derive(Deserialize)]
            struct In {
                portal_id: Option<u64>,
                latency_ms: Option<u64>,
                error_rate: Option<f64>,
                hang: Option<bool>,
                lose_answer_rate: Option<f64>,
            }
            let i: In = parse_body(body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.body["message"].to_string()))?;
            let rate = i.error_rate.unwrap_or(0.0);
            let lose = i.lose_answer_rate.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&rate) || !(0.0..=1.0).contains(&lose) {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "error_rate and lose_answer_rate must be within 0..=1",
                ));
            }
            shared.set_faults(
                i.portal_id,
                Faults {
                    latency: i.latency_ms.map(Duration::from_millis),
                    error_rate: rate,
                    hang: i.hang.unwrap_or(false),
                    lose_answer_rate: lose,
                },
            );
            ok(json!({}))
        }
        (Method::POST, ["next-grant"]) => {
            #[derive(Deserialize)]
            struct In {
                portal_id: Option<u64>,
            }
            let i: In = parse_body(body)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.body["message"].to_string()))?;
            shared.lock().next_grant_portal = i.portal_id;
            ok(json!({}))
        }
        (Method::POST, ["reset"]) => {
            shared.lock().reset();
            shared.set_faults(None, Faults::default());
            ok(json!({}))
        }
        _ => Err(err(StatusCode::NOT_FOUND, "unknown inspection path")),
    }
}

fn portal_id(shared: &Shared, raw: &str) -> Result<u64, ApiError> {
    let id: u64 = raw
        .parse()
        .map_err(|_| err(StatusCode::BAD_REQUEST, "portal id must be a number"))?;
    if !shared.lock().portals.contains_key(&id) {
        return Err(err(StatusCode::NOT_FOUND, format!("no portal {id}")));
    }
    Ok(id)
}
