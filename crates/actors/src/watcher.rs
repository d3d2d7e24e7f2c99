//! `EtcdWatcher`: etcd → PostgreSQL. A state machine: no
//! checkpoint → snapshot at R → watch from R+1; compacted → resync; then
//! stream events in batches, each batch one PostgreSQL transaction together
//! with the new checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Supervised, WeakAddr};
use eps_core::config::OnEtcdRestore;
use eps_core::model::EtcdEvent;
use eps_core::reconcile::KeyInput;
use eps_etcd::{WatchItem, WatchSession};
use eps_store::catchup::Ranges;
use eps_store::{ApplyRequest, KeyInputs};
use opentelemetry::trace::TraceContextExt;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::SyncContext;
use crate::recovery::{CompactionRecovery, Resync, ResyncReason};
use crate::shell::{ActorError, Progress, Shell};
use crate::telemetry;
use crate::tracing_ids;

pub struct EtcdWatcher {
    ctx: Arc<SyncContext>,
    recovery: WeakAddr<CompactionRecovery>,
    shell: Shell,
}

impl EtcdWatcher {
    pub fn new(
        ctx: Arc<SyncContext>,
        recovery: WeakAddr<CompactionRecovery>,
        alive: mpsc::Sender<()>,
    ) -> Self {
        let shell = Shell::new(
            "etcd_watcher",
            ctx.kill.clone(),
            ctx.board.clone(),
            ctx.config.backoff(),
            alive,
        )
        // A resync relays its walk's progress (per page); the stream
        // reports at least every progress interval.
        .with_watchdog(watchdog(&ctx.config));
        EtcdWatcher {
            ctx,
            recovery,
            shell,
        }
    }
}

/// How long the watcher may go without progress before its shell restarts
/// it (a silent watch, a stuck apply, a resync that stopped moving).
pub fn watchdog(config: &eps_core::Config) -> Duration {
    Duration::from_millis(config.sync.watch_stall_timeout_ms) * 4
}

impl Actor for EtcdWatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let body = run(
            self.ctx.clone(),
            self.recovery.clone(),
            self.shell.progress.clone(),
        );
        self.shell.spawn_loop(ctx, body);
    }
}

impl Supervised for EtcdWatcher {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shell.restarting();
    }
}

async fn resync(
    recovery: &WeakAddr<CompactionRecovery>,
    reason: ResyncReason,
    progress: &Arc<Progress>,
) -> Result<i64, ActorError> {
    let addr = recovery
        .upgrade()
        .ok_or_else(|| ActorError::Internal("compaction recovery actor is gone".into()))?;
    // The walk's progress is this actor's while it waits (see `Resync`).
    addr.send(Resync {
        reason,
        waiting: progress.clone(),
    })
    .await?
}

