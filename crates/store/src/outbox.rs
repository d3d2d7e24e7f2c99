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
    pub op: String,
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
}

impl OutboxRow {
    pub fn op(&self) -> Result<Op, StoreError> {
        Op::parse(&self.op).ok_or_else(|| {
            StoreError::Invalid(format!("outbox row {} has op {:?}", self.id, self.op))
        })
    }
}

/// Why a change cannot go to etcd (the `kind` column of `dead_letters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterKind {
    TooLarge,
    Unmapped,
    ReadOnlyMapping,
    Invalid,
    RetriesExhausted,
}

impl DeadLetterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::TooLarge => "too-large",
            DeadLetterKind::Unmapped => "unmapped",
            DeadLetterKind::ReadOnlyMapping => "read-only-mapping",
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::RetriesExhausted => "retries-exhausted",
        }
    }
}

/// The oldest pending changes, in commit order per key, leaving out keys
/// parked behind a pending `manual` conflict and keys whose etcd changes
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
                                       AND p.key = o.key AND p.conflict_id IS NOT NULL) \
                       AND NOT EXISTS (SELECT 1 FROM deferred_inputs d WHERE d.mirror_table = o.mirror_table \
                                       AND d.key = o.key) \
                     ORDER BY o.id LIMIT $1) AS oldest \
             ) AS sized WHERE before < $2), \
         c AS ( \
             SELECT d.xact8, (SELECT count(*) FROM (SELECT 1 FROM outbox x WHERE x.xact = d.xact8 \
                                                    LIMIT $1 + 1) AS capped) AS n \
             FROM (SELECT DISTINCT xact8 FROM w WHERE xact8 IS NOT NULL) AS d) \
         SELECT w.id, w.mirror_table, w.key, w.op, w.value, w.base_revision, w.attempts, w.created_at_us, \
                w.xact, coalesce(c.n, 1) AS xact_rows \
         FROM w LEFT JOIN c ON c.xact8 = w.xact8 ORDER BY w.id",
    )
    .bind::<BigInt, _>(limit as i64)
    .bind::<BigInt, _>(max_bytes as i64)
    .load(conn)
    .await?;
    Ok(rows)
}

/// Marks changes as possibly sent to etcd, before the txn that sends them
/// (see `PendingChange::sent`).
pub async fn mark_sent(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    ids: &[i64],
) -> Result<(), StoreError> {
    fenced_on_ids(
        conn,
        fence,
        "UPDATE outbox SET sent = true WHERE id = ANY($1) AND NOT sent",
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

/// Moves a change to the dead-letter list, with the reason, and records it
/// in the audit trail. The changes queued behind it keep flowing.
pub async fn dead_letter(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    row: &OutboxRow,
    kind: DeadLetterKind,
    reason: &str,
    trace_id: Option<&str>,
) -> Result<i64, StoreError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        let deleted = diesel::sql_query("DELETE FROM outbox WHERE id = $1")
            .bind::<BigInt, _>(row.id)
            .execute(conn)
            .await?;
        if deleted == 0 {
            // Consumed meanwhile (its echo arrived): nothing to dead-letter.
            return Ok(0);
        }
        let ids: Vec<Id> = diesel::sql_query(
            "INSERT INTO dead_letters (direction, mirror_table, key, op, value, base_revision, outbox_id, \
                 reason, kind, attempts, node, term, trace_id) \
             VALUES ('pg-to-etcd', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
        )
        .bind::<Text, _>(&row.mirror_table)
        .bind::<Bytea, _>(&row.key)
        .bind::<Text, _>(&row.op)
        .bind::<Nullable<Bytea>, _>(row.value.as_deref())
        .bind::<BigInt, _>(row.base_revision)
        .bind::<BigInt, _>(row.id)
        .bind::<Text, _>(reason)
        .bind::<Text, _>(kind.as_str())
        .bind::<Integer, _>(row.attempts)
        .bind::<Text, _>(&fence.node)
        .bind::<BigInt, _>(fence.term)
        .bind::<Nullable<Text>, _>(trace_id)
        .load(conn)
        .await?;
        let id = ids.into_iter().next().map_or(0, |r| r.id);
        let detail = serde_json::json!({
            "dead_letter_id": id,
            "outbox_id": row.id,
            "table": row.mirror_table,
            "key": eps_core::keys::display_key(&row.key),
            "kind": kind.as_str(),
            "reason": reason,
        });
        crate::events::record(conn, fence, AuditKind::DeadLetter, trace_id, &detail).await?;
        if kind == DeadLetterKind::RetriesExhausted {
            crate::events::record(conn, fence, AuditKind::RetryExhausted, trace_id, &detail).await?;
        }
        Ok(id)
    })
    .await
}
