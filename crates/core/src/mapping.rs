//! Mappings: which etcd key prefix goes to which PostgreSQL table, in which
//! direction, under which conflict policy.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::INTERNAL_PREFIX;
use crate::ident::Ident;
use crate::keys;

/// How a mapping's values are shown in PostgreSQL besides their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueFormat {
    /// `value bytea` only.
    Bytes,
    /// Also `value_json jsonb`, generated (NULL when not JSON).
    Json,
}

impl ValueFormat {
    pub fn parse(s: &str) -> Option<ValueFormat> {
        match s {
            "bytes" => Some(ValueFormat::Bytes),
            "json" => Some(ValueFormat::Json),
            _ => None,
        }
    }
}

/// Which way changes flow for a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Both,
    EtcdToPg,
    PgToEtcd,
}

impl Direction {
    pub fn etcd_to_pg(self) -> bool {
        matches!(self, Direction::Both | Direction::EtcdToPg)
    }
    pub fn pg_to_etcd(self) -> bool {
        matches!(self, Direction::Both | Direction::PgToEtcd)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Both => "both",
            Direction::EtcdToPg => "etcd-to-pg",
            Direction::PgToEtcd => "pg-to-etcd",
        }
    }

    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "both" => Some(Direction::Both),
            "etcd-to-pg" => Some(Direction::EtcdToPg),
            "pg-to-etcd" => Some(Direction::PgToEtcd),
            _ => None,
        }
    }
}

/// How a conflict (a key changed on both sides since they last agreed) is
/// resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    NewestWins,
    EtcdWins,
    PgWins,
    Manual,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::NewestWins => "newest-wins",
            Policy::EtcdWins => "etcd-wins",
            Policy::PgWins => "pg-wins",
            Policy::Manual => "manual",
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "newest-wins" => Ok(Policy::NewestWins),
            "etcd-wins" => Ok(Policy::EtcdWins),
            "pg-wins" => Ok(Policy::PgWins),
            "manual" => Ok(Policy::Manual),
            other => Err(format!(
                "unknown policy {other:?}, expected newest-wins, etcd-wins, pg-wins or manual"
            )),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub prefix: Vec<u8>,
    pub table: Ident,
    pub direction: Direction,
    pub policy: Policy,
    /// The side `newest-wins` keeps when it cannot order two changes
    /// (`sync.newest_wins_tie`).
    pub tie: crate::policy::Side,
    pub value_format: ValueFormat,
    /// A GIN index on `value_json` (JSON values only).
    pub json_index: bool,
}

impl Mapping {
    /// Exclusive end of the prefix range; `None` = unbounded.
    pub fn range_end(&self) -> Option<Vec<u8>> {
        keys::prefix_end(&self.prefix)
    }

    /// The key range `[start, end)` of the mapping, narrowed to `within`
    /// when that is a prefix inside it (else the whole mapping).
    pub fn range_within(&self, within: Option<&[u8]>) -> (Vec<u8>, Option<Vec<u8>>) {
        match within {
            Some(prefix) if prefix.starts_with(&self.prefix) => {
                (prefix.to_vec(), keys::prefix_end(prefix))
            }
            _ => (self.prefix.clone(), self.range_end()),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix) && !key.starts_with(INTERNAL_PREFIX)
    }
}

/// The set of mappings, sorted by prefix. Prefixes never overlap (validated
/// at load), so a key belongs to at most one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingSet {
    mappings: Vec<Mapping>,
}

/// Two prefixes overlap when one is a prefix of the other.
pub fn prefixes_overlap(a: &[u8], b: &[u8]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

impl MappingSet {
    /// Builds the set; the caller has validated non-overlap and table names.
    pub fn new(mut mappings: Vec<Mapping>) -> Self {
        mappings.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        debug_assert!(
            mappings
                .windows(2)
                .all(|w| !prefixes_overlap(&w[0].prefix, &w[1].prefix)),
            "overlapping prefixes must be rejected by validation"
        );
        Self { mappings }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter()
    }

    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The mapping a key belongs to, if any. Internal keys belong to none.
    pub fn find(&self, key: &[u8]) -> Option<&Mapping> {
        if key.starts_with(INTERNAL_PREFIX) {
            return None;
        }
        // The candidate is the last mapping whose prefix is <= key.
        let idx = self
            .mappings
            .partition_point(|m| m.prefix.as_slice() <= key);
        let candidate = self.mappings.get(idx.checked_sub(1)?)?;
        candidate.contains(key).then_some(candidate)
    }

    pub fn by_table(&self, table: &str) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.table.as_str() == table)
    }

    /// The smallest single key range covering every mapping: one watch over it
    /// keeps events of one etcd revision (a multi-key txn) together.
    pub fn covering_range(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let start = self
            .mappings
            .first()
            .map(|m| m.prefix.clone())
            .unwrap_or_default();
        let mut end: Option<Vec<u8>> = Some(start.clone());
        for mapping in &self.mappings {
            end = match (end, mapping.range_end()) {
                (None, _) | (_, None) => None,
                (Some(a), Some(b)) => Some(a.max(b)),
            };
        }
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(prefix: &str, table: &str) -> Mapping {
        Mapping {
            prefix: prefix.as_bytes().to_vec(),
            table: Ident::parse(table).unwrap(),
            direction: Direction::Both,
            policy: Policy::NewestWins,
            tie: crate::policy::Side::Etcd,
            value_format: ValueFormat::Bytes,
            json_index: false,
        }
    }

    #[test]
    fn find_picks_the_owning_prefix() {
        let set = MappingSet::new(vec![mapping("/b/", "kv_b"), mapping("/a/", "kv_a")]);
        assert_eq!(set.find(b"/a/x").unwrap().table.as_str(), "kv_a");
        assert_eq!(set.find(b"/b/").unwrap().table.as_str(), "kv_b");
        assert!(set.find(b"/c/x").is_none());
        assert!(set.find(b"/a").is_none());
        assert!(set.find(b"").is_none());
    }

    #[test]
    fn empty_prefix_covers_everything_but_internal_keys() {
        let set = MappingSet::new(vec![mapping("", "kv")]);
        assert!(set.find(b"anything").is_some());
        assert!(set.find(b"\0\xff").is_some());
        assert!(set.find(b"__etcd_pg_sync/c/election/1").is_none());
        assert_eq!(set.covering_range(), (Vec::new(), None));
    }

    #[test]
    fn covering_range_spans_all_prefixes() {
        let set = MappingSet::new(vec![mapping("/b/", "kv_b"), mapping("/a/", "kv_a")]);
        assert_eq!(
            set.covering_range(),
            (b"/a/".to_vec(), Some(b"/b0".to_vec()))
        );
    }

    #[test]
    fn overlap_is_prefix_of_either_side() {
        assert!(prefixes_overlap(b"/a/", b"/a/b/"));
        assert!(prefixes_overlap(b"", b"/x"));
        assert!(!prefixes_overlap(b"/a/", b"/b/"));
        assert!(!prefixes_overlap(b"/a", b"/b"));
    }
}
