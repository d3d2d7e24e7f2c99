//! A PostgreSQL transaction settled whole by a conflict on one of its keys.
//!
//! The planner decides a conflict per key; the decision covers the
//! transactions of the key's pending changes ([`Settled`]). This module
//! carries it to their changes of other keys, in the same database
//! transaction as the decision:
//! - etcd won: every other change of the transaction is marked dropped
//!   (`outbox.dropped_by`) and recorded as a conflict etcd won, with reason
//!   `transaction`. The poller never sends a key with a dropped change; the
//!   conflict arbiter reads etcd's state of each such key and puts the
//!   mirror row back (the planner's `Restore`), consuming the change;
//! - the conflict was parked (`manual`): every other change of the
//!   transaction is parked behind the same conflict, and its resolution
//!   releases or drops them all ([`release`], [`drop_parked`]).
//!
//! PostgreSQL wins need nothing here: the poller sends a transaction only
//! whole, so it waits for the rebased key and goes in one txn.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::audit::AuditKind;

use crate::error::StoreError;
use crate::fence::Fence;

/// A transaction a conflict settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// `pg_current_xact_id()` of the transaction, as a number.
    pub xact: i64,
    pub conflict_id: i64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// etcd's change won: the whole transaction is dropped.
    Dropped,
    /// Parked behind a pending `manual` conflict.
    Parked,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Dropped => "dropped",
            Outcome::Parked => "parked",
        }
    }
}

