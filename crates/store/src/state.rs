//! `sync_state`: the leader's term and the durable checkpoint.

use diesel::{ExpressionMethods, OptionalExtension, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::audit::AuditKind;

use eps_core::policy::Side;

use crate::error::StoreError;
use crate::schema::sync_state;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    pub term: i64,
    pub leader_node: Option<String>,
    pub applied_revision: i64,
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The etcd timeline the mirror follows (see `migrations/*_timelines`).
    pub timeline: i32,
    /// etcd's cluster id when last seen (as stored: the u64 reinterpreted).
    pub etcd_cluster_id: Option<i64>,
    /// A resync onto a new timeline started and has not finished.
    pub timeline_resync: bool,
    /// The token etcd's timeline mark holds (see [`prepare_timeline_mark`]).
    pub timeline_mark: Option<String>,
    /// A token being written to the mark.
    pub timeline_mark_pending: Option<String>,
    /// A new etcd timeline detected and held for an operator
    /// (`sync.on_etcd_restore = "pause"`): what was detected.
    pub timeline_hold: Option<serde_json::Value>,
    /// The operator's answer to the hold: follow etcd, or put PostgreSQL's
    /// state into it.
    pub timeline_decision: Option<Side>,
}

pub async fn read(conn: &mut AsyncPgConnection) -> Result<SyncState, StoreError> {
    type Row = (
        i64,
        Option<String>,
        i64,
        Option<chrono::DateTime<chrono::Utc>>,
        i32,
        Option<i64>,
        bool,
        Option<String>,
        Option<String>,
        Option<serde_json::Value>,
        Option<String>,
    );
    let row: Option<Row> = sync_state::table
        .filter(sync_state::id.eq(1))
        .select((
            sync_state::term,
            sync_state::leader_node,
            sync_state::applied_revision,
            sync_state::applied_at,
            sync_state::timeline,
            sync_state::etcd_cluster_id,
            sync_state::timeline_resync,
            sync_state::timeline_mark,
            sync_state::timeline_mark_pending,
            sync_state::timeline_hold,
            sync_state::timeline_decision,
        ))
        .first(conn)
        .await
        .optional()?;
    let (
        term,
        leader_node,
        applied_revision,
        applied_at,
        timeline,
        etcd_cluster_id,
        timeline_resync,
        timeline_mark,
        timeline_mark_pending,
        timeline_hold,
        timeline_decision,
    ) = row.ok_or_else(|| {
        StoreError::Invalid("sync_state is empty: run `etcd-pg-sync migrate`".into())
    })?;
    Ok(SyncState {
        term,
        leader_node,
        applied_revision,
        applied_at,
        timeline,
        etcd_cluster_id,
        timeline_resync,
        timeline_mark,
        timeline_mark_pending,
        timeline_hold,
        timeline_decision: timeline_decision.as_deref().and_then(Side::parse),
    })
}

/// Records `token` as the timeline mark about to be written to etcd. The
/// order (recorded, written, confirmed) means etcd never holds a token the
/// mirror does not know: a crash after the write leaves it pending, and the
/// timeline check accepts the pending token too.
pub async fn prepare_timeline_mark(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    token: &str,
) -> Result<(), StoreError> {
    set_timeline_mark(
        conn,
        fence,
        "UPDATE sync_state SET timeline_mark_pending = $1 WHERE id = 1",
        token,
    )
    .await
}

/// Makes the pending `token` the timeline mark: etcd holds it.
pub async fn confirm_timeline_mark(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    token: &str,
) -> Result<(), StoreError> {
    set_timeline_mark(
        conn,
        fence,
        "UPDATE sync_state SET timeline_mark = $1, timeline_mark_pending = NULL \
         WHERE id = 1 AND timeline_mark_pending = $1",
        token,
    )
    .await
}

async fn set_timeline_mark(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    sql: &'static str,
    token: &str,
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query(sql)
            .bind::<diesel::sql_types::Text, _>(token)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}

