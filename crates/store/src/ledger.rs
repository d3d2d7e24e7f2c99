//! The ledgers operators work with: conflicts (list, resolve) and dead
//! letters (list, retry), and the counts `status` shows.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use eps_core::audit::AuditKind;
use eps_core::ident::Ident;
use eps_core::mapping::Policy;
use eps_core::model::{KeyValue, Op};
use eps_core::policy::{ConflictStatus, ResolvedBy, Side};

use crate::apply::IdRow;
use crate::error::StoreError;
use crate::fence::{self, Fence};

#[derive(Debug, Clone, QueryableByName)]
pub struct ConflictRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub mirror_table: String,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub etcd_value: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    pub etcd_revision: i64,
    #[diesel(sql_type = Timestamptz)]
    pub etcd_observed_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub pg_value: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    pub pg_revision: i64,
    #[diesel(sql_type = Timestamptz)]
    pub pg_changed_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Text)]
    pub policy: Policy,
    #[diesel(sql_type = Nullable<Text>)]
    pub winner: Option<Side>,
    #[diesel(sql_type = Text)]
    pub status: ConflictStatus,
    #[diesel(sql_type = Nullable<Text>)]
    pub requested_take: Option<Side>,
    #[diesel(sql_type = Nullable<Text>)]
    pub resolved_by: Option<ResolvedBy>,
    #[diesel(sql_type = Timestamptz)]
    pub detected_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
    /// etcd's change was made after this (NULL: unknown) ...
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub etcd_changed_after: Option<chrono::DateTime<chrono::Utc>>,
    /// ... and by this (NULL on conflicts recorded before the revision clock).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub etcd_changed_by: Option<chrono::DateTime<chrono::Utc>>,
    /// `newest-wins` could not order the changes: the tie rule decided.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub decided_by_tie: bool,
}

const CONFLICT_COLUMNS: &str = "id, mirror_table, key, etcd_value, etcd_revision, etcd_observed_at, pg_value, \
     pg_revision, pg_changed_at, policy, winner, status, requested_take, resolved_by, detected_at, resolved_at, \
     etcd_changed_after, etcd_changed_by, decided_by_tie";

/// Conflicts, newest first; `pending_only` keeps those awaiting an operator.
pub async fn list_conflicts(
    conn: &mut AsyncPgConnection,
    pending_only: bool,
    limit: usize,
) -> Result<Vec<ConflictRow>, StoreError> {
    let rows = diesel::sql_query(format!(
        "SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE ($1 = false OR status = 'pending') ORDER BY id DESC LIMIT $2"
    ))
    .bind::<diesel::sql_types::Bool, _>(pending_only)
    .bind::<BigInt, _>(limit as i64)
    .load(conn)
    .await?;
    Ok(rows)
}

pub async fn conflict(
    conn: &mut AsyncPgConnection,
    id: i64,
) -> Result<Option<ConflictRow>, StoreError> {
    let rows: Vec<ConflictRow> = diesel::sql_query(format!(
        "SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE id = $1"
    ))
    .bind::<BigInt, _>(id)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next())
}

/// An operator's `conflicts resolve ID --take SIDE`: recorded here, carried
/// out by the leader's arbiter through the fenced paths.
pub async fn request_resolution(
    conn: &mut AsyncPgConnection,
    id: i64,
    side: Side,
) -> Result<bool, StoreError> {
    let updated = diesel::sql_query("UPDATE conflicts SET requested_take = $2 WHERE id = $1")
        .bind::<BigInt, _>(id)
        .bind::<Text, _>(side.as_str())
        .execute(conn)
        .await?;
    crate::notify::notify(conn, crate::notify::Channel::Conflicts, "resolve").await?;
    Ok(updated == 1)
}

