//! Quoting and SQL-building helpers: the identifiers, literals and statements
//! that the checks print as fixes.

use std::fmt::Write as _;

use super::{FULL_IDENTITY_TABLES, REQUIRED_TABLES, SOURCE_SCHEMA};

/// The statement that creates the publication as `sql/publication.sql` does.
pub(crate) fn create_publication_sql(publication: &str) -> String {
    let tables: Vec<String> = REQUIRED_TABLES
        .iter()
        .map(|t| qualified(SOURCE_SCHEMA, t))
        .collect();
    let mut sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate');",
        quote_ident(publication),
        tables.join(", ")
    );
    for t in FULL_IDENTITY_TABLES {
        let _ = write!(
            sql,
            " ALTER TABLE {} REPLICA IDENTITY FULL;",
            qualified(SOURCE_SCHEMA, t)
        );
    }
    sql.push_str(" (as in sql/publication.sql)");
    sql
}

/// An identifier as SQL writes it: bare when that is unambiguous, else quoted.
pub(crate) fn quote_ident(name: &str) -> String {
    let simple = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if simple {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

pub(crate) fn split_qualified(q: &str) -> (String, String) {
    match q.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => (SOURCE_SCHEMA.to_string(), q.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::checks::bytes_text;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("hubspot_sidecar"), "hubspot_sidecar");
        assert_eq!(quote_ident("My Pub"), "\"My Pub\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(bytes_text(3 << 20), "3.0 MiB");
        assert_eq!(bytes_text(512), "512 bytes");
    }
}
