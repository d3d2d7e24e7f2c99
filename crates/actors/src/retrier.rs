//! `Retrier`: the fate of a single change that etcd refused (docs/design.md D2,
//! retry/backoff). Each failure is counted on the outbox row (so a restart
//! does not reset it) and answered with a backoff delay — exponential, full
//! jitter, capped — until `retry.max_attempts`, then the change goes to the
//! dead-letter list and the changes behind it keep flowing.
//!
//! Connection-level failures never come here: they pause the whole
//! pipeline (the failing actor restarts with the same backoff, forever).

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AtomicResponse, Context, Handler, Message, Supervised, WrapFuture};
use eps_store::{DeadLetterKind, OutboxRow};
use tokio::sync::mpsc;

use crate::SyncContext;
use crate::shell::{ActorError, Shell};
use crate::telemetry;

/// A change failed with an error that is not about the connection.
#[derive(Message)]
#[rtype(result = "Result<RetryDecision, ActorError>")]
pub struct ChangeFailed {
    pub row: OutboxRow,
    pub error: String,
    /// Changes the poller sent that reached etcd (their echo pending): if
    /// the row is dead-lettered, its transaction's other changes go with it,
    /// but these.
    pub landed: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    DeadLettered,
}

pub struct Retrier {
    ctx: Arc<SyncContext>,
    shell: Shell,
}

impl Retrier {
    pub fn new(ctx: Arc<SyncContext>, alive: mpsc::Sender<()>) -> Self {
        let shell = Shell::new(
            "retrier",
            ctx.kill.clone(),
            ctx.board.clone(),
            ctx.config.backoff(),
            alive,
        )
        .with_watchdog(Duration::MAX / 2);
        Retrier { ctx, shell }
    }
}

impl Actor for Retrier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let kill = self.ctx.kill.clone();
        self.shell.spawn_loop(ctx, async move {
            kill.cancelled().await;
            Ok(())
        });
    }
}

impl Supervised for Retrier {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shell.restarting();
    }
}

impl Handler<ChangeFailed> for Retrier {
    type Result = AtomicResponse<Self, Result<RetryDecision, ActorError>>;

    fn handle(&mut self, msg: ChangeFailed, _ctx: &mut Context<Self>) -> Self::Result {
        let ctx = self.ctx.clone();
        AtomicResponse::new(Box::pin(decide(ctx, msg).into_actor(self)))
    }
}

async fn decide(ctx: Arc<SyncContext>, msg: ChangeFailed) -> Result<RetryDecision, ActorError> {
    let attempts = ctx
        .store
        .record_attempt(&ctx.fence, msg.row.id, &msg.error)
        .await?;
    metrics::counter!(telemetry::RETRIES_TOTAL, "kind" => "change").increment(1);
    let max_attempts = ctx.config.retry.max_attempts as i32;
    if attempts < max_attempts {
        let delay = ctx.config.backoff().delay(attempts.max(1) as u32 - 1);
        tracing::info!(outbox_id = msg.row.id, attempts, delay_ms = delay.as_millis() as u64, error = %msg.error, "change failed, will retry");
        return Ok(RetryDecision::RetryAfter(delay));
    }
    let mut row = msg.row;
    row.attempts = attempts;
    let reason = format!("failed {attempts} times; last error: {}", msg.error);
    // The rest of its transaction goes with it: etcd gets all of a
    // transaction or none.
    let refusal = eps_store::Refusal {
        row: &row,
        kind: DeadLetterKind::RetriesExhausted,
        reason: &reason,
    };
    let moved = ctx
        .store
        .dead_letter(&ctx.fence, &[refusal], &msg.landed, None)
        .await?;
    metrics::counter!(telemetry::DEAD_LETTERS_TOTAL, "kind" => "retries-exhausted")
        .increment(moved.max(1) as u64);
    tracing::warn!(outbox_id = row.id, attempts, error = %reason, "retries exhausted, change dead-lettered");
    ctx.wake_poller.notify_one();
    Ok(RetryDecision::DeadLettered)
}
