//! `CompactionRecovery`: brings the mirror to etcd's state at one revision R
//! when the watch cannot (docs/design.md G5): the initial snapshot (empty checkpoint)
//! and the resync after the watch's revision was compacted away.
//!
//! Both are one algorithm: walk etcd (range reads at R) and the mirror in key
//! order, page by page, and feed every difference to the apply transaction as
//! an observed state. Memory stays bounded by a page; the planner keeps keys
//! with pending PostgreSQL changes as conflicts instead of overwriting them.
//! The history marks what it learns this way `snapshot` or `resync`: the
//! revisions in between are unknown and are not invented.

use eps_core::audit::AuditKind;
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, AtomicResponse, Context, Handler, Message, Supervised, WrapFuture};
use eps_core::Classify;
use eps_core::mapping::Mapping;
use eps_core::model::{KeyValue, Origin};
use eps_core::reconcile::KeyInput;
use eps_etcd::EtcdError;
use eps_store::{ApplyRequest, KeyInputs};
use tokio::sync::mpsc;

use crate::SyncContext;
use crate::diff::{DiffCursor, PAGE_BYTES};
use crate::shell::{ActorError, Progress, Shell};
use crate::telemetry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// No checkpoint yet: the initial snapshot.
    Initial,
    /// The revision after the checkpoint is compacted.
    Compacted {
        checkpoint: i64,
        compact_revision: Option<i64>,
    },
    /// etcd is a new timeline (restored from a backup, replaced): the
    /// mirror follows it, recording every value this rolls back.
    TimelineChanged { checkpoint: i64 },
    /// Mirror tables were created while the checkpoint was past etcd's keys
    /// under their prefixes (a mapping added, a table dropped and created
    /// again): they are filled from etcd at the checkpoint.
    MirrorTablesCreated { checkpoint: i64 },
}

/// Resyncs and returns the new checkpoint R.
///
/// The handler holds this actor for the whole walk (one resync at a time;
/// actix's atomic response also holds the actor's own timers, so its shell
/// cannot watch the walk). So the walk reports its progress to `waiting`,
/// the progress of the actor that waits for it: a long walk that moves is
/// not taken for a stuck waiter, and one that stops moving for the
/// waiter's watchdog ends with `Stalled` rather than hold both actors.
#[derive(Message)]
#[rtype(result = "Result<i64, ActorError>")]
pub struct Resync {
    pub reason: ResyncReason,
    pub waiting: Arc<Progress>,
}

pub struct CompactionRecovery {
    ctx: Arc<SyncContext>,
    shell: Shell,
}

impl CompactionRecovery {
    pub fn new(ctx: Arc<SyncContext>, alive: mpsc::Sender<()>) -> Self {
        let shell = Shell::new(
            "compaction_recovery",
            ctx.kill.clone(),
            ctx.board.clone(),
            ctx.config.backoff(),
            alive,
        )
        .with_watchdog(std::time::Duration::MAX / 2);
        CompactionRecovery { ctx, shell }
    }
}

impl Actor for CompactionRecovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Resyncs come as messages; the loop runs the leader's housekeeping,
        // as a task of its own rather than a future of this actor: while a
        // resync holds the actor (an atomic response), actix polls nothing
        // else of it, and a housekeeping transaction left open meanwhile
        // would hold its locks against the resync's writes.
        let task =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(maintenance(self.ctx.clone())));
        let body = async move {
            task.await
                .map_err(|e| ActorError::Internal(format!("housekeeping task: {e}")))?
        };
        self.shell.spawn_loop(ctx, body);
    }
}

impl Supervised for CompactionRecovery {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shell.restarting();
    }
}

impl Handler<Resync> for CompactionRecovery {
    type Result = AtomicResponse<Self, Result<i64, ActorError>>;

    fn handle(&mut self, msg: Resync, _ctx: &mut Context<Self>) -> Self::Result {
        let ctx = self.ctx.clone();
        let progress = self.shell.progress.clone();
        let stall = crate::watcher::watchdog(&ctx.config);
        let kill = ctx.kill.clone();
        let walk = resync(ctx, msg.reason, progress.clone());
        AtomicResponse::new(Box::pin(
            relayed(walk, progress, msg.waiting, stall, kill).into_actor(self),
        ))
    }
}

