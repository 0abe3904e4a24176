//! What happens to contacts besides writes (reference §10): merges, deletions (archive and
//! restore) and privacy (GDPR) deletions, each announced by webhook to portals where the app is
//! installed.
//!
//! * Merge: a NEW record with a NEW id; the old ids are remembered as merged into it, so reads
//!   by an old id answer the new record (under its new id) while writes by an old id answer
//!   OBJECT_NOT_FOUND like an id that never existed.
//! * Delete: the record leaves every read, search and e-mail match, but is kept aside so a
//!   restore brings it back under the same id.
//! * Privacy delete: gone for good; its e-mails go on the portal's blocklist, which stops the UI
//!   and imports only: the API may create the person again (HubSpot's published behaviour).

use std::collections::BTreeSet;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::contacts::{contact_json, selection};
use crate::ctx::Ctx;
use crate::errors::{id_string, parse_body, ApiError, ApiResult, Reply};
use crate::state::{ContactRec, State, ADDITIONAL_EMAILS, MERGED_OBJECT_IDS};
use crate::webhooks::{add_merge_fields, event_json, ChangeSource};

/// Why a merge was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// The id names no live contact of the portal (unknown, deleted or merged away).
    #[error("contact {id} does not exist in portal {portal}")]
    NotFound { portal: u64, id: String },
    /// HubSpot merges two different records.
    #[error("contact {0} cannot be merged with itself")]
    SameRecord(String),
}

/// Properties a merge computes rather than moves.
fn merge_computed(name: &str) -> bool {
    matches!(name, "email" | ADDITIONAL_EMAILS | MERGED_OBJECT_IDS)
}