/// Requests `side` for every value a new etcd timeline rolled back that
/// nobody has resolved since; returns their conflict ids.
pub async fn request_timeline_resolutions(
    conn: &mut AsyncPgConnection,
    side: Side,
) -> Result<Vec<i64>, StoreError> {
    let updated: Vec<IdRow> = diesel::sql_query(
        "UPDATE conflicts SET requested_take = $1 \
         WHERE reason = 'timeline-change' AND resolved_by = 'timeline-change' AND requested_take IS NULL \
         RETURNING id",
    )
    .bind::<Text, _>(side.as_str())
    .load(conn)
    .await?;
    crate::notify::notify(conn, crate::notify::Channel::Conflicts, "resolve").await?;
    Ok(updated.into_iter().map(|row| row.id).collect())
}

/// How many of the conflicts `ids` an operator's request resolved (the
/// rest were skipped or are still waiting).
pub async fn resolved_by_operator(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
) -> Result<usize, StoreError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let count: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM conflicts WHERE id = ANY($1) AND resolved_by = 'operator'",
    )
    .bind::<Array<BigInt>, _>(ids)
    .get_result(conn)
    .await?;
    Ok(count.n as usize)
}

/// Conflicts with an operator's request waiting.
pub async fn requested_resolutions(
    conn: &mut AsyncPgConnection,
) -> Result<Vec<ConflictRow>, StoreError> {
    let rows = diesel::sql_query(format!(
        "SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE requested_take IS NOT NULL ORDER BY id"
    ))
    .load(conn)
    .await?;
    Ok(rows)
}

