//! The apply transaction: etcd inputs for many keys in, one PostgreSQL
//! transaction out. The planner (`eps_core::reconcile`) decides per key; this
//! module locks, reads what the planner needs and executes its plans as a few
//! bulk statements per mirror table (`unnest` of arrays, not one statement per
//! row: PostgreSQL absorbs batched rows 15x faster than single commits).

use eps_core::audit::AuditKind;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use eps_core::ident::Ident;
use eps_core::mapping::{Mapping, MappingSet};
use eps_core::model::{KeyMeta, Op, PendingChange};
use eps_core::policy::Side;
use eps_core::reconcile::{
    ConflictEntry, EtcdSide, InputTime, KeyInput, KeyPlan, MirrorAction, PlanContext, Restore,
    plan_key_timed,
};

use crate::error::StoreError;
use crate::fence::{self, Fence};

/// The etcd inputs of one key, in revision order.
#[derive(Debug, Clone)]
pub struct KeyInputs {
    pub key: Vec<u8>,
    pub inputs: Vec<KeyInput>,
}

/// One apply transaction's input.
#[derive(Debug)]
pub struct ApplyRequest<'a> {
    pub fence: &'a Fence,
    /// New checkpoint (applied revision), written in the same transaction.
    pub checkpoint: Option<i64>,
    /// The checkpoint is the one of the catch-up range starting here, not
    /// the global one (see [`crate::catchup`]).
    pub catchup_range: Option<&'a [u8]>,
    /// When the inputs were read from etcd (service clock; converted to
    /// PostgreSQL's clock inside the transaction).
    pub observed_at: Instant,
    pub trace_id: Option<&'a str>,
    pub keys: &'a [KeyInputs],
    /// False when the inputs are states the history already holds (the
    /// arbiter re-reading a key the watcher has applied).
    pub record_history: bool,
    /// A repair (`verify --repair`, anti-entropy): see [`Repair`].
    pub repair: Option<Repair<'a>>,
    /// Per key, the trace of the poller's txn whose echo may be in this
    /// batch: echoes' history rows carry it instead of `trace_id`.
    pub echo_traces: Option<&'a HashMap<Vec<u8>, String>>,
    /// Record a `batch-applied` audit event in the same transaction.
    pub audit_batch: bool,
    /// A key whose row another transaction holds (a user's, left open):
    /// true — its inputs wait in `deferred_inputs` (the watcher's batches,
    /// resyncs: the checkpoint moves past them); false — it is skipped and
    /// reported in [`ApplyReport::held_skipped`] (the arbiter, whose work
    /// comes back).
    pub defer_held: bool,
    /// A resync onto a new etcd timeline: every value of PostgreSQL's a
    /// mirror write replaces (a row deleted, changed, or created again) is
    /// recorded as a resolved conflict with reason `timeline-change`, so it
    /// can be re-applied.
    pub record_rollbacks: bool,
}

/// A repair of keys a diff found different at etcd revision `revision`:
/// the mirror row is set to etcd's state read then, even when it claims to
/// be at etcd's revision already (a row altered behind the service's back)
/// — but only if nothing moved since the diff: a key whose row is no longer
/// the one the diff saw (`seen`, `None`: absent), or for which the mirror
/// recorded an etcd change after the diff began (`since`, PostgreSQL's
/// clock before the diff read etcd's revision; a time, as revision numbers
/// restart with a replaced etcd), is left alone and reported in
/// [`ApplyReport::repair_skipped`].
#[derive(Debug, Clone, Copy)]
pub struct Repair<'a> {
    pub revision: i64,
    pub since: chrono::DateTime<chrono::Utc>,
    pub seen: &'a HashMap<Vec<u8>, Option<crate::mirror::MirrorRow>>,
}

impl<'a> ApplyRequest<'a> {
    /// A request with the defaults of the watcher's stream.
    pub fn new(fence: &'a Fence, keys: &'a [KeyInputs], observed_at: Instant) -> Self {
        ApplyRequest {
            fence,
            checkpoint: None,
            catchup_range: None,
            observed_at,
            trace_id: None,
            keys,
            record_history: true,
            repair: None,
            echo_traces: None,
            audit_batch: false,
            defer_held: true,
            record_rollbacks: false,
        }
    }
}

/// What an apply transaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub inputs: usize,
    pub history_rows: usize,
    pub mirror_upserts: usize,
    pub mirror_deletes: usize,
    pub echoes: usize,
    /// The keys whose pending change came back as an echo (once per echo).
    pub echoed_keys: Vec<Vec<u8>>,
    pub conflicts: Vec<ConflictSummary>,
    /// Keys of a repair left alone because they changed since the diff
    /// (or a user's transaction holds their row).
    pub repair_skipped: Vec<Vec<u8>>,
    /// Keys whose row a user's transaction holds: their inputs were
    /// deferred (see [`crate::deferred`]).
    pub deferred_keys: usize,
    /// Keys whose deferred inputs this transaction applied.
    pub drained_keys: usize,
    /// Keys left alone because another transaction holds their row
    /// (`defer_held` false).
    pub held_skipped: Vec<Vec<u8>>,
    /// Values recorded as rolled back (`record_rollbacks`).
    pub rolled_back: usize,
    /// Transactions a conflict settled for etcd (dropped) or parked, with
    /// the conflict: their changes of other keys follow.
    pub settled_transactions: Vec<crate::transactions::Settled>,
    /// Changes of other keys dropped with their transaction: the arbiter
    /// puts their mirror rows back.
    pub dropped_changes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictSummary {
    pub id: i64,
    pub table: String,
    pub policy: &'static str,
    pub winner: Option<Side>,
}

#[derive(QueryableByName)]
struct PendingRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Text)]
    op: Op,
    #[diesel(sql_type = Nullable<Bytea>)]
    value: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    base_revision: i64,
    #[diesel(sql_type = BigInt)]
    changed_at_us: i64,
    /// Its transaction's commit stamp, or this read (which sees it
    /// committed) when there is none.
    #[diesel(sql_type = BigInt)]
    committed_by_us: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    conflict_id: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    sent: bool,
    #[diesel(sql_type = Nullable<BigInt>)]
    xact: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    dropped: bool,
}

#[derive(QueryableByName)]
struct LockedRows {
    /// The lock statement's snapshot (`pg_snapshot` as text).
    #[diesel(sql_type = Text)]
    snapshot: String,
    /// The rows locked.
    #[diesel(sql_type = Array<Bytea>)]
    keys: Vec<Vec<u8>>,
    /// The rows the snapshot saw (a superset: a row deleted by a
    /// transaction the lock waited for is seen but not locked).
    #[diesel(sql_type = Array<Bytea>)]
    present: Vec<Vec<u8>>,
}

/// Deferred inputs taken back per apply transaction, in bytes of values.
const DEFERRED_LOAD_BYTES: usize = 32 * 1024 * 1024;

/// How many times the keys whose rows the lock statement saw but could not
/// lock are looked at again before they count as held by someone else.
const LOCK_ROUNDS: usize = 3;

/// The mirror rows of a batch's keys: `locked` are held until the
/// transaction ends; `absent` had no row at the snapshot of the statement
/// that looked for them (keys and snapshots, in parallel); `blocked` have a
/// row another transaction holds (a user's, left open).
struct LockedKeys {
    locked: std::collections::HashSet<Vec<u8>>,
    absent_keys: Vec<Vec<u8>>,
    absent_snapshots: Vec<String>,
    blocked: std::collections::HashSet<Vec<u8>>,
}

