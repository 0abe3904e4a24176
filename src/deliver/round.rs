//! The I/O of one delivery round for up to 100 rows of one portal: read the
//! members' current values and contact states, let `plan` decide, make the
//! HubSpot calls it asks for, and store how each row ended. Outbox rows are
//! deleted only after HubSpot accepted the write.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::plan::{self, ItemResult, Records, Tally};
use super::shared::{ContactKeys, ContactStates};
use super::{DeliverContext, DeliverError};
use crate::failpoints::{crash_point, CONTACT_CREATED, HUBSPOT_ACCEPTED};
use crate::hubspot::contacts::{existing_id, schema_missing_in, Resolution};
use crate::hubspot::timeline::is_input_refusal;
use crate::hubspot::{ApiError, CreateResult, Endpoint, HubSpotError, Portal};
use crate::internal_events::{CrossSpotReferencesIgnored, DeadLettered};
use crate::metrics::Metrics;
use crate::store::{self, Db, Fence, Marker, QueuedActivity, RoundDone};

/// Reads the members' records, keyed by member id, and what the contact map
/// knows of `keys` on the portal: two statements shared with the other
/// rounds asking meanwhile (`shared`), run at once.
async fn records_and_states(
    ctx: &DeliverContext,
    portal_id: i64,
    member_ids: Vec<i64>,
    keys: Vec<(i64, i64)>,
) -> Result<(Records, ContactStates), DeliverError> {
    let (records, states) = futures_util::future::try_join(
        ctx.shared.members.ask(member_ids),
        ctx.shared.contacts.ask(ContactKeys { portal_id, keys }),
    )
    .await?;
    let crossing: i64 = records.iter().map(|r| r.cross_spot_refs).sum();
    if crossing > 0 {
        CrossSpotReferencesIgnored { count: crossing }.emit(&ctx.metrics);
    }
    Ok((
        records.into_iter().map(|r| (r.member_id, r)).collect(),
        states,
    ))
}

fn count(metrics: &Metrics, tally: &Tally) {
    match tally {
        Tally::Nothing => {}
        Tally::Written => metrics.contacts_written.inc(),
        Tally::Created => {
            metrics.contacts_created.inc();
            metrics.contacts_written.inc();
        }
        Tally::Delivered => {}
        Tally::Remapped => metrics
            .contacts_remapped
            .with_label_values(&["update"])
            .inc(),
        Tally::Forgotten => metrics
            .contacts_forgotten
            .with_label_values(&["update"])
            .inc(),
        Tally::Conflict => metrics.contact_conflicts.inc(),
        Tally::DeadLetter {
            kind,
            member_id,
            category,
        } => DeadLettered {
            kind: *kind,
            member_id: *member_id,
            category,
        }
        .emit(metrics),
    }
}

