//! `PgPoller`: PostgreSQL → etcd. Wakes on NOTIFY (and polls on an interval,
//! so a lost notification only adds delay), reads the outbox in commit order
//! per key and applies it to etcd with fenced compare-and-swap txns of many
//! keys (one change per key per txn: successive changes are never
//! coalesced).
//!
//! The poller never writes the mirror or the history: the watcher sees each
//! applied change come back and recognizes it as the echo of the outbox row
//! (same op and value, previous revision = the row's base), which consumes
//! the row in the same transaction as the history row. A crash between the
//! etcd write and that transaction therefore loses and duplicates nothing:
//! the row stays, its compare fails on retry, and the echo consumes it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::{Actor, Context, Supervised, WeakAddr};
use eps_core::Classify;
use eps_core::audit::AuditKind;
use eps_core::model::Op;
use eps_etcd::txn::compare_and_swap;
use eps_etcd::{CasOutcome, CasWrite, EtcdError};
use eps_store::notify::Notifications;
use eps_store::{DeadLetterKind, OutboxRow, Refusal};
use tokio::sync::{Notify, mpsc};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::SyncContext;
use crate::arbiter::{ConflictArbiter, ResolveStale};
use crate::retrier::{ChangeFailed, Retrier, RetryDecision};
use crate::shell::{ActorError, Progress, Shell};
use crate::telemetry;
use crate::tracing_ids;

pub struct PgPoller {
    ctx: Arc<SyncContext>,
    arbiter: WeakAddr<ConflictArbiter>,
    retrier: WeakAddr<Retrier>,
    shell: Shell,
}

impl PgPoller {
    pub fn new(
        ctx: Arc<SyncContext>,
        arbiter: WeakAddr<ConflictArbiter>,
        retrier: WeakAddr<Retrier>,
        alive: mpsc::Sender<()>,
    ) -> Self {
        let shell = Shell::new(
            "pg_poller",
            ctx.kill.clone(),
            ctx.board.clone(),
            ctx.config.backoff(),
            alive,
        );
        PgPoller {
            ctx,
            arbiter,
            retrier,
            shell,
        }
    }
}

impl Actor for PgPoller {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let body = run(
            self.ctx.clone(),
            self.arbiter.clone(),
            self.retrier.clone(),
            self.shell.progress.clone(),
        );
        self.shell.spawn_loop(ctx, body);
    }
}

impl Supervised for PgPoller {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shell.restarting();
    }
}

/// Failpoint for tests: crash (abort the process) right after etcd
/// committed a txn, before anything else happens. Enabled only when the
/// binary runs with `ETCD_PG_SYNC_FAILPOINT=crash-after-etcd-commit`
/// (the crash-durability test); never in production configs.
fn crash_after_etcd_commit() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("ETCD_PG_SYNC_FAILPOINT").is_ok_and(|v| v == "crash-after-etcd-commit")
    })
}

async fn run(
    ctx: Arc<SyncContext>,
    arbiter: WeakAddr<ConflictArbiter>,
    retrier: WeakAddr<Retrier>,
    progress: Arc<Progress>,
) -> Result<(), ActorError> {
    let wake = Arc::new(Notify::new());
    let _listener = ctx
        .config
        .sync
        .listen_notify
        .then(|| AbortOnDropHandle::new(tokio::spawn(listen(ctx.clone(), wake.clone()))));
    let mut applied = ctx.applied.subscribe();
    let poll = Duration::from_millis(ctx.config.sync.poll_interval_ms);
    let mut state = PollerState::default();
    let mut epoch = 0;
    loop {
        progress.tick();
        ctx.wait_etcd_checked(&progress).await?;
        // Revisions remembered (echoes awaited, blocked keys) count another
        // etcd's history after a timeline change.
        let now = ctx.timeline_epoch.load(std::sync::atomic::Ordering::SeqCst);
        if now != epoch {
            state = PollerState::default();
            epoch = now;
        }
        let drained = drain(&ctx, &mut state, &arbiter, &retrier, &progress).await?;
        let waiting_on_watcher = state.waiting_on_watcher();
        let notify_helps = drained == Drained::Done;
        tokio::select! {
            _ = wake.notified(), if notify_helps => {}
            _ = ctx.wake_poller.notified() => {}
            _ = tokio::time::sleep(state.next_wakeup(poll)) => {}
            changed = applied.changed(), if waiting_on_watcher => {
                if changed.is_err() {
                    return Err(ActorError::Internal("applied-revision channel closed".into()));
                }
            }
        }
    }
}