/// Locks the rows of `keys`, skipping those another transaction holds: a
/// user's open transaction must delay only its own rows, not the batch. A
/// row the lock statement's snapshot saw but could not lock is looked at
/// again (it may have been deleted, or deleted and created again, just
/// then: planning it as absent would leave out that transaction's changes,
/// and a delete whose echo rebase is missed brings the row back); still
/// unlockable after a few rounds, it is blocked.
async fn lock_keys(
    conn: &mut AsyncPgConnection,
    table: &str,
    keys: &[&[u8]],
) -> Result<LockedKeys, StoreError> {
    let mut result = LockedKeys {
        locked: std::collections::HashSet::new(),
        absent_keys: Vec::new(),
        absent_snapshots: Vec::new(),
        blocked: std::collections::HashSet::new(),
    };
    let mut to_lock: Vec<&[u8]> = keys.to_vec();
    for round in 1..=LOCK_ROUNDS {
        let rows: LockedRows = diesel::sql_query(format!(
            "WITH present AS (SELECT key FROM {table} WHERE key = ANY($1)), \
                  locked AS (SELECT key FROM {table} WHERE key = ANY($1) ORDER BY key FOR UPDATE SKIP LOCKED) \
             SELECT pg_current_snapshot()::text AS snapshot, \
                    coalesce((SELECT array_agg(key) FROM locked), '{{}}') AS keys, \
                    coalesce((SELECT array_agg(key) FROM present), '{{}}') AS present"
        ))
        .bind::<Array<Bytea>, _>(&to_lock)
        .get_result(conn)
        .await?;
        let present: std::collections::HashSet<&[u8]> =
            rows.present.iter().map(Vec::as_slice).collect();
        let mut again = Vec::new();
        for key in to_lock {
            let is_locked = rows.keys.iter().any(|k| k.as_slice() == key);
            if is_locked {
                continue;
            }
            if !present.contains(key) {
                result.absent_keys.push(key.to_vec());
                result.absent_snapshots.push(rows.snapshot.clone());
            } else if round < LOCK_ROUNDS {
                again.push(key);
            } else {
                result.blocked.insert(key.to_vec());
            }
        }
        result.locked.extend(rows.keys);
        if again.is_empty() {
            break;
        }
        to_lock = again;
    }
    Ok(result)
}

#[derive(QueryableByName)]
pub(crate) struct IdRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) id: i64,
}

/// Runs one apply transaction (retrying is the caller's business).
pub async fn apply(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    mappings: &MappingSet,
    request: &ApplyRequest<'_>,
) -> Result<ApplyReport, StoreError> {
    // Group keys by mapping, keeping the order of first appearance.
    let mut groups: Vec<(&Mapping, Vec<&KeyInputs>)> = Vec::new();
    for key_inputs in request.keys {
        let Some(mapping) = mappings.find(&key_inputs.key) else {
            continue;
        };
        match groups.iter_mut().find(|(m, _)| m.table == mapping.table) {
            Some((_, keys)) => keys.push(key_inputs),
            None => groups.push((mapping, vec![key_inputs])),
        }
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        let pg_now_us = fence::enter(
            conn,
            request.fence,
            match (request.checkpoint, request.catchup_range) {
                (None, _) => fence::Checkpoint::Keep,
                (Some(revision), None) => fence::Checkpoint::Advance(revision),
                (Some(revision), Some(start)) => fence::Checkpoint::Range { start, revision },
            },
        )
        .await?;
        let observed_at_us = pg_now_us - request.observed_at.elapsed().as_micros() as i64;
        let mut report = ApplyReport::default();
        for (mapping, keys) in &groups {
            apply_table(
                conn,
                schema,
                mapping,
                keys,
                observed_at_us,
                request,
                &mut report,
            )
            .await?;
        }
        report.dropped_changes +=
            crate::transactions::settle(conn, request.fence, &report.settled_transactions).await?;
        if request.audit_batch {
            record_batch(conn, request, &report).await?;
        }
        Ok(report)
    })
    .await
}