async fn run(
    ctx: Arc<SyncContext>,
    recovery: WeakAddr<CompactionRecovery>,
    progress: Arc<Progress>,
) -> Result<(), ActorError> {
    ctx.etcd_checked.send_replace(false);
    // Unchecked again as soon as this incarnation ends (its restart waits
    // out a backoff, during which etcd may be restored).
    let _unchecked = Unchecked(&ctx);
    let state = ctx.store.state().await?;
    let probe = ctx.mappings.iter().next().map_or(&[][..], |m| &m.prefix);
    let (cluster_id, current) = ctx.etcd.identity(probe).await?;
    // Stored as PostgreSQL's bigint: the same 64 bits.
    let cluster_id = cluster_id as i64;
    let mut checkpoint = state.applied_revision;
    // A compacted checkpoint is reported by the watch itself, with the
    // compact revision the resync starts from.
    if state.timeline_resync {
        // A resync onto a new timeline was interrupted: finish it.
        checkpoint = resync(
            &recovery,
            ResyncReason::TimelineChanged { checkpoint },
            &progress,
        )
        .await?;
    } else if checkpoint == 0 {
        ctx.store.record_cluster_id(&ctx.fence, cluster_id).await?;
        checkpoint = resync(&recovery, ResyncReason::Initial, &progress).await?;
    } else if let Some(evidence) = new_timeline(&ctx, &state, cluster_id, current).await? {
        let follow = match ctx.config.sync.on_etcd_restore {
            OnEtcdRestore::FollowEtcd => true,
            OnEtcdRestore::Pause => hold(&ctx, &progress, &evidence, probe).await?,
        };
        if follow {
            checkpoint = follow_new_timeline(
                &ctx, &recovery, cluster_id, &evidence, checkpoint, &progress,
            )
            .await?;
        }
    } else {
        // etcd is the one the mirror follows: a hold left from an etcd put
        // back since (or by an older leader) no longer applies.
        release_hold(&ctx, &state).await?;
        if state.etcd_cluster_id != Some(cluster_id) {
            ctx.store.record_cluster_id(&ctx.fence, cluster_id).await?;
        }
    }
    // Tables this leader does not keep in sync are marked so: if their
    // mapping comes back, they are filled again.
    ctx.store
        .unsync_unmapped(&ctx.fence, &etcd_to_pg_tables(&ctx))
        .await?;
    // Not while a parallel catch-up's ranges are past the checkpoint: the
    // walk at the checkpoint would set their keys back (the stream fills
    // the new tables once the checkpoint has passed them).
    if !unsynced_tables(&ctx).await?.is_empty() && ctx.store.catchup_ranges().await?.is_empty() {
        checkpoint = resync(
            &recovery,
            ResyncReason::MirrorTablesCreated { checkpoint },
            &progress,
        )
        .await?;
    }
    let mut mark = TimelineMark::new(&ctx);
    mark.write_if_due(&ctx, checkpoint).await?;
    ctx.applied.send_replace(checkpoint);
    ctx.etcd_checked.send_replace(true);
    metrics::gauge!(telemetry::APPLIED_REVISION).set(checkpoint as f64);
    // Far behind etcd: replay the backlog in parallel key ranges first.
    let mut skip = Ranges::default();
    let mut ended = match crate::catchup::run(&ctx, &progress, checkpoint).await? {
        crate::catchup::Outcome::Caught {
            checkpoint: caught,
            skip: ahead,
        } => {
            checkpoint = caught;
            skip = ahead;
            None
        }
        crate::catchup::Outcome::Compacted { compact_revision } => {
            Some(StreamEnd::Compacted { compact_revision })
        }
    };
    ctx.applied.send_replace(checkpoint);
    metrics::gauge!(telemetry::APPLIED_REVISION).set(checkpoint as f64);
    loop {
        progress.tick();
        let end = match ended.take() {
            Some(end) => end,
            None => stream(&ctx, &progress, &mut checkpoint, &mut mark, &skip).await?,
        };
        match end {
            StreamEnd::MirrorTablesCreated => {
                tracing::warn!(
                    checkpoint,
                    "mirror tables were created: filling them from etcd"
                );
                checkpoint = resync(
                    &recovery,
                    ResyncReason::MirrorTablesCreated { checkpoint },
                    &progress,
                )
                .await?;
                ctx.applied.send_replace(checkpoint);
            }
            StreamEnd::Compacted { compact_revision } => {
                tracing::warn!(
                    checkpoint,
                    compact_revision,
                    "watch revision compacted, resyncing"
                );
                checkpoint = resync(
                    &recovery,
                    ResyncReason::Compacted {
                        checkpoint,
                        compact_revision: Some(compact_revision),
                    },
                    &progress,
                )
                .await?;
                ctx.applied.send_replace(checkpoint);
            }
        }
        // The resync left the catch-up ranges past its revision.
        skip = ctx.store.catchup_ranges().await?;
    }
}

/// Follows etcd's history as a new timeline (restored from a backup or
/// replaced): begins it — consuming an operator's answer to a hold — and
/// resyncs the mirror onto it. Returns the new checkpoint.
async fn follow_new_timeline(
    ctx: &SyncContext,
    recovery: &WeakAddr<CompactionRecovery>,
    cluster_id: i64,
    evidence: &serde_json::Value,
    checkpoint: i64,
    progress: &Arc<Progress>,
) -> Result<i64, ActorError> {
    tracing::error!(
        %evidence,
        "etcd is not the one the mirror follows (restored from a backup or replaced): \
         following its history as a new timeline"
    );
    ctx.board.record_error(
        "etcd_watcher",
        &format!("etcd restored or replaced: following its history as a new timeline ({evidence})"),
    );
    ctx.store
        .begin_timeline(&ctx.fence, cluster_id, evidence)
        .await?;
    ctx.timeline_epoch
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    resync(
        recovery,
        ResyncReason::TimelineChanged { checkpoint },
        progress,
    )
    .await
}