/// Runs `walk`, passing its progress (`own`) on to `waiting` every
/// second, and ends it with `Stalled` once it has not moved for about
/// `stall` (the waiter's watchdog), or when the term ends.
async fn relayed<F>(
    walk: F,
    own: Arc<Progress>,
    waiting: Arc<Progress>,
    stall: std::time::Duration,
    kill: tokio_util::sync::CancellationToken,
) -> Result<i64, ActorError>
where
    F: std::future::Future<Output = Result<i64, ActorError>>,
{
    let relay_every = std::time::Duration::from_secs(1).min(stall / 4);
    // Before the waiter's own watchdog would fire (its progress lags this
    // walk's by up to two relays).
    let give_up = stall.saturating_sub(relay_every * 2);
    own.tick();
    tokio::pin!(walk);
    let mut every = tokio::time::interval(relay_every);
    loop {
        tokio::select! {
            result = &mut walk => return result,
            // The actor's own kill switch is not polled while it waits.
            _ = kill.cancelled() => return Err(ActorError::Fenced),
            _ = every.tick() => {
                let idle = own.idle();
                if idle >= give_up {
                    return Err(ActorError::Stalled(format!(
                        "resync made no progress for {} s", idle.as_secs()
                    )));
                }
                if idle < relay_every * 2 {
                    waiting.tick();
                }
            }
        }
    }
}

/// The leader's housekeeping: retention of the audit trail and history
/// (hourly) and anti-entropy every `sync.anti_entropy_interval_secs` (off
/// when 0).
async fn maintenance(ctx: Arc<SyncContext>) -> Result<(), ActorError> {
    use std::time::Duration;
    let verify_every = match ctx.config.sync.anti_entropy_interval_secs {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    };
    let retention_every = Duration::from_secs(3600);
    let mut next_verify = verify_every.map(|every| Instant::now() + every);
    let mut next_retention = Instant::now() + Duration::from_secs(60);
    let commits_every = Duration::from_secs(60);
    let mut next_commits = Instant::now() + commits_every;
    // Partitions are made ahead of the sync, first thing in a term (a
    // first snapshot may bring a whole etcd's keys).
    let partitions_every = Duration::from_secs(300);
    let mut next_partitions = Instant::now();
    loop {
        let wake = next_verify
            .map_or(next_retention, |v| v.min(next_retention))
            .min(next_commits)
            .min(next_partitions);
        tokio::time::sleep_until(wake.into()).await;
        if Instant::now() >= next_partitions {
            // A failure (a user's long query holding the history) waits
            // for the next round; the rest of the housekeeping goes on.
            if let Err(error) = extend_history(&ctx).await {
                if matches!(error, ActorError::Fenced) {
                    return Err(error);
                }
                tracing::warn!(%error, "history partitions not extended");
            }
            next_partitions = Instant::now() + partitions_every;
        }
        if Instant::now() >= next_commits {
            ctx.store.forget_old_commits().await?;
            next_commits = Instant::now() + commits_every;
        }
        if Instant::now() >= next_retention {
            retention(&ctx).await?;
            next_retention = Instant::now() + retention_every;
        }
        if let (Some(at), Some(every)) = (next_verify, verify_every)
            && Instant::now() >= at
        {
            anti_entropy(&ctx).await?;
            next_verify = Some(Instant::now() + every);
        }
    }
}

/// How much time one history partition is sized for.
fn partition_period(config: &eps_core::Config) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(config.sync.history_partition_days) * 86_400)
}

/// Keeps history partitions ahead of the sync (see `partitions::extend`):
/// up to etcd's revision once the watcher has checked that etcd is the
/// history the mirror follows.
async fn extend_history(ctx: &SyncContext) -> Result<(), ActorError> {
    let at_least = if ctx.is_etcd_checked() {
        ctx.etcd.current_revision().await?
    } else {
        0
    };
    let made = ctx
        .store
        .extend_history(&ctx.fence, partition_period(&ctx.config), at_least, false)
        .await?;
    if made > 0 {
        tracing::info!(made, "history partitions made ahead of the sync");
    }
    Ok(())
}