/// Carries out `take` for a conflict so that both stores end with that
/// side's value. `etcd_now` is the key's current state in etcd.
///
/// - Pending (parked) conflict: `etcd` drops the local changes and gives the
///   mirror etcd's current state; `pg` rebases the parked changes onto
///   etcd's current revision and releases them to the poller.
/// - Resolved conflict (an operator overriding the policy): the chosen side's
///   recorded value is written as a new local change, so it reaches etcd by
///   the normal fenced compare-and-swap.
/// - A value a new etcd timeline rolled back, put back (`pg`): only where
///   PostgreSQL's changes flow to etcd (`pg_to_etcd`, the conflict's
///   mapping) and while etcd still holds the value it was rolled back to.
///   A key written since (in etcd, or in PostgreSQL and sent) has moved on:
///   the request is dropped and audited as skipped
///   ([`Resolution::Skipped`]), never written over a newer value.
pub async fn execute_resolution(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &Fence,
    conflict: &ConflictRow,
    take: Side,
    etcd_now: Option<&KeyValue>,
    pg_to_etcd: bool,
) -> Result<Resolution, StoreError> {
    let table = Ident::parse(&conflict.mirror_table).map_err(|e| {
        StoreError::Invalid(format!(
            "conflict {} names table {:?}: {e}",
            conflict.id, conflict.mirror_table
        ))
    })?;
    let qualified = schema.qualify(&table);
    let etcd_revision = etcd_now.map_or(0, |kv| kv.meta.mod_revision);
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        // A row a user's transaction holds: not waited for (`RowHeld`), the
        // resolution stays requested and is tried again.
        let row = lock_row(conn, &qualified, &table, &conflict.key).await?;
        let pending = conflict.status == ConflictStatus::Pending;
        let rolled_back = conflict.resolved_by == Some(ResolvedBy::TimelineChange);
        // The key changed since the rollback: in etcd, or in PostgreSQL
        // (queued, or sent and not yet seen back).
        let changed = etcd_now.map(|kv| kv.value.as_slice()) != conflict.etcd_value.as_deref()
            || row.value.as_deref() != conflict.etcd_value.as_deref()
            || row.queued;
        let skipped = if pending || !rolled_back || take != Side::Pg {
            None
        } else if !pg_to_etcd {
            Some("the mapping does not write PostgreSQL's changes to etcd")
        } else if changed {
            Some("the key changed since the rollback")
        } else {
            None
        };
        if let Some(why) = skipped {
            diesel::sql_query("UPDATE conflicts SET requested_take = NULL WHERE id = $1")
                .bind::<BigInt, _>(conflict.id)
                .execute(conn)
                .await?;
            let mut detail = resolution_detail(conflict, take);
            detail["skipped"] = serde_json::json!(why);
            crate::events::record(conn, fence, AuditKind::Resolution, None, &detail).await?;
            return Ok(Resolution::Skipped);
        }
        match (pending, take) {
            (true, Side::Etcd) => {
                // The parked changes (and those queued behind them) lose,
                // with the rest of their transactions.
                let xacts = crate::transactions::parked_with(
                    conn,
                    conflict.id,
                    &conflict.mirror_table,
                    &conflict.key,
                )
                .await?;
                diesel::sql_query(
                    "UPDATE conflicts SET pg_superseded = pg_superseded || COALESCE((SELECT array_agg(value ORDER BY id) \
                         FROM outbox WHERE mirror_table = $2 AND key = $3), '{}') WHERE id = $1",
                )
                .bind::<BigInt, _>(conflict.id)
                .bind::<Text, _>(&conflict.mirror_table)
                .bind::<Bytea, _>(&conflict.key)
                .execute(conn)
                .await?;
                diesel::sql_query("DELETE FROM outbox WHERE mirror_table = $1 AND key = $2")
                    .bind::<Text, _>(&conflict.mirror_table)
                    .bind::<Bytea, _>(&conflict.key)
                    .execute(conn)
                    .await?;
                // etcd's state read before this transaction; a newer one the
                // watcher applied meanwhile stays (the row only moves forward).
                match etcd_now {
                    Some(kv) => {
                        diesel::sql_query(format!(
                            "INSERT INTO {qualified} AS t (key, value, create_revision, mod_revision, version, lease, updated_at, origin) \
                             VALUES ($1, $2, $3, $4, $5, $6, now(), 'etcd') \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, create_revision = EXCLUDED.create_revision, \
                                 mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version, lease = EXCLUDED.lease, \
                                 updated_at = now(), origin = 'etcd' \
                             WHERE t.mod_revision <= EXCLUDED.mod_revision"
                        ))
                        .bind::<Bytea, _>(&conflict.key)
                        .bind::<Bytea, _>(&kv.value)
                        .bind::<BigInt, _>(kv.meta.create_revision)
                        .bind::<BigInt, _>(kv.meta.mod_revision)
                        .bind::<BigInt, _>(kv.meta.version)
                        .bind::<BigInt, _>(kv.meta.lease)
                        .execute(conn)
                        .await?;
                    }
                    None => {
                        write_mirror_row(conn, &qualified, &conflict.key, None, Default::default(), "etcd")
                            .await?;
                    }
                }
                crate::transactions::drop_parked(conn, fence, conflict.id, &xacts).await?;
            }
            (true, Side::Pg) => {
                diesel::sql_query(
                    "UPDATE outbox SET base_revision = $3, conflict_id = NULL WHERE mirror_table = $1 AND key = $2",
                )
                .bind::<Text, _>(&conflict.mirror_table)
                .bind::<Bytea, _>(&conflict.key)
                .bind::<BigInt, _>(etcd_revision)
                .execute(conn)
                .await?;
                set_mirror_meta(conn, &qualified, &conflict.key, etcd_now).await?;
                // The other changes of the parked transactions go with it.
                crate::transactions::release(conn, conflict.id).await?;
            }
            (false, side) => {
                let value = match side {
                    Side::Etcd => conflict.etcd_value.as_deref(),
                    Side::Pg => conflict.pg_value.as_deref(),
                };
                requeue_as_local_change(conn, &qualified, &conflict.mirror_table, &conflict.key, value, etcd_now).await?;
            }
        }
        diesel::sql_query(
            "UPDATE conflicts SET status = 'resolved', winner = $2, resolved_by = 'operator', \
                 resolved_at = clock_timestamp(), requested_take = NULL WHERE id = $1",
        )
        .bind::<BigInt, _>(conflict.id)
        .bind::<Text, _>(take.as_str())
        .execute(conn)
        .await?;
        let detail = resolution_detail(conflict, take);
        crate::events::record(conn, fence, AuditKind::Resolution, None, &detail).await?;
        Ok(Resolution::Carried)
    })
    .await
}