/// `sync.on_etcd_restore = "pause"`: holds the new timeline (recorded,
/// audited `timeline-paused`, `/readyz` failing and the alert firing on
/// every replica) until an operator answers with `etcd-pg-sync timeline
/// resume --take etcd|pg` (true: follow it) or etcd turns out to be the
/// one the mirror follows again — the original put back (false: the hold
/// is released). Nothing is applied or written to etcd meanwhile (the etcd
/// check stays unpassed). Any leader picks the hold up again.
async fn hold(
    ctx: &SyncContext,
    progress: &Progress,
    evidence: &serde_json::Value,
    probe: &[u8],
) -> Result<bool, ActorError> {
    if ctx.store.hold_timeline(&ctx.fence, evidence).await? {
        tracing::error!(
            %evidence,
            "etcd is not the one the mirror follows (restored from a backup or replaced): \
             sync paused until an operator runs `etcd-pg-sync timeline resume --take etcd|pg`"
        );
    }
    ctx.board.record_error(
        "etcd_watcher",
        "etcd restored or replaced: sync paused for an operator (`etcd-pg-sync timeline resume`)",
    );
    loop {
        progress.tick();
        let state = ctx.store.state().await?;
        if let Some(decision) = state.timeline_decision {
            tracing::warn!(
                decision = decision.as_str(),
                "operator answered the paused timeline: resuming"
            );
            return Ok(true);
        }
        let (cluster_id, current) = ctx.etcd.identity(probe).await?;
        if new_timeline(ctx, &state, cluster_id as i64, current)
            .await?
            .is_none()
        {
            release_hold(ctx, &state).await?;
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Releases a hold that no longer applies: etcd is the one the mirror
/// follows.
async fn release_hold(ctx: &SyncContext, state: &eps_store::SyncState) -> Result<(), ActorError> {
    let Some(held) = &state.timeline_hold else {
        return Ok(());
    };
    let detail =
        serde_json::json!({"held": held, "reason": "etcd is the one the mirror follows again"});
    if ctx.store.release_timeline_hold(&ctx.fence, &detail).await? {
        tracing::warn!("etcd is the one the mirror follows again: the paused timeline is released");
    }
    Ok(())
}

enum StreamEnd {
    Compacted { compact_revision: i64 },
    MirrorTablesCreated,
}

/// Why etcd is not the history the mirror follows, if it is not: another
/// cluster id, a revision behind the checkpoint, or the last change the
/// mirror applied missing at its revision (a cluster restored from a
/// backup keeps its id, and may have passed the old checkpoint by the time
/// the service sees it). A compacted revision proves nothing either way.
async fn new_timeline(
    ctx: &SyncContext,
    state: &eps_store::SyncState,
    cluster_id: i64,
    current: i64,
) -> Result<Option<serde_json::Value>, ActorError> {
    let base = serde_json::json!({
        "old_cluster_id": state.etcd_cluster_id.map(|id| format!("{:x}", id as u64)),
        "new_cluster_id": format!("{:x}", cluster_id as u64),
        "checkpoint": state.applied_revision,
        "etcd_revision": current,
        "old_timeline": state.timeline,
    });
    let with = |reason: &str| {
        let mut detail = base.clone();
        detail["reason"] = serde_json::json!(reason);
        Some(detail)
    };
    if state
        .etcd_cluster_id
        .is_some_and(|stored| stored != cluster_id)
    {
        return Ok(with("cluster-id"));
    }
    // A parallel catch-up's ranges may be ahead of the checkpoint.
    let applied = ctx
        .store
        .catchup_ranges()
        .await?
        .0
        .iter()
        .map(|r| r.applied_revision)
        .fold(state.applied_revision, i64::max);
    if applied > current {
        return Ok(with("revision-went-back"));
    }
    if let Some((expected, found)) = TimelineMark::missing(ctx, state).await? {
        let mut detail = with("mark-missing").unwrap_or_default();
        detail["mark_expected"] = serde_json::json!(expected);
        detail["mark_found"] = serde_json::json!(found);
        return Ok(Some(detail));
    }
    let Some((key, revision, value)) = ctx.store.last_applied_change().await? else {
        return Ok(None);
    };
    let found = match ctx.etcd.get_at(&key, revision).await {
        Ok(found) => found,
        Err(eps_etcd::EtcdError::Compacted { .. }) => return Ok(None),
        // A key the service may no longer read (its mapping or role
        // changed), or one too large to fetch: no evidence either way, and
        // asking again would fail again.
        Err(
            error @ (eps_etcd::EtcdError::PermissionDenied(_)
            | eps_etcd::EtcdError::ResponseTooLarge(_)),
        ) => {
            tracing::warn!(
                key = %eps_core::keys::display_key(&key),
                revision,
                %error,
                "cannot read the last applied change back from etcd: timeline check skipped"
            );
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let same = match (&value, &found) {
        (Some(value), Some(kv)) => kv.meta.mod_revision == revision && &kv.value == value,
        (None, None) => true,
        _ => false,
    };
    if same {
        return Ok(None);
    }
    let mut detail = with("last-change-missing").unwrap_or_default();
    detail["key"] = serde_json::json!(eps_core::keys::display_key(&key));
    detail["key_revision"] = serde_json::json!(revision);
    Ok(Some(detail))
}

/// Clears `SyncContext::etcd_checked` when dropped.
struct Unchecked<'a>(&'a SyncContext);

impl Drop for Unchecked<'_> {
    fn drop(&mut self) {
        self.0.etcd_checked.send_replace(false);
    }
}

/// The timeline mark: a token the leader writes to etcd as the mirror
/// moves on (after the checks of a start, then at most once per progress
/// interval while the checkpoint passes the last mark), recorded in
/// `sync_state` first. An etcd that holds neither the recorded token nor
/// the one being written has lost a revision the mirror applied — restored
/// from a backup older than the mark — even when its revision has since
/// passed the checkpoint and the last applied change is still there.
struct TimelineMark {
    key: Vec<u8>,
    revision: i64,
    written_at: Option<Instant>,
    interval: Duration,
}

impl TimelineMark {
    fn new(ctx: &SyncContext) -> Self {
        TimelineMark {
            key: Self::key(ctx),
            revision: 0,
            written_at: None,
            interval: Duration::from_millis(ctx.config.sync.progress_interval_ms),
        }
    }

    fn key(ctx: &SyncContext) -> Vec<u8> {
        let mut key = eps_core::cluster_prefix(&ctx.config.cluster.name);
        key.extend_from_slice(b"timeline-mark");
        key
    }

    /// The recorded mark and what etcd holds instead, when etcd holds
    /// neither it nor the pending one. A token of this service's that
    /// names a checkpoint at or past the mirror's is no evidence either:
    /// PostgreSQL went back (restored, or failed over to a replica that
    /// had not received the last commits), not etcd.
    async fn missing(
        ctx: &SyncContext,
        state: &eps_store::SyncState,
    ) -> Result<Option<(String, Option<String>)>, ActorError> {
        let Some(expected) = &state.timeline_mark else {
            return Ok(None);
        };
        let key = Self::key(ctx);
        let found = match ctx.etcd.get(&key).await {
            Ok((found, _)) => found.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            Err(error @ eps_etcd::EtcdError::PermissionDenied(_)) => {
                tracing::warn!(
                    key = %eps_core::keys::display_key(&key),
                    %error,
                    "cannot read the timeline mark: grant the service read-write on its prefix"
                );
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        if found.as_ref() == Some(expected) {
            return Ok(None);
        }
        let pending = state.timeline_mark_pending.as_ref();
        if let Some(token) = pending.filter(|token| found.as_ref() == Some(*token)) {
            // Written, not yet confirmed when the last leader stopped.
            ctx.store.confirm_timeline_mark(&ctx.fence, token).await?;
            return Ok(None);
        }
        let ahead = found
            .as_deref()
            .and_then(Self::checkpoint_of)
            .is_some_and(|marked| marked >= state.applied_revision);
        if ahead {
            tracing::warn!(
                found,
                expected,
                checkpoint = state.applied_revision,
                "etcd holds a newer timeline mark than PostgreSQL knows: PostgreSQL went back \
                 (restored, or failed over without its last commits); following etcd on"
            );
            return Ok(None);
        }
        Ok(Some((expected.clone(), found)))
    }

    /// The checkpoint a token was written at (`<term>-<checkpoint>-<nonce>`).
    fn checkpoint_of(token: &str) -> Option<i64> {
        token.split('-').nth(1)?.parse().ok()
    }

    /// Writes a new mark when due. Best effort: a failure (etcd out of
    /// space, a role without write on the key, a timeout) is logged and
    /// tried again at the next batch — sync goes on, with the older mark.
    /// Only a lost leadership ends the incarnation.
    async fn write_if_due(&mut self, ctx: &SyncContext, checkpoint: i64) -> Result<(), ActorError> {
        if checkpoint <= self.revision
            || self
                .written_at
                .is_some_and(|at| at.elapsed() < self.interval)
        {
            return Ok(());
        }
        self.written_at = Some(Instant::now());
        match self.write(ctx, checkpoint).await {
            Ok(revision) => {
                self.revision = revision;
                Ok(())
            }
            Err(ActorError::Fenced) => Err(ActorError::Fenced),
            Err(error) => {
                tracing::warn!(%error, "cannot write the timeline mark; trying again later");
                Ok(())
            }
        }
    }

    async fn write(&self, ctx: &SyncContext, checkpoint: i64) -> Result<i64, ActorError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let token = format!("{}-{checkpoint}-{nanos:x}", ctx.fence.term);
        ctx.store.prepare_timeline_mark(&ctx.fence, &token).await?;
        let written =
            eps_etcd::txn::fenced_put(&ctx.etcd, &ctx.leader, &self.key, token.as_bytes()).await?;
        let revision = written.ok_or(ActorError::Fenced)?;
        ctx.store.confirm_timeline_mark(&ctx.fence, &token).await?;
        Ok(revision)
    }
}

/// The tables of the mappings that etcd's changes flow into.
fn etcd_to_pg_tables(ctx: &SyncContext) -> Vec<&str> {
    ctx.mappings
        .iter()
        .filter(|m| m.direction.etcd_to_pg())
        .map(|m| m.table.as_str())
        .collect()
}

/// The mapped tables `migrate` created since the mirror last matched etcd.
async fn unsynced_tables(ctx: &SyncContext) -> Result<Vec<String>, ActorError> {
    Ok(ctx.store.unsynced_tables(&etcd_to_pg_tables(ctx)).await?)
}

/// How far (KiB of events) the watch reader may run ahead of the applies
/// (shared out among the watches of a parallel catch-up).
pub(crate) const READ_AHEAD_KIB: usize = 64 * 1024;

/// A watch item on its way to a batch, holding its share of the budget.
pub(crate) struct Buffered {
    item: Result<WatchItem, eps_etcd::EtcdError>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// Streams from `checkpoint + 1` until the watch's revision is compacted;
/// errors end the incarnation (the actor restarts from the checkpoint).
/// Changes a parallel catch-up's range applied already (`skip`) are left
/// out.
async fn stream(
    ctx: &Arc<SyncContext>,
    progress: &Progress,
    checkpoint: &mut i64,
    mark: &mut TimelineMark,
    skip: &Ranges,
) -> Result<StreamEnd, ActorError> {
    let sync = &ctx.config.sync;
    let (start, end) = ctx.mappings.covering_range();
    tracing::debug!(from_revision = *checkpoint + 1, "watch starting");
    let session = WatchSession::start(&ctx.etcd, &start, end.as_deref(), *checkpoint + 1).await?;
    tracing::debug!("watch started");
    let (mut requester, items) = session.split();
    let (mut rx, _reader) = read_ahead(items, READ_AHEAD_KIB);

    let progress_interval = Duration::from_millis(sync.progress_interval_ms);
    let stall_timeout = Duration::from_millis(sync.watch_stall_timeout_ms);
    let mut last_heard = Instant::now();
    let mut progress_asked = Instant::now();
    // A replica's `migrate` may create a mirror table (again) while this
    // one leads: looked for once per progress interval.
    let mut tables_checked = Instant::now();
    // Inputs deferred for rows that users' transactions hold are retried
    // this often, so a key converges soon after its row is free.
    let mut deferred = Deferred::new(!ctx.store.deferred_keys(None, 1).await?.is_empty());

    loop {
        // New tables are filled at the checkpoint: once no catch-up range
        // is past it.
        let passed_ranges = skip.0.iter().all(|r| r.applied_revision <= *checkpoint);
        if tables_checked.elapsed() >= progress_interval && passed_ranges {
            tables_checked = Instant::now();
            if !unsynced_tables(ctx).await?.is_empty() {
                return Ok(StreamEnd::MirrorTablesCreated);
            }
        }
        deferred.retry_if_due(ctx, progress_interval).await?;
        // Wait for the first item of the next batch.
        let wait = if deferred.pending {
            DEFERRED_RETRY.min(progress_interval)
        } else {
            progress_interval
        };
        let first = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(item) => item,
            Err(_) => {
                if last_heard.elapsed() > stall_timeout {
                    return Err(ActorError::Stalled(format!(
                        "watch silent for {:?} despite progress requests",
                        last_heard.elapsed()
                    )));
                }
                // Idle: ask etcd to confirm how far we are.
                if progress_asked.elapsed() >= progress_interval {
                    requester.request_progress().await?;
                    progress_asked = Instant::now();
                }
                progress.tick();
                continue;
            }
        };
        last_heard = Instant::now();
        progress.tick();
        let Some(first) = first else {
            return Err(ActorError::Internal("watch reader ended".into()));
        };
        let (batch, held, compacted) = gather(first, &mut rx, sync).await?;
        deferred.pending |= apply(ctx, &batch, checkpoint, Checkpointed::Global { skip }).await?;
        drop(held);
        mark.write_if_due(ctx, *checkpoint).await?;
        if let Some(compact_revision) = compacted {
            return Ok(StreamEnd::Compacted { compact_revision });
        }
    }
}

/// Items of a watch on their way to the applies, read by a task of their
/// own (dropped with the returned handle).
pub(crate) type ReadAhead = (mpsc::Receiver<Buffered>, AbortOnDropHandle<()>);

/// Reads a watch's items ahead of the applies, by at most `kib` KiB of
/// events (a catch-up over large values must not fill memory): each item
/// holds its size in permits until the batch that applies it is done.
pub(crate) fn read_ahead(mut items: eps_etcd::WatchItems, kib: usize) -> ReadAhead {
    let budget_kib = kib.max(1);
    let budget = Arc::new(tokio::sync::Semaphore::new(budget_kib));
    let (tx, rx) = mpsc::channel::<Buffered>(256);
    let reader = AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            let item = items.next().await.transpose();
            let stop = !matches!(
                item,
                Some(Ok(WatchItem::Events(_)
                    | WatchItem::Progress(_)
                    | WatchItem::Alive))
            );
            let item = item.unwrap_or_else(|| {
                Err(eps_etcd::EtcdError::Unavailable(
                    "watch stream closed".into(),
                ))
            });
            let kib = match &item {
                Ok(WatchItem::Events(events)) => {
                    let bytes: usize = events.iter().map(EtcdEvent::size_bytes).sum();
                    (bytes / 1024 + 1).min(budget_kib)
                }
                _ => 1,
            };
            let Ok(permit) = budget.clone().acquire_many_owned(kib as u32).await else {
                return;
            };
            if tx.send(Buffered { item, permit }).await.is_err() || stop {
                return;
            }
        }
    }));
    (rx, reader)
}

