//! The outbox as the PostgreSQL → etcd poller sees it.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use eps_core::audit::AuditKind;
use eps_core::model::Op;

use crate::error::StoreError;
use crate::fence::{self, Fence};

/// One pending change.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct OutboxRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub mirror_table: String,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = Text)]
    pub op: Op,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub value: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    pub base_revision: i64,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// When it was written, microseconds on PostgreSQL's clock.
    #[diesel(sql_type = BigInt)]
    pub created_at_us: i64,
    /// The PostgreSQL transaction that wrote it (`None`: written before
    /// transactions were recorded).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub xact: Option<i64>,
    /// How many changes of that transaction the outbox holds, whether this
    /// read returned them or not (1 without a transaction).
    #[diesel(sql_type = BigInt)]
    pub xact_rows: i64,
    /// Where its transaction stands in commit order (`None`: not known —
    /// no transaction recorded, or its stamp lost in a crash).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub commit_seq: Option<i64>,
    /// Another change of its transaction is on a key the read leaves out
    /// (parked, dropped, or waiting for the watcher): the transaction
    /// cannot go whole until that key is settled.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub xact_blocked: bool,
}

pub use eps_core::model::DeadLetterKind;

/// The oldest pending changes, in commit order per key, leaving out keys
/// parked behind a pending `manual` conflict, keys with a change dropped
/// with its transaction (the arbiter puts them back), and keys whose etcd changes
/// wait for a held row (the watcher settles those first): at most `limit` rows and
/// about `max_bytes` of keys and values (at least one row; the read stops
/// after the row that reaches the budget).
pub async fn pending(
    conn: &mut AsyncPgConnection,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = diesel::sql_query(
        // A transaction's rows are counted once per transaction in the
        // read, and only up to one more than the read can hold: one larger
        // cannot be whole in it anyway.
        "WITH w AS ( \
             SELECT * FROM ( \
                 SELECT *, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before FROM ( \
                     SELECT o.id, o.mirror_table, o.key, o.op, o.value, o.base_revision, o.attempts, \
                            (extract(epoch FROM o.created_at) * 1000000)::int8 AS created_at_us, \
                            o.xact AS xact8, o.xact::text::int8 AS xact, \
                            octet_length(o.key) + coalesce(octet_length(o.value), 0) AS size \
                     FROM outbox o \
                     WHERE NOT EXISTS (SELECT 1 FROM outbox p WHERE p.mirror_table = o.mirror_table \
                                       AND p.key = o.key \
                                       AND (p.conflict_id IS NOT NULL OR p.dropped_by IS NOT NULL)) \
                       AND NOT EXISTS (SELECT 1 FROM deferred_inputs d WHERE d.mirror_table = o.mirror_table \
                                       AND d.key = o.key) \
                     ORDER BY o.id LIMIT $1) AS oldest \
             ) AS sized WHERE before < $2), \
         c AS ( \
             SELECT d.xact8, (SELECT count(*) FROM (SELECT 1 FROM outbox x WHERE x.xact = d.xact8 \
                                                    LIMIT $1 + 1) AS capped) AS n, \
                    EXISTS (SELECT 1 FROM (SELECT x.mirror_table, x.key FROM outbox x WHERE x.xact = d.xact8 \
                                           LIMIT $1 + 1) AS x \
                            WHERE EXISTS (SELECT 1 FROM outbox p WHERE p.mirror_table = x.mirror_table \
                                          AND p.key = x.key \
                                          AND (p.conflict_id IS NOT NULL OR p.dropped_by IS NOT NULL)) \
                               OR EXISTS (SELECT 1 FROM deferred_inputs di WHERE di.mirror_table = x.mirror_table \
                                          AND di.key = x.key)) AS blocked \
             FROM (SELECT DISTINCT xact8 FROM w WHERE xact8 IS NOT NULL) AS d) \
         SELECT w.id, w.mirror_table, w.key, w.op, w.value, w.base_revision, w.attempts, w.created_at_us, \
                w.xact, coalesce(c.n, 1) AS xact_rows, \
                (SELECT s.seq FROM xact_commits s WHERE s.xact = w.xact8) AS commit_seq, \
                coalesce(c.blocked, false) AS xact_blocked \
         FROM w LEFT JOIN c ON c.xact8 = w.xact8 ORDER BY w.id",
    )
    .bind::<BigInt, _>(limit as i64)
    .bind::<BigInt, _>(max_bytes as i64)
    .load(conn)
    .await?;
    Ok(rows)
}