fn split_list(v: Option<&String>) -> impl Iterator<Item = &str> {
    v.map(String::as_str)
        .unwrap_or("")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn nonempty(c: &ContactRec, name: &str) -> Option<String> {
    c.props.get(name).filter(|v| !v.trim().is_empty()).cloned()
}

impl State {
    /// Merges `secondary` into `primary`: see the module doc. Returns the new record id.
    pub fn merge_contacts(
        &mut self,
        portal: u64,
        primary_id: &str,
        secondary_id: &str,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) -> Result<u64, MergeError> {
        let live = |st: &State, raw: &str| {
            raw.trim()
                .parse::<u64>()
                .ok()
                .filter(|id| {
                    st.portals
                        .get(&portal)
                        .is_some_and(|p| p.contacts.contains_key(id))
                })
                .ok_or_else(|| MergeError::NotFound {
                    portal,
                    id: raw.to_string(),
                })
        };
        let primary = live(self, primary_id)?;
        let secondary = live(self, secondary_id)?;
        if primary == secondary {
            return Err(MergeError::SameRecord(primary_id.to_string()));
        }
        let new_id = self.next_contact_id(portal);
        let p = self.ensure_portal(portal);
        let (Some(prim), Some(sec)) = (p.contacts.remove(&primary), p.contacts.remove(&secondary))
        else {
            // Checked above; unreachable, but never leave half a merge behind.
            return Err(MergeError::NotFound {
                portal,
                id: secondary_id.to_string(),
            });
        };
        // The secondary's values, overlaid by the primary's; an empty primary value does not
        // wipe a secondary one.
        let mut props = sec.props.clone();
        let mut moved = 0usize;
        for (k, v) in &sec.props {
            if !merge_computed(k) && !v.trim().is_empty() && nonempty(&prim, k).is_none() {
                moved += 1;
            }
        }
        for (k, v) in &prim.props {
            if !v.trim().is_empty() || !props.contains_key(k) {
                props.insert(k.clone(), v.clone());
            }
        }
        let email = nonempty(&prim, "email").or_else(|| nonempty(&sec, "email"));
        let mut additional: Vec<String> = Vec::new();
        let candidates = split_list(prim.props.get(ADDITIONAL_EMAILS))
            .chain(sec.email())
            .chain(split_list(sec.props.get(ADDITIONAL_EMAILS)))
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for e in candidates {
            let key = e.to_lowercase();
            let is_primary = email
                .as_deref()
                .is_some_and(|p| p.trim().to_lowercase() == key);
            if !is_primary && !additional.iter().any(|a| a.to_lowercase() == key) {
                additional.push(e.to_string());
            }
        }
        let mut merged: BTreeSet<u64> = [primary, secondary].into_iter().collect();
        for c in [&prim, &sec] {
            merged.extend(
                split_list(c.props.get(MERGED_OBJECT_IDS)).filter_map(|i| i.parse::<u64>().ok()),
            );
        }
        props.remove("email");
        if let Some(e) = email {
            props.insert("email".into(), e);
        }
        props.remove(ADDITIONAL_EMAILS);
        if !additional.is_empty() {
            props.insert(ADDITIONAL_EMAILS.into(), additional.join(";"));
        }
        let merged: Vec<String> = merged.iter().map(u64::to_string).collect();
        props.insert(MERGED_OBJECT_IDS.into(), merged.join(";"));
        p.contacts.insert(
            new_id,
            ContactRec {
                id: new_id,
                props,
                created_by: prim.created_by,
                created_at: prim.created_at.min(sec.created_at),
                updated_at: now,
            },
        );
        p.merged_into.insert(primary, new_id);
        p.merged_into.insert(secondary, new_id);
        let mut event = event_json(
            &self.cfg,
            portal,
            "contact.merge",
            Value::from(new_id),
            source,
            now,
        );
        add_merge_fields(
            &mut event,
            &primary.to_string(),
            &[&secondary.to_string()],
            &new_id.to_string(),
            moved,
        );
        self.emit_webhook(portal, event);
        Ok(new_id)
    }

    /// Archives a live contact (`contact.deletion`); false when `id` names none.
    pub fn delete_contact(
        &mut self,
        portal: u64,
        id: u64,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(p) = self.portals.get_mut(&portal) else {
            return false;
        };
        let Some(rec) = p.contacts.remove(&id) else {
            return false;
        };
        p.archived.insert(id, rec);
        self.emit_simple(portal, "contact.deletion", id, source, now);
        true
    }

    /// Brings an archived contact back with its id and properties (`contact.restore`); false
    /// when it is not archived or a live contact now holds one of its e-mails.
    pub fn restore_contact(
        &mut self,
        portal: u64,
        id: u64,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(p) = self.portals.get_mut(&portal) else {
            return false;
        };
        let Some(rec) = p.archived.get(&id) else {
            return false;
        };
        if rec.emails().any(|e| p.find_by_any_email(e).is_some()) {
            return false;
        }
        let Some(rec) = p.archived.remove(&id) else {
            return false;
        };
        p.contacts.insert(id, rec);
        self.emit_simple(portal, "contact.restore", id, source, now);
        true
    }

    /// Removes a contact for good (live or archived) and blocklists its e-mails. A live one
    /// is announced by `contact.deletion` and, in another request after it,
    /// `contact.privacyDeletion`; an archived one by `contact.privacyDeletion` only.
    pub fn privacy_delete_contact(
        &mut self,
        portal: u64,
        id: u64,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(p) = self.portals.get_mut(&portal) else {
            return false;
        };
        let (rec, was_live) = match p.contacts.remove(&id) {
            Some(r) => (r, true),
            None => match p.archived.remove(&id) {
                Some(r) => (r, false),
                None => return false,
            },
        };
        for e in rec.emails() {
            p.privacy_blocklist.insert(e.to_lowercase());
        }
        if was_live {
            self.emit_simple(portal, "contact.deletion", id, source, now);
            self.break_webhook_batch(portal);
        }
        self.emit_simple(portal, "contact.privacyDeletion", id, source, now);
        self.break_webhook_batch(portal);
        true
    }

    /// Whether a privacy deletion blocked `email` for the portal's UI and imports.
    pub fn is_privacy_blocked(&self, portal: u64, email: &str) -> bool {
        self.portals
            .get(&portal)
            .is_some_and(|p| p.privacy_blocklist.contains(&email.trim().to_lowercase()))
    }

    fn emit_simple(
        &mut self,
        portal: u64,
        subscription_type: &str,
        id: u64,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) {
        let event = event_json(
            &self.cfg,
            portal,
            subscription_type,
            Value::from(id),
            source,
            now,
        );
        self.emit_webhook(portal, event);
    }
}

// ---------------------------------------------------------------- HTTP

fn not_found() -> ApiError {
    ApiError::not_found("Object not found.  objectId are usually numeric.")
}

fn live_id(st: &mut State, ctx: &Ctx, raw: &str) -> Result<u64, ApiError> {
    let p = st.portal_mut(ctx.portal)?;
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|id| p.contacts.contains_key(id))
        .ok_or_else(not_found)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MergeIn {
    primary_object_id: Option<Value>,
    object_id_to_merge: Option<Value>,
}

/// `POST .../objects/contacts/merge`: 200 with the new record.
pub(crate) fn merge(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: MergeIn = parse_body(body)?;
    let (Some(primary), Some(secondary)) = (
        input.primary_object_id.as_ref().and_then(id_string),
        input.object_id_to_merge.as_ref().and_then(id_string),
    ) else {
        return Err(ApiError::validation(
            "primaryObjectId and objectIdToMerge are required",
        ));
    };
    // GUESS: HubSpot's answers to an unknown id (404 OBJECT_NOT_FOUND) and to a record merged
    // with itself (400 VALIDATION_ERROR).
    live_id(st, ctx, &primary)?;
    live_id(st, ctx, &secondary)?;
    let new_id = st
        .merge_contacts(ctx.portal, &primary, &secondary, ChangeSource::Api, ctx.now)
        .map_err(|e| match e {
            MergeError::NotFound { .. } => not_found(),
            MergeError::SameRecord(_) => ApiError::validation(e.to_string()),
        })?;
    let p = st.portal_mut(ctx.portal)?;
    let rec = p.contacts.get(&new_id).ok_or_else(not_found)?;
    Ok(Reply::ok(contact_json(p, rec, &selection(None))))
}

/// `DELETE .../objects/contacts/{id}`: 204. An id already archived answers 204 again (archive
/// is idempotent); GUESS: an id that never existed (or was merged away) answers 404.
pub(crate) fn archive(st: &mut State, ctx: &Ctx, id: &str) -> ApiResult {
    let p = st.portal_mut(ctx.portal)?;
    let Ok(n) = id.trim().parse::<u64>() else {
        return Err(not_found());
    };
    if p.archived.contains_key(&n) {
        return Ok(Reply::empty(StatusCode::NO_CONTENT));
    }
    if !st.delete_contact(ctx.portal, n, ChangeSource::Api, ctx.now) {
        return Err(not_found());
    }
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GdprIn {
    object_id: Option<Value>,
    id_property: Option<String>,
}

/// `POST .../objects/contacts/gdpr-delete` `{objectId, idProperty?}`: 204.
pub(crate) fn gdpr_delete(st: &mut State, ctx: &Ctx, body: &[u8]) -> ApiResult {
    let input: GdprIn = parse_body(body)?;
    let Some(raw) = input.object_id.as_ref().and_then(id_string) else {
        return Err(ApiError::validation("objectId is required"));
    };
    let by_email = match input.id_property.as_deref() {
        None | Some("") => false,
        Some(s) if s.eq_ignore_ascii_case("hs_object_id") => false,
        Some(s) if s.eq_ignore_ascii_case("email") => true,
        Some(s) => {
            return Err(ApiError::validation(format!(
                "{s} is not a unique identifier property of contacts"
            )))
        }
    };
    let p = st.portal_mut(ctx.portal)?;
    let id = if by_email {
        p.find_by_email(&raw)
    } else {
        raw.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| p.contacts.contains_key(n) || p.archived.contains_key(n))
    };
    // GUESS: an unknown contact answers 404 (nothing is blocklisted).
    let id = id.ok_or_else(not_found)?;
    st.privacy_delete_contact(ctx.portal, id, ChangeSource::Api, ctx.now);
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}