/// A batch: `first` and whatever else has arrived (with a linger, what
/// arrives soon), up to `sync.batch_size` events or 32 MiB; the permits
/// it holds; and the compact revision if the watch was compacted.
pub(crate) async fn gather(
    first: Buffered,
    rx: &mut mpsc::Receiver<Buffered>,
    sync: &eps_core::config::SyncConfig,
) -> Result<(Batch, Vec<tokio::sync::OwnedSemaphorePermit>, Option<i64>), ActorError> {
    let linger = Duration::from_millis(sync.batch_linger_ms);
    let max_events = sync.batch_size;
    let max_bytes = 32 * 1024 * 1024;
    let mut batch = Batch::default();
    let mut held = vec![first.permit];
    let mut compacted = batch.add(first.item?);
    let linger_until = Instant::now() + linger;
    while compacted.is_none() && batch.events.len() < max_events && batch.bytes < max_bytes {
        let next = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty)
                if !linger.is_zero() && Instant::now() < linger_until =>
            {
                tokio::time::timeout_at(linger_until.into(), rx.recv())
                    .await
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        };
        let Some(buffered) = next else { break };
        held.push(buffered.permit);
        compacted = batch.add(buffered.item?);
    }
    Ok((batch, held, compacted))
}

#[derive(Default)]
pub(crate) struct Batch {
    events: Vec<EtcdEvent>,
    bytes: usize,
    progress: Option<i64>,
    /// When the batch's first events were taken (latency is counted from it).
    first_seen: Option<Instant>,
    /// When its last events were taken: every event of the batch existed
    /// by then (the bound newest-wins uses; the first would be too early
    /// for events that came later).
    observed_at: Option<Instant>,
}

