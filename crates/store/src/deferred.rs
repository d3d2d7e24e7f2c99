//! Deferred inputs: the etcd inputs of keys whose mirror row a user's open
//! transaction holds. The apply transaction that meets such a row stores the
//! key's inputs here (so the checkpoint can move past them) and goes on with
//! the other keys; a later apply, once the row is free, takes them back in
//! order before any newer input of the key.

use eps_core::audit::AuditKind;
use std::collections::HashMap;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::ident::Ident;
use eps_core::model::{EtcdEvent, KeyMeta, KeyValue, Op, Origin, PrevKv};
use eps_core::reconcile::KeyInput;

use crate::error::StoreError;

/// The deferred inputs of some keys, in order, and the rows holding them.
#[derive(Debug, Default)]
pub struct DeferredInputs {
    pub by_key: HashMap<Vec<u8>, KeyDeferred>,
}

#[derive(Debug, Default)]
pub struct KeyDeferred {
    pub ids: Vec<i64>,
    /// The inputs, oldest first, each with when it was read from etcd
    /// (microseconds, PostgreSQL's clock).
    pub inputs: Vec<(KeyInput, i64)>,
    /// False when every one was a state the history already holds.
    pub record_history: bool,
    /// One was read by a resync onto a new timeline: the values it replaces
    /// are recorded as rolled back (see `ApplyRequest::record_rollbacks`).
    pub record_rollbacks: bool,
    /// More are deferred than were loaded (the byte budget ran out): the
    /// key's newer inputs must wait behind them.
    pub more: bool,
}
#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    revision: i64,
    #[diesel(sql_type = Nullable<Text>)]
    op: Option<String>,
    #[diesel(sql_type = Nullable<Bytea>)]
    value: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    create_revision: i64,
    #[diesel(sql_type = BigInt)]
    mod_revision: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    lease: i64,
    #[diesel(sql_type = Nullable<Bytea>)]
    prev_value: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    prev_revision: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    origin: Option<String>,
    #[diesel(sql_type = BigInt)]
    observed_at_us: i64,
    #[diesel(sql_type = Bool)]
    record_history: bool,
    #[diesel(sql_type = Bool)]
    record_rollbacks: bool,
    /// The key's deferred rows in all (the page may hold fewer).
    #[diesel(sql_type = BigInt)]
    of_key: i64,
}

impl Row {
    fn into_input(self) -> Result<KeyInput, StoreError> {
        let meta = KeyMeta {
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        };
        let invalid =
            |what: &str| StoreError::Invalid(format!("deferred input {}: {what}", self.id));
        match self.kind.as_str() {
            "event" => {
                let op = self
                    .op
                    .as_deref()
                    .and_then(Op::parse)
                    .ok_or_else(|| invalid("no op"))?;
                Ok(KeyInput::Event(EtcdEvent {
                    op,
                    key: self.key,
                    revision: self.revision,
                    value: self.value.unwrap_or_default(),
                    meta,
                    prev: match (self.prev_value, self.prev_revision) {
                        (Some(value), Some(mod_revision)) => Some(PrevKv {
                            value,
                            mod_revision,
                        }),
                        _ => None,
                    },
                }))
            }
            "observed" => {
                let origin = self
                    .origin
                    .as_deref()
                    .and_then(Origin::parse)
                    .ok_or_else(|| invalid("no origin"))?;
                Ok(KeyInput::Observed {
                    state: self.value.map(|value| KeyValue {
                        key: self.key,
                        value,
                        meta,
                    }),
                    revision: self.revision,
                    origin,
                })
            }
            other => Err(invalid(&format!("kind {other:?}"))),
        }
    }
}

