//! `hubspot-sidecar reconcile`: proves that HubSpot holds what the database
//! says for one Spot's matched contacts, and optionally repairs it.
//!
//! Delivery writes only the values that differ from what it remembers
//! writing (`contact_map.written`). A pipeline that marks records synced
//! without sending them looks healthy from the inside: nothing is queued,
//! nothing fails (Census lost three months of updates this way). The only
//! proof is to read the contacts back and compare them with values derived
//! afresh from the database, which is what this does, 100 contacts a call,
//! within the portal's rate limit.
//!
//! With `fix`, the drifted members are queued for delivery again, marked to
//! be written whole: delivery then sends every value instead of skipping
//! those it believes HubSpot already holds, which is the very belief the
//! drift proved wrong. Members whose contact HubSpot no longer has are
//! queued with the contact forgotten, so delivery looks their e-mail up
//! again (and finds the contact that replaced it, if any).

pub mod cli;

use std::collections::{BTreeMap, HashMap};

use chrono::DateTime;
use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::{Deserialize, Serialize};

use crate::hubspot::properties::PROPERTIES;
use crate::hubspot::{HubSpotError, Portal, BATCH_LIMIT};
use crate::store::{self, Db, DbError, MatchedContact, MemberRecord};

/// One property whose value in HubSpot differs from the database's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The member.
    pub member_id: i64,
    /// The member's HubSpot record id.
    pub contact_id: String,
    /// The e-mail the contact is mapped under.
    pub email: String,
    /// The property's name.
    pub property: String,
    /// HubSpot's value (None: empty, or not in its answer).
    pub hubspot: Option<String>,
    /// The value derived from the database.
    pub database: String,
}

/// What a reconciliation of one Spot on one portal found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The Spot.
    pub spot_id: i64,
    /// The portal its contacts were read from.
    pub portal_id: i64,
    /// Matched contacts read from HubSpot (found or missing).
    pub checked: usize,
    /// Matched members not checked: their record is gone or belongs to another Spot.
    pub skipped: usize,
    /// Record ids HubSpot did not return (deleted or merged contacts).
    pub missing_in_hubspot: Vec<String>,
    /// Contacts with at least one drifted property.
    pub drifted_contacts: usize,
    /// Every drifted property.
    pub drift: Vec<Drift>,
    /// With `fix`: how many drifted members were queued for delivery again.
    pub queued: Option<u64>,
}

/// How far a reconciliation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Matched contacts done (checked or skipped).
    pub checked: usize,
    /// Matched contacts in all.
    pub total: usize,
}

/// Why a reconciliation stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The database failed.
    #[error("reconcile: database: {0}")]
    Db(#[from] DbError),
    /// HubSpot failed or refused to read the contacts.
    #[error("reconcile: reading contacts from HubSpot: {0}")]
    HubSpot(#[from] HubSpotError),
}

/// One line that says what a report found.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "Spot {}, portal {}: {} contacts checked, {} drifted ({} properties)",
        r.spot_id,
        r.portal_id,
        r.checked,
        r.drifted_contacts,
        r.drift.len()
    );
    if !r.missing_in_hubspot.is_empty() {
        s.push_str(&format!(
            ", {} missing in HubSpot ({})",
            r.missing_in_hubspot.len(),
            r.missing_in_hubspot.join(", ")
        ));
    }
    if r.skipped > 0 {
        s.push_str(&format!(
            ", {} members gone or moved (not checked)",
            r.skipped
        ));
    }
    if let Some(q) = r.queued {
        s.push_str(&format!("; {q} contacts queued for delivery"));
    }
    s.push('.');
    s
}