async fn apply_table(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    mapping: &Mapping,
    keys: &[&KeyInputs],
    observed_at_us: i64,
    request: &ApplyRequest<'_>,
    report: &mut ApplyReport,
) -> Result<(), StoreError> {
    let table = schema.qualify(&mapping.table);
    let mut key_list: Vec<&[u8]> = keys.iter().map(|k| k.key.as_slice()).collect();
    key_list.sort_unstable();
    key_list.dedup();

    // Lock the rows first: a user's concurrent UPDATE of one of them either
    // committed before (its outbox row is visible below) or waits for us
    // (and then sees our metadata as its base). A row absent now cannot be
    // locked: one a user creates meanwhile is theirs, and the mirror writes
    // below leave it alone (`locked`). So for such a key, only the changes
    // committed before this statement's snapshot are planned (the ones the
    // absence reflects); later ones stay in the outbox for the compare.
    let keys_locked = lock_keys(conn, &table, &key_list).await?;
    // The inputs deferred for the keys that are free now (a held key's stay
    // where they are: new ones are appended behind them).
    let free_keys: Vec<&[u8]> = key_list
        .iter()
        .copied()
        .filter(|k| !keys_locked.blocked.contains(*k))
        .collect();
    let mut deferred =
        crate::deferred::load(conn, &mapping.table, &free_keys, DEFERRED_LOAD_BYTES).await?;
    let locked_keys: Vec<&[u8]> = keys_locked.locked.iter().map(Vec::as_slice).collect();
    let pending_rows: Vec<PendingRow> = diesel::sql_query(
        "SELECT id, key, op, value, base_revision, \
                (extract(epoch FROM created_at) * 1000000)::int8 AS changed_at_us, \
                (extract(epoch FROM least(clock_timestamp(), \
                    (SELECT c.committed_at FROM xact_commits c WHERE c.xact = o.xact))) * 1000000)::int8 \
                    AS committed_by_us, \
                conflict_id, sent, xact::text::int8 AS xact, dropped_by IS NOT NULL AS dropped \
         FROM outbox o WHERE mirror_table = $1 AND key = ANY($2) \
           AND (key = ANY($3) OR xact IS NULL \
                OR EXISTS (SELECT 1 FROM unnest($4::bytea[], $5::text[]) AS a(key, snapshot) \
                           WHERE a.key = o.key AND pg_visible_in_snapshot(o.xact, a.snapshot::pg_snapshot))) \
         ORDER BY key, id FOR UPDATE",
    )
    .bind::<Text, _>(mapping.table.as_str())
    .bind::<Array<Bytea>, _>(&key_list)
    .bind::<Array<Bytea>, _>(&locked_keys)
    .bind::<Array<Bytea>, _>(&keys_locked.absent_keys)
    .bind::<Array<Text>, _>(&keys_locked.absent_snapshots)
    .load(conn)
    .await?;
    let LockedKeys {
        locked, blocked, ..
    } = keys_locked;
    let mut moved = match &request.repair {
        Some(repair) => moved_since_diff(conn, &table, &key_list, repair).await?,
        None => std::collections::HashSet::new(),
    };
    if request.repair.is_some() {
        // A repair does not wait for a user's transaction: it is skipped.
        moved.extend(
            key_list
                .iter()
                .filter(|k| blocked.contains(**k) || deferred.by_key.contains_key(**k)),
        );
    }
    let mut pending: HashMap<Vec<u8>, Vec<PendingChange>> = HashMap::new();
    for row in pending_rows {
        let op = row.op;
        pending.entry(row.key).or_default().push(PendingChange {
            id: row.id,
            op,
            value: row.value,
            base_revision: row.base_revision,
            changed_at_us: row.changed_at_us,
            committed_by_us: row.committed_by_us,
            conflict_id: row.conflict_id,
            sent: row.sent,
            xact: row.xact,
            dropped: row.dropped,
        });
    }

    report
        .repair_skipped
        .extend(moved.iter().map(|key| key.to_vec()));
    // A held row defers its key's inputs, after any deferred before; a free
    // row takes the deferred ones back first, in order (all of them, or
    // its newer inputs wait behind the rest).
    let mut to_defer: Vec<(&[u8], &KeyInput, i64)> = Vec::new();
    let mut drained_ids: Vec<i64> = Vec::new();
    let mut plannable: Vec<KeyWork> = Vec::new();
    for k in keys.iter().filter(|k| !moved.contains(k.key.as_slice())) {
        report.inputs += k.inputs.len();
        if blocked.contains(&k.key) {
            if !request.defer_held {
                report.held_skipped.push(k.key.clone());
                continue;
            }
            if !k.inputs.is_empty() {
                report.deferred_keys += 1;
            }
            to_defer.extend(
                k.inputs
                    .iter()
                    .map(|input| (k.key.as_slice(), input, observed_at_us)),
            );
            continue;
        }
        let mut inputs: Vec<(KeyInput, i64)> = Vec::new();
        let mut record_history = request.record_history;
        let mut record_rollbacks = request.record_rollbacks;
        let mut more_deferred = false;
        if let Some(earlier) = deferred.by_key.remove(&k.key) {
            report.drained_keys += 1;
            drained_ids.extend(earlier.ids);
            inputs.extend(earlier.inputs);
            record_history |= earlier.record_history;
            record_rollbacks |= earlier.record_rollbacks;
            more_deferred = earlier.more;
        }
        if more_deferred {
            to_defer.extend(
                k.inputs
                    .iter()
                    .map(|input| (k.key.as_slice(), input, observed_at_us)),
            );
        } else {
            inputs.extend(
                k.inputs
                    .iter()
                    .cloned()
                    .map(|input| (input, observed_at_us)),
            );
        }
        // Revision order, whatever order they were deferred in.
        inputs.sort_by_key(|(input, _)| input.revision());
        if !inputs.is_empty() {
            plannable.push(KeyWork {
                key: k.key.as_slice(),
                inputs,
                record_history,
                record_rollbacks,
            });
        }
    }
    crate::deferred::store(
        conn,
        &mapping.table,
        &to_defer,
        request.record_history,
        request.record_rollbacks,
    )
    .await?;
    crate::deferred::remove(conn, &drained_ids).await?;
    let ctx = PlanContext {
        policy: mapping.policy,
        direction: mapping.direction,
        observed_at_us,
        tie: mapping.tie,
    };
    let times = input_times(conn, &plannable, &pending).await?;
    let rollback_keys: HashSet<&[u8]> = plannable
        .iter()
        .filter(|w| w.record_rollbacks)
        .map(|w| w.key)
        .collect();
    let plans: Vec<(&[u8], KeyPlan)> = plannable
        .into_iter()
        .zip(times)
        .map(|(work, times)| {
            let KeyWork {
                key,
                inputs,
                record_history,
                ..
            } = work;
            let inputs: Vec<KeyInput> = inputs.into_iter().map(|(input, _)| input).collect();
            let key_pending = pending.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let mut plan = plan_key_timed(ctx, key_pending, &inputs, &times);
            if !record_history {
                plan.history.clear();
            }
            (key, plan)
        })
        .collect();

    if !rollback_keys.is_empty() {
        report.rolled_back += record_rollbacks(
            conn,
            &table,
            mapping,
            &plans,
            &rollback_keys,
            &pending,
            request,
        )
        .await?;
    }
    count_echoes(&plans, report);
    // The history, the mirror and the outbox are written by independent
    // statements: pipelined, they cost one wait for PostgreSQL instead of
    // one each (each function's own statements still run in order).
    let repair_at = request.repair.map(|r| r.revision);
    let shared: &AsyncPgConnection = conn;
    let (history, mirror, outbox) = futures_util::join!(
        insert_history(shared, &plans, request),
        write_mirror(shared, &table, &plans, &locked, repair_at),
        update_outbox(shared, &plans),
    );
    let (history_rows, (upserts, deletes), ()) = match (history, mirror, outbox) {
        (Ok(history), Ok(mirror), Ok(outbox)) => (history, mirror, outbox),
        (history, mirror, outbox) => {
            return Err(first_failure(
                [history.err(), mirror.err(), outbox.err()]
                    .into_iter()
                    .flatten(),
            ));
        }
    };
    report.history_rows += history_rows;
    report.mirror_upserts += upserts;
    report.mirror_deletes += deletes;
    record_conflicts(conn, mapping, &plans, &rollback_keys, request, report).await?;
    Ok(())
}

/// The times of every input of every key: when it was read from etcd, and
/// when its change was made — from the revision clock for keys with local
/// changes pending (where a conflict can arise), taken as the read time
/// elsewhere (no decision depends on it).
async fn input_times(
    conn: &mut AsyncPgConnection,
    work: &[KeyWork<'_>],
    pending: &HashMap<Vec<u8>, Vec<PendingChange>>,
) -> Result<Vec<Vec<InputTime>>, StoreError> {
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for w in work {
        let Some(first) = pending.get(w.key).and_then(|p| p.as_slice().first()) else {
            continue;
        };
        spans.extend(w.inputs.iter().map(|(input, _)| change_span(input, first)));
    }
    let mut clock = crate::clock::windows(conn, &spans).await?.into_iter();
    let mut times = Vec::with_capacity(work.len());
    for w in work {
        let timed = pending.get(w.key).is_some_and(|p| !p.is_empty());
        let key_times = w
            .inputs
            .iter()
            .map(|&(_, observed_at_us)| InputTime {
                observed_at_us,
                changed: match timed {
                    true => crate::clock::window_of(
                        clock.next().unwrap_or((None, None)),
                        observed_at_us,
                    ),
                    false => eps_core::policy::ChangeWindow::exactly(observed_at_us),
                },
            })
            .collect();
        times.push(key_times);
    }
    Ok(times)
}

/// The revisions at which etcd's change behind `input` was made: its own
/// revision, or for a key a resync found absent, anywhere after the local
/// change's base (it existed then) up to the revision read.
fn change_span(input: &KeyInput, first_pending: &PendingChange) -> (i64, i64) {
    match input {
        KeyInput::Observed {
            state: None,
            revision,
            ..
        } => ((first_pending.base_revision + 1).min(*revision), *revision),
        other => (other.revision(), other.revision()),
    }
}

/// One key's inputs to plan, each with when it was read from etcd.
struct KeyWork<'a> {
    key: &'a [u8],
    inputs: Vec<(KeyInput, i64)>,
    /// Its states go into the history.
    record_history: bool,
    /// The values they replace are recorded as rolled back.
    record_rollbacks: bool,
}

#[derive(QueryableByName)]
struct OldRow {
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Nullable<Bytea>)]
    value: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Timestamptz>)]
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether the new timeline has touched the row yet: its metadata was
    /// zeroed when the timeline began, and a resync that ran part-way (and
    /// is now retried) wrote etcd's own values, which are no rollback.
    #[diesel(sql_type = Nullable<BigInt>)]
    mod_revision: Option<i64>,
    /// An earlier timeline's history knows the key and the current one does
    /// not yet (so its absence here is a delete of the old history's, not a
    /// key the mirror never had nor one a retried resync deleted).
    #[diesel(sql_type = diesel::sql_types::Bool)]
    known: bool,
}