/// The deferred inputs of `keys` in `table`, oldest first, locked (a
/// concurrent drain waits, and then finds them gone): about `max_bytes` of
/// values at most, whole keys first.
pub async fn load(
    conn: &mut AsyncPgConnection,
    table: &Ident,
    keys: &[&[u8]],
    max_bytes: usize,
) -> Result<DeferredInputs, StoreError> {
    if keys.is_empty() {
        return Ok(DeferredInputs::default());
    }
    // Locked first (window functions and FOR UPDATE do not mix).
    diesel::sql_query(
        "SELECT id FROM deferred_inputs WHERE mirror_table = $1 AND key = ANY($2) ORDER BY id FOR UPDATE",
    )
    .bind::<Text, _>(table.as_str())
    .bind::<Array<Bytea>, _>(keys)
    .execute(conn)
    .await?;
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT id, key, kind, revision, op, value, create_revision, mod_revision, version, lease, \
                prev_value, prev_revision, origin, observed_at_us, record_history, record_rollbacks, of_key \
         FROM (SELECT *, count(*) OVER (PARTITION BY key) AS of_key, \
                      sum(coalesce(octet_length(value), 0) + coalesce(octet_length(prev_value), 0)) \
                          OVER (ORDER BY key, id ROWS UNBOUNDED PRECEDING) \
                      - coalesce(octet_length(value), 0) - coalesce(octet_length(prev_value), 0) AS before \
               FROM deferred_inputs WHERE mirror_table = $1 AND key = ANY($2)) AS sized \
         WHERE before < $3 ORDER BY key, id",
    )
    .bind::<Text, _>(table.as_str())
    .bind::<Array<Bytea>, _>(keys)
    .bind::<BigInt, _>(max_bytes as i64)
    .load(conn)
    .await?;
    let mut deferred = DeferredInputs::default();
    for row in rows {
        let of_key = row.of_key as usize;
        let observed_at_us = row.observed_at_us;
        let entry = deferred.by_key.entry(row.key.clone()).or_default();
        entry.ids.push(row.id);
        entry.record_history |= row.record_history;
        entry.record_rollbacks |= row.record_rollbacks;
        entry.inputs.push((row.into_input()?, observed_at_us));
        entry.more = entry.ids.len() < of_key;
    }
    Ok(deferred)
}

/// Drops every deferred input of `tables`: those of a lost etcd belong to
/// another history. (On the same timeline nothing supersedes them: a
/// resync's state of a key goes in after them, in order.)
pub async fn discard(conn: &mut AsyncPgConnection, tables: &[&str]) -> Result<usize, StoreError> {
    Ok(
        diesel::sql_query("DELETE FROM deferred_inputs WHERE mirror_table = ANY($1)")
            .bind::<Array<Text>, _>(tables)
            .execute(conn)
            .await?,
    )
}

/// Drops the deferred inputs of one key (its mapping is gone).
pub async fn discard_key(
    conn: &mut AsyncPgConnection,
    table: &str,
    key: &[u8],
) -> Result<usize, StoreError> {
    Ok(
        diesel::sql_query("DELETE FROM deferred_inputs WHERE mirror_table = $1 AND key = $2")
            .bind::<Text, _>(table)
            .bind::<Bytea, _>(key)
            .execute(conn)
            .await?,
    )
}