/// The audit detail of an operator's resolution.
fn resolution_detail(conflict: &ConflictRow, take: Side) -> serde_json::Value {
    serde_json::json!({
        "conflict_id": conflict.id,
        "table": conflict.mirror_table,
        "key": eps_core::keys::display_key(&conflict.key),
        "winner": take.as_str(),
        "by": "operator",
    })
}

/// What [`execute_resolution`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Carried,
    /// A rolled-back value not put back: the key changed since.
    Skipped,
}

/// Makes the key's mirror row `value` (`None`: absent) with `meta`, whatever
/// the row held; `origin` says which side the value came from.
async fn write_mirror_row(
    conn: &mut AsyncPgConnection,
    qualified: &str,
    key: &[u8],
    value: Option<&[u8]>,
    meta: eps_core::model::KeyMeta,
    origin: &str,
) -> Result<(), StoreError> {
    match value {
        Some(value) => {
            diesel::sql_query(format!(
                "INSERT INTO {qualified} (key, value, create_revision, mod_revision, version, lease, updated_at, origin) \
                 VALUES ($1, $2, $3, $4, $5, $6, now(), $7) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, create_revision = EXCLUDED.create_revision, \
                     mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version, lease = EXCLUDED.lease, \
                     updated_at = now(), origin = EXCLUDED.origin"
            ))
            .bind::<Bytea, _>(key)
            .bind::<Bytea, _>(value)
            .bind::<BigInt, _>(meta.create_revision)
            .bind::<BigInt, _>(meta.mod_revision)
            .bind::<BigInt, _>(meta.version)
            .bind::<BigInt, _>(meta.lease)
            .bind::<Text, _>(origin)
            .execute(conn)
            .await?;
        }
        None => {
            diesel::sql_query(format!("DELETE FROM {qualified} WHERE key = $1"))
                .bind::<Bytea, _>(key)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

async fn set_mirror_meta(
    conn: &mut AsyncPgConnection,
    qualified: &str,
    key: &[u8],
    state: Option<&KeyValue>,
) -> Result<(), StoreError> {
    let meta = state.map(|kv| kv.meta).unwrap_or_default();
    diesel::sql_query(format!(
        "UPDATE {qualified} SET create_revision = $2, mod_revision = $3, version = $4, lease = $5 WHERE key = $1"
    ))
    .bind::<Bytea, _>(key)
    .bind::<BigInt, _>(meta.create_revision)
    .bind::<BigInt, _>(meta.mod_revision)
    .bind::<BigInt, _>(meta.version)
    .bind::<BigInt, _>(meta.lease)
    .execute(conn)
    .await?;
    Ok(())
}

/// Makes `value` (`None`: delete) the key's new state on the PostgreSQL
/// side, to be applied to etcd by the leader's poller (a `verify --repair`
/// where PostgreSQL is right). Fenced by the current term. Only if the row
/// is still the one the diff saw (`seen`, `None`: absent) and no change of
/// the key is queued: otherwise a user wrote since, and their change wins
/// over the diff's stale copy. Returns whether the change was queued.
#[allow(clippy::too_many_arguments)] // one call site, each argument a distinct role
pub async fn enqueue_change(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &Fence,
    table: &Ident,
    key: &[u8],
    value: Option<&[u8]>,
    etcd_now: Option<&KeyValue>,
    seen: Option<&crate::mirror::MirrorRow>,
) -> Result<bool, StoreError> {
    let qualified = schema.qualify(table);
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let now = lock_row(conn, &qualified, table, key).await?;
        let row_now = now.value.as_deref().zip(now.mod_revision);
        let row_seen = seen.map(|r| (r.value.as_slice(), r.mod_revision));
        if now.queued || row_now != row_seen {
            return Ok(false);
        }
        if row_now.is_none() && !claim_absent_key(conn, &qualified, key).await? {
            return Ok(false);
        }
        requeue_as_local_change(conn, &qualified, table.as_str(), key, value, etcd_now).await?;
        Ok(true)
    })
    .await
}

/// Gives a row whose value etcd holds too etcd's metadata (`etcd_now`):
/// only if the row is still the one a diff saw (`seen`), with that value,
/// and no change of the key is queued. Returns whether it did.
pub async fn adopt_etcd_meta(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &Fence,
    table: &Ident,
    etcd_now: &KeyValue,
    seen: &crate::mirror::MirrorRow,
) -> Result<bool, StoreError> {
    if etcd_now.value != seen.value || etcd_now.key != seen.key {
        return Ok(false);
    }
    let qualified = schema.qualify(table);
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let now = lock_row(conn, &qualified, table, &seen.key).await?;
        let row_now = now.value.as_deref().zip(now.mod_revision);
        if now.queued || row_now != Some((seen.value.as_slice(), seen.mod_revision)) {
            return Ok(false);
        }
        set_mirror_meta(conn, &qualified, &seen.key, Some(etcd_now)).await?;
        Ok(true)
    })
    .await
}