/// Records, before the mirror writes, each value of PostgreSQL's that a
/// plan replaces with a new timeline's state (keys with queued changes
/// are settled by policy instead, and recorded as conflicts then).
async fn record_rollbacks(
    conn: &mut AsyncPgConnection,
    table: &str,
    mapping: &Mapping,
    plans: &[(&[u8], KeyPlan)],
    keys: &HashSet<&[u8]>,
    pending: &HashMap<Vec<u8>, Vec<PendingChange>>,
    request: &ApplyRequest<'_>,
) -> Result<usize, StoreError> {
    // (key, etcd's value, its revision)
    type Set<'k> = (&'k [u8], Option<&'k [u8]>, i64);
    // ... and PostgreSQL's value it replaces, written when
    type Rollback<'k> = (
        &'k [u8],
        Option<&'k [u8]>,
        i64,
        Option<&'k [u8]>,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let sets: Vec<Set> = plans
        .iter()
        .filter(|(key, _)| keys.contains(key))
        .filter(|(key, _)| pending.get(*key).is_none_or(Vec::is_empty))
        .filter_map(|(key, plan)| match &plan.mirror.0 {
            MirrorAction::Set {
                value, revision, ..
            } => Some((*key, value.as_deref(), *revision)),
            _ => None,
        })
        .collect();
    if sets.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = sets.iter().map(|s| s.0).collect();
    let old: Vec<OldRow> = diesel::sql_query(format!(
        "SELECT u.key, t.value, t.updated_at, t.mod_revision, \
                EXISTS (SELECT 1 FROM history h, sync_state s WHERE s.id = 1 AND h.key = u.key \
                        AND h.timeline < s.timeline) \
                AND NOT EXISTS (SELECT 1 FROM history h, sync_state s WHERE s.id = 1 \
                        AND h.key = u.key AND h.timeline = s.timeline) AS known \
         FROM unnest($1::bytea[]) WITH ORDINALITY AS u(key, n) \
         LEFT JOIN {table} AS t ON t.key = u.key ORDER BY u.n"
    ))
    .bind::<Array<Bytea>, _>(&keys)
    .load(conn)
    .await?;
    let mut rows: Vec<Rollback> = Vec::new();
    for ((key, new, revision), before) in sets.iter().zip(&old) {
        debug_assert_eq!(*key, before.key.as_slice());
        // A key the mirror never had is no value of PostgreSQL's, and a
        // row this timeline already wrote holds etcd's value, not one of
        // the old history's.
        let had = match before.mod_revision {
            Some(mod_revision) => mod_revision == 0,
            None => before.known,
        };
        if had && before.value.as_deref() != *new {
            rows.push((
                key,
                *new,
                *revision,
                before.value.as_deref(),
                before.updated_at,
            ));
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = rows.iter().map(|r| r.0).collect();
    let etcd_values: Vec<Option<&[u8]>> = rows.iter().map(|r| r.1).collect();
    let revisions: Vec<i64> = rows.iter().map(|r| r.2).collect();
    let pg_values: Vec<Option<&[u8]>> = rows.iter().map(|r| r.3).collect();
    let changed: Vec<Option<chrono::DateTime<chrono::Utc>>> = rows.iter().map(|r| r.4).collect();
    Ok(diesel::sql_query(
        "INSERT INTO conflicts (mirror_table, key, etcd_value, etcd_revision, etcd_observed_at, pg_value, \
             pg_revision, pg_changed_at, policy, winner, status, resolved_by, resolved_at, node, term, reason, \
             requested_take) \
         SELECT $1, u.key, u.etcd_value, u.revision, clock_timestamp(), u.pg_value, 0, \
                coalesce(u.changed, clock_timestamp()), $7, 'etcd', 'resolved', 'timeline-change', \
                clock_timestamp(), $8, $9, 'timeline-change', \
                CASE WHEN s.timeline_take_pg THEN 'pg' END \
         FROM unnest($2::bytea[], $3::bytea[], $4::int8[], $5::bytea[], $6::timestamptz[]) \
              AS u(key, etcd_value, revision, pg_value, changed), sync_state s WHERE s.id = 1",
    )
    .bind::<Text, _>(mapping.table.as_str())
    .bind::<Array<Bytea>, _>(&keys)
    .bind::<Array<Nullable<Bytea>>, _>(&etcd_values)
    .bind::<Array<BigInt>, _>(&revisions)
    .bind::<Array<Nullable<Bytea>>, _>(&pg_values)
    .bind::<Array<Nullable<diesel::sql_types::Timestamptz>>, _>(&changed)
    .bind::<Text, _>(mapping.policy.as_str())
    .bind::<Text, _>(&request.fence.node)
    .bind::<BigInt, _>(request.fence.term)
    .execute(conn)
    .await?)
}

#[derive(QueryableByName)]
struct CurrentRow {
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Nullable<Bytea>)]
    value: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    mod_revision: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    etcd_moved: bool,
}

/// The keys of a repair (their rows locked) that changed since the diff:
/// the row is not the one it saw, or history recorded an etcd change of the
/// key after the diff began.
async fn moved_since_diff<'k>(
    conn: &mut AsyncPgConnection,
    table: &str,
    keys: &[&'k [u8]],
    repair: &Repair<'_>,
) -> Result<std::collections::HashSet<&'k [u8]>, StoreError> {
    let rows: Vec<CurrentRow> = diesel::sql_query(format!(
        "SELECT u.key, t.value, t.mod_revision, \
                EXISTS (SELECT 1 FROM history h WHERE h.key = u.key AND h.recorded_at > $2) AS etcd_moved \
         FROM unnest($1::bytea[]) WITH ORDINALITY AS u(key, n) LEFT JOIN {table} AS t ON t.key = u.key \
         ORDER BY u.n"
    ))
    .bind::<Array<Bytea>, _>(keys)
    .bind::<diesel::sql_types::Timestamptz, _>(repair.since)
    .load(conn)
    .await?;
    let mut moved = std::collections::HashSet::new();
    for (key, row) in keys.iter().zip(rows) {
        debug_assert_eq!(*key, row.key.as_slice());
        let now = row.value.as_deref().zip(row.mod_revision);
        let seen = repair
            .seen
            .get(*key)
            .and_then(Option::as_ref)
            .map(|r| (r.value.as_slice(), r.mod_revision));
        if row.etcd_moved || now != seen {
            moved.insert(*key);
        }
    }
    Ok(moved)
}

async fn insert_history(
    conn: &AsyncPgConnection,
    plans: &[(&[u8], KeyPlan)],
    request: &ApplyRequest<'_>,
) -> Result<usize, StoreError> {
    let rows: Vec<_> = plans
        .iter()
        .flat_map(|(key, plan)| plan.history.iter().map(move |h| (*key, h)))
        .collect();
    if rows.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = rows.iter().map(|(k, _)| *k).collect();
    let revisions: Vec<i64> = rows.iter().map(|(_, h)| h.revision).collect();
    let ops: Vec<&str> = rows.iter().map(|(_, h)| h.op.as_str()).collect();
    let values: Vec<Option<&[u8]>> = rows.iter().map(|(_, h)| h.value.as_deref()).collect();
    let prev_values: Vec<Option<&[u8]>> =
        rows.iter().map(|(_, h)| h.prev_value.as_deref()).collect();
    let create_revisions: Vec<i64> = rows.iter().map(|(_, h)| h.meta.create_revision).collect();
    let versions: Vec<i64> = rows.iter().map(|(_, h)| h.meta.version).collect();
    let leases: Vec<i64> = rows.iter().map(|(_, h)| h.meta.lease).collect();
    let origins: Vec<&str> = rows.iter().map(|(_, h)| h.origin.as_str()).collect();
    let traces: Vec<Option<&str>> = rows
        .iter()
        .map(|(key, h)| {
            let echo_trace = match h.origin {
                eps_core::model::Origin::Pg => request.echo_traces.and_then(|t| t.get(*key)),
                _ => None,
            };
            echo_trace.map(String::as_str).or(request.trace_id)
        })
        .collect();
    let inserted = diesel::sql_query(
        "INSERT INTO history (key, revision, op, value, prev_value, create_revision, version, lease, origin, term, trace_id, timeline) \
         SELECT u.key, u.revision, u.op, u.value, u.prev_value, u.create_revision, u.version, u.lease, u.origin, $10, u.trace_id, \
                (SELECT s.timeline FROM sync_state s WHERE s.id = 1) \
         FROM unnest($1::bytea[], $2::int8[], $3::text[], $4::bytea[], $5::bytea[], $6::int8[], $7::int8[], $8::int8[], $9::text[], $11::text[]) \
              AS u(key, revision, op, value, prev_value, create_revision, version, lease, origin, trace_id) \
         ON CONFLICT (key, timeline, revision) DO NOTHING",
    )
    .bind::<Array<Bytea>, _>(&keys)
    .bind::<Array<BigInt>, _>(&revisions)
    .bind::<Array<Text>, _>(&ops)
    .bind::<Array<Nullable<Bytea>>, _>(&values)
    .bind::<Array<Nullable<Bytea>>, _>(&prev_values)
    .bind::<Array<BigInt>, _>(&create_revisions)
    .bind::<Array<BigInt>, _>(&versions)
    .bind::<Array<BigInt>, _>(&leases)
    .bind::<Array<Text>, _>(&origins)
    .bind::<BigInt, _>(request.fence.term)
    .bind::<Array<Nullable<Text>>, _>(&traces)
    .execute(&mut &*conn)
    .await?;
    Ok(inserted)
}

