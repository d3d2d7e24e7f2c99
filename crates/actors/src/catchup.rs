//! Parallel catch-up (`sync.catchup_streams` above 1; off by default),
//! part of `EtcdWatcher`.
//!
//! etcd replays a watch that starts behind its head at about 10,000
//! revisions a second, however fast the reader; several watches on
//! disjoint key ranges are replayed side by side. So a leader far behind
//! (`sync.catchup_min_behind` revisions, 10,000 by default) cuts the
//! keyspace into ranges of about as many of etcd's current keys, and
//! replays each range with its own watch from its own checkpoint
//! (`eps_store::catchup`). The applies
//! stay one at a time, each excluding the other fenced transactions as the
//! watcher's always did; only etcd's replay and the decoding run in
//! parallel.
//!
//! A range's watch stops once it reached etcd's head of the start (an
//! event or progress notification at it), or after a quiet spell (an etcd
//! whose answers to progress requests cannot be trusted never says it
//! caught up). The global checkpoint then moves to the slowest range's,
//! and the single watch replays from there, leaving out per key what its
//! range applied already. Stopping early costs time, never a change: the
//! single watch replays what the range's watch did not reach.
//!
//! While the ranges replay, a reader of PostgreSQL may see one etcd txn's
//! keys at different revisions (one range ahead of another); revisions are
//! whole again once the global checkpoint passes them (so it is off by
//! default: the contract applies an etcd txn in one PostgreSQL
//! transaction). A restart during the replay resumes every range from its
//! own checkpoint; a compaction resync leaves the keys of ranges past its
//! revision alone (`recovery::WalkAt::ahead`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use eps_etcd::WatchSession;
use eps_store::catchup::{CatchupRange, Ranges};

use crate::SyncContext;
use crate::shell::{ActorError, Progress};
use crate::watcher::{Checkpointed, apply, gather, read_ahead};

/// Keys per page when the keyspace is cut.
const KEY_PAGE: usize = 10_000;

/// How the catch-up ended.
pub(crate) enum Outcome {
    /// The global checkpoint, and the ranges still ahead of it.
    Caught { checkpoint: i64, skip: Ranges },
    /// A range's watch start was compacted: a resync takes over.
    Compacted { compact_revision: i64 },
}

/// Replays the backlog in parallel ranges when the leader is far behind,
/// or goes on with the ranges an earlier incarnation left (they must be
/// honoured: their keys are ahead of the global checkpoint).
pub(crate) async fn run(
    ctx: &Arc<SyncContext>,
    progress: &Arc<Progress>,
    checkpoint: i64,
) -> Result<Outcome, ActorError> {
    let not_needed = Outcome::Caught {
        checkpoint,
        skip: Ranges::default(),
    };
    let mut ranges = ctx.store.catchup_ranges().await?;
    if ranges.0.iter().any(|r| r.applied_revision < checkpoint) {
        // The checkpoint moved past ranges without removing them: a leader
        // that does not know them (an older build) led meanwhile. Those it
        // passed skip nothing; the others still say what is applied.
        tracing::warn!(
            checkpoint,
            "catch-up ranges behind the checkpoint: a leader that ignores them led; \
             not resuming them"
        );
        ranges.0.retain(|r| r.applied_revision > checkpoint);
        return Ok(Outcome::Caught {
            checkpoint,
            skip: ranges,
        });
    }
    if !ranges.is_empty() && !ranges.cover_keyspace() {
        // The replays ended and the single watch was on its way: it goes
        // on, leaving out what the ranges still ahead applied.
        return Ok(Outcome::Caught {
            checkpoint,
            skip: ranges,
        });
    }
    if ranges.is_empty() {
        let streams = ctx.config.sync.catchup_streams as usize;
        if streams < 2 {
            return Ok(not_needed);
        }
        let head = ctx.etcd.current_revision().await?;
        let min_behind = i64::try_from(ctx.config.sync.catchup_min_behind).unwrap_or(i64::MAX);
        if head - checkpoint < min_behind.max(1) {
            return Ok(not_needed);
        }
        let Some(bounds) = split(ctx, progress, head, streams, head - checkpoint).await? else {
            return Ok(not_needed);
        };
        ranges = ctx
            .store
            .begin_catchup(&ctx.fence, checkpoint, &bounds)
            .await?;
    }
    let target = ctx.etcd.current_revision().await?;
    tracing::info!(
        checkpoint,
        target,
        ranges = ranges.0.len(),
        "far behind etcd: replaying the backlog in parallel key ranges"
    );
    let started = Instant::now();
    // One apply at a time (and one pooled connection): the ranges' applies
    // exclude each other on the checkpoint row anyway.
    let applying = Arc::new(tokio::sync::Mutex::new(()));
    let mut streams = tokio::task::JoinSet::new();
    // The watcher's read-ahead budget, shared out.
    let read_ahead_kib = crate::watcher::READ_AHEAD_KIB / ranges.0.len().max(1);
    for range in ranges.0 {
        streams.spawn(replay(
            ctx.clone(),
            range,
            target,
            progress.clone(),
            applying.clone(),
            read_ahead_kib,
        ));
    }
    while let Some(joined) = streams.join_next().await {
        match joined {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(compact_revision))) => return Ok(Outcome::Compacted { compact_revision }),
            Ok(Err(error)) => return Err(error),
            Err(error) => return Err(ActorError::Internal(format!("catch-up stream: {error}"))),
        }
    }
    let left = ctx.store.catchup_ranges().await?;
    let Some(slowest) = left.0.iter().map(|r| r.applied_revision).min() else {
        return Err(ActorError::Internal(
            "the catch-up ranges are gone: the checkpoint was set anew".into(),
        ));
    };
    let slowest = slowest.max(checkpoint);
    ctx.store.advance_checkpoint(&ctx.fence, slowest).await?;
    let skip = ctx.store.catchup_ranges().await?;
    tracing::info!(
        checkpoint = slowest,
        target,
        ranges_ahead = skip.0.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "parallel catch-up done: one watch from here"
    );
    Ok(Outcome::Caught {
        checkpoint: slowest,
        skip,
    })
}