#[derive(QueryableByName)]
struct LockedRow {
    #[diesel(sql_type = Nullable<Bytea>)]
    value: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    mod_revision: Option<i64>,
    /// A change of the key is queued.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    queued: bool,
}

/// Locks the key's row (not waiting for a user's transaction: `RowHeld`)
/// and reads it and whether a change of the key is queued.
async fn lock_row(
    conn: &mut AsyncPgConnection,
    qualified: &str,
    table: &Ident,
    key: &[u8],
) -> Result<LockedRow, StoreError> {
    Ok(diesel::sql_query(format!(
        "WITH locked AS (SELECT value, mod_revision FROM {qualified} WHERE key = $1 FOR UPDATE NOWAIT) \
         SELECT (SELECT value FROM locked) AS value, (SELECT mod_revision FROM locked) AS mod_revision, \
                EXISTS (SELECT 1 FROM outbox WHERE mirror_table = $2 AND key = $1) AS queued"
    ))
    .bind::<Bytea, _>(key)
    .bind::<Text, _>(table.as_str())
    .get_result(conn)
    .await?)
}

/// Holds an absent key against a user's concurrent insert, as a row lock
/// holds a present one: a placeholder row is inserted (waiting for an
/// insert of the key in progress, which wins) and removed again, so the
/// key's index entry stays ours until the transaction ends and a user's
/// insert of it queues its change after ours. False when a row appeared.
async fn claim_absent_key(
    conn: &mut AsyncPgConnection,
    qualified: &str,
    key: &[u8],
) -> Result<bool, StoreError> {
    let claimed = diesel::sql_query(format!(
        "INSERT INTO {qualified} (key, value) VALUES ($1, ''::bytea) ON CONFLICT (key) DO NOTHING"
    ))
    .bind::<Bytea, _>(key)
    .execute(conn)
    .await?;
    if claimed == 0 {
        return Ok(false);
    }
    diesel::sql_query(format!("DELETE FROM {qualified} WHERE key = $1"))
        .bind::<Bytea, _>(key)
        .execute(conn)
        .await?;
    Ok(true)
}

