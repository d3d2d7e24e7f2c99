//! `etcd-pg-sync rollback`: the changes that bring a key range back to its
//! state at an earlier revision (from the history, `state_at`), and their
//! application as ordinary SQL writes of the mirror table — the triggers
//! queue them, and the leader sends them to etcd like any user's change
//! (compare, policy, history, audit).

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use eps_core::ident::Ident;

use crate::error::StoreError;

/// One key's change: `current` (the mirror's value now, `None`: absent)
/// becomes `target` (its value at the revision, `None`: delete it).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct RollbackChange {
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub current: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub target: Option<Vec<u8>>,
    /// At the revision the key was bound to a lease (long gone since, or
    /// not): putting it back would make it a key without one.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub target_leased: bool,
}

/// What `migrate` and the leader recorded of a mirror table.
#[derive(Debug, Clone, QueryableByName)]
pub struct TableRecord {
    #[diesel(sql_type = Nullable<Bytea>)]
    pub prefix: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub synced: bool,
    /// The first revision `state_at` answers for (`None`: not synced yet
    /// on this timeline): see migration 000010.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub history_floor: Option<i64>,
}

pub async fn table_record(
    conn: &mut AsyncPgConnection,
    table: &Ident,
) -> Result<Option<TableRecord>, StoreError> {
    let found: Vec<TableRecord> = diesel::sql_query(
        "SELECT m.prefix, m.synced, \
                CASE WHEN m.history_from IS NOT NULL \
                     THEN greatest(m.history_from, s.history_complete_from) END AS history_floor \
         FROM mirror_tables m, sync_state s WHERE s.id = 1 AND m.name = $1",
    )
    .bind::<Text, _>(table.as_str())
    .load(conn)
    .await?;
    Ok(found.into_iter().next())
}

/// The changes under `[start, end)` of `table` from its rows now to its
/// state at `revision`, in key order.
pub async fn plan(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    (start, end): (&[u8], Option<&[u8]>),
    revision: i64,
) -> Result<Vec<RollbackChange>, StoreError> {
    let changes = diesel::sql_query(format!(
        "SELECT coalesce(t.key, m.key) AS key, m.value AS current, t.value AS target, \
                coalesce(t.lease <> 0, false) AS target_leased \
         FROM (SELECT s.key, s.value, \
                      (SELECT h.lease FROM {schema}.history h, {schema}.sync_state st \
                       WHERE st.id = 1 AND h.timeline = st.timeline AND h.key = s.key \
                         AND h.revision = s.mod_revision) AS lease \
               FROM {schema}.state_at($1, $2) s \
               WHERE s.key >= $3 AND ($4::bytea IS NULL OR s.key < $4)) AS t \
         FULL JOIN (SELECT r.key, r.value FROM {mirror} r \
                    WHERE r.key >= $3 AND ($4::bytea IS NULL OR r.key < $4)) AS m \
           ON m.key = t.key \
         WHERE t.value IS DISTINCT FROM m.value \
         ORDER BY 1",
        schema = schema.quoted(),
        mirror = schema.qualify(table),
    ))
    .bind::<Text, _>(table.as_str())
    .bind::<BigInt, _>(revision)
    .bind::<Bytea, _>(start)
    .bind::<Nullable<Bytea>, _>(end)
    .load(conn)
    .await?;
    Ok(changes)
}

#[derive(QueryableByName)]
struct Revision {
    #[diesel(sql_type = BigInt)]
    revision: i64,
}

