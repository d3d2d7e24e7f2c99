//! The ranges of a parallel catch-up (`catchup_ranges`, migration 000013).
//!
//! When the leader is far behind etcd it splits the keyspace into ranges
//! and replays each with its own watch. Each range keeps its own
//! checkpoint, moved in the apply transaction of its changes
//! ([`crate::fence::Checkpoint::Range`]); the global checkpoint stays until
//! the replays end, then moves to the slowest range's. From then on a
//! watch replaying from the global checkpoint skips, per key, the changes
//! its range already applied ([`Ranges::applied`]), and the checkpoint's
//! advance deletes the ranges it passes. Anything that sets the
//! checkpoint anew deletes them all.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bytea, Nullable};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::error::StoreError;
use crate::fence::{self, Fence};

/// One range of the keyspace, `[start, end)` (`end == None`: to its end).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct CatchupRange {
    #[diesel(sql_type = Bytea, column_name = range_start)]
    pub start: Vec<u8>,
    #[diesel(sql_type = Nullable<Bytea>, column_name = range_end)]
    pub end: Option<Vec<u8>>,
    /// Every change of a key in the range up to this revision is applied.
    #[diesel(sql_type = BigInt, column_name = applied_revision)]
    pub applied_revision: i64,
}

impl CatchupRange {
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The ranges left, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<CatchupRange>);

impl Ranges {
    pub const EMPTY: Ranges = Ranges(Vec::new());

    /// Up to which revision the changes of `key` are applied beyond the
    /// global checkpoint, if its range says so.
    pub fn applied(&self, key: &[u8]) -> Option<i64> {
        let at = self.0.partition_point(|r| r.start.as_slice() <= key);
        let range = self.0.get(at.checked_sub(1)?)?;
        range.contains(key).then_some(range.applied_revision)
    }

    /// Whether the change of `key` at `revision` is applied already.
    pub fn skips(&self, key: &[u8], revision: i64) -> bool {
        self.applied(key).is_some_and(|applied| revision <= applied)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the ranges still cut the whole keyspace: the replays have
    /// not ended (once they do, the global checkpoint's advance removes the
    /// ranges it passes).
    pub fn cover_keyspace(&self) -> bool {
        let mut next: Option<&[u8]> = Some(&[]);
        for range in &self.0 {
            if next != Some(range.start.as_slice()) {
                return false;
            }
            next = range.end.as_deref();
        }
        !self.0.is_empty() && next.is_none()
    }
}

/// The ranges left, in key order.
pub async fn load(conn: &mut AsyncPgConnection) -> Result<Ranges, StoreError> {
    let ranges = diesel::sql_query(
        "SELECT range_start, range_end, applied_revision FROM catchup_ranges ORDER BY range_start",
    )
    .load::<CatchupRange>(conn)
    .await?;
    Ok(Ranges(ranges))
}

/// Starts a parallel catch-up from the global checkpoint `from`: the
/// keyspace cut at `bounds` (ascending, none empty), every range at `from`.
/// Refused if the checkpoint is no longer `from` or ranges exist.
pub async fn begin(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    from: i64,
    bounds: &[Vec<u8>],
) -> Result<Ranges, StoreError> {
    if bounds.windows(2).any(|w| w[0] >= w[1]) || bounds.iter().any(Vec::is_empty) {
        return Err(StoreError::Invalid(
            "catch-up bounds must ascend and not be empty".into(),
        ));
    }
    let mut starts: Vec<Vec<u8>> = vec![Vec::new()];
    starts.extend(bounds.iter().cloned());
    let ends: Vec<Option<Vec<u8>>> = bounds
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None))
        .collect();
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let inserted = diesel::sql_query(
            "INSERT INTO catchup_ranges (range_start, range_end, applied_revision) \
             SELECT r.start, r.end_, s.applied_revision \
             FROM unnest($1::bytea[], $2::bytea[]) AS r(start, end_), sync_state s \
             WHERE s.id = 1 AND s.applied_revision = $3 \
               AND NOT EXISTS (SELECT 1 FROM catchup_ranges)",
        )
        .bind::<diesel::sql_types::Array<Bytea>, _>(&starts)
        .bind::<diesel::sql_types::Array<Nullable<Bytea>>, _>(&ends)
        .bind::<BigInt, _>(from)
        .execute(conn)
        .await?;
        if inserted != starts.len() {
            return Err(StoreError::Invalid(format!(
                "cannot begin a catch-up from {from}: the checkpoint moved or one is under way"
            )));
        }
        load(conn).await
    })
    .await
}

/// Moves the checkpoint of the range starting at `start` to `revision`
/// with nothing to apply (a progress notification of its watch).
pub async fn advance(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    start: &[u8],
    revision: i64,
) -> Result<(), StoreError> {
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Range { start, revision })
            .await
            .map(|_| ())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: Option<&str>, applied: i64) -> CatchupRange {
        CatchupRange {
            start: start.as_bytes().to_vec(),
            end: end.map(|e| e.as_bytes().to_vec()),
            applied_revision: applied,
        }
    }

    #[test]
    fn a_key_takes_the_checkpoint_of_its_range() {
        let ranges = Ranges(vec![
            range("", Some("/b"), 10),
            range("/b", Some("/d"), 20),
            range("/d", None, 30),
        ]);
        assert_eq!(ranges.applied(b"/a/x"), Some(10));
        assert_eq!(ranges.applied(b"/b"), Some(20));
        assert_eq!(ranges.applied(b"/c/zzz"), Some(20));
        assert_eq!(ranges.applied(b"/d"), Some(30));
        assert_eq!(ranges.applied(b"\xff\xff"), Some(30));
        assert!(ranges.skips(b"/c", 20));
        assert!(!ranges.skips(b"/c", 21));
        // Ranges the global checkpoint passed are gone: their keys follow it.
        let left = Ranges(vec![range("/b", Some("/d"), 20)]);
        assert_eq!(left.applied(b"/a"), None);
        assert_eq!(left.applied(b"/d"), None);
        assert!(!left.skips(b"/e", 1));
        assert_eq!(Ranges::default().applied(b"/a"), None);
        assert!(ranges.cover_keyspace());
        assert!(!left.cover_keyspace());
        assert!(!Ranges::default().cover_keyspace());
        assert!(Ranges(vec![range("", None, 1)]).cover_keyspace());
    }
}
