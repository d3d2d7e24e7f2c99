//! `CompactionRecovery`: brings the mirror to etcd's state at one revision R
//! when the watch cannot (SPEC 3.5): the initial snapshot (empty checkpoint)
//! and the resync after the watch's revision was compacted away.
//!
//! Both are one algorithm: walk etcd (range reads at R) and the mirror in key
//! order, page by page, and feed every difference to the apply transaction as
//! an observed state. Memory stays bounded by a page; the planner keeps keys
//! with pending PostgreSQL changes as conflicts instead of overwriting them.
//! The history marks what it learns this way `snapshot` or `resync`: the
//! revisions in between are unknown and are not invented.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, AtomicResponse, Context, Handler, Message, Supervised, WrapFuture};
use eps_core::mapping::Mapping;
use eps_core::model::{KeyValue, Origin};
use eps_core::reconcile::KeyInput;
use eps_etcd::EtcdError;
use eps_store::mirror::MirrorRow;
use eps_store::{ApplyRequest, KeyInputs};
use tokio::sync::mpsc;

use crate::SyncContext;
use crate::shell::{ActorError, Progress, Shell};
use crate::telemetry;

/// Target bytes per page and per apply chunk (values can be 1.5 MiB each).
const PAGE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// No checkpoint yet: the initial snapshot.
    Initial,
    /// The revision after the checkpoint is compacted.
    Compacted {
        checkpoint: i64,
        compact_revision: Option<i64>,
    },
    /// etcd's revision is behind the checkpoint (etcd was restored/replaced).
    RevisionWentBack { checkpoint: i64, etcd_revision: i64 },
}