/// Holds a dedicated connection on `LISTEN <schema>_outbox` and turns
/// notifications into wake-ups. After every (re)connect it wakes the poller
/// once: PostgreSQL does not keep notifications for a session that was not
/// listening, so those sent meanwhile are lost.
async fn listen(ctx: Arc<SyncContext>, wake: Arc<Notify>) {
    let backoff = ctx.config.backoff();
    let mut attempt = 0u32;
    loop {
        match Notifications::listen(ctx.store.connector(), eps_store::notify::Channel::Outbox).await
        {
            Ok(mut notifications) => {
                attempt = 0;
                wake.notify_one();
                while notifications.next().await.is_ok() {
                    wake.notify_one();
                }
                tracing::debug!("outbox notification connection lost, reconnecting");
            }
            Err(error) => tracing::debug!(%error, "cannot open the LISTEN connection"),
        }
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

type KeyId = (String, Vec<u8>);

fn key_id(row: &OutboxRow) -> KeyId {
    (row.mirror_table.clone(), row.key.clone())
}

/// Changes of one key this poller applied whose echoes the watcher has not
/// consumed yet: the next change of the key is based on `last_revision`.
#[derive(Debug)]
struct Chain {
    last_id: i64,
    /// Revision of our last write (0 after a delete: the key is absent).
    last_revision: i64,
    /// Bases our writes superseded: a queued row based on one of them is in
    /// fact based on `last_revision`.
    superseded: Vec<i64>,
    /// Revision of the txn of our last write: once the watcher has applied
    /// it, every echo of the chain has been seen.
    echo_revision: i64,
}

/// A key whose compare failed: it waits until the watcher has applied
/// etcd's state (`until`); if the row is still stale then, the arbiter
/// settles it.
#[derive(Debug)]
struct Blocked {
    until: i64,
    etcd_revision: i64,
}

#[derive(Debug, Default)]
struct PollerState {
    chains: HashMap<KeyId, Chain>,
    blocked: HashMap<KeyId, Blocked>,
    retry_at: HashMap<i64, Instant>,
    /// Rows of the last read whose transaction waits for a key settled
    /// elsewhere (parked, dropped, held by a user): the next read takes
    /// that many more, so they cannot fill the window and stop the rest.
    waiting_rows: usize,
    /// The transaction holding back later ones has rows beyond the last
    /// read: the next read is as large as it can be.
    read_past_held: bool,
}

#[derive(Debug, Clone)]
struct Candidate {
    row: OutboxRow,
    op: Op,
    expected: i64,
}

impl PollerState {
    fn waiting_on_watcher(&self) -> bool {
        !self.chains.is_empty() || !self.blocked.is_empty()
    }

    fn next_wakeup(&self, poll: Duration) -> Duration {
        let now = Instant::now();
        self.retry_at
            .values()
            .map(|at| at.saturating_duration_since(now))
            .min()
            .map_or(poll, |d| d.min(poll))
            .max(Duration::from_millis(1))
    }

    /// Forgets chains the watcher is past. `applied` must have been read
    /// before `rows`: the transaction that applied an echo consumed its row.
    fn prune(&mut self, rows: &[OutboxRow], applied: i64) {
        let mut oldest_present: HashMap<KeyId, i64> = HashMap::new();
        for row in rows {
            oldest_present.entry(key_id(row)).or_insert(row.id);
        }
        self.chains.retain(|key, chain| {
            if applied < chain.echo_revision {
                return true;
            }
            // A sent row outliving its echo was not recognized (it should
            // not happen); waiting for it would stall the key forever, so
            // the row goes the way of a failed compare instead.
            if let Some(id) = oldest_present.get(key).filter(|id| **id <= chain.last_id) {
                tracing::warn!(
                    outbox_id = *id,
                    echo_revision = chain.echo_revision,
                    applied,
                    "a change applied to etcd outlived its echo; settling it again"
                );
            }
            false
        });
        let present: HashSet<i64> = rows.iter().map(|r| r.id).collect();
        self.retry_at.retain(|id, _| present.contains(id));
        // A key whose failed compare the watcher has since settled (its rows
        // consumed by the policy) waits for nothing: memory stays
        // proportional to the work in flight, not to every key ever blocked.
        self.blocked
            .retain(|key, blocked| applied < blocked.until || oldest_present.contains_key(key));
    }

    /// The last change of each key this poller sent whose echo is not
    /// consumed yet: it reached etcd.
    fn landed(&self) -> Vec<i64> {
        self.chains.values().map(|c| c.last_id).collect()
    }

    /// Sent by this poller, its echo not consumed yet.
    fn in_flight(&self, row: &OutboxRow) -> bool {
        self.chains
            .get(&key_id(row))
            .is_some_and(|c| row.id <= c.last_id)
    }

    /// The first unsent change of every key that may go now.
    fn select(
        &self,
        rows: &[OutboxRow],
        applied: i64,
        now: Instant,
    ) -> Result<Vec<Candidate>, ActorError> {
        let mut taken: HashSet<KeyId> = HashSet::new();
        let mut out = Vec::new();
        for row in rows {
            let key = key_id(row);
            if taken.contains(&key) {
                continue;
            }
            if self.blocked.get(&key).is_some_and(|b| applied < b.until) {
                taken.insert(key);
                continue;
            }
            let chain = self.chains.get(&key);
            if chain.is_some_and(|c| row.id <= c.last_id) {
                continue; // sent; its echo is on the way
            }
            taken.insert(key);
            if self.retry_at.get(&row.id).is_some_and(|at| *at > now) {
                continue;
            }
            let expected = match chain {
                Some(c) if c.superseded.contains(&row.base_revision) => c.last_revision,
                _ => row.base_revision,
            };
            out.push(Candidate {
                op: row.op,
                row: row.clone(),
                expected,
            });
        }
        Ok(out)
    }

    fn record_applied(&mut self, candidate: &Candidate, revision: i64) {
        let key = key_id(&candidate.row);
        self.blocked.remove(&key);
        let chain = self.chains.entry(key).or_insert(Chain {
            last_id: 0,
            last_revision: 0,
            superseded: Vec::new(),
            echo_revision: 0,
        });
        chain.echo_revision = chain.echo_revision.max(revision);
        chain.superseded.push(candidate.row.base_revision);
        chain.superseded.push(candidate.expected);
        chain.last_id = candidate.row.id;
        chain.last_revision = match candidate.op {
            Op::Put => revision,
            Op::Delete => 0,
        };
    }
}

/// Why a change can never go to etcd, checked before sending.
fn validate(ctx: &SyncContext, candidate: &Candidate) -> Result<(), (DeadLetterKind, String)> {
    let row = &candidate.row;
    let Some(mapping) = ctx.mappings.by_table(&row.mirror_table) else {
        return Err((
            DeadLetterKind::Unmapped,
            format!("table {:?} is not a configured mapping", row.mirror_table),
        ));
    };
    if !mapping.contains(&row.key) {
        return Err((
            DeadLetterKind::Unmapped,
            format!(
                "key is outside the prefix {:?} of the mapping for table {:?}",
                String::from_utf8_lossy(&mapping.prefix),
                row.mirror_table
            ),
        ));
    }
    if !mapping.direction.pg_to_etcd() {
        return Err((
            DeadLetterKind::ReadOnlyMapping,
            format!(
                "the mapping for table {:?} is etcd-to-pg: changes made in PostgreSQL are not propagated",
                row.mirror_table
            ),
        ));
    }
    if row.key.is_empty() {
        return Err((
            DeadLetterKind::Invalid,
            "etcd does not accept an empty key".into(),
        ));
    }
    let limit = ctx.config.etcd.max_request_bytes;
    if request_bytes(row) > limit {
        return Err((
            DeadLetterKind::TooLarge,
            format!(
                "value of {} bytes with a key of {} bytes exceeds etcd's request limit of {limit} bytes (etcd.max_request_bytes)",
                row.value.as_ref().map_or(0, Vec::len),
                row.key.len()
            ),
        ));
    }
    Ok(())
}

/// Bytes a change adds to a txn request (key twice: compare and op).
fn request_bytes(row: &OutboxRow) -> usize {
    eps_core::keys::put_request_bytes(row.key.len(), row.value.as_ref().map_or(0, Vec::len))
}

async fn drain(
    ctx: &Arc<SyncContext>,
    state: &mut PollerState,
    arbiter: &WeakAddr<ConflictArbiter>,
    retrier: &WeakAddr<Retrier>,
    progress: &Progress,
) -> Result<Drained, ActorError> {
    // Bounded so one wake-up cannot spin; the next wake-up continues.
    for _round in 0..1_000 {
        if !ctx.is_etcd_checked() {
            // The watcher restarted: wait for its checks (in `run`).
            return Ok(Drained::Done);
        }
        let applied = *ctx.applied.borrow();
        let batch = ctx.config.sync.outbox_batch_size;
        let most = batch + MORE_ROWS_PAST_WAITING * batch;
        let limit = if std::mem::take(&mut state.read_past_held) {
            most
        } else {
            batch + state.waiting_rows.min(MORE_ROWS_PAST_WAITING * batch)
        };
        let rows = ctx.store.pending_outbox(limit, OUTBOX_READ_BYTES).await?;
        // Rows of waiting transactions, and the rows of their keys queued
        // behind them.
        let waiting_keys: HashSet<KeyId> =
            rows.iter().filter(|r| r.xact_blocked).map(key_id).collect();
        state.waiting_rows = rows
            .iter()
            .filter(|r| r.xact_blocked || waiting_keys.contains(&key_id(r)))
            .count();
        state.prune(&rows, applied);
        // As the read counts: keys and values.
        let read_bytes: usize = rows
            .iter()
            .map(|r| r.key.len() + r.value.as_ref().map_or(0, Vec::len))
            .sum();
        let window_full = rows.len() >= limit || read_bytes >= OUTBOX_READ_BYTES;
        let candidates = state.select(&rows, applied, Instant::now())?;
        let window = Window {
            state,
            full: window_full,
        };
        let mut grouped = whole_transactions(&rows, candidates, window);
        if grouped.holder_beyond {
            if limit < most {
                // The oldest transaction held back has rows beyond the
                // window: read them before anything committed after it goes.
                state.read_past_held = true;
                continue;
            }
            // Beyond the largest read: the part of it in the window goes
            // (audited as a split), so the order holds and the window
            // moves on.
            let holder = std::mem::take(&mut grouped.holder_group);
            if let Some(xact) = holder.first().and_then(|c| c.row.xact) {
                grouped.released = vec![(xact, holder.len())];
                grouped.groups.push(holder);
                in_commit_order(&mut grouped.groups);
            }
        }
        if grouped.groups.is_empty() {
            return Ok(if window_full {
                Drained::WindowAwaitingEchoes
            } else {
                Drained::Done
            });
        }
        progress.tick();
        metrics::gauge!(telemetry::OUTBOX_DEPTH).set(rows.len() as f64);
        let mut sendable = Vec::with_capacity(grouped.groups.len());
        for group in grouped.groups {
            let refused: Vec<(usize, DeadLetterKind, String)> = group
                .iter()
                .enumerate()
                .filter_map(|(i, c)| validate(ctx, c).err().map(|(kind, why)| (i, kind, why)))
                .collect();
            if refused.is_empty() {
                sendable.push(group);
                continue;
            }
            // A change that can never go takes its whole transaction with
            // it: etcd gets all of a transaction or none of it.
            let refusals: Vec<Refusal> = refused
                .iter()
                .map(|(i, kind, reason)| {
                    tracing::warn!(outbox_id = group[*i].row.id, kind = kind.as_str(), %reason, "change dead-lettered");
                    Refusal {
                        row: &group[*i].row,
                        kind: *kind,
                        reason,
                    }
                })
                .collect();
            dead_letter(ctx, &refusals, &state.landed()).await?;
        }
        // Durably "may have been sent" before etcd sees them: a resync
        // takes only such a change for landed when etcd holds its value.
        let ids: Vec<i64> = sendable.iter().flatten().map(|c| c.row.id).collect();
        // Only this round's own marks may be taken back if it stops early:
        // an earlier round's may stand for a change that landed.
        let marked_now: HashSet<i64> = if ids.is_empty() {
            HashSet::new()
        } else {
            ctx.store
                .mark_sent(&ctx.fence, &ids)
                .await?
                .into_iter()
                .collect()
        };
        let (txns, mut splits) = chunks(sendable, txn_limits(ctx));
        splits.extend(grouped.released.into_iter().map(|(xact, keys)| Split {
            xact,
            keys,
            txns: None,
            reason: SplitReason::Released,
        }));
        record_splits(ctx, &splits).await?;
        // One txn at a time, in commit order: etcd orders concurrent
        // requests as it likes, and a transaction that read another's
        // writes must land after it.
        let mut txns = txns.into_iter();
        for txn in txns.by_ref() {
            if let Round::Stop { unsent } = send(ctx, state, txn, arbiter, retrier).await? {
                // Marked as maybe sent, never sent: a resync must not take
                // them for landed.
                let unsent: Vec<i64> = unsent
                    .into_iter()
                    .chain(txns.flatten().map(|c| c.row.id))
                    .filter(|id| marked_now.contains(id))
                    .collect();
                if !unsent.is_empty() {
                    ctx.store.unmark_sent(&ctx.fence, &unsent).await?;
                }
                break;
            }
        }
    }
    Ok(Drained::Done)
}

/// Dead-letters `refused` and the rest of their transactions, counted.
async fn dead_letter(
    ctx: &SyncContext,
    refused: &[Refusal<'_>],
    landed: &[i64],
) -> Result<(), ActorError> {
    let moved = ctx
        .store
        .dead_letter(&ctx.fence, refused, landed, None)
        .await?;
    for refusal in refused {
        metrics::counter!(telemetry::DEAD_LETTERS_TOTAL, "kind" => refusal.kind.as_str())
            .increment(1);
    }
    if let Some(first) = refused.first() {
        let with_them = moved.saturating_sub(refused.len()) as u64;
        metrics::counter!(telemetry::DEAD_LETTERS_TOTAL, "kind" => first.kind.as_str())
            .increment(with_them);
    }
    Ok(())
}

/// Takes the changes of `xacts` out of the txns still to send: a
/// transaction goes whole or waits (the next round reads it again).
fn hold_back(queue: &mut VecDeque<Vec<Candidate>>, xacts: &HashSet<i64>) {
    for txn in queue.iter_mut() {
        txn.retain(|c| c.row.xact.is_none_or(|x| !xacts.contains(&x)));
    }
}

/// Rows of waiting transactions read past, at most, in batches
/// (`sync.outbox_batch_size`): the read grows by up to this many batches.
const MORE_ROWS_PAST_WAITING: usize = 15;

/// The outbox rows read per round hold at most about this many bytes of
/// keys and values (plus one row): large values do not fill memory.
const OUTBOX_READ_BYTES: usize = 32 * 1024 * 1024;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    Done,
    /// The window of oldest rows is full of changes awaiting their echo:
    /// a NOTIFY cannot make anything sendable, the watcher's progress can.
    WindowAwaitingEchoes,
}

/// This round's candidates grouped by the PostgreSQL transaction that
/// wrote them.
#[derive(Debug, Default)]
struct Grouped {
    /// In the order of their first change; a change written before
    /// transactions were recorded is a group of its own.
    groups: Vec<Vec<Candidate>>,
    /// Transactions sent without the rest of their changes (transaction id,
    /// changes sent): the window of oldest rows was full of changes held
    /// back, one transaction larger than it.
    released: Vec<(i64, usize)>,
    /// Held back until the transaction that committed first among those
    /// held back (and not waiting for a key settled elsewhere) goes: the
    /// later ones may have read its writes.
    behind: Vec<Vec<Candidate>>,
    /// That transaction has rows beyond the window: a larger read brings
    /// them.
    holder_beyond: bool,
    /// Its changes in the window, when only rows beyond the window hold it:
    /// at the largest read they go as they are (an audited split), and the
    /// transactions behind it wait on.
    holder_group: Vec<Candidate>,
}

/// What [`whole_transactions`] knows of the window besides the candidates.
#[derive(Debug, Clone, Copy)]
struct Window<'a> {
    state: &'a PollerState,
    /// The read stopped at its row or byte limit: rows may lie beyond it.
    full: bool,
}

/// Keeps a PostgreSQL transaction together: it goes only when every change
/// of it is in the window (the read leaves out keys the watcher or an
/// operator must settle first) and, for each of its keys, its first change
/// not yet sent is a candidate — a key whose earlier change (another
/// transaction's) is still to go, blocked, or waiting for a retry holds the
/// whole transaction back, and it goes once that change is on its way.
///
/// Per key, a user's changes are in commit order (the mirror row's lock
/// orders writers), so a transaction held back waits on an older one. The
/// service's own writes (a dead-letter retry of several keys) need not
/// follow that order, and a transaction can outgrow the window: when
/// nothing can go and every held-back transaction waits only on another
/// held-back one (or on rows beyond a full window no echo will free), the
/// oldest goes as it is (a split, reported in `released`) — after a larger
/// read, when its rows lie beyond the window (`holder_beyond`).
///
/// Transactions go in commit order: those committed after the oldest one
/// held back wait in `behind` (see [`hold_behind_oldest`]).
fn whole_transactions(rows: &[OutboxRow], candidates: Vec<Candidate>, window: Window) -> Grouped {
    let candidate_ids: HashSet<i64> = candidates.iter().map(|c| c.row.id).collect();
    let mut first_unsent: HashSet<(i64, KeyId)> = HashSet::new();
    // Per transaction: complete, and the keys it waits for (none when complete).
    let mut complete: HashMap<i64, bool> = HashMap::new();
    let mut waits_on: HashMap<i64, Vec<KeyId>> = HashMap::new();
    let mut in_window: HashMap<i64, i64> = HashMap::new();
    for row in rows {
        let Some(xact) = row.xact else { continue };
        *in_window.entry(xact).or_default() += 1;
        let entry = complete.entry(xact).or_insert(true);
        if window.state.in_flight(row) || !first_unsent.insert((xact, key_id(row))) {
            continue;
        }
        if !candidate_ids.contains(&row.id) {
            *entry = false;
            waits_on.entry(xact).or_default().push(key_id(row));
        }
    }
    let mut beyond: HashSet<i64> = HashSet::new();
    // Waiting for a key settled elsewhere (the watcher, the arbiter, an
    // operator): never released, however full the window.
    let mut blocked: HashSet<i64> = HashSet::new();
    for row in rows {
        let Some(xact) = row.xact else { continue };
        if row.xact_blocked {
            complete.insert(xact, false);
            blocked.insert(xact);
        } else if in_window.get(&xact).is_some_and(|n| *n < row.xact_rows) {
            complete.insert(xact, false);
            beyond.insert(xact);
        }
    }
    let mut grouped = Grouped::default();
    let mut held: Vec<Candidate> = Vec::new();
    let mut index: HashMap<i64, usize> = HashMap::new();
    for candidate in candidates {
        match candidate.row.xact {
            None => grouped.groups.push(vec![candidate]),
            Some(xact) if complete.get(&xact) == Some(&true) => match index.get(&xact) {
                Some(i) => grouped.groups[*i].push(candidate),
                None => {
                    index.insert(xact, grouped.groups.len());
                    grouped.groups.push(vec![candidate]);
                }
            },
            Some(_) => held.push(candidate),
        }
    }
    // Transactions waiting for a key settled elsewhere (a parked or dropped
    // change, a row a user holds), directly or through a key of such a
    // transaction, wait whole, however long: they hold back nothing else.
    // Through any chain of waits: one waiting on a key of a stuck one is
    // stuck, and so is one waiting on a key of that one.
    let mut stuck_xacts: HashSet<i64> = blocked.clone();
    loop {
        let blocked_keys: HashSet<KeyId> = rows
            .iter()
            .filter(|r| r.xact.is_some_and(|x| stuck_xacts.contains(&x)))
            .map(key_id)
            .collect();
        let more: Vec<i64> = waits_on
            .iter()
            .filter(|(xact, keys)| {
                !stuck_xacts.contains(*xact) && keys.iter().any(|k| blocked_keys.contains(k))
            })
            .map(|(xact, _)| *xact)
            .collect();
        if more.is_empty() {
            break;
        }
        stuck_xacts.extend(more);
    }
    let stuck = |xact: &i64| stuck_xacts.contains(xact);
    if !grouped.groups.is_empty() || held.is_empty() {
        in_commit_order(&mut grouped.groups);
        hold_behind_oldest(
            &mut grouped,
            &held,
            rows,
            &complete,
            &waits_on,
            &beyond,
            &stuck,
        );
        if !grouped.groups.is_empty() || held.is_empty() || grouped.holder_beyond {
            return grouped;
        }
    }
    // Nothing can go. Of the transactions not stuck, release the oldest
    // only if none of them waits on something outside their set (an echo,
    // a retry, rows a read will bring).
    let movable: Vec<&Candidate> = held
        .iter()
        .filter(|c| c.row.xact.is_some_and(|x| !stuck(&x)))
        .collect();
    let held_keys: HashSet<KeyId> = movable.iter().map(|c| key_id(&c.row)).collect();
    let held_xacts: HashSet<i64> = movable.iter().filter_map(|c| c.row.xact).collect();
    let awaiting_echoes = !window.state.chains.is_empty();
    let waits_outside = held_xacts.iter().any(|xact| {
        let on_keys = waits_on
            .get(xact)
            .is_some_and(|keys| keys.iter().any(|k| !held_keys.contains(k)));
        let on_rows = beyond.contains(xact) && (!window.full || awaiting_echoes);
        on_keys || on_rows
    });
    if waits_outside {
        return grouped;
    }
    let Some(oldest) = movable
        .iter()
        .min_by_key(|c| c.row.id)
        .and_then(|c| c.row.xact)
    else {
        return grouped;
    };
    let released: Vec<Candidate> = held
        .into_iter()
        .filter(|c| c.row.xact == Some(oldest))
        .collect();
    if beyond.contains(&oldest) {
        // A larger read may bring the rest: it goes whole then (or, at the
        // largest read, as it is).
        grouped.holder_beyond = true;
        grouped.holder_group = released;
    } else {
        grouped.released = vec![(oldest, released.len())];
        grouped.groups.push(released);
    }
    grouped
}

/// Moves the transactions committed after the oldest one held back into
/// `grouped.behind`: a transaction that read another's writes committed
/// after it, and must land after it, whatever held the other back (a key's
/// earlier change going this round, a failed compare, a retry, rows beyond
/// the window). A transaction on a key the held one waits for still goes:
/// per key, the outbox's order comes first. Transactions stuck on a key
/// settled elsewhere (parked behind a `manual` conflict, dropped, held by a
/// user) hold nothing back, or one conflict would stop every later
/// transaction. One whose commit order is unknown (its stamp lost in a
/// crash) counts as committed before all others.
fn hold_behind_oldest(
    grouped: &mut Grouped,
    held: &[Candidate],
    rows: &[OutboxRow],
    complete: &HashMap<i64, bool>,
    waits_on: &HashMap<i64, Vec<KeyId>>,
    beyond: &HashSet<i64>,
    stuck: &impl Fn(&i64) -> bool,
) {
    let seq_of: HashMap<i64, i64> = rows
        .iter()
        .filter_map(|r| Some((r.xact?, r.commit_seq?)))
        .collect();
    let holder = complete
        .iter()
        .filter(|(xact, whole)| !**whole && !stuck(xact))
        .map(|(xact, _)| (seq_of.get(xact).copied().unwrap_or(i64::MIN), *xact))
        .min();
    let Some((seq, xact)) = holder else { return };
    // The keys it waits for, and those the transactions owning their next
    // change wait for, and so on.
    let owner: HashMap<KeyId, i64> = grouped
        .groups
        .iter()
        .flatten()
        .chain(held)
        .filter_map(|c| Some((key_id(&c.row), c.row.xact?)))
        .collect();
    let mut needed: HashSet<KeyId> = HashSet::new();
    let mut visited: HashSet<i64> = HashSet::from([xact]);
    let mut todo = vec![xact];
    while let Some(x) = todo.pop() {
        for key in waits_on.get(&x).into_iter().flatten() {
            if needed.insert(key.clone())
                && let Some(next) = owner.get(key).filter(|o| visited.insert(**o))
            {
                todo.push(*next);
            }
        }
    }
    let (go, wait): (Vec<_>, Vec<_>) =
        std::mem::take(&mut grouped.groups)
            .into_iter()
            .partition(|group| {
                group
                    .first()
                    .and_then(|c| c.row.commit_seq)
                    .is_none_or(|s| s < seq)
                    || group.iter().any(|c| needed.contains(&key_id(&c.row)))
            });
    grouped.groups = go;
    grouped.holder_beyond = !wait.is_empty() && beyond.contains(&xact);
    // Held by nothing but rows beyond the window: at the largest read it
    // may go as it is.
    if grouped.holder_beyond && waits_on.get(&xact).is_none_or(Vec::is_empty) {
        grouped.holder_group = held
            .iter()
            .filter(|c| c.row.xact == Some(xact))
            .cloned()
            .collect();
    }
    grouped.behind = wait;
}

/// Orders transactions as they committed: one that read another's writes
/// committed after it. Those whose commit order is unknown (written before
/// it was recorded, or stamped before a crash of PostgreSQL) committed
/// before every known one; among themselves, in the order of their first
/// change. Two transactions of one round never share a key, so per key the
/// order stays the outbox's.
fn in_commit_order(groups: &mut [Vec<Candidate>]) {
    groups.sort_by_key(|group| group.first().and_then(|c| c.row.commit_seq));
}

/// A transaction that reached etcd in more than one txn.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Split {
    xact: i64,
    /// Its changes sent in this round.
    keys: usize,
    /// The etcd txns they took, when known.
    txns: Option<usize>,
    reason: SplitReason,
}