/// The drift as a text table for a terminal: contact, property, HubSpot, database.
pub fn drift_table(r: &Report) -> String {
    let cell = |v: &str| -> String {
        let v = v.replace(['\n', '\r', '\t'], " ");
        if v.chars().count() > 40 {
            format!("{}…", v.chars().take(39).collect::<String>())
        } else {
            v
        }
    };
    let rows: Vec<[String; 4]> = r
        .drift
        .iter()
        .map(|d| {
            [
                cell(&format!("{} ({})", d.contact_id, d.email)),
                cell(&d.property),
                cell(d.hubspot.as_deref().unwrap_or("(empty)")),
                cell(if d.database.is_empty() {
                    "(empty)"
                } else {
                    &d.database
                }),
            ]
        })
        .collect();
    let head = ["contact", "property", "HubSpot", "database"].map(String::from);
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            std::iter::once(&head)
                .chain(&rows)
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String; 4]| -> String {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = line(&head);
    out.push_str(&line(&std::array::from_fn(|i| "-".repeat(widths[i]))));
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

/// Compares every matched contact of the Spot on `portal_id` with the
/// values derived from the database, page by page (reporting `progress`
/// after each), and with `fix` queues the drifted members for delivery again.
pub async fn reconcile(
    db: &Db,
    portal: &Portal,
    spot_id: i64,
    portal_id: i64,
    fix: bool,
    mut progress: impl FnMut(Progress),
) -> Result<Report, ReconcileError> {
    let names: Vec<&str> = PROPERTIES.iter().map(|p| p.name).collect();
    let total = store::count_matched_contacts(&*db.client().await?, spot_id, portal_id).await?;
    let total = usize::try_from(total).unwrap_or(0);
    let mut report = Report {
        spot_id,
        portal_id,
        ..Report::default()
    };
    let mut drifted: Vec<i64> = Vec::new();
    let mut missing: Vec<i64> = Vec::new();
    let mut after = i64::MIN;
    let mut done = 0;
    let mut last_page = false;
    // Pages whose contacts are being read from HubSpot, compared in order.
    let mut in_flight = FuturesOrdered::new();
    loop {
        while !last_page && in_flight.len() < PAGES_IN_FLIGHT {
            let page = store::matched_contacts(
                &*db.client().await?,
                spot_id,
                portal_id,
                after,
                BATCH_LIMIT as i64,
            )
            .await?;
            last_page = page.len() < BATCH_LIMIT;
            let Some(last) = page.last() else {
                break;
            };
            after = last.member_id;
            let ids: Vec<i64> = page.iter().map(|c| c.member_id).collect();
            let mut records: HashMap<i64, MemberRecord> =
                store::member_records(&*db.client().await?, &ids)
                    .await?
                    .into_iter()
                    .map(|r| (r.member_id, r))
                    .collect();
            let read = page.len();
            // A member gone, or now of another Spot, is not this Spot's to prove (G4).
            let live: Vec<(MatchedContact, MemberRecord)> = page
                .into_iter()
                .filter_map(|c| {
                    records
                        .remove(&c.member_id)
                        .filter(|r| r.spot_id == spot_id)
                        .map(|r| (c, r))
                })
                .collect();
            report.skipped += read - live.len();
            let mut contact_ids: Vec<String> =
                live.iter().map(|(c, _)| c.contact_id.clone()).collect();
            contact_ids.sort();
            contact_ids.dedup();
            let names = &names;
            in_flight.push_back(async move {
                let held = if contact_ids.is_empty() {
                    Ok(HashMap::new())
                } else {
                    read_with_retries(portal, &contact_ids, names).await
                };
                (read, live, held)
            });
        }
        let Some((read, live, held)) = in_flight.next().await else {
            break;
        };
        let held = held?;
        for (c, rec) in live {
            report.checked += 1;
            let Some(values) = held.get(&c.contact_id) else {
                report.missing_in_hubspot.push(c.contact_id.clone());
                missing.push(c.member_id);
                continue;
            };
            let (derived, _) = crate::deliver::derive(&rec);
            let diffs = compare(&derived, values);
            if diffs.is_empty() {
                continue;
            }
            drifted.push(c.member_id);
            report.drift.extend(
                diffs
                    .into_iter()
                    .map(|(property, hubspot, database)| Drift {
                        member_id: c.member_id,
                        contact_id: c.contact_id.clone(),
                        email: c.email.clone(),
                        property,
                        hubspot,
                        database,
                    }),
            );
        }
        done += read;
        // Rows added since the count must not show more than 100%.
        progress(Progress {
            checked: done,
            total: total.max(done),
        });
    }
    report.drifted_contacts = drifted.len();
    if fix {
        let mut client = db.client().await?;
        report.queued = Some(
            store::queue_for_delivery(&mut client, spot_id, portal_id, &drifted, &missing).await?,
        );
    }
    Ok(report)
}

/// Pages of 100 contacts read from HubSpot at once; the portal's shared
/// limiter still spaces every call. One at a time, a reconcile was bound by
/// the round trip, not by the budget: 50,000 contacts answered after 150 ms
/// at 100 calls per 10 s took 79.8 s, 1.60x the budget's bound; 4 at once,
/// 50.8 s, 1.02x (`cargo bench --bench pipeline -- --shape activation`).
const PAGES_IN_FLIGHT: usize = 4;

/// How many times one page's read is tried when HubSpot turns it away for now.
const READ_TRIES: u32 = 5;

/// Reads one page of contacts, again after a 429 or a transient failure
/// (with the one backoff), so one busy moment does not throw away the
/// pages already compared. The limiter already paces every try.
async fn read_with_retries(
    portal: &Portal,
    ids: &[String],
    names: &[&str],
) -> Result<HashMap<String, HashMap<String, Option<String>>>, HubSpotError> {
    let mut backoff = crate::backoff::Backoff::delivery();
    let mut tries = 0;
    loop {
        tries += 1;
        match portal.read_contact_properties(ids, names).await {
            Err(HubSpotError::RateLimited { retry_after, .. }) if tries < READ_TRIES => {
                tokio::time::sleep(retry_after.unwrap_or_else(|| backoff.next())).await;
            }
            Err(HubSpotError::Transient(_)) if tries < READ_TRIES => {
                tokio::time::sleep(backoff.next()).await;
            }
            other => return other,
        }
    }
}

/// The properties whose HubSpot value differs from the database's, as
/// (property, HubSpot's value, the database's). A property missing from
/// HubSpot's answer counts as empty, and empty is null (a NULL is written
/// as "", which clears the value); datetimes compare as instants, in
/// whichever format HubSpot answers.
fn compare(
    derived: &BTreeMap<String, String>,
    hubspot: &HashMap<String, Option<String>>,
) -> Vec<(String, Option<String>, String)> {
    derived
        .iter()
        .filter_map(|(name, database)| {
            let held = hubspot.get(name).cloned().flatten();
            let same = match held.as_deref() {
                None | Some("") => database.is_empty(),
                Some(h) if is_datetime(name) => {
                    h == database
                        || matches!((instant(h), instant(database)), (Some(a), Some(b)) if a == b)
                }
                // Everything else (groups and tags too: plain strings that
                // `join_names` joins in a fixed order) must match exactly.
                Some(h) => h == database,
            };
            (!same).then(|| (name.clone(), held, database.clone()))
        })
        .collect()
}

/// Whether the property is one of our datetime properties.
fn is_datetime(name: &str) -> bool {
    PROPERTIES
        .iter()
        .any(|p| p.name == name && p.type_ == "datetime")
}

/// A datetime value as epoch milliseconds: HubSpot answers ISO 8601 (with or
/// without milliseconds) or epoch milliseconds; `hubspot_time` writes ISO 8601.
fn instant(v: &str) -> Option<i64> {
    let v = v.trim();
    if let Ok(ms) = v.parse::<i64>() {
        return Some(ms);
    }
    DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITED: &str = "meltingspot_spot_invitation_date";

    fn derived(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn held(pairs: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn equal_values_show_no_drift() {
        let db = derived(&[
            ("meltingspot_member_role", "admin"),
            ("meltingspot_tags", "a;b"),
        ]);
        let hs = held(&[
            ("meltingspot_member_role", Some("admin")),
            ("meltingspot_tags", Some("a;b")),
        ]);
        assert!(compare(&db, &hs).is_empty());
    }

    #[test]
    fn a_changed_value_is_drift() {
        let db = derived(&[
            ("meltingspot_member_role", "admin"),
            ("meltingspot_headline", "new"),
        ]);
        let hs = held(&[
            ("meltingspot_member_role", Some("admin")),
            ("meltingspot_headline", Some("old")),
        ]);
        assert_eq!(
            compare(&db, &hs),
            vec![(
                "meltingspot_headline".to_string(),
                Some("old".to_string()),
                "new".to_string()
            )]
        );
    }

    #[test]
    fn null_and_empty_are_the_same() {
        let db = derived(&[("meltingspot_bio", ""), ("meltingspot_headline", "")]);
        let hs = held(&[
            ("meltingspot_bio", None),
            ("meltingspot_headline", Some("")),
        ]);
        assert!(compare(&db, &hs).is_empty());
        let db = derived(&[("meltingspot_bio", "hi")]);
        assert_eq!(compare(&db, &held(&[("meltingspot_bio", None)])).len(), 1);
    }

    #[test]
    fn datetimes_compare_as_instants() {
        let db = derived(&[(INVITED, "2024-05-01T10:00:00.000Z")]);
        for answer in [
            "2024-05-01T10:00:00Z",
            "2024-05-01T10:00:00.000Z",
            "1714557600000",
        ] {
            assert!(
                compare(&db, &held(&[(INVITED, Some(answer))])).is_empty(),
                "{answer}"
            );
        }
    }

    #[test]
    fn a_different_datetime_is_drift() {
        let db = derived(&[(INVITED, "2024-05-01T10:00:00.000Z")]);
        for answer in ["2024-05-01T10:00:01Z", "1714557600001", "not a date"] {
            assert_eq!(
                compare(&db, &held(&[(INVITED, Some(answer))])).len(),
                1,
                "{answer}"
            );
        }
    }

    #[test]
    fn a_property_missing_from_the_answer_counts_as_empty() {
        let db = derived(&[("meltingspot_bio", ""), ("meltingspot_headline", "hi")]);
        assert_eq!(
            compare(&db, &HashMap::new()),
            vec![("meltingspot_headline".to_string(), None, "hi".to_string())]
        );
    }
}