/// The newest etcd revision known to exist by `at` (`revision_at`).
pub async fn revision_at(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<i64, StoreError> {
    let found: Revision = diesel::sql_query(format!(
        "SELECT coalesce({}.revision_at($1), 0) AS revision",
        schema.quoted()
    ))
    .bind::<Timestamptz, _>(at)
    .get_result(conn)
    .await?;
    Ok(found.revision)
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Writes `changes` into `table` in one transaction, as a user would:
/// each only if the row is still as planned (`current`); returns how many
/// were written. A row a user holds makes the batch fail after 5 s
/// (retryable), not wait for ever.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    changes: &[RollbackChange],
) -> Result<usize, StoreError> {
    let mirror = schema.qualify(table);
    // Column arrays for `unnest`: keys, then current and/or target values.
    type Columns<'a> = Vec<&'a [u8]>;
    let mut updates: (Columns, Columns, Columns) = Default::default();
    let mut inserts: (Columns, Columns) = Default::default();
    let mut deletes: (Columns, Columns) = Default::default();
    for change in changes {
        match (&change.current, &change.target) {
            (Some(current), Some(target)) => {
                updates.0.push(&change.key);
                updates.1.push(current);
                updates.2.push(target);
            }
            (None, Some(target)) => {
                inserts.0.push(&change.key);
                inserts.1.push(target);
            }
            (Some(current), None) => {
                deletes.0.push(&change.key);
                deletes.1.push(current);
            }
            (None, None) => {}
        }
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        conn.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
        let updated: Written = diesel::sql_query(format!(
            "WITH w AS (UPDATE {mirror} r SET value = u.target \
                        FROM unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS u(key, current, target) \
                        WHERE r.key = u.key AND r.value = u.current RETURNING 1) \
             SELECT count(*) AS n FROM w"
        ))
        .bind::<Array<Bytea>, _>(&updates.0)
        .bind::<Array<Bytea>, _>(&updates.1)
        .bind::<Array<Bytea>, _>(&updates.2)
        .get_result(conn)
        .await?;
        let inserted: Written = diesel::sql_query(format!(
            "WITH w AS (INSERT INTO {mirror} (key, value) \
                        SELECT u.key, u.target FROM unnest($1::bytea[], $2::bytea[]) AS u(key, target) \
                        ON CONFLICT (key) DO NOTHING RETURNING 1) \
             SELECT count(*) AS n FROM w"
        ))
        .bind::<Array<Bytea>, _>(&inserts.0)
        .bind::<Array<Bytea>, _>(&inserts.1)
        .get_result(conn)
        .await?;
        let deleted: Written = diesel::sql_query(format!(
            "WITH w AS (DELETE FROM {mirror} r \
                        USING unnest($1::bytea[], $2::bytea[]) AS u(key, current) \
                        WHERE r.key = u.key AND r.value = u.current RETURNING 1) \
             SELECT count(*) AS n FROM w"
        ))
        .bind::<Array<Bytea>, _>(&deletes.0)
        .bind::<Array<Bytea>, _>(&deletes.1)
        .get_result(conn)
        .await?;
        Ok((updated.n + inserted.n + deleted.n) as usize)
    })
    .await
}

/// Changes of `table` under `[start, end)` still queued for etcd.
pub async fn queued_in_range(
    conn: &mut AsyncPgConnection,
    table: &Ident,
    (start, end): (&[u8], Option<&[u8]>),
) -> Result<i64, StoreError> {
    let found: Written = diesel::sql_query(
        "SELECT count(*) AS n FROM outbox \
         WHERE mirror_table = $1 AND key >= $2 AND ($3::bytea IS NULL OR key < $3)",
    )
    .bind::<Text, _>(table.as_str())
    .bind::<Bytea, _>(start)
    .bind::<Nullable<Bytea>, _>(end)
    .get_result(conn)
    .await?;
    Ok(found.n)
}

/// What [`rewind`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewound {
    /// The rows hold the state at the revision: `changed` were written,
    /// `deleted` removed, `set_aside` queued changes moved to the
    /// dead-letter list.
    Done {
        changed: i64,
        deleted: i64,
        set_aside: i64,
    },
    /// Changes of the ranges written in PostgreSQL are queued for etcd
    /// (newer than the revision) and were not to be set aside: nothing was
    /// done.
    Queued(i64),
}

/// One key range of a mirror table to set back.
#[derive(Debug, Clone, Copy)]
pub struct RewindRange<'a> {
    pub table: &'a Ident,
    pub start: &'a [u8],
    pub end: Option<&'a [u8]>,
}