/// Stores inputs of keys that cannot be applied now, after any already
/// deferred for them.
pub async fn store(
    conn: &mut AsyncPgConnection,
    table: &Ident,
    inputs: &[(&[u8], &KeyInput, i64)],
    record_history: bool,
    record_rollbacks: bool,
) -> Result<(), StoreError> {
    if inputs.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    let mut revisions: Vec<i64> = Vec::new();
    let mut ops: Vec<Option<&str>> = Vec::new();
    let mut values: Vec<Option<&[u8]>> = Vec::new();
    let mut metas: Vec<KeyMeta> = Vec::new();
    let mut prev_values: Vec<Option<&[u8]>> = Vec::new();
    let mut prev_revisions: Vec<Option<i64>> = Vec::new();
    let mut origins: Vec<Option<&str>> = Vec::new();
    let observed: Vec<i64> = inputs.iter().map(|(_, _, at)| *at).collect();
    for (key, input, _) in inputs {
        keys.push(key);
        match input {
            KeyInput::Event(event) => {
                kinds.push("event");
                revisions.push(event.revision);
                ops.push(Some(event.op.as_str()));
                values.push((event.op == Op::Put).then_some(event.value.as_slice()));
                metas.push(event.meta);
                prev_values.push(event.prev.as_ref().map(|p| p.value.as_slice()));
                prev_revisions.push(event.prev.as_ref().map(|p| p.mod_revision));
                origins.push(None);
            }
            KeyInput::Observed {
                state,
                revision,
                origin,
            } => {
                kinds.push("observed");
                revisions.push(*revision);
                ops.push(None);
                values.push(state.as_ref().map(|kv| kv.value.as_slice()));
                metas.push(state.as_ref().map(|kv| kv.meta).unwrap_or_default());
                prev_values.push(None);
                prev_revisions.push(None);
                origins.push(Some(origin.as_str()));
            }
        }
    }
    let create: Vec<i64> = metas.iter().map(|m| m.create_revision).collect();
    let modr: Vec<i64> = metas.iter().map(|m| m.mod_revision).collect();
    let version: Vec<i64> = metas.iter().map(|m| m.version).collect();
    let lease: Vec<i64> = metas.iter().map(|m| m.lease).collect();
    diesel::sql_query(
        "INSERT INTO deferred_inputs (mirror_table, key, kind, revision, op, value, create_revision, \
             mod_revision, version, lease, prev_value, prev_revision, origin, observed_at_us, record_history, \
             record_rollbacks) \
         SELECT $1, u.key, u.kind, u.revision, u.op, u.value, u.create_revision, u.mod_revision, \
                u.version, u.lease, u.prev_value, u.prev_revision, u.origin, u.observed_at_us, $14, $16 \
         FROM unnest($2::bytea[], $3::text[], $4::int8[], $5::text[], $6::bytea[], $7::int8[], \
                     $8::int8[], $9::int8[], $10::int8[], $11::bytea[], $12::int8[], $15::text[], $13::int8[]) \
              WITH ORDINALITY AS u(key, kind, revision, op, value, create_revision, mod_revision, \
                                   version, lease, prev_value, prev_revision, origin, observed_at_us, n) \
         ORDER BY u.n",
    )
    .bind::<Text, _>(table.as_str())
    .bind::<Array<Bytea>, _>(&keys)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<BigInt>, _>(&revisions)
    .bind::<Array<Nullable<Text>>, _>(&ops)
    .bind::<Array<Nullable<Bytea>>, _>(&values)
    .bind::<Array<BigInt>, _>(&create)
    .bind::<Array<BigInt>, _>(&modr)
    .bind::<Array<BigInt>, _>(&version)
    .bind::<Array<BigInt>, _>(&lease)
    .bind::<Array<Nullable<Bytea>>, _>(&prev_values)
    .bind::<Array<Nullable<BigInt>>, _>(&prev_revisions)
    .bind::<Array<BigInt>, _>(&observed)
    .bind::<Bool, _>(record_history)
    .bind::<Array<Nullable<Text>>, _>(&origins)
    .bind::<Bool, _>(record_rollbacks)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes inputs that were applied.
pub async fn remove(conn: &mut AsyncPgConnection, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query("DELETE FROM deferred_inputs WHERE id = ANY($1)")
        .bind::<Array<BigInt>, _>(ids)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, QueryableByName)]
pub struct DeferredKey {
    #[diesel(sql_type = Text)]
    pub mirror_table: String,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
}

