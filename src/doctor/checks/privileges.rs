//! What the sidecar's role may do: REPLICATION, SELECT on the tables it reads,
//! and creating its state schema.

use super::Check;
use crate::doctor::snapshot::Snapshot;
use crate::doctor::sql::{qualified, quote_ident};

pub(crate) fn check_role_replication(s: &Snapshot) -> Check {
    let name = format!("role {}", s.role.name);
    if s.role.superuser {
        Check::pass(
            name,
            "superuser (works; a role with REPLICATION and no superuser is enough, see sql/role.sql)",
        )
    } else if s.role.replication {
        Check::pass(name, "has REPLICATION")
    } else {
        Check::fail(
            name,
            "lacks REPLICATION: it cannot create or stream the slot",
            format!("ALTER ROLE {} WITH REPLICATION;", quote_ident(&s.role.name)),
        )
    }
}

pub(crate) fn check_select_privileges(s: &Snapshot) -> Check {
    let name = "select privilege";
    let missing: Vec<String> = s
        .source_tables
        .iter()
        .filter(|t| t.exists && !t.can_select)
        .map(|t| qualified(&t.schema, &t.name))
        .collect();
    let readable = s
        .source_tables
        .iter()
        .filter(|t| t.exists && t.can_select)
        .count();
    if missing.is_empty() {
        Check::pass(
            name,
            format!(
                "{} can read the {readable} tables the sidecar reads",
                s.role.name
            ),
        )
    } else {
        Check::fail(
            name,
            format!("{} cannot SELECT from {}", s.role.name, missing.join(", ")),
            format!(
                "GRANT SELECT ON {} TO {};",
                missing.join(", "),
                quote_ident(&s.role.name)
            ),
        )
    }
}

pub(crate) fn check_state_schema(s: &Snapshot) -> Check {
    let name = "state schema hubspot_sync";
    let role = quote_ident(&s.role.name);
    match (s.state_schema.exists, s.state_schema.usable) {
        (true, true) => Check::pass(name, format!("exists, {} may create in it", s.role.name)),
        (true, false) => Check::fail(
            name,
            format!(
                "exists but {} lacks USAGE or CREATE on it: migrations cannot run",
                s.role.name
            ),
            format!("ALTER SCHEMA hubspot_sync OWNER TO {role};"),
        ),
        (false, _) if s.state_schema.can_create_in_database => {
            Check::pass(name, "missing; the sidecar creates it at start".to_string())
        }
        (false, _) => Check::fail(
            name,
            format!("missing, and {} may not create schemas", s.role.name),
            format!("CREATE SCHEMA hubspot_sync AUTHORIZATION {role};"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::Status;
    use crate::doctor::fixtures::good;
    use crate::doctor::snapshot::{RoleInfo, StateSchema};

    #[test]
    fn role_without_replication_or_select() {
        let mut s = good();
        s.role = RoleInfo {
            name: "Reader".into(),
            superuser: false,
            replication: false,
        };
        s.source_tables[0].can_select = false;
        let r = check_role_replication(&s);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.fix.as_deref(),
            Some("ALTER ROLE \"Reader\" WITH REPLICATION;")
        );
        let p = check_select_privileges(&s);
        assert_eq!(p.status, Status::Fail);
        assert_eq!(
            p.fix.as_deref(),
            Some("GRANT SELECT ON public.members TO \"Reader\";")
        );
        s.role.superuser = true;
        assert_eq!(check_role_replication(&s).status, Status::Pass);
    }

    #[test]
    fn state_schema_rules() {
        let mut s = good();
        s.state_schema = StateSchema {
            exists: false,
            usable: false,
            can_create_in_database: true,
        };
        assert_eq!(check_state_schema(&s).status, Status::Pass);
        s.state_schema.can_create_in_database = false;
        let c = check_state_schema(&s);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.fix.as_deref(),
            Some("CREATE SCHEMA hubspot_sync AUTHORIZATION hubspot_sidecar;")
        );
        s.state_schema.exists = true;
        assert_eq!(check_state_schema(&s).status, Status::Fail);
    }
}