async fn retention(ctx: &SyncContext) -> Result<(), ActorError> {
    let sync = &ctx.config.sync;
    let (events, history, clock_samples) = ctx
        .store
        .purge(
            &ctx.fence,
            sync.events_retention_days,
            sync.history_retention_days,
            sync.clock_retention_days,
        )
        .await?;
    if events + history + clock_samples > 0 {
        tracing::info!(
            events,
            history,
            clock_samples,
            "retention removed old audit events, history rows and revision clock samples"
        );
        let detail = serde_json::json!({
            "events": events,
            "history_rows": history,
            "clock_samples": clock_samples,
        });
        ctx.store
            .record_event(&ctx.fence, AuditKind::Retention, None, &detail)
            .await?;
    }
    Ok(())
}

/// Compares etcd with the mirror and repairs drift by policy (not before
/// the watcher has checked that etcd is the history the mirror follows).
async fn anti_entropy(ctx: &SyncContext) -> Result<(), ActorError> {
    if !ctx.is_etcd_checked() {
        tracing::debug!("anti-entropy skipped: etcd not checked yet");
        return Ok(());
    }
    let options = crate::verify::VerifyOptions {
        prefix: None,
        repair: true,
        page_size: ctx.config.sync.snapshot_page_size,
        settle: std::time::Duration::from_secs(2),
        progress: None,
    };
    let report = crate::verify::verify(
        &ctx.etcd,
        &ctx.store,
        &ctx.mappings,
        Some(&ctx.fence),
        &options,
        |mapping, difference, outcome| {
            tracing::warn!(table = %mapping.table, key = %eps_core::keys::display_key(&difference.key), kind = %difference.kind(), ?outcome, "drift");
        },
        |_| {},
    )
    .await?;
    metrics::gauge!(telemetry::DRIFTED_KEYS).set(report.differences() as f64);
    let detail = serde_json::json!({"source": "anti-entropy", "report": report});
    ctx.store
        .record_event(&ctx.fence, AuditKind::Verify, None, &detail)
        .await?;
    if report.differences() > 0 {
        tracing::warn!(
            differences = report.differences(),
            repaired = report.repaired,
            "anti-entropy found drift"
        );
        ctx.wake_poller.notify_one();
    }
    Ok(())
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Counts {
    keys_scanned: u64,
    differences: u64,
    upserts: u64,
    deletes: u64,
    conflicts: u64,
    /// Values of PostgreSQL's a new timeline replaced (recorded).
    rolled_back: u64,
    /// Rows of `pg-to-etcd` tables queued again for a new timeline that
    /// lacked their values.
    pushed: u64,
}

/// After a new timeline was followed: the tables whose rows only flow to
/// etcd (`pg-to-etcd`) are the source of their keys, and the restored etcd
/// may lack what was written since its backup. Every key that differs is
/// queued again from PostgreSQL (as `verify --repair` does), based on
/// etcd's current state; a row whose value etcd holds takes etcd's
/// metadata.
async fn push_pg_to_etcd_tables(
    ctx: &SyncContext,
    progress: &Arc<Progress>,
) -> Result<u64, ActorError> {
    let one_way: Vec<Mapping> = ctx
        .mappings
        .iter()
        .filter(|m| !m.direction.etcd_to_pg())
        .cloned()
        .collect();
    if one_way.is_empty() {
        return Ok(0);
    }
    let options = crate::verify::VerifyOptions {
        prefix: None,
        repair: true,
        page_size: ctx.config.sync.snapshot_page_size,
        settle: std::time::Duration::ZERO,
        progress: Some(progress.clone()),
    };
    let report = crate::verify::verify(
        &ctx.etcd,
        &ctx.store,
        &eps_core::mapping::MappingSet::new(one_way),
        Some(&ctx.fence),
        &options,
        |_, _, _| {},
        |_| {},
    )
    .await?;
    if report.repaired > 0 {
        tracing::warn!(
            queued = report.repaired,
            "the new etcd timeline lacked values of pg-to-etcd tables: queued again"
        );
        ctx.wake_poller.notify_one();
    }
    Ok(report.repaired)
}

/// Runs a resync until it completes at one revision (a compaction racing
/// the walk restarts it at a newer revision).
pub async fn resync(
    ctx: Arc<SyncContext>,
    reason: ResyncReason,
    progress: Arc<Progress>,
) -> Result<i64, ActorError> {
    // First at the compact revision (everything after it is still in etcd
    // and comes from the watch); if etcd compacts again during the walk,
    // at its head.
    let mut at_compact_revision = true;
    loop {
        match resync_once(&ctx, reason, at_compact_revision, &progress).await {
            Err(ActorError::Etcd(EtcdError::Compacted { .. })) => {
                tracing::warn!(
                    "snapshot revision compacted during the walk, starting over at etcd's head"
                );
                at_compact_revision = false;
                continue;
            }
            other => return other,
        }
    }
}

async fn resync_once(
    ctx: &Arc<SyncContext>,
    reason: ResyncReason,
    at_compact_revision: bool,
    progress: &Arc<Progress>,
) -> Result<i64, ActorError> {
    let started = Instant::now();
    // The smallest revision etcd still knows: only what it destroyed
    // (checkpoint, compact revision] is unknowable.
    let revision = match reason {
        ResyncReason::Compacted {
            compact_revision: Some(compacted),
            ..
        } if at_compact_revision => compacted,
        ResyncReason::MirrorTablesCreated { checkpoint } if at_compact_revision => checkpoint,
        _ => ctx.etcd.current_revision().await?,
    };
    let origin = match reason {
        ResyncReason::Initial => Origin::Snapshot,
        _ => Origin::Resync,
    };
    let mapped: Vec<&Mapping> = ctx
        .mappings
        .iter()
        .filter(|m| m.direction.etcd_to_pg())
        .collect();
    let tables: Vec<&str> = mapped.iter().map(|m| m.table.as_str()).collect();
    // New tables alone, at the unchanged checkpoint, when etcd still has it;
    // otherwise every table, at the new revision.
    let walked: Vec<&Mapping> = match reason {
        ResyncReason::MirrorTablesCreated { checkpoint } if revision == checkpoint => {
            let unsynced = ctx.store.unsynced_tables(&tables).await?;
            mapped
                .into_iter()
                .filter(|m| unsynced.iter().any(|t| t == m.table.as_str()))
                .collect()
        }
        _ => mapped,
    };
    tracing::info!(?reason, revision, tables = walked.len(), "resync started");
    // The walk writes history rows up to `revision`: partitions for them
    // first, or they would all land in the default one (from which the
    // next extension moves them, under a lock: so a failure here, e.g. a
    // user's long query on the history, only costs that).
    if let Err(error) = ctx
        .store
        .extend_history(&ctx.fence, partition_period(&ctx.config), revision, true)
        .await
    {
        if matches!(error, eps_store::StoreError::Fenced { .. }) {
            return Err(error.into());
        }
        tracing::warn!(%error, "history partitions not made ahead of the resync");
    }
    let walked_tables: Vec<&str> = walked.iter().map(|m| m.table.as_str()).collect();
    // After etcd went back, inputs deferred for held rows belong to the
    // history it lost. On the same timeline they are changes etcd made, in
    // order: they stay, and go before what the walk reads (an apply takes
    // a key's deferred inputs back first), so their history is recorded
    // when they are applied — nothing is dropped in a transaction of its
    // own that a crash could separate from the end of the resync.
    if matches!(
        reason,
        ResyncReason::TimelineChanged { .. } | ResyncReason::Initial
    ) {
        let discarded = ctx
            .store
            .discard_deferred(&ctx.fence, &walked_tables)
            .await?;
        if discarded > 0 {
            tracing::info!(discarded, "deferred inputs of a lost history discarded");
        }
    }
    // The keys of a parallel catch-up's ranges that are past `revision`
    // are applied further than the walk reads: left alone (the walk would
    // set them back, and take a SQL write on a key such a range deleted
    // for a conflict with etcd's older state). The ranges stay, and the
    // watch from `revision` leaves out what they applied.
    let mut ahead = ctx.store.catchup_ranges().await?;
    ahead.0.retain(|r| r.applied_revision > revision);
    // A table not in sync yet is marked so only when the walk filled it
    // whole: with keys left alone, the stream fills it once the
    // checkpoint has passed the ranges.
    let unsynced = if ahead.is_empty() {
        Vec::new()
    } else {
        ctx.store.unsynced_tables(&walked_tables).await?
    };
    let filled: Vec<&str> = walked_tables
        .iter()
        .copied()
        .filter(|t| !unsynced.iter().any(|u| u == t))
        .collect();
    let walked_relids = ctx.store.table_relids(&filled).await?;
    let mut counts = Counts::default();
    for mapping in &walked {
        let rollbacks = matches!(reason, ResyncReason::TimelineChanged { .. });
        let at = WalkAt {
            revision,
            origin,
            rollbacks,
            ahead: &ahead,
        };
        walk(ctx, mapping, &at, progress, &mut counts).await?;
    }
    // Before the resync is finished: an interruption pushes again.
    if matches!(reason, ResyncReason::TimelineChanged { .. }) {
        counts.pushed = push_pg_to_etcd_tables(ctx, progress).await?;
    }
    ctx.store
        .finish_resync(&ctx.fence, revision, &walked_relids)
        .await?;
    let (kind, from) = match reason {
        ResyncReason::Initial => (AuditKind::Snapshot, 0),
        ResyncReason::Compacted { checkpoint, .. } => (AuditKind::CompactionRecovery, checkpoint),
        ResyncReason::TimelineChanged { checkpoint } => (AuditKind::TimelineResync, checkpoint),
        ResyncReason::MirrorTablesCreated { checkpoint } => {
            (AuditKind::MirrorTablesFilled, checkpoint)
        }
    };
    let compact_revision = match reason {
        ResyncReason::Compacted {
            compact_revision, ..
        } => compact_revision,
        _ => None,
    };
    let detail = serde_json::json!({
        "tables": walked_tables,
        "gap_from": from,
        "gap_to": revision,
        "compact_revision": compact_revision,
        "counts": counts,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    ctx.store
        .record_event(&ctx.fence, kind, None, &detail)
        .await?;
    if kind == AuditKind::CompactionRecovery {
        metrics::counter!(telemetry::COMPACTION_RECOVERIES_TOTAL).increment(1);
    }
    tracing::info!(
        kind = kind.as_str(),
        revision,
        keys = counts.keys_scanned,
        differences = counts.differences,
        conflicts = counts.conflicts,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "resync done"
    );
    Ok(revision)
}

/// Apply transactions of one walk in flight at once, at most: the next
/// pages are read and compared (etcd, then the mirror) while earlier chunks
/// are written. The chunks are disjoint key ranges, in key order; each is
/// its own transaction (the fence is taken FOR SHARE: they run alongside
/// each other and the poller's marks), and the checkpoint
/// moves only after the walk, once every one of them committed. Measured
/// (`eps-bench snapshot --quick`, 50,000 keys): 22.9k keys/s one at a time,
/// 36k with 2, 43k with 3.
const APPLIES_IN_FLIGHT: usize = 3;

/// Pool connections a walk leaves to the others: the cursor's mirror
/// reads, the poller, the arbiter and the health checks.
const POOL_LEFT_DURING_WALK: usize = 4;

/// What a walk reads and records.
#[derive(Clone, Copy)]
struct WalkAt<'a> {
    /// The etcd revision read.
    revision: i64,
    /// The history origin of what it finds.
    origin: Origin,
    /// Record every value of PostgreSQL's the walk replaces (a new timeline).
    rollbacks: bool,
    /// Catch-up ranges past `revision`: their keys are left alone.
    ahead: &'a eps_store::catchup::Ranges,
}

/// Feeds every difference between etcd at `at.revision` and the mirror
/// over one mapping's range to the apply transaction, a chunk at a time.
async fn walk(
    ctx: &Arc<SyncContext>,
    mapping: &Mapping,
    at: &WalkAt<'_>,
    progress: &Arc<Progress>,
    counts: &mut Counts,
) -> Result<(), ActorError> {
    let WalkAt {
        revision,
        origin,
        rollbacks,
        ahead,
    } = *at;
    let page_size = ctx.config.sync.snapshot_page_size;
    let mut cursor = DiffCursor::new(&ctx.etcd, &ctx.store, mapping, revision, page_size, None)
        .with_progress(progress.clone());
    let mut chunk: Vec<KeyInputs> = Vec::new();
    let mut chunk_bytes = 0usize;
    let observed_at = Instant::now();
    let mut scanned = 0u64;
    let mut last_log = Instant::now();
    // Aborted when dropped: an error ends the walk and the chunks with it
    // (the resync starts over; nothing moved the checkpoint).
    let mut applying: Applying = tokio::task::JoinSet::new();
    // Chunks whose apply failed in a way a retry may mend (two chunks
    // settling one PostgreSQL transaction deadlocked, a lock timed out):
    // applied again, one at a time, once the others are done.
    let mut again: Vec<Vec<KeyInputs>> = Vec::new();
    while let Some(difference) = cursor.next().await.map_err(ActorError::from)? {
        if last_log.elapsed() > std::time::Duration::from_secs(5) {
            tracing::info!(table = %mapping.table, keys = cursor.etcd_keys, differences = counts.differences, "resync progress");
            last_log = Instant::now();
        }
        if ahead.applied(&difference.key).is_some() {
            continue;
        }
        counts.differences += 1;
        let input = match difference.etcd {
            Some(kv) => present(kv, revision, origin),
            None => absent(difference.key, revision, origin),
        };
        chunk_bytes += input.key.len() + input_bytes(&input.inputs);
        chunk.push(input);
        if chunk.len() >= page_size || chunk_bytes >= PAGE_BYTES {
            let in_flight = (ctx.config.postgres.pool_size as usize)
                .saturating_sub(POOL_LEFT_DURING_WALK)
                .clamp(1, APPLIES_IN_FLIGHT);
            if applying.len() >= in_flight {
                joined(ctx, &mut applying, counts, &mut again).await?;
            }
            let ctx = ctx.clone();
            let keys = std::mem::take(&mut chunk);
            applying.spawn(async move {
                let applied = apply_chunk(&ctx, &keys, observed_at, rollbacks).await;
                (keys, applied)
            });
            chunk_bytes = 0;
        }
        if cursor.etcd_keys > scanned {
            metrics::counter!(telemetry::SNAPSHOT_KEYS_TOTAL).increment(cursor.etcd_keys - scanned);
            scanned = cursor.etcd_keys;
            progress.tick();
        }
    }
    metrics::counter!(telemetry::SNAPSHOT_KEYS_TOTAL).increment(cursor.etcd_keys - scanned);
    counts.keys_scanned += cursor.etcd_keys;
    while !applying.is_empty() {
        joined(ctx, &mut applying, counts, &mut again).await?;
        progress.tick();
    }
    if !chunk.is_empty() {
        again.push(chunk);
    }
    for keys in again {
        let report = apply_chunk(ctx, &keys, observed_at, rollbacks).await?;
        tally(ctx, counts, &report);
        progress.tick();
    }
    Ok(())
}

/// Chunks being applied; each task gives its chunk back with the outcome.
type Applying = tokio::task::JoinSet<(Vec<KeyInputs>, Result<eps_store::ApplyReport, ActorError>)>;

/// Waits for one chunk in flight and counts it; a chunk that failed in a
/// way a retry may mend goes to `again`.
async fn joined(
    ctx: &SyncContext,
    applying: &mut Applying,
    counts: &mut Counts,
    again: &mut Vec<Vec<KeyInputs>>,
) -> Result<(), ActorError> {
    match applying.join_next().await {
        Some(Ok((_, Ok(report)))) => {
            tally(ctx, counts, &report);
            Ok(())
        }
        Some(Ok((keys, Err(error)))) if error.retryable() && !error.connection_level() => {
            tracing::info!(%error, keys = keys.len(), "resync chunk failed alongside others; applying it again alone");
            again.push(keys);
            Ok(())
        }
        Some(Ok((_, Err(error)))) => Err(error),
        Some(Err(error)) => Err(ActorError::Internal(format!("resync apply task: {error}"))),
        None => Ok(()),
    }
}

fn present(kv: KeyValue, revision: i64, origin: Origin) -> KeyInputs {
    KeyInputs {
        key: kv.key.clone(),
        inputs: vec![KeyInput::Observed {
            state: Some(kv),
            revision,
            origin,
        }],
    }
}

fn absent(key: Vec<u8>, revision: i64, origin: Origin) -> KeyInputs {
    KeyInputs {
        key,
        inputs: vec![KeyInput::Observed {
            state: None,
            revision,
            origin,
        }],
    }
}

fn input_bytes(inputs: &[KeyInput]) -> usize {
    inputs
        .iter()
        .map(|i| match i {
            KeyInput::Observed {
                state: Some(kv), ..
            } => kv.value.len(),
            KeyInput::Event(e) => e.value.len(),
            KeyInput::Observed { state: None, .. } => 0,
        })
        .sum()
}

/// Applies one chunk of differences. `rollbacks`: a resync onto a new
/// timeline, which records every value of PostgreSQL's it replaces.
async fn apply_chunk(
    ctx: &SyncContext,
    chunk: &[KeyInputs],
    observed_at: Instant,
    rollbacks: bool,
) -> Result<eps_store::ApplyReport, ActorError> {
    let request = ApplyRequest {
        fence: &ctx.fence,
        checkpoint: None,
        catchup_range: None,
        observed_at,
        trace_id: None,
        keys: chunk,
        record_history: true,
        repair: None,
        echo_traces: None,
        audit_batch: false,
        defer_held: true,
        record_rollbacks: rollbacks,
    };
    Ok(ctx.store.apply(&request).await?)
}

/// Counts what one chunk's apply did.
fn tally(ctx: &SyncContext, counts: &mut Counts, report: &eps_store::ApplyReport) {
    ctx.dropped_with_transactions(report);
    counts.rolled_back += report.rolled_back as u64;
    counts.upserts += report.mirror_upserts as u64;
    counts.deletes += report.mirror_deletes as u64;
    counts.conflicts += report.conflicts.len() as u64;
    telemetry::count_conflicts(&report.conflicts);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_walk_that_moves_is_relayed_and_one_that_stops_ends_stalled() {
        let stall = Duration::from_millis(400);
        // Moves for a while (twice the stall), then finishes.
        let (own, waiting) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
        let walk = {
            let own = own.clone();
            async move {
                for _ in 0..16 {
                    own.tick();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(7)
            }
        };
        let result = relayed(walk, own, waiting.clone(), stall, Default::default()).await;
        assert_eq!(result.ok(), Some(7));
        assert!(
            waiting.idle() < Duration::from_millis(300),
            "the waiter saw the walk move: idle {:?}",
            waiting.idle()
        );
        // Never moves: ends, and the waiter saw nothing.
        let (own, waiting) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
        waiting.tick();
        let started = std::time::Instant::now();
        let result = relayed(
            std::future::pending(),
            own,
            waiting.clone(),
            stall,
            Default::default(),
        )
        .await;
        assert!(matches!(result, Err(ActorError::Stalled(_))), "{result:?}");
        assert!(started.elapsed() >= stall / 2);
        // The waiter is ticked while the walk's last tick is under two
        // relays (stall / 4 each) old, so its idle time at the end is about
        // one relay: less by the timers' jitter on a loaded machine.
        assert!(waiting.idle() >= stall / 8, "idle {:?}", waiting.idle());
    }
}
