//! The live contacts of a portal, with their e-mail indexes.
//!
//! Records are kept by id (iteration in id order, as lists and searches expect) next to two
//! indexes from normalized e-mail (trimmed, lower-cased) to the ids holding it: one for the
//! primary `email`, one for every e-mail (primary and `hs_additional_emails`). The fields are
//! private: every change goes through `insert`, `remove` or `update`, which keep the indexes
//! right, so a look-up by e-mail is a hash look-up instead of a scan of every contact.
//!
//! An index entry holds all the ids with that e-mail in ascending order, and a look-up
//! answers the lowest: exactly what the former scan in id order answered, even if a seed
//! gives two contacts the same e-mail.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeBounds;

use crate::state::ContactRec;

/// The one normalization of e-mail look-ups: trimmed, lower-cased.
pub(crate) fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

#[derive(Default)]
pub(crate) struct ContactStore {
    by_id: BTreeMap<u64, ContactRec>,
    /// Normalized primary e-mail -> ids (ascending).
    by_email: HashMap<String, Vec<u64>>,
    /// Normalized primary or additional e-mail -> ids (ascending).
    by_any_email: HashMap<String, Vec<u64>>,
}

/// The index keys of a record: its primary e-mail, and all its e-mails (deduplicated).
fn keys(rec: &ContactRec) -> (Option<String>, Vec<String>) {
    let primary = rec.email().map(normalize_email).filter(|e| !e.is_empty());
    let mut any: Vec<String> = Vec::new();
    for e in rec.emails().map(normalize_email) {
        if !e.is_empty() && !any.contains(&e) {
            any.push(e);
        }
    }
    (primary, any)
}

fn add(index: &mut HashMap<String, Vec<u64>>, key: String, id: u64) {
    let ids = index.entry(key).or_default();
    if let Err(at) = ids.binary_search(&id) {
        ids.insert(at, id);
    }
}

fn drop_id(index: &mut HashMap<String, Vec<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

fn first(index: &HashMap<String, Vec<u64>>, email: &str) -> Option<u64> {
    let wanted = normalize_email(email);
    if wanted.is_empty() {
        return None;
    }
    index.get(&wanted).and_then(|ids| ids.first().copied())
}

impl ContactStore {
    fn index(&mut self, rec: &ContactRec) {
        let (primary, any) = keys(rec);
        if let Some(k) = primary {
            add(&mut self.by_email, k, rec.id);
        }
        for k in any {
            add(&mut self.by_any_email, k, rec.id);
        }
    }

    fn unindex(&mut self, rec: &ContactRec) {
        let (primary, any) = keys(rec);
        if let Some(k) = primary {
            drop_id(&mut self.by_email, &k, rec.id);
        }
        for k in any {
            drop_id(&mut self.by_any_email, &k, rec.id);
        }
    }

    pub fn get(&self, id: &u64) -> Option<&ContactRec> {
        self.by_id.get(id)
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.by_id.contains_key(id)
    }

    /// In id order.
    pub fn values(&self) -> impl Iterator<Item = &ContactRec> {
        self.by_id.values()
    }

    pub fn range<R: RangeBounds<u64>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = (&u64, &ContactRec)> {
        self.by_id.range(range)
    }

    /// Adds (or replaces) the record `id`; `rec.id` is set to `id`.
    pub fn insert(&mut self, id: u64, mut rec: ContactRec) -> Option<ContactRec> {
        rec.id = id;
        let old = self.remove(&id);
        self.index(&rec);
        self.by_id.insert(id, rec);
        old
    }

    pub fn remove(&mut self, id: &u64) -> Option<ContactRec> {
        let rec = self.by_id.remove(id)?;
        self.unindex(&rec);
        Some(rec)
    }

    /// Changes the record `id` in place (its e-mails included: it is re-indexed after `f`).
    /// `None` when there is no such record.
    pub fn update<T>(&mut self, id: u64, f: impl FnOnce(&mut ContactRec) -> T) -> Option<T> {
        let mut rec = self.remove(&id)?;
        let out = f(&mut rec);
        self.insert(id, rec);
        Some(out)
    }

    /// The lowest id whose primary e-mail matches, trimmed and case-insensitively.
    pub fn find_by_email(&self, email: &str) -> Option<u64> {
        first(&self.by_email, email)
    }

    /// The lowest id holding `email` as primary or additional e-mail.
    pub fn find_by_any_email(&self, email: &str) -> Option<u64> {
        first(&self.by_any_email, email)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;

    use super::*;
    use crate::model::CreatedBy;
    use crate::state::ADDITIONAL_EMAILS;

    fn rec(props: &[(&str, &str)]) -> ContactRec {
        let now = Utc::now();
        ContactRec {
            id: 0,
            props: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created_by: CreatedBy::Seed,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn indexes_follow_inserts_updates_and_removals() {
        let mut s = ContactStore::default();
        s.insert(7, rec(&[("email", " Ada@X.com ")]));
        s.insert(
            9,
            rec(&[
                ("email", "bob@x.com"),
                (ADDITIONAL_EMAILS, "old@x.com; BOB@x.com ;"),
            ]),
        );
        assert_eq!(s.find_by_email("ada@x.COM "), Some(7));
        assert_eq!(s.find_by_email("old@x.com"), None);
        assert_eq!(s.find_by_any_email(" OLD@x.com"), Some(9));
        assert_eq!(s.find_by_any_email("bob@x.com"), Some(9));
        assert_eq!(s.find_by_email(""), None);
        assert_eq!(s.find_by_any_email("  "), None);

        // A duplicate primary e-mail: the lowest id answers, as the former scan did.
        s.insert(3, rec(&[("email", "ada@x.com")]));
        assert_eq!(s.find_by_email("ada@x.com"), Some(3));
        s.remove(&3);
        assert_eq!(s.find_by_email("ada@x.com"), Some(7));

        s.update(7, |c| {
            c.props.insert("email".into(), "ada2@x.com".into());
        });
        assert_eq!(s.find_by_email("ada@x.com"), None);
        assert_eq!(s.find_by_any_email("ada@x.com"), None);
        assert_eq!(s.find_by_email("ADA2@x.com"), Some(7));
        assert_eq!(s.update(8, |_| ()), None);

        s.update(9, |c| {
            c.props.remove(ADDITIONAL_EMAILS);
        });
        assert_eq!(s.find_by_any_email("old@x.com"), None);
        assert_eq!(s.find_by_any_email("bob@x.com"), Some(9));

        s.remove(&9);
        assert_eq!(s.find_by_any_email("bob@x.com"), None);
        assert_eq!(s.values().map(|c| c.id).collect::<Vec<_>>(), vec![7]);
        assert!(s.by_email.values().all(|v| !v.is_empty()));
        assert_eq!(s.by_email.len(), 1);
        assert_eq!(s.by_any_email.len(), 1);
    }
}
