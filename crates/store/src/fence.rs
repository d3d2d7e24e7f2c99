//! Fencing (docs/design.md G6): every transaction of the sync starts by proving that
//! its term is still the stored one, and holds the `sync_state` row lock
//! until it commits, so a new leader's term bump waits for it and every
//! later transaction of the old leader fails.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::error::StoreError;

/// Who writes: the leader's term and node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub term: i64,
    pub node: String,
}

#[derive(QueryableByName)]
struct FenceRow {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)] // evaluated for its side effect
    applying: String,
    #[diesel(sql_type = BigInt)]
    now_us: i64,
}

/// What a fenced transaction does to the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint<'a> {
    /// Leave it; wait for a transaction moving it to end (and hold it
    /// back meanwhile). Transactions fenced so run alongside each other.
    Keep,
    /// Leave it, running alongside the transactions that move it (`FOR KEY
    /// SHARE`, which only `FOR UPDATE` waits for): for the poller's marks
    /// (`crate::outbox::mark_sent`), which an apply orders through the
    /// outbox rows' own locks. A term claim and the resyncs lock the row
    /// `FOR UPDATE` ([`lock_exclusively`]), so they still wait for such a
    /// transaction and it for them.
    KeepConcurrently,
    /// Move it forward to this revision (never back); the catch-up ranges
    /// it passes go (they no longer skip anything).
    Advance(i64),
    /// Set it to exactly this revision (a resync at R); the catch-up
    /// ranges at or below it go (the resync left the keys of those past
    /// it alone).
    Set(i64),
    /// Move it back to this revision if it is past it (`restore-etcd`: the
    /// watch must replay whatever the new etcd did from there); every
    /// catch-up range goes.
    AtMost(i64),
    /// Move the checkpoint of the catch-up range starting at `start`
    /// forward to `revision`, the global one staying (see
    /// `crate::catchup`). Excludes the other fenced transactions as an
    /// advance of the global checkpoint does (all but the poller's marks,
    /// [`Checkpoint::KeepConcurrently`]). Fails if the range is gone.
    Range { start: &'a [u8], revision: i64 },
}

#[derive(QueryableByName)]
struct RangeRow {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)] // evaluated for its side effect
    applying: String,
    #[diesel(sql_type = BigInt)]
    now_us: i64,
    #[diesel(sql_type = BigInt)]
    ranged: i64,
}

/// Checks the term, marks the transaction as the service's own (the mirror
/// triggers skip it) and moves the checkpoint as asked. Returns PostgreSQL's
/// clock in microseconds since the epoch.
pub async fn enter(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    checkpoint: Checkpoint<'_>,
) -> Result<i64, StoreError> {
    // One statement: the catch-up ranges change only once the term's row
    // is updated (a fenced-out leader deletes nothing).
    let advance = |revision, how: &'static str| {
        diesel::sql_query(
            "WITH moved AS ( \
                 UPDATE sync_state \
                 SET applied_revision = CASE $3 WHEN 'set' THEN $2 \
                                                WHEN 'at-most' THEN LEAST(applied_revision, $2) \
                                                ELSE GREATEST(applied_revision, $2) END, \
                     applied_at = now() \
                 WHERE id = 1 AND term = $1 \
                 RETURNING applied_revision, \
                           set_config('etcd_sync.applying', 'on', true) AS applying, \
                           (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us), \
             passed AS ( \
                 DELETE FROM catchup_ranges c USING moved \
                 WHERE $3 = 'at-most' OR c.applied_revision <= moved.applied_revision) \
             SELECT applying, now_us FROM moved",
        )
        .bind::<BigInt, _>(fence.term)
        .bind::<BigInt, _>(revision)
        .bind::<Text, _>(how)
    };
    let keep = |lock: &'static str| {
        diesel::sql_query(format!(
            "SELECT set_config('etcd_sync.applying', 'on', true) AS applying, \
                    (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us \
             FROM sync_state WHERE id = 1 AND term = $1 {lock}"
        ))
        .bind::<BigInt, _>(fence.term)
    };
    let rows: Vec<FenceRow> = match checkpoint {
        Checkpoint::Advance(revision) => advance(revision, "advance").load(conn).await?,
        Checkpoint::Set(revision) => {
            lock_exclusively(conn, Some(fence.term)).await?;
            advance(revision, "set").load(conn).await?
        }
        Checkpoint::AtMost(revision) => {
            lock_exclusively(conn, Some(fence.term)).await?;
            advance(revision, "at-most").load(conn).await?
        }
        Checkpoint::Keep => keep("FOR SHARE").load(conn).await?,
        Checkpoint::KeepConcurrently => keep("FOR KEY SHARE").load(conn).await?,
        Checkpoint::Range { start, revision } => {
            let rows: Vec<RangeRow> = diesel::sql_query(
                "WITH fenced AS ( \
                     SELECT set_config('etcd_sync.applying', 'on', true) AS applying, \
                            (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us \
                     FROM sync_state WHERE id = 1 AND term = $1 FOR NO KEY UPDATE), \
                 moved AS ( \
                     UPDATE catchup_ranges c \
                     SET applied_revision = GREATEST(c.applied_revision, $3) \
                     FROM fenced WHERE c.range_start = $2 RETURNING 1) \
                 SELECT applying, now_us, (SELECT count(*) FROM moved) AS ranged FROM fenced",
            )
            .bind::<BigInt, _>(fence.term)
            .bind::<diesel::sql_types::Bytea, _>(start)
            .bind::<BigInt, _>(revision)
            .load(conn)
            .await?;
            return match rows.into_iter().next() {
                Some(row) if row.ranged > 0 => Ok(row.now_us),
                Some(_) => Err(StoreError::Invalid(format!(
                    "the catch-up range from {} is gone (the checkpoint was set anew)",
                    eps_core::keys::display_key(start)
                ))),
                None => Err(StoreError::Fenced { term: fence.term }),
            };
        }
    };
    match rows.into_iter().next() {
        Some(row) => Ok(row.now_us),
        None => Err(StoreError::Fenced { term: fence.term }),
    }
}

/// Locks the `sync_state` row `FOR UPDATE` until the transaction ends: the
/// one lock that also waits for (and holds back) the transactions fenced
/// [`Checkpoint::KeepConcurrently`]. A term claim takes it (`term` None),
/// and so do the resyncs (a checkpoint set anew or moved back) while their
/// `term` is still the stored one — a deposed leader's resync takes no
/// lock before it finds itself fenced.
pub(crate) async fn lock_exclusively(
    conn: &mut AsyncPgConnection,
    term: Option<i64>,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "SELECT 1 FROM sync_state WHERE id = 1 AND ($1::int8 IS NULL OR term = $1) FOR UPDATE",
    )
    .bind::<diesel::sql_types::Nullable<BigInt>, _>(term)
    .execute(conn)
    .await?;
    Ok(())
}