/// Writes the plans' mirror actions. Rows that were absent when the keys
/// were locked (`locked` holds the present ones) are only ever inserted:
/// a row a user created since then carries a local change this
/// transaction has not seen, and is left to the outbox and the compare.
async fn write_mirror(
    conn: &AsyncPgConnection,
    table: &str,
    plans: &[(&[u8], KeyPlan)],
    locked: &std::collections::HashSet<Vec<u8>>,
    repair_at: Option<i64>,
) -> Result<(usize, usize), StoreError> {
    let mut upserted = 0;
    let mut deleted = 0;
    // Normally a row moves only forward in etcd's revisions; a repair at R
    // (-1: none) may rewrite any row not changed after R.
    let repair_revision = repair_at.unwrap_or(-1);
    let mut upserts: Vec<(&[u8], &[u8], &KeyMeta, &'static str)> = Vec::new();
    let mut inserts: Vec<(&[u8], &[u8], &KeyMeta, &'static str)> = Vec::new();
    let mut deletes: Vec<(&[u8], i64)> = Vec::new();
    let mut metas: Vec<(&[u8], Option<i64>, &KeyMeta)> = Vec::new();
    // Rows that show a dropped change (see `Restore`).
    let mut restore_upserts: Vec<(&[u8], &[u8], &KeyMeta, &'static str)> = Vec::new();
    let mut restore_deletes: Vec<(&[u8], i64)> = Vec::new();
    let mut restore_local: Vec<LocalRestore> = Vec::new();
    for (key, plan) in plans {
        let present = locked.contains(*key);
        match (&plan.restore, &plan.mirror.0) {
            (
                Restore::Etcd,
                MirrorAction::Set {
                    value: Some(value),
                    meta,
                    origin,
                    ..
                },
            ) if present => {
                restore_upserts.push((*key, value.as_slice(), meta, origin.row_origin()));
                continue;
            }
            (
                Restore::Etcd,
                MirrorAction::Set {
                    value: None,
                    revision,
                    ..
                },
            ) if present => {
                restore_deletes.push((*key, *revision));
                continue;
            }
            (Restore::Local { value, base }, _) => {
                restore_local.push((*key, value.as_deref(), *base))
            }
            _ => {}
        }
        match &plan.mirror.0 {
            MirrorAction::Leave => {}
            MirrorAction::Set {
                value: Some(value),
                meta,
                origin,
                ..
            } => {
                let row = (*key, value.as_slice(), meta, origin.row_origin());
                if present {
                    upserts.push(row);
                } else {
                    inserts.push(row);
                }
            }
            MirrorAction::Set {
                value: None,
                revision,
                ..
            } if present => deletes.push((key, *revision)),
            MirrorAction::Meta {
                expect_mod_revision,
                meta,
            } if present => metas.push((key, *expect_mod_revision, meta)),
            MirrorAction::Set { .. } | MirrorAction::Meta { .. } => {}
        }
    }
    // Rows absent at lock time are only inserted: one a user created
    // meanwhile is theirs.
    upserted += write_rows(conn, table, &inserts, "DO NOTHING", repair_revision).await?;
    upserted += write_rows(
        conn,
        table,
        &upserts,
        // The echo of a user's change keeps the time the user wrote it.
        "DO UPDATE SET value = EXCLUDED.value, create_revision = EXCLUDED.create_revision, \
             mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version, lease = EXCLUDED.lease, \
             updated_at = CASE WHEN EXCLUDED.origin = 'pg' AND t.origin = 'pg' AND t.value = EXCLUDED.value \
                               THEN t.updated_at ELSE EXCLUDED.updated_at END, \
             origin = EXCLUDED.origin \
         WHERE CASE WHEN $8 < 0 THEN t.mod_revision < EXCLUDED.mod_revision ELSE t.mod_revision <= $8 END",
        repair_revision,
    )
    .await?;
    if !deletes.is_empty() {
        let keys: Vec<&[u8]> = deletes.iter().map(|d| d.0).collect();
        let revisions: Vec<i64> = deletes.iter().map(|d| d.1).collect();
        deleted += diesel::sql_query(format!(
            "DELETE FROM {table} AS t USING unnest($1::bytea[], $2::int8[]) AS u(key, revision) \
             WHERE t.key = u.key \
               AND CASE WHEN $3 < 0 THEN t.mod_revision < u.revision ELSE t.mod_revision <= $3 END"
        ))
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Array<BigInt>, _>(&revisions)
        .bind::<BigInt, _>(repair_revision)
        .execute(&mut &*conn)
        .await?;
    }
    upserted += write_rows(
        conn,
        table,
        &restore_upserts,
        "DO UPDATE SET value = EXCLUDED.value, create_revision = EXCLUDED.create_revision, \
             mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version, lease = EXCLUDED.lease, \
             updated_at = EXCLUDED.updated_at, origin = EXCLUDED.origin \
         WHERE t.mod_revision <= EXCLUDED.mod_revision",
        repair_revision,
    )
    .await?;
    if !restore_deletes.is_empty() {
        let keys: Vec<&[u8]> = restore_deletes.iter().map(|d| d.0).collect();
        let revisions: Vec<i64> = restore_deletes.iter().map(|d| d.1).collect();
        deleted += diesel::sql_query(format!(
            "DELETE FROM {table} AS t USING unnest($1::bytea[], $2::int8[]) AS u(key, revision) \
             WHERE t.key = u.key AND t.mod_revision <= u.revision"
        ))
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Array<BigInt>, _>(&revisions)
        .execute(&mut &*conn)
        .await?;
    }
    if !metas.is_empty() {
        let keys: Vec<&[u8]> = metas.iter().map(|m| m.0).collect();
        let expect: Vec<Option<i64>> = metas.iter().map(|m| m.1).collect();
        let create: Vec<i64> = metas.iter().map(|m| m.2.create_revision).collect();
        let modr: Vec<i64> = metas.iter().map(|m| m.2.mod_revision).collect();
        let version: Vec<i64> = metas.iter().map(|m| m.2.version).collect();
        let lease: Vec<i64> = metas.iter().map(|m| m.2.lease).collect();
        diesel::sql_query(format!(
            "UPDATE {table} AS t SET create_revision = u.create_revision, mod_revision = u.mod_revision, \
                 version = u.version, lease = u.lease \
             FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
                  AS u(key, expect, create_revision, mod_revision, version, lease) \
             WHERE t.key = u.key AND (u.expect IS NULL OR t.mod_revision = u.expect)"
        ))
        .bind::<Array<Bytea>, _>(&keys)
        .bind::<Array<Nullable<BigInt>>, _>(&expect)
        .bind::<Array<BigInt>, _>(&create)
        .bind::<Array<BigInt>, _>(&modr)
        .bind::<Array<BigInt>, _>(&version)
        .bind::<Array<BigInt>, _>(&lease)
        .execute(&mut &*conn)
        .await?;
    }
    restore_local_values(conn, table, &restore_local, locked).await?;
    Ok((upserted, deleted))
}

/// A row to put back to a queued change: key, value (`None`: absent), base.
type LocalRestore<'a> = (&'a [u8], Option<&'a [u8]>, i64);

/// Rows that show a dropped change while an earlier change of the key is
/// still queued take that change's value (`None`: the row goes); their
/// metadata stays. A row absent at lock time is created as a local row
/// based on `base` (the queued change's base).
async fn restore_local_values(
    conn: &AsyncPgConnection,
    table: &str,
    rows: &[LocalRestore<'_>],
    locked: &std::collections::HashSet<Vec<u8>>,
) -> Result<(), StoreError> {
    for (key, value, base) in rows {
        match value {
            Some(value) if locked.contains(*key) => {
                diesel::sql_query(format!(
                    "UPDATE {table} SET value = $2, origin = 'pg' WHERE key = $1"
                ))
                .bind::<Bytea, _>(*key)
                .bind::<Bytea, _>(*value)
                .execute(&mut &*conn)
                .await?;
            }
            Some(value) => {
                diesel::sql_query(format!(
                    "INSERT INTO {table} (key, value, create_revision, mod_revision, version, lease, updated_at, origin) \
                     VALUES ($1, $2, 0, $3, 0, 0, now(), 'pg') ON CONFLICT (key) DO NOTHING"
                ))
                .bind::<Bytea, _>(*key)
                .bind::<Bytea, _>(*value)
                .bind::<BigInt, _>(*base)
                .execute(&mut &*conn)
                .await?;
            }
            None if locked.contains(*key) => {
                diesel::sql_query(format!("DELETE FROM {table} WHERE key = $1"))
                    .bind::<Bytea, _>(*key)
                    .execute(&mut &*conn)
                    .await?;
            }
            None => {}
        }
    }
    Ok(())
}

/// Writes mirror rows in one statement; `on_conflict` follows `ON CONFLICT
/// (key)` and may use `$8`, the repair revision (-1: none).
async fn write_rows(
    conn: &AsyncPgConnection,
    table: &str,
    rows: &[(&[u8], &[u8], &KeyMeta, &'static str)],
    on_conflict: &str,
    repair_revision: i64,
) -> Result<usize, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&[u8]> = rows.iter().map(|u| u.0).collect();
    let values: Vec<&[u8]> = rows.iter().map(|u| u.1).collect();
    let create: Vec<i64> = rows.iter().map(|u| u.2.create_revision).collect();
    let modr: Vec<i64> = rows.iter().map(|u| u.2.mod_revision).collect();
    let version: Vec<i64> = rows.iter().map(|u| u.2.version).collect();
    let lease: Vec<i64> = rows.iter().map(|u| u.2.lease).collect();
    let origin: Vec<&str> = rows.iter().map(|u| u.3).collect();
    Ok(diesel::sql_query(format!(
        "INSERT INTO {table} AS t (key, value, create_revision, mod_revision, version, lease, updated_at, origin) \
         SELECT u.key, u.value, u.create_revision, u.mod_revision, u.version, u.lease, now(), u.origin \
         FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::text[]) \
              AS u(key, value, create_revision, mod_revision, version, lease, origin) \
         ON CONFLICT (key) {on_conflict}"
    ))
    .bind::<Array<Bytea>, _>(&keys)
    .bind::<Array<Bytea>, _>(&values)
    .bind::<Array<BigInt>, _>(&create)
    .bind::<Array<BigInt>, _>(&modr)
    .bind::<Array<BigInt>, _>(&version)
    .bind::<Array<BigInt>, _>(&lease)
    .bind::<Array<Text>, _>(&origin)
    .bind::<BigInt, _>(repair_revision)
    .execute(&mut &*conn)
    .await?)
}

/// The error of pipelined statements to report: the one that failed, not
/// those sent after it, which PostgreSQL refuses because the transaction is
/// aborted (and which say nothing of whether to retry).
fn first_failure(errors: impl Iterator<Item = StoreError>) -> StoreError {
    let mut errors: Vec<StoreError> = errors.collect();
    let aborted = |e: &StoreError| {
        matches!(e, StoreError::Query { message, .. }
            if message.contains("current transaction is aborted"))
    };
    match errors.iter().position(|e| !aborted(e)) {
        Some(i) => errors.swap_remove(i),
        None => errors
            .pop()
            .unwrap_or_else(|| StoreError::Invalid("no error to report".into())),
    }
}

/// Counts the plans' echoes (changes of PostgreSQL's that came back from
/// etcd) into the report.
fn count_echoes(plans: &[(&[u8], KeyPlan)], report: &mut ApplyReport) {
    for (key, plan) in plans {
        for _ in plan
            .history
            .iter()
            .filter(|h| h.origin == eps_core::model::Origin::Pg)
        {
            report.echoes += 1;
            report.echoed_keys.push(key.to_vec());
        }
    }
}

async fn update_outbox(
    conn: &AsyncPgConnection,
    plans: &[(&[u8], KeyPlan)],
) -> Result<(), StoreError> {
    let consumed: Vec<i64> = plans
        .iter()
        .flat_map(|(_, p)| p.consumed.iter().copied())
        .collect();
    if !consumed.is_empty() {
        diesel::sql_query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(&consumed)
            .execute(&mut &*conn)
            .await?;
    }
    let rebased: Vec<(i64, i64)> = plans
        .iter()
        .flat_map(|(_, p)| p.rebased.iter().copied())
        .collect();
    if !rebased.is_empty() {
        let ids: Vec<i64> = rebased.iter().map(|r| r.0).collect();
        let bases: Vec<i64> = rebased.iter().map(|r| r.1).collect();
        diesel::sql_query(
            "UPDATE outbox AS o SET base_revision = u.base FROM unnest($1::int8[], $2::int8[]) AS u(id, base) \
             WHERE o.id = u.id",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<BigInt>, _>(&bases)
        .execute(&mut &*conn)
        .await?;
    }
    Ok(())
}

/// Records the plans' conflicts: one row each, a `conflict` audit event
/// each and a `resolution` event for those the policy settled; those of
/// `timeline_keys` (settled while following a new etcd timeline) carry
/// reason `timeline-change`. The settled ones are written together (see
/// [`insert_settled_conflicts`]): a leader catching up on a busy key after
/// a failover meets one conflict per etcd event.
async fn record_conflicts(
    conn: &mut AsyncPgConnection,
    mapping: &Mapping,
    plans: &[(&[u8], KeyPlan)],
    timeline_keys: &HashSet<&[u8]>,
    request: &ApplyRequest<'_>,
    report: &mut ApplyReport,
) -> Result<(), StoreError> {
    let conflicts: Vec<(&[u8], &ConflictEntry)> = plans
        .iter()
        .flat_map(|(key, plan)| plan.conflicts.iter().map(move |c| (*key, c)))
        .collect();
    // A change parked with its transaction behind another key's conflict
    // leaves that conflict's etcd side alone (`refresh_conflict` matches
    // the key).
    let refreshed: Vec<(i64, &[u8], &EtcdSide)> = plans
        .iter()
        .flat_map(|(key, plan)| {
            plan.refreshed_conflicts
                .iter()
                .map(move |(id, side)| (*id, *key, side))
        })
        .collect();
    if conflicts.is_empty() && refreshed.is_empty() {
        return Ok(());
    }
    let conn: &AsyncPgConnection = conn;
    let settled: Vec<(&[u8], &ConflictEntry)> = conflicts
        .iter()
        .filter(|(_, c)| c.winner.is_some())
        .copied()
        .collect();
    let settled_ids = allocate_conflict_ids(conn, settled.len()).await?;
    let mut fresh_ids = settled_ids.iter().copied();
    let mut ids = Vec::with_capacity(conflicts.len());
    for (key, conflict) in &conflicts {
        if conflict.winner.is_some() {
            ids.push(
                fresh_ids
                    .next()
                    .ok_or_else(|| StoreError::Invalid("too few conflict ids allocated".into()))?,
            );
        } else {
            // A pending conflict may merge into the key's pending one: its
            // id comes back from the upsert.
            ids.push(
                insert_conflict(
                    conn,
                    mapping,
                    key,
                    conflict,
                    timeline_keys.contains(key),
                    request,
                )
                .await?,
            );
        }
    }
    insert_settled_conflicts(
        conn,
        &settled_ids,
        mapping,
        &settled,
        timeline_keys,
        request,
    )
    .await?;

    let mut park_ids = Vec::new();
    let mut park_conflicts = Vec::new();
    let mut events = Vec::with_capacity(conflicts.len() * 2);
    for ((key, conflict), id) in conflicts.iter().zip(&ids) {
        park_ids.extend(conflict.parks.iter().copied());
        park_conflicts.extend(conflict.parks.iter().map(|_| *id));
        let outcome = match conflict.winner {
            Some(Side::Etcd) => Some(crate::transactions::Outcome::Dropped),
            None => Some(crate::transactions::Outcome::Parked),
            Some(Side::Pg) => None,
        };
        if let Some(outcome) = outcome {
            report
                .settled_transactions
                .extend(
                    conflict
                        .xacts
                        .iter()
                        .map(|xact| crate::transactions::Settled {
                            xact: *xact,
                            conflict_id: *id,
                            outcome,
                        }),
                );
        }
        let detail = serde_json::json!({
            "conflict_id": id,
            "table": mapping.table.as_str(),
            "key": eps_core::keys::display_key(key),
            "policy": mapping.policy.as_str(),
            "winner": conflict.winner.map(Side::as_str),
            "etcd_revision": conflict.etcd.revision,
            "pg_revision": conflict.pg_base_revision,
        });
        if conflict.winner.is_some() {
            events.push((AuditKind::Conflict, detail.clone()));
            events.push((AuditKind::Resolution, detail));
        } else {
            events.push((AuditKind::Conflict, detail));
        }
        report.conflicts.push(ConflictSummary {
            id: *id,
            table: mapping.table.to_string(),
            policy: mapping.policy.as_str(),
            winner: conflict.winner,
        });
    }
    let parks = async {
        if !park_ids.is_empty() {
            diesel::sql_query(
                "UPDATE outbox AS o SET conflict_id = u.conflict_id \
                 FROM unnest($1::int8[], $2::int8[]) AS u(id, conflict_id) WHERE o.id = u.id",
            )
            .bind::<Array<BigInt>, _>(&park_ids)
            .bind::<Array<BigInt>, _>(&park_conflicts)
            .execute(&mut &*conn)
            .await?;
        }
        Ok::<_, StoreError>(())
    };
    let refreshes = futures_util::future::try_join_all(
        refreshed
            .iter()
            .map(|(id, key, side)| refresh_conflict(conn, *id, key, side)),
    );
    let audit = crate::events::record_many(conn, request.fence, request.trace_id, &events);
    futures_util::try_join!(parks, refreshes, audit)?;
    Ok(())
}

/// `count` fresh ids from the conflicts' sequence, in one round trip.
async fn allocate_conflict_ids(
    conn: &AsyncPgConnection,
    count: usize,
) -> Result<Vec<i64>, StoreError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<IdRow> = diesel::sql_query(
        "SELECT nextval(pg_get_serial_sequence('conflicts', 'id')) AS id FROM generate_series(1, $1)",
    )
    .bind::<BigInt, _>(count as i64)
    .load(&mut &*conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Inserts the conflicts a policy settled, with their preallocated `ids`,
/// in one statement: a catch-up after a failover can meet a conflict per
/// etcd event, and one statement per conflict cost a statement's
/// preparation and round trip each (about 0.6 ms, against 0.03 ms of
/// execution).
async fn insert_settled_conflicts(
    conn: &AsyncPgConnection,
    ids: &[i64],
    mapping: &Mapping,
    settled: &[(&[u8], &ConflictEntry)],
    timeline_keys: &HashSet<&[u8]>,
    request: &ApplyRequest<'_>,
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let keys: Vec<&[u8]> = settled.iter().map(|(k, _)| *k).collect();
    let etcd_values: Vec<Option<&[u8]>> = settled
        .iter()
        .map(|(_, c)| c.etcd.value.as_deref())
        .collect();
    let etcd_revisions: Vec<i64> = settled.iter().map(|(_, c)| c.etcd.revision).collect();
    let etcd_observed: Vec<i64> = settled.iter().map(|(_, c)| c.etcd.observed_at_us).collect();
    let pg_values: Vec<Option<&[u8]>> =
        settled.iter().map(|(_, c)| c.pg_value.as_deref()).collect();
    let pg_revisions: Vec<i64> = settled.iter().map(|(_, c)| c.pg_base_revision).collect();
    let pg_changed: Vec<i64> = settled.iter().map(|(_, c)| c.pg_changed_at_us).collect();
    let policies: Vec<&str> = settled.iter().map(|(_, c)| c.policy.as_str()).collect();
    let winners: Vec<Option<&str>> = settled
        .iter()
        .map(|(_, c)| c.winner.map(Side::as_str))
        .collect();
    let reasons: Vec<Option<&str>> = settled
        .iter()
        .map(|(k, _)| timeline_keys.contains(k).then_some("timeline-change"))
        .collect();
    let changed_after: Vec<Option<i64>> = settled
        .iter()
        .map(|(_, c)| c.etcd.changed.after_us)
        .collect();
    let changed_by: Vec<i64> = settled.iter().map(|(_, c)| c.etcd.changed.by_us).collect();
    let ties: Vec<bool> = settled.iter().map(|(_, c)| c.decided_by_tie).collect();
    let committed_by: Vec<i64> = settled.iter().map(|(_, c)| c.pg_committed_by_us).collect();
    let xacts: Vec<Option<i64>> = settled.iter().map(|(_, c)| c.pg_xact).collect();
    // The superseded values, one array per conflict, flattened: (owner id,
    // value) pairs in order.
    let mut superseded_ids = Vec::new();
    let mut superseded_values: Vec<Option<&[u8]>> = Vec::new();
    for (id, (_, conflict)) in ids.iter().zip(settled) {
        for value in &conflict.pg_superseded {
            superseded_ids.push(*id);
            superseded_values.push(value.as_deref());
        }
    }
    diesel::sql_query(
        "WITH sup AS ( \
             SELECT s.id, array_agg(s.value ORDER BY s.n) AS vals \
             FROM unnest($17::int8[], $18::bytea[]) WITH ORDINALITY AS s(id, value, n) GROUP BY s.id) \
         INSERT INTO conflicts (id, mirror_table, key, etcd_value, etcd_revision, etcd_observed_at, pg_value, \
             pg_revision, pg_changed_at, policy, winner, status, resolved_by, resolved_at, node, term, trace_id, \
             pg_superseded, reason, etcd_changed_after, etcd_changed_by, decided_by_tie, pg_committed_by, pg_xact) \
         SELECT u.id, $1, u.key, u.etcd_value, u.etcd_revision, to_timestamp(u.etcd_observed::float8 / 1000000), \
             u.pg_value, u.pg_revision, to_timestamp(u.pg_changed::float8 / 1000000), u.policy, u.winner, \
             'resolved', 'policy', clock_timestamp(), $2, $3, $4, coalesce(sup.vals, '{}'), u.reason, \
             to_timestamp(u.changed_after::float8 / 1000000), to_timestamp(u.changed_by::float8 / 1000000), \
             u.tie, to_timestamp(u.committed_by::float8 / 1000000), u.xact \
         FROM unnest($5::int8[], $6::bytea[], $7::bytea[], $8::int8[], $9::int8[], $10::bytea[], $11::int8[], \
                     $12::int8[], $13::text[], $14::text[], $15::text[], $16::int8[], $19::int8[], \
                     $20::bool[], $21::int8[], $22::int8[]) \
              AS u(id, key, etcd_value, etcd_revision, etcd_observed, pg_value, pg_revision, pg_changed, policy, \
                   winner, reason, changed_after, changed_by, tie, committed_by, xact) \
         LEFT JOIN sup ON sup.id = u.id",
    )
    .bind::<Text, _>(mapping.table.as_str())
    .bind::<Text, _>(&request.fence.node)
    .bind::<BigInt, _>(request.fence.term)
    .bind::<Nullable<Text>, _>(request.trace_id)
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Bytea>, _>(&keys)
    .bind::<Array<Nullable<Bytea>>, _>(&etcd_values)
    .bind::<Array<BigInt>, _>(&etcd_revisions)
    .bind::<Array<BigInt>, _>(&etcd_observed)
    .bind::<Array<Nullable<Bytea>>, _>(&pg_values)
    .bind::<Array<BigInt>, _>(&pg_revisions)
    .bind::<Array<BigInt>, _>(&pg_changed)
    .bind::<Array<Text>, _>(&policies)
    .bind::<Array<Nullable<Text>>, _>(&winners)
    .bind::<Array<Nullable<Text>>, _>(&reasons)
    .bind::<Array<Nullable<BigInt>>, _>(&changed_after)
    .bind::<Array<BigInt>, _>(&superseded_ids)
    .bind::<Array<Nullable<Bytea>>, _>(&superseded_values)
    .bind::<Array<BigInt>, _>(&changed_by)
    .bind::<Array<diesel::sql_types::Bool>, _>(&ties)
    .bind::<Array<BigInt>, _>(&committed_by)
    .bind::<Array<Nullable<BigInt>>, _>(&xacts)
    .execute(&mut &*conn)
    .await?;
    Ok(())
}

/// Inserts a pending conflict (one `manual` parks) with a fresh id unless
/// the key already has a pending conflict, which then takes the newer etcd
/// side. Returns the row's id. Settled conflicts go through
/// [`insert_settled_conflicts`].
async fn insert_conflict(
    conn: &AsyncPgConnection,
    mapping: &Mapping,
    key: &[u8],
    conflict: &ConflictEntry,
    timeline_change: bool,
    request: &ApplyRequest<'_>,
) -> Result<i64, StoreError> {
    let rows: Vec<IdRow> = diesel::sql_query(
        "INSERT INTO conflicts (id, mirror_table, key, etcd_value, etcd_revision, etcd_observed_at, pg_value, \
             pg_revision, pg_changed_at, policy, winner, status, resolved_by, resolved_at, node, term, trace_id, \
             pg_superseded, reason, etcd_changed_after, etcd_changed_by, decided_by_tie, pg_committed_by, pg_xact) \
         VALUES (nextval(pg_get_serial_sequence('conflicts', 'id')), \
             $1, $2, $3, $4, to_timestamp($5::float8 / 1000000), $6, $7, to_timestamp($8::float8 / 1000000), \
             $9, NULL, 'pending', NULL, NULL, $10, $11, $12, $13, $14, \
             to_timestamp($15::float8 / 1000000), to_timestamp($16::float8 / 1000000), $17, \
             to_timestamp($18::float8 / 1000000), $19) \
         ON CONFLICT (mirror_table, key) WHERE status = 'pending' DO UPDATE SET \
             etcd_value = EXCLUDED.etcd_value, etcd_revision = EXCLUDED.etcd_revision, \
             etcd_observed_at = EXCLUDED.etcd_observed_at, \
             etcd_changed_after = EXCLUDED.etcd_changed_after, etcd_changed_by = EXCLUDED.etcd_changed_by \
         RETURNING id",
    )
    .bind::<Text, _>(mapping.table.as_str())
    .bind::<Bytea, _>(key)
    .bind::<Nullable<Bytea>, _>(conflict.etcd.value.as_deref())
    .bind::<BigInt, _>(conflict.etcd.revision)
    .bind::<BigInt, _>(conflict.etcd.observed_at_us)
    .bind::<Nullable<Bytea>, _>(conflict.pg_value.as_deref())
    .bind::<BigInt, _>(conflict.pg_base_revision)
    .bind::<BigInt, _>(conflict.pg_changed_at_us)
    .bind::<Text, _>(conflict.policy.as_str())
    .bind::<Text, _>(&request.fence.node)
    .bind::<BigInt, _>(request.fence.term)
    .bind::<Nullable<Text>, _>(request.trace_id)
    .bind::<Array<Nullable<Bytea>>, _>(&conflict.pg_superseded)
    .bind::<Nullable<Text>, _>(timeline_change.then_some("timeline-change"))
    .bind::<Nullable<BigInt>, _>(conflict.etcd.changed.after_us)
    .bind::<BigInt, _>(conflict.etcd.changed.by_us)
    .bind::<diesel::sql_types::Bool, _>(conflict.decided_by_tie)
    .bind::<BigInt, _>(conflict.pg_committed_by_us)
    .bind::<Nullable<BigInt>, _>(conflict.pg_xact)
    .load(&mut &*conn)
    .await?;
    rows.into_iter()
        .next()
        .map(|r| r.id)
        .ok_or_else(|| StoreError::Invalid("conflict insert returned no id".into()))
}

async fn refresh_conflict(
    conn: &AsyncPgConnection,
    id: i64,
    key: &[u8],
    side: &EtcdSide,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "UPDATE conflicts SET etcd_value = $2, etcd_revision = $3, \
             etcd_observed_at = to_timestamp($4::float8 / 1000000), \
             etcd_changed_after = to_timestamp($5::float8 / 1000000), \
             etcd_changed_by = to_timestamp($6::float8 / 1000000) \
         WHERE id = $1 AND status = 'pending' AND key = $7",
    )
    .bind::<BigInt, _>(id)
    .bind::<Nullable<Bytea>, _>(side.value.as_deref())
    .bind::<BigInt, _>(side.revision)
    .bind::<BigInt, _>(side.observed_at_us)
    .bind::<Nullable<BigInt>, _>(side.changed.after_us)
    .bind::<BigInt, _>(side.changed.by_us)
    .bind::<Bytea, _>(key)
    .execute(&mut &*conn)
    .await?;
    Ok(())
}

/// The `batch-applied` audit event: what one apply transaction covered.
async fn record_batch(
    conn: &mut AsyncPgConnection,
    request: &ApplyRequest<'_>,
    report: &ApplyReport,
) -> Result<(), StoreError> {
    let revisions = request
        .keys
        .iter()
        .flat_map(|k| k.inputs.iter())
        .filter_map(|i| match i {
            KeyInput::Event(e) => Some(e.revision),
            KeyInput::Observed { .. } => None,
        });
    let detail = serde_json::json!({
        "from_revision": revisions.clone().min(),
        "to_revision": request.checkpoint.or(revisions.max()),
        "changes": report.inputs,
        "from_etcd": report.inputs.saturating_sub(report.echoes),
        "from_pg_confirmed": report.echoes,
        "conflicts": report.conflicts.len(),
        "mirror_upserts": report.mirror_upserts,
        "mirror_deletes": report.mirror_deletes,
        "duration_ms": request.observed_at.elapsed().as_millis() as u64,
    });
    crate::events::record(
        conn,
        request.fence,
        AuditKind::BatchApplied,
        request.trace_id,
        &detail,
    )
    .await
}