/// Queues a change made by the service itself (an operator's resolution or
/// repair, a dead-letter retry), as the mirror tables' trigger queues a
/// user's: in the caller's transaction, which the poller sees as one.
pub(crate) async fn queue(
    conn: &mut AsyncPgConnection,
    table: &str,
    key: &[u8],
    op: Op,
    value: Option<&[u8]>,
    base_revision: i64,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "INSERT INTO outbox (mirror_table, key, op, value, base_revision) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind::<Text, _>(table)
    .bind::<Bytea, _>(key)
    .bind::<Text, _>(op.as_str())
    .bind::<Nullable<Bytea>, _>(value)
    .bind::<BigInt, _>(base_revision)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks changes as possibly sent to etcd, before the txn that sends them
/// (see `PendingChange::sent`); returns those not marked already.
///
/// A mark runs alongside the watcher's applies (fenced
/// [`fence::Checkpoint::KeepConcurrently`]) and takes its rows `NOWAIT`: an
/// apply that reads them holds them `FOR UPDATE`, so the apply sees the
/// mark, or the mark does not happen this way. Waiting for such a row
/// instead could close a cycle: the apply locks outbox rows in key order
/// and then its transactions' other rows, the mark in id order. When a row
/// is held (an apply consuming the echo of the key's earlier change), the
/// mark is made as every fenced transaction is, behind the checkpoint's
/// movers ([`fence::Checkpoint::Keep`]).
pub async fn mark_sent(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    ids: &[i64],
) -> Result<Vec<i64>, StoreError> {
    let alongside = mark(
        conn,
        fence,
        ids,
        fence::Checkpoint::KeepConcurrently,
        "UPDATE outbox SET sent = true \
         WHERE id IN (SELECT id FROM outbox WHERE id = ANY($1) AND NOT sent FOR UPDATE NOWAIT) \
         RETURNING id",
    )
    .await;
    match alongside {
        Err(StoreError::RowHeld(_)) => {
            mark(
                conn,
                fence,
                ids,
                fence::Checkpoint::Keep,
                "UPDATE outbox SET sent = true WHERE id = ANY($1) AND NOT sent RETURNING id",
            )
            .await
        }
        other => other,
    }
}

/// One try of [`mark_sent`]: `sql` (taking the ids as `$1`, returning the
/// ids marked) in its own transaction fenced as `checkpoint` says.
async fn mark(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    ids: &[i64],
    checkpoint: fence::Checkpoint<'_>,
    sql: &'static str,
) -> Result<Vec<i64>, StoreError> {
    #[derive(QueryableByName)]
    struct Marked {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, checkpoint).await?;
        let marked: Vec<Marked> = diesel::sql_query(sql)
            .bind::<Array<BigInt>, _>(ids)
            .load(conn)
            .await?;
        Ok(marked.into_iter().map(|m| m.id).collect())
    })
    .await
}

/// Takes back [`mark_sent`] for changes a round marked but did not send
/// (it stopped before them): a resync must not take them for landed. Only
/// ids that round's [`mark_sent`] returned: a mark an earlier round set
/// may stand for a change that landed (its outcome unknown).
pub async fn unmark_sent(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    ids: &[i64],
) -> Result<(), StoreError> {
    fenced_on_ids(
        conn,
        fence,
        "UPDATE outbox SET sent = false WHERE id = ANY($1) AND sent",
        ids,
    )
    .await
}

/// Removes changes that took effect without an etcd event (deleting a key
/// that was already absent).
pub async fn consume(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    ids: &[i64],
) -> Result<(), StoreError> {
    fenced_on_ids(conn, fence, "DELETE FROM outbox WHERE id = ANY($1)", ids).await
}

/// Runs `sql` (taking the ids as `$1`) in its own fenced transaction.
async fn fenced_on_ids(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    sql: &'static str,
    ids: &[i64],
) -> Result<(), StoreError> {
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        diesel::sql_query(sql)
            .bind::<Array<BigInt>, _>(ids)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}

/// Counts a failed attempt on a change.
pub async fn record_attempt(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    id: i64,
    error: &str,
) -> Result<i32, StoreError> {
    #[derive(QueryableByName)]
    struct Attempts {
        #[diesel(sql_type = Integer)]
        attempts: i32,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let rows: Vec<Attempts> =
            diesel::sql_query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1 RETURNING attempts")
                .bind::<BigInt, _>(id)
                .bind::<Text, _>(error)
                .load(conn)
                .await?;
        Ok(rows.into_iter().next().map_or(0, |r| r.attempts))
    })
    .await
}