/// Why a transaction reached etcd in several txns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitReason {
    /// More changes or bytes than one etcd txn takes.
    TooLarge,
    /// Held back while nothing else could go (see [`whole_transactions`]).
    Released,
    /// etcd refused the txn and it was divided to find the change refused.
    Refused,
}

impl SplitReason {
    fn describe(self) -> &'static str {
        match self {
            SplitReason::TooLarge => {
                "more changes than one etcd txn takes (etcd.max_txn_ops, etcd.max_request_bytes)"
            }
            SplitReason::Released => {
                "held back while nothing else could go (larger than the outbox read, sync.outbox_batch_size, or waiting on a service write)"
            }
            SplitReason::Refused => {
                "etcd refused the txn; it was divided to find the change refused"
            }
        }
    }
}

/// The transactions of `part` that also have changes in `rest`: divided
/// between the two (the changes in `part` are reported).
fn divided(part: &[Candidate], rest: &[Candidate], reason: SplitReason) -> Vec<Split> {
    let in_rest: HashSet<i64> = rest.iter().filter_map(|c| c.row.xact).collect();
    let mut splits: Vec<Split> = Vec::new();
    for candidate in part {
        let Some(xact) = candidate.row.xact.filter(|x| in_rest.contains(x)) else {
            continue;
        };
        match splits.iter_mut().find(|s| s.xact == xact) {
            Some(split) => split.keys += 1,
            None => splits.push(Split {
                xact,
                keys: 1,
                txns: None,
                reason,
            }),
        }
    }
    splits
}