impl Batch {
    /// Adds an item; returns the compact revision if the watch was
    /// compacted.
    fn add(&mut self, item: WatchItem) -> Option<i64> {
        match item {
            WatchItem::Events(events) => {
                let now = Instant::now();
                self.first_seen.get_or_insert(now);
                self.observed_at = Some(now);
                self.bytes += events.iter().map(EtcdEvent::size_bytes).sum::<usize>();
                self.events.extend(events);
                None
            }
            WatchItem::Progress(revision) => {
                self.progress = Some(self.progress.map_or(revision, |p| p.max(revision)));
                None
            }
            // Heard from, nothing learnt.
            WatchItem::Alive => None,
            WatchItem::Compacted { compact_revision } => Some(compact_revision),
        }
    }

    /// The checkpoint after this batch: its last event, or a later progress
    /// notification (which promises every earlier event was delivered).
    pub(crate) fn checkpoint(&self) -> Option<i64> {
        let last_event = self.events.last().map(|e| e.revision);
        match (last_event, self.progress) {
            (Some(e), Some(p)) => Some(e.max(p)),
            (e, p) => e.or(p),
        }
    }
}

/// Groups events by key (first-appearance order, revision order within a
/// key), leaving out keys no mapping covers and changes a catch-up range
/// applied already.
fn group_by_key(ctx: &SyncContext, events: &[EtcdEvent], skip: &Ranges) -> Vec<KeyInputs> {
    let mut index: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    let mut keys: Vec<KeyInputs> = Vec::new();
    for event in events {
        if ctx.mappings.find(&event.key).is_none() || skip.skips(&event.key, event.revision) {
            continue;
        }
        let slot = *index.entry(event.key.as_slice()).or_insert_with(|| {
            keys.push(KeyInputs {
                key: event.key.clone(),
                inputs: Vec::new(),
            });
            keys.len() - 1
        });
        keys[slot].inputs.push(KeyInput::Event(event.clone()));
    }
    keys
}