/// Makes `term` the current one if it is newer than the stored term. Waits
/// for the old leader's open transactions (they hold the row lock); returns
/// false when a newer term is already stored.
///
/// A stored term above `etcd_revision` (etcd's current revision) cannot come
/// from this etcd — terms are create revisions — but from one that was
/// replaced (restored from backup, rebuilt with `restore-etcd`); it is
/// superseded too. Its leaders cannot write here: the equality check fails.
pub async fn claim_term(
    conn: &mut AsyncPgConnection,
    term: i64,
    node: &str,
    etcd_revision: i64,
) -> Result<bool, StoreError> {
    use diesel::BoolExpressionMethods;
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        // `FOR UPDATE`, not the update's own lock: it also waits for the
        // old term's transactions fenced `FOR KEY SHARE` (the poller's
        // marks), which an update of the term alone would not.
        crate::fence::lock_exclusively(conn, None).await?;
        let superseded = sync_state::term
            .lt(term)
            .or(sync_state::term.gt(etcd_revision));
        let updated = diesel::update(
            sync_state::table
                .filter(sync_state::id.eq(1))
                .filter(superseded),
        )
        .set((
            sync_state::term.eq(term),
            sync_state::leader_node.eq(node),
            sync_state::leader_since.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
        Ok(updated == 1)
    })
    .await
}

