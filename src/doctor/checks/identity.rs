//! Replica identities of the published tables: usable for UPDATE and DELETE,
//! and FULL where the sidecar needs the old row.

use super::Check;
use crate::doctor::snapshot::{ReplicaIdentity, Snapshot};
use crate::doctor::{FULL_IDENTITY_TABLES, SOURCE_SCHEMA};

/// One FAIL/WARN per table with a problem, or one PASS for all.
pub(crate) fn check_replica_identities(s: &Snapshot) -> Vec<Check> {
    let mut out = Vec::new();
    for t in &s.published {
        let name = format!("replica identity {}", t.qualified());
        let table = t.qualified();
        match (t.identity, t.has_primary_key) {
            (ReplicaIdentity::Nothing, pk) => out.push(Check::fail(
                name,
                "NOTHING: every UPDATE and DELETE of this published table fails for the application",
                if pk {
                    format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT;")
                } else {
                    format!("ALTER TABLE {table} REPLICA IDENTITY FULL; (or add a primary key)")
                },
            )),
            (ReplicaIdentity::Default, false) => out.push(Check::fail(
                name,
                "DEFAULT without a primary key: every UPDATE and DELETE of this published table fails for the application",
                format!("ALTER TABLE {table} ADD PRIMARY KEY (id); (or ALTER TABLE {table} REPLICA IDENTITY FULL;)"),
            )),
            (ReplicaIdentity::Index, _) if !t.has_identity_index => out.push(Check::fail(
                name,
                "USING INDEX, but no valid index is marked as the replica identity",
                format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT; (or USING INDEX on a valid unique index)"),
            )),
            (identity, _)
                if t.schema == SOURCE_SCHEMA
                    && FULL_IDENTITY_TABLES.contains(&t.name.as_str())
                    && identity != ReplicaIdentity::Full =>
            {
                out.push(Check::fail(
                    name,
                    "not FULL: an UPDATE does not carry the old row, so a status or timestamp that changes \
                     cannot be told from one that was already set (member status activities are held back, \
                     others may repeat)",
                    format!("ALTER TABLE {table} REPLICA IDENTITY FULL;"),
                ))
            }
            _ => {}
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            "replica identity",
            format!(
                "all {} published tables have a usable replica identity",
                s.published.len()
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::Status;
    use crate::doctor::fixtures::good;
    use crate::doctor::snapshot::PublishedTable;

    #[test]
    fn replica_identity_rules() {
        let table = |name: &str, identity, pk, idx| PublishedTable {
            schema: "public".into(),
            name: name.into(),
            identity,
            has_primary_key: pk,
            has_identity_index: idx,
        };
        let mut s = good();
        s.published = vec![
            table("members", ReplicaIdentity::Nothing, true, false),
            table("tags", ReplicaIdentity::Default, false, false),
            table("groups", ReplicaIdentity::Index, false, true),
            table("topics", ReplicaIdentity::Index, false, false),
            table("live_registrations", ReplicaIdentity::Default, true, false),
            table("course_progress", ReplicaIdentity::Full, false, false),
            table("custom_roles", ReplicaIdentity::Full, false, false),
        ];
        let checks = check_replica_identities(&s);
        let status = |n: &str| {
            checks
                .iter()
                .find(|c| c.name == format!("replica identity public.{n}"))
                .map(|c| (c.status, c.fix.clone().unwrap_or_default()))
        };
        let (st, fix) = status("members").unwrap();
        assert_eq!(st, Status::Fail);
        assert_eq!(fix, "ALTER TABLE public.members REPLICA IDENTITY DEFAULT;");
        let (st, fix) = status("tags").unwrap();
        assert_eq!(st, Status::Fail);
        assert!(fix.contains("REPLICA IDENTITY FULL"), "{fix}");
        assert_eq!(status("groups"), None);
        assert_eq!(status("topics").unwrap().0, Status::Fail);
        let (st, fix) = status("live_registrations").unwrap();
        assert_eq!(st, Status::Fail);
        assert_eq!(
            fix,
            "ALTER TABLE public.live_registrations REPLICA IDENTITY FULL;"
        );
        assert_eq!(status("course_progress"), None);
        assert_eq!(status("custom_roles"), None);
    }
}