/// Delivers the property changes of `markers` and stores how each ended.
pub(super) async fn deliver_properties(
    ctx: &DeliverContext,
    portal: &Portal,
    fence: Fence,
    markers: &[Marker],
) -> Result<(), DeliverError> {
    let (metrics, db) = (&*ctx.metrics, &ctx.db);
    let member_ids: Vec<i64> = markers.iter().map(|m| m.member_id).collect();
    let keys: Vec<(i64, i64)> = markers.iter().map(|m| (m.spot_id, m.member_id)).collect();
    let (records, mut states) =
        records_and_states(ctx, fence.portal_id, member_ids, keys.clone()).await?;
    // A row `reconcile --fix` queued: HubSpot was proven to differ from what
    // the contact map says was written, so nothing is taken as written.
    for m in markers.iter().filter(|m| m.rewrite) {
        if let Some(state) = states.get_mut(&(m.spot_id, m.member_id)) {
            state.written.clear();
        }
    }

    // Resolve e-mails we do not know yet, or that changed, in one batch read.
    let lookups = plan::emails_to_look_up(&records, &states, &keys);
    let (found, refused, suppressed) = look_up(db, portal, fence.portal_id, lookups).await?;

    let plan = plan::plan_properties(markers, &records, &states, &found, &refused, &suppressed);
    for tally in &plan.tallies {
        count(metrics, tally);
    }
    metrics.members_suppressed.inc_by(plan.suppressed as u64);
    metrics.values_truncated.inc_by(plan.truncated as u64);
    metrics
        .members_without_contact
        .inc_by(plan.without_contact as u64);
    let mut completions = plan.completions;

    if !plan.creates.is_empty() {
        let inputs: Vec<(String, BTreeMap<String, String>)> = plan
            .creates
            .iter()
            .map(|c| (c.trace.clone(), c.properties.clone()))
            .collect();
        let (answers, rejected) = isolating(
            portal,
            Endpoint::ContactsBatchCreate.operation(),
            &inputs,
            |batch| async move { portal.create_contacts(&batch).await },
        )
        .await?;
        crash_point(CONTACT_CREATED);
        let mut results: HashMap<String, CreateResult> = answers.into_iter().flatten().collect();
        for (i, e) in rejected {
            // "Contact already exists. Existing ID: N": created meanwhile, use it.
            let result = match existing_id(&e.message) {
                Some(id) => CreateResult::Exists(id),
                None => {
                    let (category, message) = reason(&e);
                    CreateResult::Rejected { category, message }
                }
            };
            results.insert(inputs[i].0.clone(), result);
        }
        for (completion, tally) in plan::settle_creates(markers, plan.creates, &results) {
            count(metrics, &tally);
            completions.push(completion);
        }
    }

    let inputs: Vec<(String, BTreeMap<String, String>)> = plan
        .updates
        .iter()
        .map(|u| (u.contact_id.clone(), u.diff.clone()))
        .collect();
    let results = update_isolating_rejects(portal, inputs).await?;
    if !results.is_empty() {
        crash_point(HUBSPOT_ACCEPTED);
    }
    let missing = read_back_missing(db, portal, fence, &plan.updates, &results).await?;
    for (completion, tally) in
        plan::settle_updates(markers, &records, plan.updates, results, &missing)
    {
        count(metrics, &tally);
        completions.push(completion);
    }
    let done = RoundDone {
        fence,
        done: completions,
    };
    if !ctx.shared.complete.ask(done).await? {
        return Err(DeliverError::Superseded);
    }
    Ok(())
}

/// Calls `call` with the whole batch; when HubSpot rejects a batch as a whole
/// (a permanent 4xx), splits it in halves until each rejected input stands
/// alone, so one bad input never stalls the portal (G8). Returns the answers
/// of the accepted groups and the error of each input rejected alone.
async fn isolating<I, R, F, Fut>(
    portal: &Portal,
    operation: &'static str,
    inputs: &[I],
    mut call: F,
) -> Result<(Vec<R>, Vec<(usize, Box<ApiError>)>), HubSpotError>
where
    I: Clone,
    F: FnMut(Vec<I>) -> Fut,
    Fut: std::future::Future<Output = Result<R, HubSpotError>>,
{
    let mut answers = Vec::new();
    let mut rejected = Vec::new();
    let mut pending: Vec<Vec<usize>> = if inputs.is_empty() {
        Vec::new()
    } else {
        vec![(0..inputs.len()).collect()]
    };
    while let Some(group) = pending.pop() {
        let batch: Vec<I> = group.iter().map(|&i| inputs[i].clone()).collect();
        match call(batch).await {
            Ok(answer) => answers.push(answer),
            // A route or request-shape refusal is nobody's input: the round fails.
            Err(e) if !is_input_refusal(&e) => return Err(e),
            Err(HubSpotError::Rejected { error, .. }) if group.len() == 1 => {
                rejected.push((group[0], error));
            }
            Err(_) => {
                portal.split_call(operation);
                let (a, b) = group.split_at(group.len() / 2);
                pending.push(b.to_vec());
                pending.push(a.to_vec());
            }
        }
    }
    Ok((answers, rejected))
}