/// After `restore-etcd` wrote a page of mirror rows (`restored`: key, the
/// mod revision the row had when read, the lease it was written with) to a
/// fresh etcd at `revision`:
/// the rows take the new revision (the old ones belong to the lost
/// cluster), and the changes the restored values hold — those committed
/// before the page's `snapshot` — are consumed. A change committed since
/// was made on the restored value: it stays queued, based on `revision`.
/// Returns how many queued changes were consumed.
pub async fn mark_restored(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &Fence,
    table: &Ident,
    restored: &[(&[u8], i64, i64)],
    revision: i64,
    snapshot: &str,
) -> Result<usize, StoreError> {
    let qualified = schema.qualify(table);
    let keys: Vec<&[u8]> = restored.iter().map(|r| r.0).collect();
    let read_at: Vec<i64> = restored.iter().map(|r| r.1).collect();
    let leases: Vec<i64> = restored.iter().map(|r| r.2).collect();
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        // Rows deleted and created again since the read are not the
        // restored ones: their metadata stays.
        diesel::sql_query(format!(
            "UPDATE {qualified} AS t SET create_revision = $3, mod_revision = $3, version = 1, lease = u.lease \
             FROM unnest($1::bytea[], $2::int8[], $4::int8[]) AS u(key, read_at, lease) \
             WHERE t.key = u.key AND t.mod_revision = u.read_at"
        ))
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Array<BigInt>, _>(&read_at)
        .bind::<BigInt, _>(revision)
        .bind::<Array<BigInt>, _>(&leases)
        .execute(conn)
        .await?;
        let consumed = diesel::sql_query(
            "DELETE FROM outbox WHERE mirror_table = $1 AND key = ANY($2) \
               AND (xact IS NULL OR pg_visible_in_snapshot(xact, $3::pg_snapshot))",
        )
        .bind::<Text, _>(table.as_str())
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Text, _>(snapshot)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "UPDATE outbox AS o SET base_revision = $4 \
             FROM unnest($2::bytea[], $3::int8[]) AS u(key, read_at) \
             WHERE o.mirror_table = $1 AND o.key = u.key AND o.base_revision = u.read_at",
        )
        .bind::<Text, _>(table.as_str())
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Array<BigInt>, _>(&read_at)
        .bind::<BigInt, _>(revision)
        .execute(conn)
        .await?;
        Ok(consumed)
    })
    .await
}

/// True when the key has changes on their way: to etcd (the outbox), or
/// from etcd (inputs deferred while a user's transaction holds its row).
pub async fn has_pending(
    conn: &mut AsyncPgConnection,
    table: &str,
    key: &[u8],
) -> Result<bool, StoreError> {
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    let rows: Vec<Exists> = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE mirror_table = $1 AND key = $2) \
             OR EXISTS (SELECT 1 FROM deferred_inputs WHERE mirror_table = $1 AND key = $2) AS exists",
    )
    .bind::<Text, _>(table)
    .bind::<Bytea, _>(key)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next().is_some_and(|r| r.exists))
}

/// When the service recorded a revision of a key, if it did.
pub async fn recorded_at(
    conn: &mut AsyncPgConnection,
    key: &[u8],
    revision: i64,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    #[derive(QueryableByName)]
    struct At {
        #[diesel(sql_type = Timestamptz)]
        recorded_at: chrono::DateTime<chrono::Utc>,
    }
    let rows: Vec<At> = diesel::sql_query(
        "SELECT recorded_at FROM history WHERE key = $1 AND revision = $2 \
               AND timeline = (SELECT timeline FROM sync_state WHERE id = 1)",
    )
    .bind::<Bytea, _>(key)
    .bind::<BigInt, _>(revision)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next().map(|r| r.recorded_at))
}

/// Whether the mirror applied a change of `key` newer than `revision` (on
/// the current timeline): a row it deleted since is not missing.
pub async fn changed_after(
    conn: &mut AsyncPgConnection,
    key: &[u8],
    revision: i64,
) -> Result<bool, StoreError> {
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        changed: bool,
    }
    let row: Exists = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM history WHERE key = $1 AND revision > $2 \
               AND timeline = (SELECT timeline FROM sync_state WHERE id = 1)) AS changed",
    )
    .bind::<Bytea, _>(key)
    .bind::<BigInt, _>(revision)
    .get_result(conn)
    .await?;
    Ok(row.changed)
}

