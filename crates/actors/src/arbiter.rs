//! `ConflictArbiter`: settles the conflicts the watcher cannot settle inline
//! — a PostgreSQL change whose base went stale without the watcher seeing it
//! (handed over by the poller) — and carries out operators' `conflicts
//! resolve` requests through the fenced paths. The policy decision itself is
//! `eps_core::policy::decide`, also used by the watcher's transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, AtomicResponse, Context, Handler, Message, Supervised, WrapFuture};
use eps_core::Classify;
use eps_core::model::Origin;
use eps_core::policy::Side;
use eps_core::reconcile::KeyInput;
use eps_store::transactions::DroppedKey;
use eps_store::{ApplyRequest, KeyInputs};
use tokio::sync::mpsc;

use crate::SyncContext;
use crate::shell::{ActorError, Progress, Shell};
use crate::telemetry;

/// Settle the pending changes of one key against etcd's current state.
#[derive(Message)]
#[rtype(result = "Result<(), ActorError>")]
pub struct ResolveStale {
    pub table: String,
    pub key: Vec<u8>,
}

pub struct ConflictArbiter {
    ctx: Arc<SyncContext>,
    shell: Shell,
}

impl ConflictArbiter {
    pub fn new(ctx: Arc<SyncContext>, alive: mpsc::Sender<()>) -> Self {
        let shell = Shell::new(
            "conflict_arbiter",
            ctx.kill.clone(),
            ctx.board.clone(),
            ctx.config.backoff(),
            alive,
        );
        ConflictArbiter { ctx, shell }
    }
}

impl Actor for ConflictArbiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let body = run(self.ctx.clone(), self.shell.progress.clone());
        self.shell.spawn_loop(ctx, body);
    }
}

impl Supervised for ConflictArbiter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shell.restarting();
    }
}

impl Handler<ResolveStale> for ConflictArbiter {
    type Result = AtomicResponse<Self, Result<(), ActorError>>;

    fn handle(&mut self, msg: ResolveStale, _ctx: &mut Context<Self>) -> Self::Result {
        let ctx = self.ctx.clone();
        AtomicResponse::new(Box::pin(resolve_stale(ctx, msg).into_actor(self)))
    }
}

async fn resolve_stale(ctx: Arc<SyncContext>, msg: ResolveStale) -> Result<(), ActorError> {
    let (state, revision) = ctx.etcd.get(&msg.key).await?;
    // After the read: the state it returned existed by then (taken before
    // the read, a slow answer could carry a change made after it).
    let observed_at = Instant::now();
    let keys = [KeyInputs {
        key: msg.key.clone(),
        inputs: vec![KeyInput::Observed {
            state,
            revision,
            origin: Origin::Etcd,
        }],
    }];
    let request = ApplyRequest {
        fence: &ctx.fence,
        checkpoint: None,
        catchup_range: None,
        observed_at,
        trace_id: None,
        keys: &keys,
        // The watcher has recorded etcd's changes of this key already.
        record_history: false,
        repair: None,
        echo_traces: None,
        audit_batch: false,
        // A row a user holds: skipped, not deferred (the arbiter reads ahead
        // of the watcher; the poller hands the key over again).
        defer_held: false,
        record_rollbacks: false,
    };
    let report = ctx.store.apply(&request).await?;
    ctx.dropped_with_transactions(&report);
    if !report.held_skipped.is_empty() {
        tracing::debug!(table = %msg.table, "the key's row is held by a user's transaction: settled later");
    }
    telemetry::count_conflicts(&report.conflicts);
    for conflict in &report.conflicts {
        let winner = conflict.winner.map_or("pending", Side::as_str);
        tracing::info!(conflict_id = conflict.id, table = %msg.table, policy = conflict.policy, winner, "conflict settled by the arbiter");
    }
    ctx.wake_poller.notify_one();
    Ok(())
}

/// Keys with dropped changes put back per round.
const RESTORES_PER_ROUND: usize = 256;

/// Carries out operators' resolution requests as they appear, and puts
/// back the mirror rows of changes dropped with their transaction.
async fn run(ctx: Arc<SyncContext>, progress: Arc<Progress>) -> Result<(), ActorError> {
    let interval = Duration::from_millis(ctx.config.sync.poll_interval_ms);
    let mut restore_after: Option<DroppedKey> = None;
    loop {
        progress.tick();
        ctx.wait_etcd_checked(&progress).await?;
        restore_dropped(&ctx, &progress, &mut restore_after).await?;
        for conflict in ctx.store.requested_resolutions().await? {
            let Some(take) = conflict.requested_take else {
                continue;
            };
            let (etcd_now, _) = ctx.etcd.get(&conflict.key).await?;
            let resolved = ctx
                .store
                .execute_resolution(&ctx.fence, &conflict, take, etcd_now.as_ref())
                .await;
            if let Err(eps_store::StoreError::RowHeld(_)) = resolved {
                tracing::info!(
                    conflict_id = conflict.id,
                    "the conflict's row is held by a user's transaction: resolving later"
                );
                continue;
            }
            match resolved? {
                eps_store::ledger::Resolution::Carried => tracing::info!(
                    conflict_id = conflict.id,
                    take = take.as_str(),
                    "conflict resolved by operator request"
                ),
                eps_store::ledger::Resolution::Skipped => tracing::warn!(
                    conflict_id = conflict.id,
                    take = take.as_str(),
                    "rolled-back value not put back: the key changed since the rollback"
                ),
            }
            ctx.wake_poller.notify_one();
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = ctx.wake_arbiter.notified() => {}
        }
    }
}

/// A change dropped with its transaction left its value in the mirror row:
/// each such key takes etcd's current state (read now), or the value of a
/// change of it still queued; the dropped change is consumed then. A page
/// of keys per round, in key order from where the last round stopped, so
/// keys that cannot be put back yet (a user's transaction holds the row;
/// an error) do not hide the others.
async fn restore_dropped(
    ctx: &Arc<SyncContext>,
    progress: &Progress,
    after: &mut Option<DroppedKey>,
) -> Result<(), ActorError> {
    let keys = ctx
        .store
        .dropped_keys(after.as_ref(), RESTORES_PER_ROUND)
        .await?;
    for key in &keys {
        progress.tick();
        let restored = resolve_stale(
            ctx.clone(),
            ResolveStale {
                table: key.mirror_table.clone(),
                key: key.key.clone(),
            },
        )
        .await;
        match restored {
            Ok(()) => {}
            // The stores or the term, not this key: the loop restarts.
            Err(error)
                if error.connection_level()
                    || matches!(error, ActorError::Fenced | ActorError::Internal(_)) =>
            {
                return Err(error);
            }
            Err(error) => tracing::warn!(
                table = %key.mirror_table,
                key = %eps_core::keys::display_key(&key.key),
                %error,
                "a change dropped with its transaction is not put back yet"
            ),
        }
    }
    *after = keys
        .last()
        .cloned()
        .filter(|_| keys.len() == RESTORES_PER_ROUND);
    if after.is_some() {
        ctx.wake_arbiter.notify_one();
    }
    Ok(())
}