/// A change that cannot go to etcd, and why.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub row: &'a OutboxRow,
    pub kind: DeadLetterKind,
    pub reason: &'a str,
}

/// Moves changes to the dead-letter list, each with its reason, and with
/// them every other change of their transactions (etcd gets all of a
/// transaction or none; `dead-letters retry` replays them together) except
/// `landed` (changes the caller knows reached etcd, their echo pending),
/// recorded in the audit trail. One database transaction. Changes of other
/// transactions queued behind them keep flowing. Returns how many changes
/// were dead-lettered.
///
/// A change that reached etcd unknown to the caller (an answer lost, a
/// leader gone) may be dead-lettered with its transaction: its echo then
/// applies as etcd's own change (the same value), and a retry puts it
/// again. Leaving an unsent one behind would send part of a transaction.
pub async fn dead_letter(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    refused: &[Refusal<'_>],
    landed: &[i64],
    trace_id: Option<&str>,
) -> Result<usize, StoreError> {
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let mut moved = 0;
        for refusal in refused {
            moved += move_to_dead_letters(conn, fence, refusal, None, &[], trace_id).await?;
        }
        for refusal in refused {
            let Some(xact) = refusal.row.xact else {
                continue;
            };
            let reason = format!(
                "dead-lettered with its transaction, another change of which cannot go: {}",
                refusal.reason
            );
            let sibling = Refusal {
                reason: &reason,
                ..*refusal
            };
            moved +=
                move_to_dead_letters(conn, fence, &sibling, Some(xact), landed, trace_id).await?;
        }
        Ok(moved)
    })
    .await
}

/// Moves `refusal.row` (`xact: None`) or the changes of transaction `xact`
/// but `landed` and the dropped ones to the dead letters, with `refusal`'s
/// kind and reason; audits each. A row already gone (its echo consumed it)
/// is not moved.
async fn move_to_dead_letters(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    refusal: &Refusal<'_>,
    xact: Option<i64>,
    landed: &[i64],
    trace_id: Option<&str>,
) -> Result<usize, StoreError> {
    #[derive(QueryableByName)]
    struct Letter {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = BigInt)]
        outbox_id: i64,
        #[diesel(sql_type = Text)]
        mirror_table: String,
        #[diesel(sql_type = Bytea)]
        key: Vec<u8>,
    }
    let letters: Vec<Letter> = diesel::sql_query(
        "WITH moved AS ( \
             DELETE FROM outbox o WHERE CASE WHEN $1 IS NULL THEN o.id = $2 \
                 ELSE o.xact = $1::text::xid8 AND o.id <> ALL($9) AND o.dropped_by IS NULL END \
             RETURNING o.id, o.mirror_table, o.key, o.op, o.value, o.base_revision, o.attempts, o.xact) \
         INSERT INTO dead_letters (direction, mirror_table, key, op, value, base_revision, outbox_id, \
             reason, kind, attempts, node, term, trace_id, pg_xact) \
         SELECT 'pg-to-etcd', m.mirror_table, m.key, m.op, m.value, m.base_revision, m.id, $3, $4, \
             greatest(m.attempts, $5), $6, $7, $8, m.xact::text::int8 \
         FROM moved m ORDER BY m.id \
         RETURNING id, outbox_id, mirror_table, key",
    )
    .bind::<Nullable<BigInt>, _>(xact)
    .bind::<BigInt, _>(refusal.row.id)
    .bind::<Text, _>(refusal.reason)
    .bind::<Text, _>(refusal.kind.as_str())
    .bind::<Integer, _>(refusal.row.attempts)
    .bind::<Text, _>(&fence.node)
    .bind::<BigInt, _>(fence.term)
    .bind::<Nullable<Text>, _>(trace_id)
    .bind::<Array<BigInt>, _>(landed)
    .load(conn)
    .await?;
    for letter in &letters {
        let detail = serde_json::json!({
            "dead_letter_id": letter.id,
            "outbox_id": letter.outbox_id,
            "table": letter.mirror_table,
            "key": eps_core::keys::display_key(&letter.key),
            "kind": refusal.kind.as_str(),
            "reason": refusal.reason,
            "transaction": xact.or(refusal.row.xact),
        });
        crate::events::record(conn, fence, AuditKind::DeadLetter, trace_id, &detail).await?;
        if refusal.kind == DeadLetterKind::RetriesExhausted {
            crate::events::record(conn, fence, AuditKind::RetryExhausted, trace_id, &detail)
                .await?;
        }
    }
    Ok(letters.len())
}
