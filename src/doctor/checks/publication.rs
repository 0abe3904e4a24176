//! The publication: that it exists, publishes every operation, and holds every
//! table the sidecar needs.

use std::fmt::Write as _;

use super::Check;
use crate::doctor::snapshot::Snapshot;
use crate::doctor::sql::{create_publication_sql, qualified, quote_ident};
use crate::doctor::{Options, FULL_IDENTITY_TABLES, REQUIRED_TABLES, SOURCE_SCHEMA};

pub(crate) fn check_publication(s: &Snapshot, opts: &Options) -> Check {
    let name = format!("publication {}", opts.publication);
    let Some(p) = &s.publication else {
        return Check::fail(
            name,
            "does not exist: the sidecar cannot stream without it",
            create_publication_sql(&opts.publication),
        );
    };
    let mut missing = Vec::new();
    for (on, op) in [
        (p.insert, "insert"),
        (p.update, "update"),
        (p.delete, "delete"),
    ] {
        if !on {
            missing.push(op);
        }
    }
    let fix = format!(
        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
        quote_ident(&opts.publication)
    );
    let scope = if p.all_tables {
        "FOR ALL TABLES"
    } else {
        "FOR TABLE"
    };
    if !missing.is_empty() {
        return Check::fail(
            name,
            format!(
                "exists ({scope}) but does not publish {}",
                missing.join(", ")
            ),
            fix,
        );
    }
    if !p.truncate {
        return Check::warn(
            name,
            format!("exists ({scope}) but does not publish truncate: a TRUNCATE would go unseen"),
            fix,
        );
    }
    Check::pass(
        name,
        format!("exists ({scope}), publishes insert, update, delete, truncate"),
    )
}

pub(crate) fn check_publication_tables(s: &Snapshot, opts: &Options) -> Check {
    let name = "publication tables";
    let published = |t: &str| {
        s.published
            .iter()
            .any(|p| p.schema == SOURCE_SCHEMA && p.name == t)
    };
    let exists = |t: &str| {
        s.source_tables
            .iter()
            .any(|st| st.schema == SOURCE_SCHEMA && st.name == t && st.exists)
    };
    let missing: Vec<&str> = REQUIRED_TABLES
        .iter()
        .copied()
        .filter(|t| !published(t))
        .collect();
    if missing.is_empty() {
        return Check::pass(
            name,
            format!(
                "all {} required tables are published",
                REQUIRED_TABLES.len()
            ),
        );
    }
    let absent: Vec<String> = missing
        .iter()
        .filter(|t| !exists(t))
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let addable: Vec<String> = missing
        .iter()
        .filter(|t| exists(t))
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let listed: Vec<String> = missing
        .iter()
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let mut fix = String::new();
    if !addable.is_empty() {
        let _ = write!(
            fix,
            "ALTER PUBLICATION {} ADD TABLE {};",
            quote_ident(&opts.publication),
            addable.join(", ")
        );
        for t in FULL_IDENTITY_TABLES {
            if addable.contains(&qualified(SOURCE_SCHEMA, t)) {
                let _ = write!(
                    fix,
                    " ALTER TABLE {} REPLICA IDENTITY FULL;",
                    qualified(SOURCE_SCHEMA, t)
                );
            }
        }
    }
    if !absent.is_empty() {
        if !fix.is_empty() {
            fix.push(' ');
        }
        let _ = write!(
            fix,
            "create {} from sql/meltingspot_schema.sql, then add them to the publication",
            absent.join(", ")
        );
    }
    Check::fail(
        name,
        format!(
            "not published: {} (their changes would never reach HubSpot)",
            listed.join(", ")
        ),
        fix,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::{evaluate, Status};
    use crate::doctor::fixtures::{good, opts};

    fn by_name<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
    }

    #[test]
    fn a_missing_publication_fails_with_create_publication() {
        let mut s = good();
        s.publication = None;
        s.published.clear();
        let checks = evaluate(&s, &opts());
        let c = by_name(&checks, "publication hubspot_sidecar");
        assert_eq!(c.status, Status::Fail);
        let fix = c.fix.as_deref().unwrap();
        assert!(fix.starts_with("CREATE PUBLICATION hubspot_sidecar FOR TABLE public.members,"));
        assert!(fix.contains("ALTER TABLE public.course_progress REPLICA IDENTITY FULL;"));
        // The table and identity checks have nothing to look at.
        assert!(!checks.iter().any(|c| c.name == "publication tables"));
    }

    #[test]
    fn publication_operations() {
        let mut s = good();
        s.publication.as_mut().unwrap().truncate = false;
        assert_eq!(check_publication(&s, &opts()).status, Status::Warn);
        s.publication.as_mut().unwrap().delete = false;
        let c = check_publication(&s, &opts());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("delete"));
        assert!(c
            .fix
            .unwrap()
            .contains("SET (publish = 'insert, update, delete, truncate')"));
    }

    #[test]
    fn missing_tables_are_named_with_alter_publication() {
        let mut s = good();
        s.published
            .retain(|t| t.name != "tags" && t.name != "course_progress");
        let c = check_publication_tables(&s, &opts());
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("public.tags"), "{}", c.detail);
        let fix = c.fix.unwrap();
        assert!(fix.starts_with(
            "ALTER PUBLICATION hubspot_sidecar ADD TABLE public.tags, public.course_progress;"
        ));
        assert!(fix.contains("ALTER TABLE public.course_progress REPLICA IDENTITY FULL;"));
        // A table that does not exist cannot be added: the schema is named instead.
        s.source_tables.retain(|t| t.name != "tags");
        let fix = check_publication_tables(&s, &opts()).fix.unwrap();
        assert!(fix.contains("create public.tags from sql/meltingspot_schema.sql"));
    }
}