#[derive(diesel::QueryableByName)]
struct TableName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// Which of `tables` were created since the mirror last matched etcd (new
/// mappings, tables dropped and created again): see `mirror_tables.synced`.
pub async fn unsynced_tables(
    conn: &mut AsyncPgConnection,
    tables: &[&str],
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<TableName> = diesel::sql_query(
        "SELECT name FROM mirror_tables WHERE NOT synced AND name = ANY($1) ORDER BY name",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

#[derive(diesel::QueryableByName)]
struct Relid {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    relid: i64,
}

/// The relations of `tables` as registered now: a resync marks in sync
/// the relations it walked, not whatever carries their names when it ends
/// (a table dropped and created again meanwhile is a new one).
pub async fn table_relids(
    conn: &mut AsyncPgConnection,
    tables: &[&str],
) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<Relid> =
        diesel::sql_query("SELECT relid::int8 AS relid FROM mirror_tables WHERE name = ANY($1)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
            .load(conn)
            .await?;
    Ok(rows.into_iter().map(|r| r.relid).collect())
}

/// Tables registered but not among `tables` (the mapped ones) are not kept
/// in sync by this leader: a mapping removed, or made `pg-to-etcd`. If it
/// comes back, its table is filled from etcd again.
pub async fn unsync_unmapped(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    tables: &[&str],
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query(
            "UPDATE mirror_tables SET synced = false WHERE synced AND name <> ALL($1)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// Ends a resync: the checkpoint becomes exactly `revision` and the
/// relations walked at it (`relids`) are marked in sync, in one fenced
/// transaction.
pub async fn finish_resync(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    revision: i64,
    relids: &[i64],
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Set(revision)).await?;
        diesel::sql_query("UPDATE sync_state SET timeline_resync = false WHERE id = 1")
            .execute(conn)
            .await?;
        // A table synced for the first time (on this timeline) has its
        // whole range in the history from this revision on.
        diesel::sql_query(
            "UPDATE mirror_tables SET synced = true,                  history_from = coalesce(CASE WHEN synced THEN history_from END, $2)              WHERE relid::int8 = ANY($1)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(relids)
        .bind::<diesel::sql_types::BigInt, _>(revision)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// The newest history row of the current timeline up to the checkpoint
/// (or a parallel catch-up range's, when one is ahead of it): key,
/// revision, and the value (`None`: absent). Every row says what etcd
/// held at its revision — a change, or a state a snapshot or resync read
/// (a key's value at its mod revision, or its absence at the resync's).
pub async fn last_applied_change(
    conn: &mut AsyncPgConnection,
) -> Result<Option<(Vec<u8>, i64, Option<Vec<u8>>)>, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Change {
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        key: Vec<u8>,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        revision: i64,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
        value: Option<Vec<u8>>,
    }
    let rows: Vec<Change> = diesel::sql_query(
        "SELECT h.key, h.revision, CASE WHEN h.op = 'put' THEN h.value END AS value \
         FROM history h, sync_state s \
         WHERE s.id = 1 AND h.timeline = s.timeline \
           AND h.revision <= GREATEST(s.applied_revision, \
                                      (SELECT max(c.applied_revision) FROM catchup_ranges c)) \
         ORDER BY h.revision DESC LIMIT 1",
    )
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .next()
        .map(|c| (c.key, c.revision, c.value)))
}

/// Records etcd's cluster id (first seen, or the same timeline's).
pub async fn record_cluster_id(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    cluster_id: i64,
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query("UPDATE sync_state SET etcd_cluster_id = $1 WHERE id = 1")
            .bind::<diesel::sql_types::BigInt, _>(cluster_id)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}

/// Starts following a new etcd timeline, in one fenced transaction: the
/// timeline number moves on, the cluster id is recorded, the mirror rows'
/// etcd metadata is forgotten (it numbers the old history's revisions; the
/// resync that follows writes the new), queued changes lose their base
/// revision (they are settled against the new etcd by policy, never
/// compared with an old revision) — except those of `one_way` tables
/// (`pg-to-etcd`), which are dropped: the table's rows are their source,
/// and every row etcd lacks is queued again from its current value after
/// the resync — inputs deferred from the old etcd are dropped, and a
/// `timeline-change` audit event says what was seen. An operator's answer
/// to a held timeline (`timeline_decision`) is consumed here, in the same
/// transaction: `pg` makes the new timeline's rollbacks requests to put
/// the values back (`timeline_take_pg`).
pub async fn begin_timeline(
    conn: &mut AsyncPgConnection,
    schema: &eps_core::ident::Ident,
    fence: &crate::Fence,
    tables: &[&eps_core::ident::Ident],
    one_way: &[&str],
    cluster_id: i64,
    detail: &serde_json::Value,
) -> Result<i32, StoreError> {
    use diesel_async::AsyncConnection;
    #[derive(diesel::QueryableByName)]
    struct Timeline {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeline: i32,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        decision: Option<String>,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        let next: Timeline = diesel::sql_query(
            "UPDATE sync_state s SET timeline = s.timeline + 1, etcd_cluster_id = $1, timeline_resync = true, \
                 timeline_mark = NULL, timeline_mark_pending = NULL, timeline_hold = NULL, \
                 timeline_decision = NULL, timeline_take_pg = (o.decision IS NOT DISTINCT FROM 'pg') \
             FROM (SELECT timeline_decision AS decision FROM sync_state WHERE id = 1) o \
             WHERE s.id = 1 RETURNING s.timeline, o.decision",
        )
        .bind::<diesel::sql_types::BigInt, _>(cluster_id)
        .get_result(conn)
        .await?;
        let decision = next.decision.as_deref().and_then(Side::parse);
        // A catch-up's ranges name revisions of the old timeline.
        diesel::sql_query("DELETE FROM catchup_ranges")
            .execute(conn)
            .await?;
        // The new timeline's history starts with its resync.
        new_timeline_history(conn).await?;
        for table in tables {
            diesel::sql_query(format!(
                "UPDATE {} SET create_revision = 0, mod_revision = 0, version = 0, lease = 0",
                schema.qualify(table)
            ))
            .execute(conn)
            .await?;
        }
        // A key with a parked change keeps its queue (the conflict is the
        // operator's, and what was queued behind it still is to come).
        diesel::sql_query(
            "DELETE FROM outbox o WHERE o.mirror_table = ANY($1) AND NOT EXISTS \
                 (SELECT 1 FROM outbox p WHERE p.mirror_table = o.mirror_table AND p.key = o.key \
                  AND p.conflict_id IS NOT NULL)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(one_way)
        .execute(conn)
        .await?;
        diesel::sql_query("UPDATE outbox SET base_revision = -1 WHERE base_revision > 0")
            .execute(conn)
            .await?;
        diesel::sql_query("DELETE FROM deferred_inputs")
            .execute(conn)
            .await?;
        let mut detail = detail.clone();
        detail["timeline"] = serde_json::json!(next.timeline);
        if let Some(decision) = decision {
            detail["decision"] = serde_json::json!(decision.as_str());
        }
        crate::events::record(conn, fence, AuditKind::TimelineChange, None, &detail).await?;
        Ok(next.timeline)
    })
    .await
}

/// Holds a new etcd timeline for an operator (`sync.on_etcd_restore =
/// "pause"`): records what was detected and an audit event
/// `timeline-paused`, once. Returns false when one was held already.
pub async fn hold_timeline(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    detail: &serde_json::Value,
) -> Result<bool, StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        let held = diesel::update(sync_state::table)
            .filter(sync_state::id.eq(1))
            .filter(sync_state::timeline_hold.is_null())
            .set(sync_state::timeline_hold.eq(Some(detail)))
            .execute(conn)
            .await?;
        if held > 0 {
            crate::events::record(conn, fence, AuditKind::TimelinePaused, None, detail).await?;
        }
        Ok(held > 0)
    })
    .await
}