/// The reason a rejected input is dead-lettered with.
fn reason(error: &ApiError) -> (String, String) {
    let text = if error.message.is_empty() {
        error.category.clone()
    } else {
        error.message.clone()
    };
    (error.category.clone(), text)
}

/// Looks e-mails up, except those suppressed on the portal (returned apart:
/// a person deleted there for privacy is never looked up again); an e-mail
/// HubSpot refuses is returned apart with its reason instead of failing the
/// round.
async fn look_up(
    db: &Db,
    portal: &Portal,
    portal_id: i64,
    mut emails: Vec<String>,
) -> Result<(HashMap<String, String>, plan::Refused, plan::Suppressed), DeliverError> {
    if emails.is_empty() {
        return Ok(Default::default());
    }
    let suppressed =
        store::portal_changes::suppressed_among(&*db.client().await?, portal_id, &emails).await?;
    emails.retain(|e| !suppressed.contains(e));
    if emails.is_empty() {
        return Ok((HashMap::new(), plan::Refused::new(), suppressed));
    }
    let emails = &emails;
    let (answers, rejected) = isolating(
        portal,
        Endpoint::ContactsBatchRead.operation(),
        emails,
        |batch| async move { portal.read_contacts_by_email(&batch).await },
    )
    .await?;
    let found = answers.into_iter().flatten().collect();
    let refused = rejected
        .into_iter()
        .map(|(i, e)| (emails[i].clone(), reason(&e)))
        .collect();
    Ok((found, refused, suppressed))
}

/// Reads back by id the records an update was answered OBJECT_NOT_FOUND
/// for, to tell merges from deletions (reference §10), and finds the
/// members of the Spot already on the merged records.
async fn read_back_missing(
    db: &Db,
    portal: &Portal,
    fence: Fence,
    updates: &[plan::PendingUpdate],
    results: &[ItemResult],
) -> Result<plan::Missing, DeliverError> {
    let ids: Vec<String> = updates
        .iter()
        .zip(results)
        .filter(|(_, r)| **r == ItemResult::Missing)
        .map(|(u, _)| u.contact_id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(plan::Missing::default());
    }
    let resolved = portal.resolve_contact_ids(&ids).await?;
    let merged: Vec<String> = resolved
        .values()
        .filter_map(|r| match r {
            Resolution::MergedInto(new) => Some(new.clone()),
            _ => None,
        })
        .collect();
    let taken = if merged.is_empty() {
        HashMap::new()
    } else {
        store::portal_changes::members_on_contacts(
            &*db.client().await?,
            fence.spot_id,
            fence.portal_id,
            &merged,
        )
        .await?
    };
    Ok(plan::Missing { resolved, taken })
}