/// Writes `value` (`None`: delete) to the mirror and the outbox as if a user
/// had written it on top of etcd's current state.
async fn requeue_as_local_change(
    conn: &mut AsyncPgConnection,
    qualified: &str,
    table: &str,
    key: &[u8],
    value: Option<&[u8]>,
    etcd_now: Option<&KeyValue>,
) -> Result<(), StoreError> {
    let meta = etcd_now.map(|kv| kv.meta).unwrap_or_default();
    write_mirror_row(conn, qualified, key, value, meta, "pg").await?;
    let op = if value.is_some() { Op::Put } else { Op::Delete };
    crate::outbox::queue(conn, table, key, op, value, meta.mod_revision).await?;
    crate::notify::notify(conn, crate::notify::Channel::Outbox, "").await?;
    Ok(())
}

#[derive(Debug, Clone, QueryableByName)]
pub struct DeadLetterRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub direction: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub mirror_table: Option<String>,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = Text)]
    pub op: Op,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub value: Option<Vec<u8>>,
    #[diesel(sql_type = Text)]
    pub reason: String,
    #[diesel(sql_type = Text)]
    pub kind: crate::DeadLetterKind,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub retried_at: Option<chrono::DateTime<chrono::Utc>>,
}

const DEAD_LETTER_COLUMNS: &str =
    "id, direction, mirror_table, key, op, value, reason, kind, attempts, created_at, retried_at";

/// Dead letters, newest first; by default only those not retried yet.
pub async fn list_dead_letters(
    conn: &mut AsyncPgConnection,
    include_retried: bool,
    limit: usize,
) -> Result<Vec<DeadLetterRow>, StoreError> {
    let rows = diesel::sql_query(format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE ($1 OR retried_at IS NULL) \
         ORDER BY id DESC LIMIT $2"
    ))
    .bind::<diesel::sql_types::Bool, _>(include_retried)
    .bind::<BigInt, _>(limit as i64)
    .load(conn)
    .await?;
    Ok(rows)
}

/// `dead-letters retry`: puts the changes back into the outbox, based on the
/// key's current mirror row, and wakes the poller. `ids == None`: all. A
/// change dead-lettered with its transaction is retried with the rest of
/// it, in one transaction: they reach etcd together.
pub async fn retry_dead_letters(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    ids: Option<&[i64]>,
) -> Result<usize, StoreError> {
    let all = ids.is_none();
    let ids: Vec<i64> = ids.map(<[i64]>::to_vec).unwrap_or_default();
    conn.transaction::<_, StoreError, _>(async |conn| {
        let letters: Vec<DeadLetterRow> = diesel::sql_query(format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters \
             WHERE retried_at IS NULL AND direction = 'pg-to-etcd' \
               AND ($1 OR id = ANY($2) \
                    OR pg_xact IN (SELECT d.pg_xact FROM dead_letters d WHERE d.id = ANY($2))) \
             ORDER BY id FOR UPDATE"
        ))
        .bind::<diesel::sql_types::Bool, _>(all)
        .bind::<Array<BigInt>, _>(&ids)
        .load(conn)
        .await?;
        for letter in &letters {
            let Some(table) = letter
                .mirror_table
                .as_deref()
                .and_then(|t| Ident::parse(t).ok())
            else {
                continue;
            };
            #[derive(QueryableByName)]
            struct Base {
                #[diesel(sql_type = BigInt)]
                base: i64,
            }
            let base: Vec<Base> = diesel::sql_query(format!(
                "SELECT COALESCE((SELECT mod_revision FROM {} WHERE key = $1), 0) AS base",
                schema.qualify(&table)
            ))
            .bind::<Bytea, _>(&letter.key)
            .load(conn)
            .await?;
            let base = base.into_iter().next().map_or(0, |b| b.base);
            crate::outbox::queue(
                conn,
                table.as_str(),
                &letter.key,
                letter.op,
                letter.value.as_deref(),
                base,
            )
            .await?;
            diesel::sql_query(
                "UPDATE dead_letters SET retried_at = clock_timestamp() WHERE id = $1",
            )
            .bind::<BigInt, _>(letter.id)
            .execute(conn)
            .await?;
        }
        crate::notify::notify(conn, crate::notify::Channel::Outbox, "").await?;
        Ok(letters.len())
    })
    .await
}