/// How many changes of other keys a settled transaction had.
#[derive(QueryableByName)]
struct Changes {
    #[diesel(sql_type = BigInt)]
    xact: i64,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Carries each settled transaction's outcome to its other changes, and
/// audits it. Returns how many changes were dropped.
pub async fn settle(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    settled: &[Settled],
) -> Result<usize, StoreError> {
    settle_as(conn, fence, settled, "policy").await
}

async fn settle_as(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    settled: &[Settled],
    resolved_by: &str,
) -> Result<usize, StoreError> {
    if settled.is_empty() {
        return Ok(0);
    }
    // A transaction dropped by one key and parked by another is dropped:
    // etcd kept a change it made.
    let mut dropped: Vec<Settled> = Vec::new();
    let mut parked: Vec<Settled> = Vec::new();
    for s in settled {
        let list = match s.outcome {
            Outcome::Dropped => &mut dropped,
            Outcome::Parked => &mut parked,
        };
        if !list.iter().any(|o| o.xact == s.xact) {
            list.push(*s);
        }
    }
    parked.retain(|p| !dropped.iter().any(|d| d.xact == p.xact));
    let (xacts, conflicts): (Vec<i64>, Vec<i64>) =
        dropped.iter().map(|s| (s.xact, s.conflict_id)).unzip();
    let mut changes: Vec<Changes> = Vec::new();
    if !dropped.is_empty() {
        // A pending conflict of another key with nothing parked behind it
        // but a dropped transaction's changes has nothing left to decide:
        // etcd keeps its value there too.
        diesel::sql_query(
            "WITH s AS (SELECT u.xact::text::xid8 AS xact, u.conflict_id \
                        FROM unnest($1::int8[], $2::int8[]) AS u(xact, conflict_id)) \
             UPDATE conflicts c SET status = 'resolved', winner = 'etcd', resolved_by = 'transaction', \
                 resolved_at = clock_timestamp() \
             WHERE c.status = 'pending' AND c.id <> ALL($2) \
               AND c.id IN (SELECT o.conflict_id FROM outbox o JOIN s ON o.xact = s.xact \
                            WHERE o.conflict_id IS NOT NULL) \
               AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.conflict_id = c.id \
                               AND (p.xact IS NULL OR p.xact NOT IN (SELECT xact FROM s)))",
        )
        .bind::<Array<BigInt>, _>(&xacts)
        .bind::<Array<BigInt>, _>(&conflicts)
        .execute(conn)
        .await?;
        changes = diesel::sql_query(
            "WITH s AS (SELECT u.xact, u.xact::text::xid8 AS xact8, u.conflict_id \
                        FROM unnest($1::int8[], $2::int8[]) AS u(xact, conflict_id)), \
             dropped AS ( \
                 UPDATE outbox o SET dropped_by = s.conflict_id, conflict_id = NULL \
                 FROM s WHERE o.xact = s.xact8 AND o.dropped_by IS NULL \
                 RETURNING o.mirror_table, o.key, o.value, o.base_revision, o.created_at, s.xact, \
                     s.conflict_id), \
             recorded AS ( \
                 INSERT INTO conflicts (mirror_table, key, etcd_value, etcd_revision, etcd_observed_at, \
                     pg_value, pg_revision, pg_changed_at, policy, winner, status, resolved_by, resolved_at, \
                     node, term, trace_id, reason, pg_xact, etcd_changed_after, etcd_changed_by) \
                 SELECT d.mirror_table, d.key, value_at(d.key, d.base_revision), d.base_revision, \
                     c.etcd_observed_at, d.value, d.base_revision, d.created_at, c.policy, 'etcd', 'resolved', \
                     $3, clock_timestamp(), $4, $5, c.trace_id, 'transaction', d.xact, \
                     c.etcd_changed_after, c.etcd_changed_by \
                 FROM dropped d JOIN conflicts c ON c.id = d.conflict_id \
                 RETURNING pg_xact) \
             SELECT pg_xact AS xact, count(*) AS n FROM recorded GROUP BY pg_xact",
        )
        .bind::<Array<BigInt>, _>(&xacts)
        .bind::<Array<BigInt>, _>(&conflicts)
        .bind::<Text, _>(resolved_by)
        .bind::<Text, _>(&fence.node)
        .bind::<BigInt, _>(fence.term)
        .load(conn)
        .await?;
    }
    let dropped_changes = changes.iter().map(|c| c.n as usize).sum();
    if !parked.is_empty() {
        let (xacts, conflicts): (Vec<i64>, Vec<i64>) =
            parked.iter().map(|s| (s.xact, s.conflict_id)).unzip();
        let parked_changes: Vec<Changes> = diesel::sql_query(
            "WITH s AS (SELECT u.xact, u.xact::text::xid8 AS xact8, u.conflict_id \
                        FROM unnest($1::int8[], $2::int8[]) AS u(xact, conflict_id)), \
             parked AS ( \
                 UPDATE outbox o SET conflict_id = s.conflict_id FROM s \
                 WHERE o.xact = s.xact8 AND o.conflict_id IS NULL AND o.dropped_by IS NULL \
                 RETURNING s.xact) \
             SELECT xact, count(*) AS n FROM parked GROUP BY xact",
        )
        .bind::<Array<BigInt>, _>(&xacts)
        .bind::<Array<BigInt>, _>(&conflicts)
        .load(conn)
        .await?;
        changes.extend(parked_changes);
    }
    // One audit event per transaction that had changes of other keys.
    let events: Vec<(AuditKind, serde_json::Value)> = changes
        .iter()
        .filter_map(|c| {
            let settled = dropped.iter().chain(&parked).find(|s| s.xact == c.xact)?;
            let detail = serde_json::json!({
                "transaction": settled.xact,
                "conflict_id": settled.conflict_id,
                "outcome": settled.outcome.as_str(),
                "other_changes": c.n,
            });
            Some((AuditKind::TransactionSettled, detail))
        })
        .collect();
    crate::events::record_many(conn, fence, None, &events).await?;
    Ok(dropped_changes)
}

/// An operator took PostgreSQL's side of conflict `conflict_id`: the
/// changes parked with it go (their bases are their own keys').
pub async fn release(conn: &mut AsyncPgConnection, conflict_id: i64) -> Result<(), StoreError> {
    diesel::sql_query("UPDATE outbox SET conflict_id = NULL WHERE conflict_id = $1")
        .bind::<BigInt, _>(conflict_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The transactions of the changes parked behind `conflict_id` and of every
/// queued change of its key (all lose when an operator takes etcd's side),
/// read before the key's changes are deleted.
pub async fn parked_with(
    conn: &mut AsyncPgConnection,
    conflict_id: i64,
    table: &str,
    key: &[u8],
) -> Result<Vec<i64>, StoreError> {
    #[derive(QueryableByName)]
    struct Xact {
        #[diesel(sql_type = BigInt)]
        xact: i64,
    }
    let rows: Vec<Xact> = diesel::sql_query(
        "SELECT DISTINCT xact::text::int8 AS xact FROM outbox \
         WHERE xact IS NOT NULL AND (conflict_id = $1 OR (mirror_table = $2 AND key = $3))",
    )
    .bind::<BigInt, _>(conflict_id)
    .bind::<Text, _>(table)
    .bind::<Bytea, _>(key)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.xact).collect())
}

/// An operator took etcd's side of conflict `conflict_id`: the other
/// changes of `xacts` (see [`parked_with`]) are dropped with it.
pub async fn drop_parked(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    conflict_id: i64,
    xacts: &[i64],
) -> Result<usize, StoreError> {
    let settled: Vec<Settled> = xacts
        .iter()
        .map(|xact| Settled {
            xact: *xact,
            conflict_id,
            outcome: Outcome::Dropped,
        })
        .collect();
    settle_as(conn, fence, &settled, "operator").await
}

/// A key whose mirror row shows a dropped change.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct DroppedKey {
    #[diesel(sql_type = Text)]
    pub mirror_table: String,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
}

/// Keys with dropped changes, for the arbiter to put back: a page of them
/// in key order after `after` (none: from the start).
pub async fn dropped_keys(
    conn: &mut AsyncPgConnection,
    after: Option<&DroppedKey>,
    limit: usize,
) -> Result<Vec<DroppedKey>, StoreError> {
    Ok(diesel::sql_query(
        "SELECT DISTINCT mirror_table, key FROM outbox \
         WHERE dropped_by IS NOT NULL AND ($1::text IS NULL OR (mirror_table, key) > ($1, $2)) \
         ORDER BY mirror_table, key LIMIT $3",
    )
    .bind::<Nullable<Text>, _>(after.map(|k| k.mirror_table.as_str()))
    .bind::<Bytea, _>(after.map_or(&[][..], |k| k.key.as_slice()))
    .bind::<BigInt, _>(limit as i64)
    .load(conn)
    .await?)
}