/// Resyncs and returns the new checkpoint R.
#[derive(Message)]
#[rtype(result = "Result<i64, ActorError>")]
pub struct Resync {
    pub reason: ResyncReason,
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
        // Message-driven: the loop only keeps the term's lifecycle.
        let kill = self.ctx.kill.clone();
        self.shell.spawn_loop(ctx, async move {
            kill.cancelled().await;
            Ok(())
        });
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
        AtomicResponse::new(Box::pin(resync(ctx, msg.reason, progress).into_actor(self)))
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Counts {
    keys_scanned: u64,
    differences: u64,
    upserts: u64,
    deletes: u64,
    conflicts: u64,
}

/// Runs a resync until it completes at one revision (a compaction racing
/// the walk restarts it at a newer revision).
pub async fn resync(
    ctx: Arc<SyncContext>,
    reason: ResyncReason,
    progress: Arc<Progress>,
) -> Result<i64, ActorError> {
    loop {
        match resync_once(&ctx, reason, &progress).await {
            Err(ActorError::Etcd(EtcdError::Compacted { .. })) => {
                tracing::warn!("snapshot revision compacted during the walk, starting over");
                continue;
            }
            other => return other,
        }
    }
}

async fn resync_once(
    ctx: &Arc<SyncContext>,
    reason: ResyncReason,
    progress: &Progress,
) -> Result<i64, ActorError> {
    let started = Instant::now();
    let revision = ctx.etcd.current_revision().await?;
    let origin = match reason {
        ResyncReason::Initial => Origin::Snapshot,
        _ => Origin::Resync,
    };
    tracing::info!(?reason, revision, "resync started");
    let mut counts = Counts::default();
    for mapping in ctx.mappings.iter().filter(|m| m.direction.etcd_to_pg()) {
        walk(ctx, mapping, revision, origin, progress, &mut counts).await?;
    }
    ctx.store.set_checkpoint(&ctx.fence, revision).await?;
    let (kind, from) = match reason {
        ResyncReason::Initial => ("snapshot", 0),
        ResyncReason::Compacted { checkpoint, .. } => ("compaction-recovery", checkpoint),
        ResyncReason::RevisionWentBack { checkpoint, .. } => ("revision-went-back", checkpoint),
    };
    let compact_revision = match reason {
        ResyncReason::Compacted {
            compact_revision, ..
        } => compact_revision,
        _ => None,
    };
    let detail = serde_json::json!({
        "gap_from": from,
        "gap_to": revision,
        "compact_revision": compact_revision,
        "counts": counts,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    ctx.store
        .record_event(&ctx.fence, kind, None, &detail)
        .await?;
    if kind == "compaction-recovery" {
        metrics::counter!(telemetry::COMPACTION_RECOVERIES_TOTAL).increment(1);
    }
    tracing::info!(
        kind,
        revision,
        keys = counts.keys_scanned,
        differences = counts.differences,
        conflicts = counts.conflicts,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "resync done"
    );
    Ok(revision)
}

/// Page size that keeps a page near [`PAGE_BYTES`] given the average entry
/// size seen so far.
fn adaptive_limit(max: usize, avg_bytes: usize) -> usize {
    (PAGE_BYTES / avg_bytes.max(1)).clamp(1, max)
}

/// Merge-joins etcd (at `revision`) and the mirror over one mapping's range.
async fn walk(
    ctx: &Arc<SyncContext>,
    mapping: &Mapping,
    revision: i64,
    origin: Origin,
    progress: &Progress,
    counts: &mut Counts,
) -> Result<(), ActorError> {
    let page_size = ctx.config.sync.snapshot_page_size;
    let start = mapping.prefix.clone();
    let end = mapping.range_end();
    let mut etcd_buf: VecDeque<KeyValue> = VecDeque::new();
    let mut etcd_next: Option<Vec<u8>> = Some(start.clone());
    let mut pg_buf: VecDeque<MirrorRow> = VecDeque::new();
    let mut pg_after: Option<Vec<u8>> = None;
    let mut pg_done = false;
    let mut avg_bytes = 256usize;
    let mut chunk: Vec<KeyInputs> = Vec::new();
    let mut chunk_bytes = 0usize;
    let observed_at = Instant::now();

    loop {
        // Refill until there is a key or etcd's range is exhausted (a page
        // may hold only the service's own keys, filtered out).
        while etcd_buf.is_empty() {
            let Some(from) = etcd_next.take() else { break };
            {
                let limit = adaptive_limit(page_size, avg_bytes);
                let page = ctx
                    .etcd
                    .range_page(&from, end.as_deref(), revision, limit)
                    .await?;
                if let Some(last) = page.kvs.last() {
                    if page.more {
                        etcd_next = Some(eps_core::keys::successor(&last.key));
                    }
                }
                let bytes: usize = page
                    .kvs
                    .iter()
                    .map(|kv| kv.key.len() + kv.value.len())
                    .sum();
                if !page.kvs.is_empty() {
                    avg_bytes = (bytes / page.kvs.len()).max(1);
                }
                counts.keys_scanned += page.kvs.len() as u64;
                metrics::counter!(telemetry::SNAPSHOT_KEYS_TOTAL).increment(page.kvs.len() as u64);
                etcd_buf.extend(page.kvs.into_iter().filter(|kv| mapping.contains(&kv.key)));
                progress.tick();
            }
        }
        if pg_buf.is_empty() && !pg_done {
            let limit = adaptive_limit(page_size, avg_bytes);
            let rows = ctx
                .store
                .mirror_page(
                    &mapping.table,
                    &start,
                    end.as_deref(),
                    pg_after.as_deref(),
                    limit,
                )
                .await?;
            pg_done = rows.len() < limit;
            pg_after = rows.last().map(|r| r.key.clone());
            pg_buf.extend(rows);
        }
        let input = match (etcd_buf.front(), pg_buf.front()) {
            (None, None) => break,
            (Some(_), None) => etcd_buf.pop_front().map(|kv| present(kv, revision, origin)),
            (None, Some(_)) => pg_buf
                .pop_front()
                .map(|row| absent(row.key, revision, origin)),
            (Some(kv), Some(row)) => match kv.key.cmp(&row.key) {
                std::cmp::Ordering::Less => {
                    etcd_buf.pop_front().map(|kv| present(kv, revision, origin))
                }
                std::cmp::Ordering::Greater => pg_buf
                    .pop_front()
                    .map(|row| absent(row.key, revision, origin)),
                std::cmp::Ordering::Equal => {
                    let same = kv.meta.mod_revision == row.mod_revision && kv.value == row.value;
                    let row = pg_buf.pop_front();
                    let kv = etcd_buf.pop_front();
                    match (same, kv, row) {
                        (false, Some(kv), Some(_)) => Some(present(kv, revision, origin)),
                        _ => None,
                    }
                }
            },
        };
        if let Some(input) = input {
            counts.differences += 1;
            chunk_bytes += input.key.len() + input_bytes(&input.inputs);
            chunk.push(input);
        }
        if chunk.len() >= page_size || chunk_bytes >= PAGE_BYTES {
            flush(ctx, &mut chunk, observed_at, counts).await?;
            chunk_bytes = 0;
            progress.tick();
        }
    }
    flush(ctx, &mut chunk, observed_at, counts).await
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

async fn flush(
    ctx: &Arc<SyncContext>,
    chunk: &mut Vec<KeyInputs>,
    observed_at: Instant,
    counts: &mut Counts,
) -> Result<(), ActorError> {
    if chunk.is_empty() {
        return Ok(());
    }
    let request = ApplyRequest {
        fence: &ctx.fence,
        checkpoint: None,
        observed_at,
        trace_id: None,
        keys: chunk,
        record_history: true,
    };
    let report = ctx.store.apply(&request).await?;
    counts.upserts += report.mirror_upserts as u64;
    counts.deletes += report.mirror_deletes as u64;
    counts.conflicts += report.conflicts.len() as u64;
    for conflict in &report.conflicts {
        let winner = conflict.winner.map_or("pending", |w| w.as_str());
        metrics::counter!(telemetry::CONFLICTS_TOTAL, "policy" => conflict.policy, "winner" => winner).increment(1);
    }
    chunk.clear();
    Ok(())
}