/// Which checkpoint a batch moves.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Checkpointed<'a> {
    /// The global one; changes a catch-up range applied already are left
    /// out.
    Global { skip: &'a Ranges },
    /// The one of the catch-up range starting at `start`.
    Range { start: &'a [u8] },
}

/// Applies a batch; true when some of its keys were deferred (a user's
/// transaction holds their rows).
pub(crate) async fn apply(
    ctx: &Arc<SyncContext>,
    batch: &Batch,
    checkpoint: &mut i64,
    checkpointed: Checkpointed<'_>,
) -> Result<bool, ActorError> {
    let Some(new_checkpoint) = batch.checkpoint() else {
        return Ok(false);
    };
    if new_checkpoint <= *checkpoint && batch.events.is_empty() {
        return Ok(false);
    }
    let mut deferred = false;
    let (skip, catchup_range) = match checkpointed {
        Checkpointed::Global { skip } => (skip, None),
        Checkpointed::Range { start } => (&Ranges::EMPTY, Some(start)),
    };
    let keys = group_by_key(ctx, &batch.events, skip);
    let started = Instant::now();
    let span = tracing::info_span!(
        "etcd_to_pg.batch",
        events = batch.events.len(),
        from_revision = batch.events.first().map(|e| e.revision),
        to_revision = new_checkpoint,
        term = ctx.fence.term,
    );
    let trace_id = tracing_ids::trace_id(&span);
    // Echoes of the poller's txns in this batch carry the txn's trace id,
    // and their recognition joins that trace.
    let echo_traces: HashMap<Vec<u8>, String> = ctx
        .echo_traces
        .trace_ids(keys.iter().map(|k| k.key.as_slice()));
    if keys.is_empty() {
        match catchup_range {
            None => {
                ctx.store
                    .advance_checkpoint(&ctx.fence, new_checkpoint)
                    .await?
            }
            Some(start) => {
                ctx.store
                    .advance_catchup_range(&ctx.fence, start, new_checkpoint)
                    .await?
            }
        }
    } else {
        let request = ApplyRequest {
            fence: &ctx.fence,
            checkpoint: Some(new_checkpoint),
            catchup_range,
            observed_at: batch.observed_at.unwrap_or(started),
            trace_id: trace_id.as_deref(),
            keys: &keys,
            record_history: true,
            repair: None,
            echo_traces: Some(&echo_traces),
            audit_batch: true,
            defer_held: true,
            record_rollbacks: false,
        };
        let report = ctx.store.apply(&request).instrument(span.clone()).await?;
        ctx.dropped_with_transactions(&report);
        deferred = report.deferred_keys > 0;
        if report.drained_keys > 0 {
            ctx.wake_poller.notify_one();
        }
        for key in &report.echoed_keys {
            if let Some(context) = ctx.echo_traces.consume(key) {
                let echo =
                    tracing::info_span!("pg_to_etcd.echo_recognized", checkpoint = new_checkpoint);
                let _ = echo
                    .set_parent(opentelemetry::Context::new().with_remote_span_context(context));
            }
        }
        for event in &batch.events {
            if ctx.mappings.find(&event.key).is_some() {
                metrics::counter!(telemetry::CHANGES_TOTAL, "direction" => telemetry::ETCD_TO_PG, "op" => event.op.as_str()).increment(1);
            }
        }
        telemetry::count_conflicts(&report.conflicts);
        for conflict in &report.conflicts {
            let winner = conflict.winner.map_or("pending", |w| w.as_str());
            tracing::debug!(conflict_id = conflict.id, table = %conflict.table, policy = conflict.policy, winner, "conflict");
        }
        metrics::histogram!(telemetry::BATCH_SIZE, "direction" => telemetry::ETCD_TO_PG)
            .record(batch.events.len() as f64);
        if let Some(observed) = batch.first_seen {
            metrics::histogram!(telemetry::APPLY_LATENCY_SECONDS, "direction" => telemetry::ETCD_TO_PG)
                .record(observed.elapsed().as_secs_f64());
        }
        tracing::debug!(
            events = batch.events.len(),
            checkpoint = new_checkpoint,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch applied"
        );
    }
    *checkpoint = new_checkpoint.max(*checkpoint);
    if catchup_range.is_none() {
        ctx.applied.send_replace(*checkpoint);
        metrics::gauge!(telemetry::APPLIED_REVISION).set(*checkpoint as f64);
    }
    Ok(deferred)
}

/// How often inputs deferred for held rows are retried.
const DEFERRED_RETRY: Duration = Duration::from_millis(200);

/// Keys retried per round.
const DEFERRED_KEYS_PER_ROUND: usize = 1_000;

/// The watcher's view of deferred inputs (see `eps_store::deferred`).
struct Deferred {
    pending: bool,
    tried: Instant,
    /// Where the last round stopped: rounds walk the keys round-robin.
    after: Option<eps_store::deferred::DeferredKey>,
    /// When the table was last looked at for inputs deferred by a resync
    /// or another replica's term (the flag only knows about this term's).
    looked: Instant,
}

impl Deferred {
    fn new(pending: bool) -> Self {
        Deferred {
            pending,
            tried: Instant::now(),
            after: None,
            looked: Instant::now(),
        }
    }

    /// Applies what was deferred for rows that are free now, once per
    /// [`DEFERRED_RETRY`], and reports keys held for long.
    async fn retry_if_due(
        &mut self,
        ctx: &Arc<SyncContext>,
        look_every: Duration,
    ) -> Result<(), ActorError> {
        if !self.pending && self.looked.elapsed() >= look_every {
            self.looked = Instant::now();
            self.pending = !ctx.store.deferred_keys(None, 1).await?.is_empty();
        }
        if !self.pending || self.tried.elapsed() < DEFERRED_RETRY {
            return Ok(());
        }
        self.tried = Instant::now();
        let mut keys = ctx
            .store
            .deferred_keys(self.after.as_ref(), DEFERRED_KEYS_PER_ROUND)
            .await?;
        if keys.len() < DEFERRED_KEYS_PER_ROUND && self.after.is_some() {
            // Wrap around.
            let first = ctx
                .store
                .deferred_keys(None, DEFERRED_KEYS_PER_ROUND - keys.len())
                .await?;
            let fresh: Vec<_> = first
                .into_iter()
                .filter(|k| {
                    !keys
                        .iter()
                        .any(|seen| seen.mirror_table == k.mirror_table && seen.key == k.key)
                })
                .collect();
            keys.extend(fresh);
        }
        self.after = keys.last().cloned();
        if keys.is_empty() {
            self.pending = false;
            return Ok(());
        }
        let mut inputs = Vec::with_capacity(keys.len());
        for key in &keys {
            let mapped = ctx
                .mappings
                .find(&key.key)
                .is_some_and(|m| m.table.as_str() == key.mirror_table && m.direction.etcd_to_pg());
            if mapped {
                inputs.push(KeyInputs {
                    key: key.key.clone(),
                    inputs: Vec::new(),
                });
            } else {
                // Its mapping is gone (or moved to another table): nothing
                // syncs it now, and its table is filled again if it returns.
                ctx.store
                    .discard_deferred_key(&ctx.fence, &key.mirror_table, &key.key)
                    .await?;
            }
        }
        let report = ctx
            .store
            .apply(&ApplyRequest::new(&ctx.fence, &inputs, Instant::now()))
            .await?;
        ctx.dropped_with_transactions(&report);
        if report.drained_keys > 0 {
            tracing::info!(
                keys = report.drained_keys,
                "applied inputs deferred for held rows"
            );
            // Their keys' queued changes (and the transactions they held
            // back) may go now.
            ctx.wake_poller.notify_one();
        }
        let after = Duration::from_secs(ctx.config.sync.key_blocked_alert_secs);
        for blocked in ctx.store.report_blocked_keys(&ctx.fence, after).await? {
            tracing::warn!(
                table = %blocked.mirror_table,
                key = %eps_core::keys::display_key(&blocked.key),
                blocked_secs = blocked.blocked_secs,
                pid = blocked.pid,
                "a user's transaction holds a mirror row: its key is not synced"
            );
        }
        Ok(())
    }
}