/// Batch update; when HubSpot rejects the batch, the inputs it names (or, when
/// it names none, halves of the batch) are retried apart until each bad input
/// stands alone and can be dead-lettered without holding back the others.
async fn update_isolating_rejects(
    portal: &Portal,
    inputs: Vec<(String, BTreeMap<String, String>)>,
) -> Result<Vec<ItemResult>, HubSpotError> {
    let mut results: Vec<Option<ItemResult>> = (0..inputs.len()).map(|_| None).collect();
    let mut pending: Vec<Vec<usize>> = if inputs.is_empty() {
        Vec::new()
    } else {
        vec![(0..inputs.len()).collect()]
    };
    while let Some(group) = pending.pop() {
        let batch: Vec<_> = group.iter().map(|&i| inputs[i].clone()).collect();
        match portal.update_contacts(&batch).await {
            Ok(outcome) => {
                for &i in &group {
                    let id = &inputs[i].0;
                    results[i] = Some(if outcome.missing.contains(id) {
                        ItemResult::Missing
                    } else if let Some((category, message)) = outcome.rejected.get(id) {
                        ItemResult::Rejected(category.clone(), message.clone())
                    } else {
                        ItemResult::Ok
                    });
                }
            }
            // Our own properties are gone: recreate them, dead-letter nothing.
            Err(HubSpotError::Rejected { error, .. }) if schema_missing_in(&error) => {
                return Err(HubSpotError::SchemaMissing(error.message.clone()));
            }
            Err(HubSpotError::Rejected { error, .. }) if group.len() == 1 => {
                let (category, text) = reason(&error);
                results[group[0]] = Some(ItemResult::Rejected(category, text));
            }
            Err(HubSpotError::Rejected { error, .. }) => {
                portal.split_call(Endpoint::ContactsBatchUpdate.operation());
                let named = named_ids(&error);
                let (bad, good): (Vec<usize>, Vec<usize>) =
                    group.iter().partition(|&&i| named.contains(&inputs[i].0));
                if !bad.is_empty() && bad.len() < group.len() {
                    pending.extend(bad.into_iter().map(|i| vec![i]));
                    pending.push(good);
                } else {
                    let (a, b) = group.split_at(group.len() / 2);
                    pending.push(a.to_vec());
                    pending.push(b.to_vec());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(ItemResult::Ok))
        .collect())
}

/// Record ids a 400 body names in `context.ids`/`context.id`, at the top or per error.
fn named_ids(error: &ApiError) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut collect = |ctx: Option<&serde_json::Value>| {
        for key in ["ids", "id"] {
            if let Some(arr) = ctx.and_then(|c| c.get(key)).and_then(|v| v.as_array()) {
                out.extend(arr.iter().filter_map(|v| v.as_str().map(str::to_string)));
            }
        }
    };
    collect(error.context.as_ref());
    for e in &error.errors {
        collect(e.get("context"));
    }
    out
}

/// Delivers up to 100 queued timeline events and stores how each ended.
/// Returns the soonest an event it put off (waiting for its contact) comes due.
pub(super) async fn deliver_activities(
    ctx: &DeliverContext,
    portal: &Portal,
    fence: Fence,
    queued: Vec<QueuedActivity>,
) -> Result<Option<std::time::Duration>, DeliverError> {
    let (metrics, db, sink) = (&*ctx.metrics, &ctx.db, &ctx.sink);
    let mut member_ids: Vec<i64> = queued.iter().map(|q| q.member_id).collect();
    member_ids.sort_unstable();
    member_ids.dedup();
    let keys: Vec<(i64, i64)> = queued.iter().map(|q| (q.spot_id, q.member_id)).collect();
    let (records, states) =
        records_and_states(ctx, fence.portal_id, member_ids, keys.clone()).await?;
    let creating: HashSet<(i64, i64)> = store::pending_creations(&*db.client().await?, &keys)
        .await?
        .into_iter()
        .collect();
    let lookups = plan::emails_to_look_up(&records, &states, &keys);
    let (found, refused, suppressed) = look_up(db, portal, fence.portal_id, lookups).await?;

    let plan = plan::plan_activities(
        queued,
        &records,
        &states,
        &creating,
        &found,
        &refused,
        &suppressed,
    );
    for tally in &plan.tallies {
        count(metrics, tally);
    }
    metrics.members_suppressed.inc_by(plan.suppressed as u64);
    metrics
        .activities_without_contact
        .inc_by(plan.without_contact as u64);
    let mut done = plan.done;
    if !plan.events.is_empty() {
        let outcomes = portal.send_events(sink, &plan.events).await?;
        crash_point(HUBSPOT_ACCEPTED);
        for (d, tally, delivered) in plan::settle_events(plan.sending, &outcomes) {
            if let Some(q) = delivered {
                metrics
                    .activities
                    .with_label_values(&[q.activity.category().name(), q.activity.name()])
                    .inc();
            }
            count(metrics, &tally);
            done.push(d);
        }
    }
    let put_off = done
        .iter()
        .filter_map(|d| match d {
            store::ActivityDone::Later(_, delay) => Some(*delay),
            _ => None,
        })
        .min();
    if !store::complete_activities(&mut *db.client().await?, fence, &done).await? {
        return Err(DeliverError::Superseded);
    }
    Ok(put_off)
}