/// Cuts the mapped keys into `streams` ranges of about as many of etcd's
/// keys at `head`: the bounds (each a key), or `None` when reading the
/// keys would cost more than it saves (more than ten keys per revision
/// behind) or there is nothing to cut.
async fn split(
    ctx: &SyncContext,
    progress: &Progress,
    head: i64,
    streams: usize,
    behind: i64,
) -> Result<Option<Vec<Vec<u8>>>, ActorError> {
    let (start, end) = ctx.mappings.covering_range();
    let read = async {
        let keys = ctx.etcd.count_at(&start, end.as_deref(), head).await?;
        if keys < 2 * streams as i64 || keys > behind.saturating_mul(10) {
            return Ok(None);
        }
        let share = (keys as usize).div_ceil(streams);
        let mut bounds = Vec::new();
        let mut seen = 0usize;
        let mut from = start.clone();
        loop {
            let (page, more) = ctx
                .etcd
                .key_page(&from, end.as_deref(), head, KEY_PAGE)
                .await?;
            for key in &page {
                if seen > 0 && seen.is_multiple_of(share) && bounds.len() + 1 < streams {
                    bounds.push(key.clone());
                }
                seen += 1;
            }
            progress.tick();
            match page.last() {
                Some(last) if more => from = eps_core::keys::successor(last),
                _ => break,
            }
        }
        Ok::<_, eps_etcd::EtcdError>((!bounds.is_empty()).then_some(bounds))
    };
    match read.await {
        Ok(bounds) => Ok(bounds),
        // etcd compacted `head` meanwhile: one watch will do.
        Err(eps_etcd::EtcdError::Compacted { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Replays one range from its checkpoint until it reached `target` or
/// went quiet; `Some(compact revision)` when its start was compacted.
async fn replay(
    ctx: Arc<SyncContext>,
    range: CatchupRange,
    target: i64,
    progress: Arc<Progress>,
    applying: Arc<tokio::sync::Mutex<()>>,
    read_ahead_kib: usize,
) -> Result<Option<i64>, ActorError> {
    let mut applied = range.applied_revision;
    if applied >= target {
        return Ok(None);
    }
    let Some((start, end)) = mapped_part(&ctx, &range) else {
        // No mapped key in it: nothing to replay.
        ctx.store
            .advance_catchup_range(&ctx.fence, &range.start, target)
            .await?;
        return Ok(None);
    };
    let sync = &ctx.config.sync;
    let session = WatchSession::start(&ctx.etcd, &start, end.as_deref(), applied + 1).await?;
    let (mut requester, items) = session.split();
    let (mut rx, _reader) = read_ahead(items, read_ahead_kib);
    let interval = Duration::from_millis(sync.progress_interval_ms);
    let stall_timeout = Duration::from_millis(sync.watch_stall_timeout_ms);
    let quiet = (interval * 2).max(Duration::from_secs(1));
    let mut last_heard = Instant::now();
    let mut last_moved = Instant::now();
    let mut asked = Instant::now();
    loop {
        let first = match tokio::time::timeout(interval, rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return Err(ActorError::Internal("watch reader ended".into())),
            Err(_) => {
                if last_moved.elapsed() >= quiet {
                    return Ok(None);
                }
                if last_heard.elapsed() > stall_timeout {
                    return Err(ActorError::Stalled(format!(
                        "catch-up watch silent for {:?}",
                        last_heard.elapsed()
                    )));
                }
                if asked.elapsed() >= interval {
                    requester.request_progress().await?;
                    asked = Instant::now();
                }
                progress.tick();
                continue;
            }
        };
        last_heard = Instant::now();
        progress.tick();
        let (batch, held, compacted) = gather(first, &mut rx, sync).await?;
        if batch.checkpoint().is_some_and(|c| c > applied) {
            last_moved = Instant::now();
        }
        {
            let _one = applying.lock().await;
            apply(
                &ctx,
                &batch,
                &mut applied,
                Checkpointed::Range {
                    start: &range.start,
                },
            )
            .await?;
        }
        drop(held);
        if let Some(compact_revision) = compacted {
            return Ok(Some(compact_revision));
        }
        if applied >= target {
            return Ok(None);
        }
    }
}

/// The part of `range` the mappings cover, if any.
fn mapped_part(ctx: &SyncContext, range: &CatchupRange) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let (cover_start, cover_end) = ctx.mappings.covering_range();
    let start = range.start.clone().max(cover_start);
    let end = match (&range.end, cover_end) {
        (None, end) => end,
        (Some(a), None) => Some(a.clone()),
        (Some(a), Some(b)) => Some(a.clone().min(b)),
    };
    match &end {
        Some(end) if *end <= start => None,
        _ => Some((start, end)),
    }
}