/// Counts for `status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct Counts {
    #[diesel(sql_type = BigInt)]
    pub outbox_pending: i64,
    #[diesel(sql_type = BigInt)]
    pub conflicts_pending: i64,
    #[diesel(sql_type = BigInt)]
    pub dead_letters: i64,
    /// Keys whose etcd changes wait for a row a user's transaction holds.
    #[diesel(sql_type = BigInt)]
    pub keys_blocked: i64,
}

pub async fn counts(conn: &mut AsyncPgConnection) -> Result<Counts, StoreError> {
    let rows: Vec<Counts> = diesel::sql_query(
        "SELECT (SELECT count(*) FROM outbox) AS outbox_pending, \
                (SELECT count(*) FROM conflicts WHERE status = 'pending') AS conflicts_pending, \
                (SELECT count(*) FROM dead_letters WHERE retried_at IS NULL) AS dead_letters, \
                (SELECT count(*) FROM (SELECT DISTINCT mirror_table, key FROM deferred_inputs) AS d) AS keys_blocked",
    )
    .load(conn)
    .await?;
    Ok(rows.into_iter().next().unwrap_or_default())
}

/// Deletes audit events older than `events_days`, history older than
/// `history_days` by partition (every key keeps its newest row, and
/// `state_at` its answer for every revision from the horizon on: see
/// [`crate::partitions::expire`]) and revision clock samples older than
/// `clock_days`. 0 days keeps everything. Returns (events, history rows,
/// clock samples).
pub async fn purge(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    events_days: u32,
    history_days: u32,
    clock_days: u32,
) -> Result<(usize, usize, usize), StoreError> {
    let events = purge_older_than(
        conn,
        fence,
        events_days,
        "DELETE FROM sync_events WHERE id IN (SELECT id FROM sync_events \
         WHERE at < now() - make_interval(days => $1) LIMIT $2)",
    )
    .await?;
    let history = crate::partitions::expire(conn, fence, history_days).await? as usize;
    let clock = purge_older_than(conn, fence, clock_days, crate::clock::PURGE).await?;
    Ok((events, history, clock))
}

/// Runs `delete` (parameters: days, chunk size) in fenced transactions
/// until a chunk comes back short. `days == 0` deletes nothing.
async fn purge_older_than(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    days: u32,
    delete: &'static str,
) -> Result<usize, StoreError> {
    const CHUNK: i64 = 10_000;
    if days == 0 {
        return Ok(0);
    }
    let mut total = 0;
    loop {
        let deleted = conn
            .transaction::<_, StoreError, _>(async |conn| {
                fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
                Ok(diesel::sql_query(delete)
                    .bind::<diesel::sql_types::Integer, _>(days as i32)
                    .bind::<BigInt, _>(CHUNK)
                    .execute(conn)
                    .await?)
            })
            .await?;
        total += deleted;
        if (deleted as i64) < CHUNK {
            return Ok(total);
        }
    }
}

/// Audit events of the last hour, counted by kind.
pub async fn recent_events(conn: &mut AsyncPgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    #[derive(QueryableByName)]
    struct KindCount {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let rows: Vec<KindCount> = diesel::sql_query(
        "SELECT kind, count(*) AS n FROM sync_events WHERE at > now() - interval '1 hour' GROUP BY kind ORDER BY kind",
    )
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kind, r.n)).collect())
}