#[derive(QueryableByName)]
struct RewindCounts {
    #[diesel(sql_type = BigInt)]
    changed: i64,
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

/// Sets the rows of every range to their state at `revision` — values and
/// etcd's metadata of then, keys created since removed — as the service's
/// own write (no change is queued for etcd), in one transaction: the first
/// step of `restore-etcd --at-revision`, which then copies the rows into
/// the empty etcd. The checkpoint goes back to `revision` with them, so
/// the mirror never claims to hold a later state than it does (should the
/// lost etcd come back, the watch replays what follows).
///
/// Changes written in PostgreSQL and still queued for etcd are newer than
/// the revision: with `set_aside` they move to the dead-letter list (kind
/// `set-aside-by-restore`, from which `dead-letters retry` sends them on
/// top of the restored state); without, nothing is done. Writers of the
/// tables wait until the transaction ends, so a change made after it is
/// made on the state at `revision`.
pub async fn rewind(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &crate::Fence,
    ranges: &[RewindRange<'_>],
    revision: i64,
    set_aside: bool,
) -> Result<Rewound, StoreError> {
    let mut tables: Vec<&Ident> = ranges.iter().map(|r| r.table).collect();
    tables.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    tables.dedup();
    conn.transaction::<_, StoreError, _>(async |conn| {
        // Each statement sees what was committed before it (the count
        // below, everything committed before the locks), whatever the
        // database's default isolation.
        conn.batch_execute(
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = '10s'",
        )
        .await?;
        // In the order an apply takes them: the term's row first, then the
        // tables.
        diesel::sql_query("SELECT 1 FROM sync_state WHERE id = 1 FOR NO KEY UPDATE")
            .execute(conn)
            .await?;
        for table in &tables {
            conn.batch_execute(&format!(
                "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                schema.qualify(table)
            ))
            .await?;
        }
        let mut queued = 0;
        for range in ranges {
            queued += queued_in_range(conn, range.table, (range.start, range.end)).await?;
        }
        if queued > 0 && !set_aside {
            return Ok(Rewound::Queued(queued));
        }
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::AtMost(revision)).await?;
        let (mut changed, mut deleted, mut moved) = (0, 0, 0);
        for range in ranges {
            if queued > 0 {
                moved += set_aside_queued(conn, fence, range, revision).await?;
            }
            let counts = rewind_range(conn, schema, range, revision).await?;
            changed += counts.changed;
            deleted += counts.deleted;
        }
        Ok(Rewound::Done {
            changed,
            deleted,
            set_aside: moved,
        })
    })
    .await
}

/// Moves the changes of `range` queued for etcd to the dead-letter list.
async fn set_aside_queued(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    range: &RewindRange<'_>,
    revision: i64,
) -> Result<i64, StoreError> {
    let moved: Written = diesel::sql_query(
        "WITH moved AS ( \
             DELETE FROM outbox o WHERE o.mirror_table = $1 AND o.key >= $2 \
               AND ($3::bytea IS NULL OR o.key < $3) \
             RETURNING o.id, o.mirror_table, o.key, o.op, o.value, o.base_revision, o.attempts, o.xact), \
         lettered AS ( \
             INSERT INTO dead_letters (direction, mirror_table, key, op, value, base_revision, outbox_id, \
                 reason, kind, attempts, node, term, pg_xact) \
             SELECT 'pg-to-etcd', m.mirror_table, m.key, m.op, m.value, m.base_revision, m.id, $4, $5, \
                 m.attempts, $6, $7, m.xact::text::int8 \
             FROM moved m ORDER BY m.id RETURNING 1) \
         SELECT count(*) AS n FROM lettered",
    )
    .bind::<Text, _>(range.table.as_str())
    .bind::<Bytea, _>(range.start)
    .bind::<Nullable<Bytea>, _>(range.end)
    .bind::<Text, _>(format!(
        "set aside by restore-etcd --at-revision {revision}: written after the state restored"
    ))
    .bind::<Text, _>(eps_core::model::DeadLetterKind::SetAsideByRestore.as_str())
    .bind::<Text, _>(&fence.node)
    .bind::<BigInt, _>(fence.term)
    .get_result(conn)
    .await?;
    Ok(moved.n)
}

/// The rows of one range set to the state at `revision` (see [`rewind`]).
async fn rewind_range(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    range: &RewindRange<'_>,
    revision: i64,
) -> Result<RewindCounts, StoreError> {
    let mirror = schema.qualify(range.table);
    let counts = diesel::sql_query(format!(
        "WITH target AS ( \
             SELECT s.key, s.value, s.mod_revision, h.create_revision, h.version, h.lease \
             FROM {schema}.state_at($1, $2) s \
             JOIN {schema}.sync_state st ON st.id = 1 \
             JOIN {schema}.history h ON h.key = s.key AND h.timeline = st.timeline \
                                    AND h.revision = s.mod_revision \
             WHERE s.key >= $3 AND ($4::bytea IS NULL OR s.key < $4)), \
         deleted AS ( \
             DELETE FROM {mirror} r WHERE r.key >= $3 AND ($4::bytea IS NULL OR r.key < $4) \
               AND NOT EXISTS (SELECT 1 FROM target t WHERE t.key = r.key) RETURNING 1), \
         changed AS ( \
             INSERT INTO {mirror} AS r (key, value, create_revision, mod_revision, version, lease, origin, updated_at) \
             SELECT t.key, t.value, t.create_revision, t.mod_revision, t.version, t.lease, 'etcd', now() \
             FROM target t \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
                 create_revision = EXCLUDED.create_revision, mod_revision = EXCLUDED.mod_revision, \
                 version = EXCLUDED.version, lease = EXCLUDED.lease, origin = 'etcd', updated_at = now() \
             WHERE (r.value, r.create_revision, r.mod_revision, r.version, r.lease) IS DISTINCT FROM \
                   (EXCLUDED.value, EXCLUDED.create_revision, EXCLUDED.mod_revision, EXCLUDED.version, EXCLUDED.lease) \
             RETURNING 1) \
         SELECT (SELECT count(*) FROM changed) AS changed, (SELECT count(*) FROM deleted) AS deleted",
        schema = schema.quoted(),
    ))
    .bind::<Text, _>(range.table.as_str())
    .bind::<BigInt, _>(revision)
    .bind::<Bytea, _>(range.start)
    .bind::<Nullable<Bytea>, _>(range.end)
    .get_result(conn)
    .await?;
    Ok(counts)
}
