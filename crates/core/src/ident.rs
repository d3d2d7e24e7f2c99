//! SQL identifiers that come from configuration (schema and table names).
//!
//! They are validated to a conservative alphabet and always rendered quoted, so
//! a name from a config file can never change the meaning of a statement.

use std::fmt;

/// Longest identifier PostgreSQL keeps without truncation (NAMEDATALEN - 1),
/// minus room for the `_text` suffix of the text view.
pub const MAX_IDENT_LEN: usize = 58;

/// Names the service uses for its own tables in the schema.
pub const RESERVED_TABLES: &[&str] = &[
    "history",
    "outbox",
    "conflicts",
    "dead_letters",
    "sync_events",
    "sync_state",
    "mirror_tables",
    "deferred_inputs",
];

/// A validated SQL identifier: lowercase ASCII letters, digits and `_`, not
/// starting with a digit, at most [`MAX_IDENT_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("must not be empty".into());
        }
        if name.len() > MAX_IDENT_LEN {
            return Err(format!("must be at most {MAX_IDENT_LEN} characters"));
        }
        let first = name.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first == b'_') {
            return Err("must start with a lowercase letter or '_'".into());
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err("may contain only lowercase letters, digits and '_'".into());
        }
        if name.starts_with("pg_") {
            return Err("must not start with 'pg_' (reserved by PostgreSQL)".into());
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier quoted for SQL text. The alphabet has no `"`, but quote
    /// doubling keeps this correct even if it ever widens.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }

    /// `name` in this schema, both quoted: how SQL names a table of the
    /// service's schema.
    pub fn qualify(&self, name: &Ident) -> String {
        format!("{}.{}", self.quoted(), name.quoted())
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["kv", "kv_app", "_x1", "etcd_sync"] {
            assert!(Ident::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn rejects_everything_that_could_change_sql() {
        for name in [
            "",
            "Kv",
            "1kv",
            "kv;drop table x",
            "kv\"",
            "kv name",
            "pg_catalog",
            "ünïcode",
            &"x".repeat(59),
        ] {
            assert!(Ident::parse(name).is_err(), "{name:?} should be rejected");
        }
    }

    #[test]
    fn quoted_wraps_in_double_quotes() {
        assert_eq!(Ident::parse("kv").unwrap().quoted(), "\"kv\"");
    }

    #[test]
    fn qualify_quotes_both_names() {
        let schema = Ident::parse("etcd_sync").unwrap();
        let table = Ident::parse("kv").unwrap();
        assert_eq!(schema.qualify(&table), "\"etcd_sync\".\"kv\"");
    }
}
