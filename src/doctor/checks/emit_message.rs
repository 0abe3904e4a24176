//! Who may write into the stream: `pg_logical_emit_message` puts a message of
//! any size into the WAL, which the sidecar's stream must read whole. By
//! default PUBLIC may call it, so any role that can connect could send the
//! sidecar a message big enough to exhaust its memory. Only the sidecar's role
//! (for its settings markers) and superusers should hold EXECUTE.

use super::Check;
use crate::doctor::snapshot::Snapshot;
use crate::doctor::sql::quote_ident;

pub(crate) const NAME: &str = "pg_logical_emit_message";

/// At most this many role names in the detail.
const MAX_LISTED: usize = 10;

pub(crate) fn check_emit_message(s: &Snapshot) -> Check {
    let e = &s.emit_message;
    let role = &s.role.name;
    let sidecar_lacks_it = !s.role.superuser && !e.role_can_execute;
    let open = e.public || !e.others.is_empty();
    if !open && !sidecar_lacks_it {
        let who = if s.role.superuser {
            "only superusers".to_string()
        } else {
            format!("only {role} and superusers")
        };
        return Check::pass(NAME, format!("{who} can EXECUTE it"));
    }

    let mut problems = Vec::new();
    if e.public {
        problems.push(
            "EXECUTE is granted to PUBLIC: any role that can connect can write messages of any \
             size into the WAL the sidecar streams (a large one can exhaust its memory)"
                .to_string(),
        );
    } else if open {
        problems.push(format!(
            "roles other than {role} can EXECUTE it: {}: each can write messages of any size \
             into the WAL the sidecar streams (a large one can exhaust its memory)",
            listed(&e.others)
        ));
    }
    if sidecar_lacks_it {
        problems.push(format!(
            "{role} cannot EXECUTE it: the sidecar writes its settings markers with it"
        ));
    }

    let functions = e.overloads.join(", ");
    let mut statements = Vec::new();
    if open {
        let from: Vec<String> = std::iter::once("PUBLIC".to_string())
            .chain(e.grantees.iter().map(|g| quote_ident(g)))
            .collect();
        statements.push(format!(
            "REVOKE EXECUTE ON FUNCTION {functions} FROM {};",
            from.join(", ")
        ));
    }
    // A superuser needs no grant; any other sidecar role must keep the function.
    if !s.role.superuser {
        statements.push(format!(
            "GRANT EXECUTE ON FUNCTION {functions} TO {};",
            quote_ident(role)
        ));
    }
    statements.push("-- as sql/role.sql does".to_string());
    Check::fail(NAME, problems.join("; "), statements.join(" "))
}

/// `a, b, c`, or the first names and how many more.
fn listed(names: &[String]) -> String {
    if names.len() <= MAX_LISTED {
        names.join(", ")
    } else {
        format!(
            "{} and {} more",
            names[..MAX_LISTED].join(", "),
            names.len() - MAX_LISTED
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::Status;
    use crate::doctor::fixtures::good;

    const BOTH: &str = "pg_logical_emit_message(boolean,text,bytea), \
                        pg_logical_emit_message(boolean,text,text)";

    #[test]
    fn only_the_sidecar_and_superusers_pass() {
        let mut s = good();
        let c = check_emit_message(&s);
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert_eq!(
            c.detail,
            "only hubspot_sidecar and superusers can EXECUTE it"
        );
        s.role.superuser = true;
        s.emit_message.role_can_execute = true;
        assert_eq!(
            check_emit_message(&s).detail,
            "only superusers can EXECUTE it"
        );
    }

    #[test]
    fn public_execute_fails_with_revoke_and_grant() {
        let mut s = good();
        s.emit_message.public = true;
        s.emit_message.others = vec!["app".into(), "pg_monitor".into()];
        let c = check_emit_message(&s);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail.starts_with("EXECUTE is granted to PUBLIC: "),
            "{c:?}"
        );
        assert_eq!(
            c.fix.as_deref(),
            Some(
                format!(
                    "REVOKE EXECUTE ON FUNCTION {BOTH} FROM PUBLIC; \
                     GRANT EXECUTE ON FUNCTION {BOTH} TO hubspot_sidecar; -- as sql/role.sql does"
                )
                .as_str()
            )
        );

        // Run as a superuser, the fix grants nothing.
        s.role.superuser = true;
        assert_eq!(
            check_emit_message(&s).fix.as_deref(),
            Some(
                format!("REVOKE EXECUTE ON FUNCTION {BOTH} FROM PUBLIC; -- as sql/role.sql does")
                    .as_str()
            )
        );
    }

    #[test]
    fn other_roles_are_named_and_revoked() {
        let mut s = good();
        s.emit_message.grantees = vec!["App Writer".into()];
        s.emit_message.others = vec!["App Writer".into(), "bi".into()];
        let c = check_emit_message(&s);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail
                .starts_with("roles other than hubspot_sidecar can EXECUTE it: App Writer, bi: "),
            "{c:?}"
        );
        assert!(
            c.fix.as_deref().unwrap().starts_with(&format!(
                "REVOKE EXECUTE ON FUNCTION {BOTH} FROM PUBLIC, \"App Writer\"; GRANT"
            )),
            "{c:?}"
        );

        s.emit_message.others = (0..12).map(|i| format!("r{i}")).collect();
        assert!(check_emit_message(&s)
            .detail
            .contains("r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 and 2 more: "));
    }

    #[test]
    fn a_sidecar_role_without_execute_fails_with_the_grant() {
        let mut s = good();
        s.emit_message.role_can_execute = false;
        let c = check_emit_message(&s);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.detail,
            "hubspot_sidecar cannot EXECUTE it: the sidecar writes its settings markers with it"
        );
        assert_eq!(
            c.fix.as_deref(),
            Some(
                format!(
                    "GRANT EXECUTE ON FUNCTION {BOTH} TO hubspot_sidecar; -- as sql/role.sql does"
                )
                .as_str()
            )
        );
    }
}