/// An operator's answer to a held timeline: `etcd` follows the new etcd,
/// `pg` follows it and puts back every value that rolled back. Consumed by
/// the leader's [`begin_timeline`], whose `timeline-change` event names it.
/// The first answer stands (two operators cannot overwrite each other):
/// returns what was held and the answer recorded, `None` when nothing is
/// held.
pub async fn decide_timeline(
    conn: &mut AsyncPgConnection,
    side: Side,
) -> Result<Option<(serde_json::Value, Side)>, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Held {
        #[diesel(sql_type = diesel::sql_types::Jsonb)]
        hold: serde_json::Value,
        #[diesel(sql_type = diesel::sql_types::Text)]
        decision: String,
    }
    let held: Option<Held> = diesel::sql_query(
        "UPDATE sync_state SET timeline_decision = coalesce(timeline_decision, $1) \
         WHERE id = 1 AND timeline_hold IS NOT NULL \
         RETURNING timeline_hold AS hold, timeline_decision AS decision",
    )
    .bind::<diesel::sql_types::Text, _>(side.as_str())
    .get_result(conn)
    .await
    .optional()?;
    Ok(held.and_then(|h| Some((h.hold, Side::parse(&h.decision)?))))
}

/// Releases a held timeline that no longer applies — etcd is the one the
/// mirror follows again (the original put back) — with a
/// `timeline-released` event. Returns false when nothing was held.
pub async fn release_timeline_hold(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    detail: &serde_json::Value,
) -> Result<bool, StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        let released = diesel::update(sync_state::table)
            .filter(sync_state::id.eq(1))
            .filter(sync_state::timeline_hold.is_not_null())
            .set((
                sync_state::timeline_hold.eq(None::<serde_json::Value>),
                sync_state::timeline_decision.eq(None::<String>),
            ))
            .execute(conn)
            .await?;
        if released > 0 {
            crate::events::record(conn, fence, AuditKind::TimelineReleased, None, detail).await?;
        }
        Ok(released > 0)
    })
    .await
}

/// Forgets the timeline mark: the etcd the mirror follows from now on
/// (rebuilt by `restore-etcd`) holds none yet.
pub async fn forget_timeline_mark(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query(
            "UPDATE sync_state SET timeline_mark = NULL, timeline_mark_pending = NULL WHERE id = 1",
        )
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// `restore-etcd` rebuilds a new etcd from the mirror: a new timeline the
/// mirror already matches. Records it (number, cluster id, audit event)
/// without forgetting any metadata, so the watcher does not take the new
/// etcd for a foreign one.
pub async fn adopt_timeline(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    cluster_id: i64,
    detail: &serde_json::Value,
) -> Result<i32, StoreError> {
    use diesel_async::AsyncConnection;
    #[derive(diesel::QueryableByName)]
    struct Timeline {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeline: i32,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        let next: Timeline = diesel::sql_query(
            "UPDATE sync_state SET timeline = timeline + 1, etcd_cluster_id = $1, \
                 timeline_mark = NULL, timeline_mark_pending = NULL, \
                 timeline_hold = NULL, timeline_decision = NULL, timeline_take_pg = false \
             WHERE id = 1 RETURNING timeline",
        )
        .bind::<diesel::sql_types::BigInt, _>(cluster_id)
        .get_result(conn)
        .await?;
        // The new timeline's history starts with what the restore writes
        // (see `history_whole_from`).
        new_timeline_history(conn).await?;
        let mut detail = detail.clone();
        detail["timeline"] = serde_json::json!(next.timeline);
        crate::events::record(conn, fence, AuditKind::TimelineChange, None, &detail).await?;
        Ok(next.timeline)
    })
    .await
}

/// On a new timeline no table's history is whole yet (until its resync or
/// restore says from where), and retention has forgotten none of it.
async fn new_timeline_history(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    diesel::sql_query("UPDATE mirror_tables SET history_from = NULL")
        .execute(conn)
        .await?;
    diesel::sql_query("UPDATE sync_state SET history_complete_from = 0 WHERE id = 1")
        .execute(conn)
        .await?;
    Ok(())
}

/// After `restore-etcd` rebuilt the whole range of each of `tables` in an
/// etcd that held none of it at `revision`: the watch replays every change
/// since into the history, so `state_at` answers from `revision` on. A
/// table whose history is whole already (the same etcd, emptied and
/// restored) keeps its older start.
pub async fn history_whole_from(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    tables: &[&str],
    revision: i64,
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query(
            "UPDATE mirror_tables SET history_from = $2 WHERE name = ANY($1) AND history_from IS NULL",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
        .bind::<diesel::sql_types::BigInt, _>(revision)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}