/// Keys with deferred inputs, in (table, key) order after `after`: the
/// retry walks them round-robin, so a thousand keys held for long do not
/// keep one released after them waiting.
pub async fn keys(
    conn: &mut AsyncPgConnection,
    after: Option<&DeferredKey>,
    limit: usize,
) -> Result<Vec<DeferredKey>, StoreError> {
    let (table, key) = match after {
        Some(k) => (Some(k.mirror_table.as_str()), Some(k.key.as_slice())),
        None => (None, None),
    };
    Ok(diesel::sql_query(
        "SELECT DISTINCT mirror_table, key FROM deferred_inputs \
         WHERE $1::text IS NULL OR (mirror_table, key) > ($1, $2) \
         ORDER BY mirror_table, key LIMIT $3",
    )
    .bind::<Nullable<Text>, _>(table)
    .bind::<Nullable<Bytea>, _>(key)
    .bind::<BigInt, _>(limit as i64)
    .load(conn)
    .await?)
}

#[derive(Debug, Clone, QueryableByName)]
pub struct BlockedKey {
    #[diesel(sql_type = Text)]
    pub mirror_table: String,
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub blocked_secs: f64,
}

/// Keys blocked longer than `secs` and not reported yet; marks them
/// reported.
pub async fn newly_blocked(
    conn: &mut AsyncPgConnection,
    secs: u64,
) -> Result<Vec<BlockedKey>, StoreError> {
    Ok(diesel::sql_query(
        "WITH due AS (SELECT mirror_table, key, min(deferred_at) AS since FROM deferred_inputs \
                      GROUP BY mirror_table, key \
                      HAVING NOT bool_or(reported) AND min(deferred_at) < clock_timestamp() - make_interval(secs => $1)), \
              marked AS (UPDATE deferred_inputs d SET reported = true FROM due \
                         WHERE d.mirror_table = due.mirror_table AND d.key = due.key) \
         SELECT mirror_table, key, extract(epoch FROM clock_timestamp() - since)::float8 AS blocked_secs FROM due",
    )
    .bind::<diesel::sql_types::Double, _>(secs as f64)
    .load(conn)
    .await?)
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    pid: Option<i32>,
}

/// The backend holding `key`'s row in `table`, if one does (the row's
/// locker is its `xmax`; its transaction lock names the backend).
pub async fn blocking_pid(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    key: &[u8],
) -> Result<Option<i32>, StoreError> {
    let rows: Vec<Pid> = diesel::sql_query(format!(
        "SELECT (SELECT l.pid FROM pg_locks l \
                 WHERE l.locktype = 'transactionid' AND l.transactionid = t.xmax AND l.granted \
                 LIMIT 1) AS pid \
         FROM {} AS t WHERE t.key = $1",
        schema.qualify(table)
    ))
    .bind::<Bytea, _>(key)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next().and_then(|r| r.pid))
}

/// A key reported as blocked, with the backend holding its row.
#[derive(Debug, Clone)]
pub struct BlockedReport {
    pub mirror_table: String,
    pub key: Vec<u8>,
    pub blocked_secs: f64,
    pub pid: Option<i32>,
}

/// Records a `key-blocked` audit event for every key held longer than
/// `after` and not reported yet, naming the backend that holds its row
/// (`pg_stat_activity.pid`), in one fenced transaction.
pub async fn report_blocked(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    fence: &crate::Fence,
    after: std::time::Duration,
) -> Result<Vec<BlockedReport>, StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        let due = newly_blocked(conn, after.as_secs()).await?;
        let mut reports = Vec::with_capacity(due.len());
        for blocked in due {
            let pid = match Ident::parse(&blocked.mirror_table) {
                Ok(table) => blocking_pid(conn, schema, &table, &blocked.key).await?,
                Err(_) => None,
            };
            let detail = serde_json::json!({
                "table": blocked.mirror_table,
                "key": eps_core::keys::display_key(&blocked.key),
                "blocked_secs": blocked.blocked_secs,
                "pid": pid,
            });
            crate::events::record(conn, fence, AuditKind::KeyBlocked, None, &detail).await?;
            reports.push(BlockedReport {
                mirror_table: blocked.mirror_table,
                key: blocked.key,
                blocked_secs: blocked.blocked_secs,
                pid,
            });
        }
        Ok(reports)
    })
    .await
}