/// Packs transactions into txns within etcd's op and size limits, never
/// splitting one that fits in a txn by itself; one that does not is split
/// in order (reported).
fn chunks(
    groups: Vec<Vec<Candidate>>,
    (max_ops, max_bytes): (usize, usize),
) -> (Vec<Vec<Candidate>>, Vec<Split>) {
    let mut out: Vec<Vec<Candidate>> = Vec::new();
    let mut splits = Vec::new();
    let mut current: Vec<Candidate> = Vec::new();
    let mut bytes = 0usize;
    for group in groups {
        let size: usize = group.iter().map(|c| request_bytes(&c.row)).sum();
        if group.len() <= max_ops && size <= max_bytes {
            if current.len() + group.len() > max_ops || bytes + size > max_bytes {
                out.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.extend(group);
            continue;
        }
        // Larger than one txn: in order, in as many as it takes.
        if !current.is_empty() {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        let xact = group[0].row.xact;
        let keys = group.len();
        let before = out.len();
        for candidate in group {
            let size = request_bytes(&candidate.row);
            if !current.is_empty() && (current.len() >= max_ops || bytes + size > max_bytes) {
                out.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(candidate);
        }
        out.push(std::mem::take(&mut current));
        bytes = 0;
        if let Some(xact) = xact {
            splits.push(Split {
                xact,
                keys,
                txns: Some(out.len() - before),
                reason: SplitReason::TooLarge,
            });
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    (out, splits)
}

/// Changes and bytes one etcd txn of the poller takes (one compare slot
/// goes to the leader fence).
fn txn_limits(ctx: &SyncContext) -> (usize, usize) {
    ctx.config.etcd.txn_limits(1)
}

/// Audits and counts transactions that reached etcd in several txns.
async fn record_splits(ctx: &SyncContext, splits: &[Split]) -> Result<(), ActorError> {
    for split in splits {
        let detail = serde_json::json!({
            "transaction": split.xact,
            "changes": split.keys,
            "etcd_txns": split.txns,
            "reason": split.reason.describe(),
        });
        tracing::warn!(%detail, "a PostgreSQL transaction reaches etcd in several txns");
        metrics::counter!(telemetry::TRANSACTION_SPLITS_TOTAL).increment(1);
        ctx.store
            .record_event(&ctx.fence, AuditKind::TransactionSplit, None, &detail)
            .await?;
    }
    Ok(())
}

/// One fenced compare-and-swap txn for `txn` (distinct keys), traced.
async fn attempt(ctx: &Arc<SyncContext>, txn: &[Candidate]) -> Result<CasOutcome, EtcdError> {
    let writes: Vec<CasWrite> = txn
        .iter()
        .map(|c| CasWrite {
            key: c.row.key.clone(),
            value: match c.op {
                Op::Put => Some(c.row.value.clone().unwrap_or_default()),
                Op::Delete => None,
            },
            expect_mod_revision: c.expected,
            lease: 0,
        })
        .collect();
    let span = tracing::info_span!("pg_to_etcd.txn", changes = txn.len(), term = ctx.fence.term);
    // Registered before sending: the echo may beat the response.
    let traced = tracing_ids::span_context(&span).map(|context| {
        ctx.echo_traces
            .register(writes.iter().map(|w| w.key.as_slice()), context)
    });
    let outcome = compare_and_swap(&ctx.etcd, Some(&ctx.leader), &writes)
        .instrument(span)
        .await;
    if let Some(txn_id) = traced
        && !matches!(outcome, Ok(CasOutcome::Applied { .. }))
    {
        ctx.echo_traces
            .unregister(txn_id, writes.iter().map(|w| w.key.as_slice()));
    }
    outcome
}

/// Whether the rest of a round may go after a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Round {
    Continue,
    /// A change waits for a retry or for its failed compare to be settled:
    /// a later transaction of the round may have read its transaction's
    /// writes, so the round stops (the next one reads the outbox again).
    /// `unsent`: changes of this txn's queue left unsent.
    Stop {
        unsent: Vec<i64>,
    },
}

/// Settles a txn: conflicts are set aside and the rest retried, a rejected
/// txn is split until the change etcd refuses is found.
async fn send(
    ctx: &Arc<SyncContext>,
    state: &mut PollerState,
    chunk: Vec<Candidate>,
    arbiter: &WeakAddr<ConflictArbiter>,
    retrier: &WeakAddr<Retrier>,
) -> Result<Round, ActorError> {
    let mut queue: VecDeque<Vec<Candidate>> = VecDeque::from([chunk]);
    // Set when the round stops: the changes left unsent.
    let mut stopped: Option<Vec<i64>> = None;
    while let Some(mut txn) = queue.pop_front() {
        if txn.is_empty() {
            continue;
        }
        let outcome = attempt(ctx, &txn).await;
        match outcome {
            Ok(CasOutcome::Applied {
                revision,
                noop_deletes,
            }) => {
                if crash_after_etcd_commit() {
                    tracing::error!("failpoint crash-after-etcd-commit: aborting");
                    std::process::abort();
                }
                record_sent(ctx, state, &txn, revision, &noop_deletes).await?;
            }
            Ok(CasOutcome::Conflicts {
                revision,
                conflicts,
            }) => {
                let failed: HashSet<usize> = conflicts.iter().map(|(i, _)| *i).collect();
                for (index, current) in conflicts {
                    let etcd_revision = current.as_ref().map_or(0, |kv| kv.meta.mod_revision);
                    let until = current.as_ref().map_or(revision, |kv| kv.meta.mod_revision);
                    on_compare_failed(ctx, state, &txn[index], etcd_revision, until, arbiter)
                        .await?;
                }
                // A transaction with a failed compare waits whole for the
                // policy's decision (the watcher or the arbiter settles the
                // key, then the transaction goes or is dropped, whole). The
                // transactions committed after it wait too (they may have
                // read its writes); those committed before it go on.
                // The part cut off was in a txn etcd did not apply.
                let cut = txn.split_off(committed_before_first_failed(&txn, &failed));
                let unsent = queue.drain(..).flatten().chain(cut).map(|c| c.row.id);
                stopped.get_or_insert_with(Vec::new).extend(unsent);
                queue.push_front(txn);
            }
            Ok(CasOutcome::Fenced) => return Err(ActorError::Fenced),
            Err(error) if error.connection_level() || (error.retryable() && txn.len() > 1) => {
                // The whole pipeline pauses; on restart everything is re-read
                // (an unknown outcome is settled by the compares).
                return Err(error.into());
            }
            Err(error) if txn.len() > 1 && one_transaction(&txn) => {
                // etcd refused one transaction's txn. It goes whole or not
                // at all, so it is not divided to find the change etcd
                // rejects (a part would land): all of it goes to the dead
                // letters with etcd's answer.
                let kind = match error {
                    EtcdError::TooLarge(_) => DeadLetterKind::TooLarge,
                    _ => DeadLetterKind::Refused,
                };
                let reason = format!("etcd refused the transaction's txn: {error}");
                let refusals: Vec<Refusal> = txn
                    .iter()
                    .map(|c| Refusal {
                        row: &c.row,
                        kind,
                        reason: &reason,
                    })
                    .collect();
                tracing::warn!(%error, changes = txn.len(), "a transaction refused by etcd is dead-lettered whole");
                dead_letter(ctx, &refusals, &state.landed()).await?;
                hold_back(&mut queue, &txn.iter().filter_map(|c| c.row.xact).collect());
            }
            Err(error) if txn.len() > 1 => {
                // etcd refused a txn of several transactions: divide it
                // between them until the one etcd rejects is alone.
                let middle = split_point(&txn);
                let second = txn.split_off(middle);
                record_splits(ctx, &divided(&txn, &second, SplitReason::Refused)).await?;
                queue.push_front(second);
                queue.push_front(txn);
                tracing::debug!(%error, "txn rejected, bisecting");
            }
            Err(EtcdError::TooLarge(message)) => {
                let candidate = &txn[0];
                let reason = format!("etcd rejected the change as too large: {message}");
                // Its transaction's changes still to send in this round were
                // refused with it (etcd took none of the txn): they go too.
                let with = format!(
                    "dead-lettered with its transaction, another change of which cannot go: {reason}"
                );
                let siblings: Vec<Candidate> = queue
                    .iter()
                    .flatten()
                    .filter(|c| candidate.row.xact.is_some() && c.row.xact == candidate.row.xact)
                    .cloned()
                    .collect();
                let mut refusals = vec![Refusal {
                    row: &candidate.row,
                    kind: DeadLetterKind::TooLarge,
                    reason: &reason,
                }];
                refusals.extend(siblings.iter().map(|c| Refusal {
                    row: &c.row,
                    kind: DeadLetterKind::TooLarge,
                    reason: &with,
                }));
                dead_letter(ctx, &refusals, &state.landed()).await?;
                hold_back(&mut queue, &candidate.row.xact.into_iter().collect());
            }
            Err(error) if !error.retryable() => {
                // Refused for good (permission, invalid request): no retry
                // can help, and every transaction committed after it would
                // wait through them.
                let candidate = &txn[0];
                let reason = format!("etcd refused the change: {error}");
                let refusal = Refusal {
                    row: &candidate.row,
                    kind: DeadLetterKind::Refused,
                    reason: &reason,
                };
                tracing::warn!(outbox_id = candidate.row.id, %error, "change refused by etcd, dead-lettered with its transaction");
                dead_letter(ctx, &[refusal], &state.landed()).await?;
                hold_back(&mut queue, &candidate.row.xact.into_iter().collect());
            }
            Err(error) => {
                let candidate = &txn[0];
                let retrier = retrier
                    .upgrade()
                    .ok_or_else(|| ActorError::Internal("retrier actor is gone".into()))?;
                let decision = retrier
                    .send(ChangeFailed {
                        row: candidate.row.clone(),
                        error: error.to_string(),
                        landed: state.landed(),
                    })
                    .await??;
                match decision {
                    RetryDecision::RetryAfter(delay) => {
                        state
                            .retry_at
                            .insert(candidate.row.id, Instant::now() + delay);
                        // What is left of the txn may have committed after
                        // it: read again next round (it waits then).
                        let unsent = queue.drain(..).flatten().map(|c| c.row.id);
                        stopped.get_or_insert_with(Vec::new).extend(unsent);
                    }
                    RetryDecision::DeadLettered => {
                        state.retry_at.remove(&candidate.row.id);
                    }
                }
                // Its transaction waits for the retry, or went to the dead
                // letters with it.
                hold_back(&mut queue, &candidate.row.xact.into_iter().collect());
            }
        }
    }
    Ok(match stopped {
        Some(unsent) => Round::Stop { unsent },
        None => Round::Continue,
    })
}

/// How many of `txn`'s changes belong to transactions committed before
/// the first one with a failed compare (`failed`: indexes into `txn`, whose
/// transactions are in commit order, each one's changes together).
fn committed_before_first_failed(txn: &[Candidate], failed: &HashSet<usize>) -> usize {
    let Some(first) = failed.iter().copied().min() else {
        return txn.len();
    };
    match txn[first].row.xact {
        Some(xact) => txn
            .iter()
            .position(|c| c.row.xact == Some(xact))
            .unwrap_or(first),
        None => first,
    }
}

/// Whether every change of `txn` belongs to one recorded transaction.
fn one_transaction(txn: &[Candidate]) -> bool {
    txn.first()
        .and_then(|c| c.row.xact)
        .is_some_and(|xact| txn.iter().all(|c| c.row.xact == Some(xact)))
}

/// Where to divide a txn etcd refused: at the transaction boundary nearest
/// its middle (a txn of one transaction is never divided; its middle is
/// only the fallback of changes recorded without a transaction).
fn split_point(txn: &[Candidate]) -> usize {
    let middle = txn.len() / 2;
    (1..txn.len())
        .filter(|i| txn[*i].row.xact.is_none() || txn[*i].row.xact != txn[i - 1].row.xact)
        .min_by_key(|i| i.abs_diff(middle))
        .unwrap_or(middle)
}

async fn record_sent(
    ctx: &Arc<SyncContext>,
    state: &mut PollerState,
    txn: &[Candidate],
    revision: i64,
    noop_deletes: &[usize],
) -> Result<(), ActorError> {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    for candidate in txn {
        state.record_applied(candidate, revision);
        state.retry_at.remove(&candidate.row.id);
        metrics::counter!(telemetry::CHANGES_TOTAL, "direction" => telemetry::PG_TO_ETCD, "op" => candidate.op.as_str()).increment(1);
        let latency = (now_us - candidate.row.created_at_us).max(0) as f64 / 1e6;
        metrics::histogram!(telemetry::APPLY_LATENCY_SECONDS, "direction" => telemetry::PG_TO_ETCD)
            .record(latency);
    }
    metrics::histogram!(telemetry::BATCH_SIZE, "direction" => telemetry::PG_TO_ETCD)
        .record(txn.len() as f64);
    if !noop_deletes.is_empty() {
        // Deleting an absent key leaves no event to echo: consume here.
        let ids: Vec<i64> = noop_deletes.iter().map(|i| txn[*i].row.id).collect();
        ctx.store.consume_outbox(&ctx.fence, &ids).await?;
    }
    tracing::debug!(
        changes = txn.len(),
        revision,
        "outbox changes applied to etcd"
    );
    Ok(())
}

async fn on_compare_failed(
    ctx: &Arc<SyncContext>,
    state: &mut PollerState,
    candidate: &Candidate,
    etcd_revision: i64,
    until: i64,
    arbiter: &WeakAddr<ConflictArbiter>,
) -> Result<(), ActorError> {
    let key = key_id(&candidate.row);
    state.chains.remove(&key);
    let applied = *ctx.applied.borrow();
    let stale = state
        .blocked
        .get(&key)
        .is_some_and(|b| applied >= b.until && b.etcd_revision == etcd_revision);
    if !stale {
        // etcd changed the key: the watcher will bring that change here and
        // settle it with the pending row; wait for it.
        state.blocked.insert(
            key,
            Blocked {
                until,
                etcd_revision,
            },
        );
        return Ok(());
    }
    // The watcher has passed etcd's state and the row is still based on an
    // older one: a conflict it could not see (the row was committed while
    // the watcher applied the key). The arbiter settles it.
    state.blocked.remove(&key);
    tracing::info!(
        outbox_id = candidate.row.id,
        "stale change handed to the conflict arbiter"
    );
    let arbiter = arbiter
        .upgrade()
        .ok_or_else(|| ActorError::Internal("conflict arbiter actor is gone".into()))?;
    arbiter
        .send(ResolveStale {
            table: candidate.row.mirror_table.clone(),
            key: candidate.row.key.clone(),
        })
        .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, key: &str, base_revision: i64) -> OutboxRow {
        OutboxRow {
            id,
            mirror_table: "kv".into(),
            key: key.as_bytes().to_vec(),
            op: Op::Put,
            value: Some(b"v".to_vec()),
            base_revision,
            attempts: 0,
            created_at_us: 0,
            xact: None,
            xact_rows: 1,
            commit_seq: None,
            xact_blocked: false,
        }
    }

    fn sent(state: &mut PollerState, rows: &[OutboxRow], revision: i64) {
        let candidates = state.select(rows, 0, Instant::now()).unwrap();
        for candidate in &candidates {
            state.record_applied(candidate, revision);
        }
    }

    #[test]
    fn a_sent_change_waits_for_its_echo() {
        let mut state = PollerState::default();
        let rows = [row(1, "/a", 5), row(2, "/a", 5)];
        sent(&mut state, &rows[..1], 10);
        state.prune(&rows, 9);
        let next = state.select(&rows, 9, Instant::now()).unwrap();
        assert_eq!(next.len(), 1, "the next change of the key may go");
        assert_eq!(next[0].row.id, 2);
        assert_eq!(next[0].expected, 10, "based on our own write");
    }

    #[test]
    fn a_consumed_echo_ends_the_chain() {
        let mut state = PollerState::default();
        let rows = [row(1, "/a", 5)];
        sent(&mut state, &rows, 10);
        state.prune(&[], 10);
        assert!(state.chains.is_empty());
    }

    #[test]
    fn a_change_outliving_its_echo_is_settled_again_not_awaited_forever() {
        let mut state = PollerState::default();
        let rows = [row(1, "/a", 5)];
        sent(&mut state, &rows, 10);
        // The watcher is past revision 10 and the row is still there.
        state.prune(&rows, 12);
        assert!(state.chains.is_empty());
        let again = state.select(&rows, 12, Instant::now()).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].expected, 5,
            "its compare fails and the key is settled"
        );
    }

    #[test]
    fn a_blocked_key_is_forgotten_once_the_watcher_settled_it() {
        let mut state = PollerState::default();
        let key = key_id(&row(1, "/a", 5));
        state.blocked.insert(
            key.clone(),
            Blocked {
                until: 10,
                etcd_revision: 8,
            },
        );
        state.prune(&[row(1, "/a", 5)], 9);
        assert!(
            state.blocked.contains_key(&key),
            "still waiting for the watcher"
        );
        state.prune(&[row(1, "/a", 5)], 10);
        assert!(state.blocked.contains_key(&key), "its row is still there");
        state.prune(&[], 10);
        assert!(
            state.blocked.is_empty(),
            "settled: nothing left to wait for"
        );
    }

    #[test]
    fn deletes_keep_their_chain_until_the_echo_is_applied() {
        let mut state = PollerState::default();
        let mut delete = row(1, "/a", 5);
        delete.op = Op::Delete;
        let rows = [delete, row(2, "/a", 5)];
        sent(&mut state, &rows[..1], 10);
        state.prune(&rows, 9);
        let next = state.select(&rows, 9, Instant::now()).unwrap();
        assert_eq!(next[0].row.id, 2);
        assert_eq!(next[0].expected, 0, "after our delete the key is absent");
    }

    fn in_xact(mut row: OutboxRow, xact: i64, rows: i64) -> OutboxRow {
        row.xact = Some(xact);
        row.xact_rows = rows;
        row
    }

    fn ids(groups: &[Vec<Candidate>]) -> Vec<Vec<i64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|c| c.row.id).collect())
            .collect()
    }

    fn group(state: &PollerState, rows: &[OutboxRow], full: bool) -> Grouped {
        let candidates = state.select(rows, 0, Instant::now()).unwrap();
        whole_transactions(rows, candidates, Window { state, full })
    }

    #[test]
    fn a_transaction_goes_whole_or_waits() {
        // Transaction 7 wrote /a and /b; transaction 8 wrote /b (after 7's
        // change of /b: the row lock orders them) and /c.
        let rows = [
            in_xact(row(1, "/a", 1), 7, 2),
            in_xact(row(2, "/b", 2), 7, 2),
            in_xact(row(3, "/c", 3), 8, 2),
            in_xact(row(4, "/b", 2), 8, 2),
        ];
        let mut state = PollerState::default();
        let grouped = group(&state, &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![1, 2]], "8 waits for 7's /b");
        for candidate in &grouped.groups[0] {
            state.record_applied(candidate, 10);
        }
        let grouped = group(&state, &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![3, 4]], "then 8 goes whole");
        assert!(grouped.released.is_empty());
    }

    #[test]
    fn a_transaction_with_rows_left_out_of_the_read_waits() {
        // Transaction 7 has 3 rows; the read returned 2 (the third lies
        // beyond it): it is held, and nothing is released.
        let rows = [
            in_xact(row(1, "/a", 1), 7, 3),
            in_xact(row(2, "/b", 1), 7, 3),
        ];
        let grouped = group(&PollerState::default(), &rows, false);
        assert!(grouped.groups.is_empty());
        // A full window, nothing in flight: the rest lies beyond it and
        // nothing else will move it. A larger read is tried first; at the
        // largest, it goes as it is.
        let grouped = group(&PollerState::default(), &rows, true);
        assert!(grouped.groups.is_empty());
        assert!(grouped.holder_beyond);
        assert_eq!(ids(&[grouped.holder_group]), vec![vec![1, 2]]);
    }

    #[test]
    fn two_transactions_waiting_on_each_other_are_untangled_oldest_first() {
        // A dead-letter retry (transaction 9: /a then /b) took no row
        // locks, so a user's transaction 8 (/b then /a) interleaves:
        // each waits for the other's first change.
        let rows = [
            in_xact(row(100, "/b", 1), 8, 2),
            in_xact(row(101, "/a", 1), 9, 2),
            in_xact(row(102, "/b", 1), 9, 2),
            in_xact(row(103, "/a", 1), 8, 2),
        ];
        let mut state = PollerState::default();
        let grouped = group(&state, &rows, false);
        assert_eq!(
            ids(&grouped.groups),
            vec![vec![100]],
            "the oldest goes first"
        );
        assert_eq!(grouped.released, vec![(8, 1)]);
        for candidate in &grouped.groups[0] {
            state.record_applied(candidate, 10);
        }
        let grouped = group(&state, &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![101, 102]], "then 9, whole");
        for candidate in &grouped.groups[0] {
            state.record_applied(candidate, 11);
        }
        let grouped = group(&state, &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![103]], "then the rest of 8");
        assert!(grouped.released.is_empty());
    }

    #[test]
    fn transactions_go_in_commit_order_not_in_the_order_of_their_first_change() {
        // Transaction 8 wrote /r first, then read what 7 wrote and
        // committed: it committed after 7, and goes after it.
        let mut rows = [
            in_xact(row(1, "/r", 1), 8, 1),
            in_xact(row(2, "/w", 1), 7, 1),
            in_xact(row(3, "/old", 1), 6, 1),
        ];
        rows[0].commit_seq = Some(41);
        rows[1].commit_seq = Some(40);
        // 6's stamp was lost: it committed before every stamped one.
        rows[2].commit_seq = None;
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![3], vec![2], vec![1]]);
    }

    #[test]
    fn a_transaction_waiting_for_a_key_settled_elsewhere_is_never_released() {
        // Its change of a parked key is left out of the read: the window is
        // full and nothing is in flight, but it must not go without it.
        let mut rows = [in_xact(row(1, "/a", 1), 7, 2)];
        rows[0].xact_blocked = true;
        let grouped = group(&PollerState::default(), &rows, true);
        assert!(grouped.groups.is_empty());
        assert!(grouped.released.is_empty());
    }

    #[test]
    fn transactions_committed_after_one_waiting_for_a_retry_wait_too() {
        let mut rows = [
            in_xact(row(1, "/a", 1), 7, 1),
            in_xact(row(2, "/b", 1), 8, 1),
            in_xact(row(3, "/c", 1), 6, 1),
        ];
        rows[0].commit_seq = Some(20);
        rows[1].commit_seq = Some(21);
        rows[2].commit_seq = Some(19);
        let mut state = PollerState::default();
        let now = Instant::now();
        state.retry_at.insert(1, now + Duration::from_secs(5));
        let candidates = state.select(&rows, 0, now).unwrap();
        let grouped = whole_transactions(
            &rows,
            candidates,
            Window {
                state: &state,
                full: false,
            },
        );
        assert_eq!(ids(&grouped.groups), vec![vec![3]], "8 committed after 7");
        assert_eq!(ids(&grouped.behind), vec![vec![2]]);
    }

    #[test]
    fn transactions_committed_after_one_held_back_wait_for_it() {
        // 6 wrote /k; 7 wrote /k and /j; 8 read /j and wrote /m. 7 waits
        // for 6's /k to go; 8 may have read 7's writes, so it waits too.
        let mut rows = [
            in_xact(row(1, "/k", 1), 6, 1),
            in_xact(row(2, "/k", 1), 7, 2),
            in_xact(row(3, "/j", 1), 7, 2),
            in_xact(row(4, "/m", 1), 8, 1),
        ];
        for (row, seq) in rows.iter_mut().zip([10, 11, 11, 12]) {
            row.commit_seq = Some(seq);
        }
        let mut state = PollerState::default();
        let grouped = group(&state, &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![1]]);
        assert_eq!(ids(&grouped.behind), vec![vec![4]]);
        assert!(!grouped.holder_beyond);
        state.record_applied(&grouped.groups[0][0], 20);
        let grouped = group(&state, &rows, false);
        assert_eq!(
            ids(&grouped.groups),
            vec![vec![2, 3], vec![4]],
            "then 7, then 8"
        );
    }

    #[test]
    fn a_transaction_on_a_key_the_held_one_waits_for_goes_whatever_its_commit_order() {
        // A dead-letter retry (9) queued /k before a user's 8, but
        // committed after it: 8 waits for 9's /k, so 9 cannot wait for 8.
        let mut rows = [
            in_xact(row(1, "/k", 1), 9, 1),
            in_xact(row(2, "/k", 1), 8, 1),
        ];
        rows[0].commit_seq = Some(31);
        rows[1].commit_seq = Some(30);
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![1]]);
        assert!(grouped.behind.is_empty());
    }

    #[test]
    fn transactions_waiting_on_each_other_are_untangled_while_later_ones_wait() {
        // 8 and 9 wait on each other's first change (a dead-letter retry
        // took no row locks); 10, committed after both, is complete.
        let mut rows = [
            in_xact(row(100, "/b", 1), 8, 2),
            in_xact(row(101, "/a", 1), 9, 2),
            in_xact(row(102, "/b", 1), 9, 2),
            in_xact(row(103, "/a", 1), 8, 2),
            in_xact(row(104, "/c", 1), 10, 1),
        ];
        for (row, seq) in rows.iter_mut().zip([8, 9, 9, 8, 10]) {
            row.commit_seq = Some(seq);
        }
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(
            ids(&grouped.groups),
            vec![vec![100]],
            "the oldest goes first"
        );
        assert_eq!(grouped.released, vec![(8, 1)]);
        assert_eq!(ids(&grouped.behind), vec![vec![104]]);
    }

    #[test]
    fn what_the_held_transaction_waits_for_goes_through_any_chain_of_waits() {
        // 10 waits for 12's /k, 12 waits for 13's /y: 13 must go, or
        // nothing ever does.
        let mut rows = [
            in_xact(row(1, "/y", 1), 13, 1),
            in_xact(row(2, "/y", 1), 12, 2),
            in_xact(row(3, "/k", 1), 12, 2),
            in_xact(row(4, "/k", 1), 10, 1),
        ];
        for (row, seq) in rows.iter_mut().zip([13, 12, 12, 10]) {
            row.commit_seq = Some(seq);
        }
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![1]]);
    }

    #[test]
    fn after_a_failed_compare_only_transactions_committed_before_it_go_on() {
        let candidate = |id: i64, xact: Option<i64>| Candidate {
            row: OutboxRow {
                xact,
                ..row(id, "/k", 1)
            },
            op: Op::Put,
            expected: 1,
        };
        let txn = [
            candidate(1, Some(7)),
            candidate(2, None),
            candidate(3, Some(8)),
            candidate(4, Some(8)),
            candidate(5, Some(9)),
        ];
        let at = |failed: &[usize]| {
            committed_before_first_failed(&txn, &failed.iter().copied().collect())
        };
        assert_eq!(
            at(&[4, 3]),
            2,
            "8 failed on its second key: 7 and the lone change go"
        );
        assert_eq!(at(&[1]), 1);
        assert_eq!(at(&[0, 4]), 0);
        assert_eq!(at(&[]), 5);
    }

    #[test]
    fn a_transaction_stuck_on_a_parked_key_holds_nothing_back() {
        let mut rows = [
            in_xact(row(1, "/a", 1), 7, 2),
            in_xact(row(2, "/b", 1), 8, 1),
        ];
        rows[0].xact_blocked = true;
        rows[0].commit_seq = Some(1);
        rows[1].commit_seq = Some(2);
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![2]]);
    }

    #[test]
    fn a_held_transaction_with_rows_beyond_the_window_asks_for_a_larger_read() {
        // 7 has a third row beyond the full window; 8 committed after it.
        let mut rows = [
            in_xact(row(1, "/a", 1), 7, 3),
            in_xact(row(2, "/b", 1), 7, 3),
            in_xact(row(3, "/c", 1), 8, 1),
        ];
        for (row, seq) in rows.iter_mut().zip([5, 5, 6]) {
            row.commit_seq = Some(seq);
        }
        let grouped = group(&PollerState::default(), &rows, true);
        assert!(grouped.groups.is_empty());
        assert_eq!(ids(&grouped.behind), vec![vec![3]]);
        assert!(grouped.holder_beyond);
        assert_eq!(
            ids(&[grouped.holder_group]),
            vec![vec![1, 2]],
            "at the largest read, it goes as it is"
        );
    }

    #[test]
    fn a_transaction_waiting_through_a_chain_on_a_parked_key_holds_nothing_back() {
        // 5 is parked (its /b is left out of the read); 6 waits for 5's /c,
        // 7 for 6's /d. Neither may stop 8, committed after them all.
        let mut rows = [
            in_xact(row(1, "/c", 1), 5, 2),
            in_xact(row(2, "/c", 1), 6, 2),
            in_xact(row(3, "/d", 1), 6, 2),
            in_xact(row(4, "/d", 1), 7, 2),
            in_xact(row(5, "/e", 1), 7, 2),
            in_xact(row(6, "/f", 1), 8, 1),
        ];
        rows[0].xact_blocked = true;
        for (row, seq) in rows.iter_mut().zip([5, 6, 6, 7, 7, 8]) {
            row.commit_seq = Some(seq);
        }
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![6]]);
        assert!(grouped.behind.is_empty());
    }

    #[test]
    fn a_held_transaction_whose_commit_order_was_lost_counts_as_first() {
        // 7's stamp was lost in a crash; it waits for 6's /k.
        let mut rows = [
            in_xact(row(1, "/k", 1), 6, 1),
            in_xact(row(2, "/k", 1), 7, 2),
            in_xact(row(3, "/j", 1), 7, 2),
            in_xact(row(4, "/m", 1), 8, 1),
        ];
        rows[0].commit_seq = Some(1);
        rows[3].commit_seq = Some(2);
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(ids(&grouped.groups), vec![vec![1]]);
        assert_eq!(ids(&grouped.behind), vec![vec![4]]);
    }

    #[test]
    fn a_transaction_waiting_elsewhere_does_not_stop_the_release_of_a_large_one() {
        // 7 waits for a parked key; 8 is larger than the full window (its
        // third change lies beyond it): 8 goes as it is, 7 waits.
        let mut rows = [
            in_xact(row(1, "/a", 1), 7, 2),
            in_xact(row(2, "/t1", 1), 8, 3),
            in_xact(row(3, "/t2", 1), 8, 3),
        ];
        rows[0].xact_blocked = true;
        let grouped = group(&PollerState::default(), &rows, true);
        assert!(grouped.holder_beyond);
        assert_eq!(ids(&[grouped.holder_group]), vec![vec![2, 3]]);
    }

    #[test]
    fn a_key_written_twice_in_a_transaction_does_not_hold_it() {
        let rows = [
            in_xact(row(1, "/a", 1), 7, 2),
            in_xact(row(2, "/a", 1), 7, 2),
        ];
        let grouped = group(&PollerState::default(), &rows, false);
        assert_eq!(
            ids(&grouped.groups),
            vec![vec![1]],
            "its first change of /a goes"
        );
    }

    #[test]
    fn a_held_transaction_waiting_for_a_blocked_key_is_not_released() {
        let rows = [
            in_xact(row(1, "/a", 1), 7, 2),
            in_xact(row(2, "/b", 1), 7, 2),
        ];
        let mut state = PollerState::default();
        state.blocked.insert(
            key_id(&rows[0]),
            Blocked {
                until: 10,
                etcd_revision: 8,
            },
        );
        let grouped = group(&state, &rows, true);
        assert!(grouped.groups.is_empty(), "it waits for the watcher");
    }

    #[test]
    fn transactions_share_a_txn_and_only_an_oversized_one_is_split() {
        let candidate = |id: i64, xact: i64| Candidate {
            row: in_xact(row(id, &format!("/k{id}"), 1), xact, 1),
            op: Op::Put,
            expected: 1,
        };
        let groups = vec![
            vec![candidate(1, 7), candidate(2, 7)],
            vec![candidate(3, 8), candidate(4, 8), candidate(5, 8)],
            vec![candidate(6, 9)],
        ];
        let (txns, splits) = chunks(groups.clone(), (3, usize::MAX));
        assert_eq!(ids(&txns), vec![vec![1, 2], vec![3, 4, 5], vec![6]]);
        assert!(splits.is_empty(), "no transaction split: {splits:?}");
        let (txns, splits) = chunks(groups, (2, usize::MAX));
        assert_eq!(ids(&txns), vec![vec![1, 2], vec![3, 4], vec![5], vec![6]]);
        assert_eq!(
            splits,
            vec![Split {
                xact: 8,
                keys: 3,
                txns: Some(2),
                reason: SplitReason::TooLarge,
            }]
        );
    }

    #[test]
    fn a_refused_txn_is_divided_between_transactions_and_a_divided_one_is_reported() {
        let candidate = |id: i64, xact: i64| Candidate {
            row: in_xact(row(id, &format!("/k{id}"), 1), xact, 1),
            op: Op::Put,
            expected: 1,
        };
        let txn = vec![
            candidate(1, 7),
            candidate(2, 7),
            candidate(3, 7),
            candidate(4, 8),
            candidate(5, 8),
            candidate(6, 8),
        ];
        assert_eq!(split_point(&txn), 3, "at the boundary of 7 and 8");
        let one = vec![candidate(1, 7), candidate(2, 7), candidate(3, 7)];
        assert_eq!(split_point(&one), 1, "one transaction: its middle");
        let (first, second) = one.split_at(1);
        assert_eq!(
            divided(first, second, SplitReason::Refused),
            vec![Split {
                xact: 7,
                keys: 1,
                txns: None,
                reason: SplitReason::Refused,
            }]
        );
        let (first, second) = txn.split_at(3);
        assert!(divided(first, second, SplitReason::Refused).is_empty());
    }
}
