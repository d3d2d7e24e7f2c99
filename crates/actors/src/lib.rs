//! The sync actors (ARCHITECTURE.md): `EtcdWatcher` (etcd → PostgreSQL),
//! `CompactionRecovery` (snapshot and resync), `PgPoller` (PostgreSQL →
//! etcd), `ConflictArbiter` (conflicts the watcher could not settle inline,
//! operator resolutions) and `Retrier` (per-change retries, dead letters).
//!
//! They run only on the leader, all under one [`Pipeline`] per leadership
//! term: one kill switch stops them together (docs/design.md D7). Each is an actix
//! actor under a `Supervisor`: its work is one loop future; a failure stops
//! the actor deliberately and the supervisor restarts it with backoff, from
//! durable state (docs/design.md D7: an actor's memory may be stale after a failure).

pub mod arbiter;
pub mod catchup;
pub mod diff;
pub mod poller;
pub mod recovery;
pub mod retrier;
pub mod shell;
pub mod telemetry;
pub mod tracing_ids;
pub mod verify;
pub mod watcher;

use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Supervisor};
use eps_core::config::Config;
use eps_core::mapping::MappingSet;
use eps_etcd::{EtcdClient, LeaderFence};
use eps_store::{Fence, Store};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use arbiter::ConflictArbiter;
pub use poller::PgPoller;
pub use recovery::CompactionRecovery;
pub use retrier::Retrier;
pub use shell::{ActorError, StatusBoard};
pub use watcher::EtcdWatcher;

/// What every actor of one leadership term shares.
pub struct SyncContext {
    pub config: Arc<Config>,
    pub mappings: MappingSet,
    pub store: Store,
    pub etcd: EtcdClient,
    /// PostgreSQL fencing: the term every transaction checks.
    pub fence: Fence,
    /// etcd fencing: the leader key every write compares.
    pub leader: LeaderFence,
    /// The term's kill switch.
    pub kill: CancellationToken,
    /// The watcher's applied revision (the durable checkpoint), published
    /// for the poller, which waits on it after a failed compare.
    pub applied: watch::Sender<i64>,
    /// True once this incarnation of the watcher has checked that etcd is
    /// the history the mirror follows (and followed a new timeline if not).
    /// Until then nothing is written to etcd nor settled against it: the
    /// queued changes' base revisions may number another history.
    pub etcd_checked: watch::Sender<bool>,
    /// Moves on each time a new etcd timeline is followed: what an actor
    /// keeps in memory about etcd's revisions belongs to the old one.
    pub timeline_epoch: std::sync::atomic::AtomicU64,
    /// Wakes the poller (new work released by the arbiter or retrier).
    pub wake_poller: Notify,
    /// Changes were dropped with their transaction: the arbiter puts their
    /// mirror rows back.
    pub wake_arbiter: Notify,
    /// Trace contexts of the poller's txns, joined by the watcher's echo.
    pub echo_traces: tracing_ids::EchoTraces,
    pub board: Arc<StatusBoard>,
}

impl SyncContext {
    /// Wakes the arbiter when an apply dropped changes with their
    /// transaction (it puts their mirror rows back).
    pub fn dropped_with_transactions(&self, report: &eps_store::ApplyReport) {
        if report.dropped_changes > 0 {
            self.wake_arbiter.notify_one();
        }
    }

    /// Whether the watcher has checked etcd's timeline now.
    pub fn is_etcd_checked(&self) -> bool {
        *self.etcd_checked.borrow()
    }

    /// Waits until the watcher has checked etcd's timeline (see
    /// [`SyncContext::etcd_checked`]), keeping the waiting loop's heartbeat
    /// (a first snapshot or a resync can take minutes).
    pub async fn wait_etcd_checked(&self, progress: &shell::Progress) -> Result<(), ActorError> {
        let mut checked = self.etcd_checked.subscribe();
        loop {
            progress.tick();
            let wait = checked.wait_for(|checked| *checked);
            match tokio::time::timeout(Duration::from_secs(10), wait).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => {
                    return Err(ActorError::Internal("etcd-checked channel closed".into()));
                }
                Err(_) => continue,
            }
        }
    }

    pub fn new(
        config: Arc<Config>,
        store: Store,
        etcd: EtcdClient,
        fence: Fence,
        leader: LeaderFence,
        board: Arc<StatusBoard>,
    ) -> Arc<Self> {
        let mappings = store.mappings().clone();
        Arc::new(SyncContext {
            config,
            mappings,
            store,
            etcd,
            fence,
            leader,
            kill: CancellationToken::new(),
            applied: watch::channel(0).0,
            etcd_checked: watch::channel(false).0,
            timeline_epoch: std::sync::atomic::AtomicU64::new(0),
            wake_poller: Notify::new(),
            wake_arbiter: Notify::new(),
            echo_traces: tracing_ids::EchoTraces::default(),
            board,
        })
    }
}

/// The sync actors of one term. Dropping it (or [`Pipeline::stop`]) trips
/// the kill switch and releases the actors.
pub struct Pipeline {
    ctx: Arc<SyncContext>,
    watcher: Option<Addr<EtcdWatcher>>,
    poller: Option<Addr<PgPoller>>,
    arbiter: Option<Addr<ConflictArbiter>>,
    retrier: Option<Addr<Retrier>>,
    recovery: Option<Addr<CompactionRecovery>>,
    stopped: tokio::sync::mpsc::Receiver<()>,
}

impl Pipeline {
    /// Starts every actor under its supervisor. Must run on the actix
    /// system's thread.
    pub fn start(ctx: Arc<SyncContext>) -> Pipeline {
        // Each actor holds a clone of `alive`; when all are gone, `stopped`
        // closes.
        let (alive, stopped) = tokio::sync::mpsc::channel::<()>(1);
        let recovery = {
            let (ctx, alive) = (ctx.clone(), alive.clone());
            Supervisor::start(move |_| CompactionRecovery::new(ctx, alive))
        };
        let retrier = {
            let (ctx, alive) = (ctx.clone(), alive.clone());
            Supervisor::start(move |_| Retrier::new(ctx, alive))
        };
        let arbiter = {
            let (ctx, alive) = (ctx.clone(), alive.clone());
            Supervisor::start(move |_| ConflictArbiter::new(ctx, alive))
        };
        let poller = {
            let (ctx, alive) = (ctx.clone(), alive.clone());
            let (arbiter, retrier) = (arbiter.downgrade(), retrier.downgrade());
            Supervisor::start(move |_| PgPoller::new(ctx, arbiter, retrier, alive))
        };
        let watcher = {
            let (ctx, alive) = (ctx.clone(), alive.clone());
            let recovery = recovery.downgrade();
            Supervisor::start(move |_| EtcdWatcher::new(ctx, recovery, alive))
        };
        drop(alive);
        Pipeline {
            ctx,
            watcher: Some(watcher),
            poller: Some(poller),
            arbiter: Some(arbiter),
            retrier: Some(retrier),
            recovery: Some(recovery),
            stopped,
        }
    }

    pub fn context(&self) -> &Arc<SyncContext> {
        &self.ctx
    }

    /// Resolves when an actor tripped the kill switch (fenced: another
    /// leader took over).
    pub async fn killed(&self) {
        self.ctx.kill.cancelled().await;
    }

    /// Trips the kill switch, releases the actors and waits (at most
    /// `deadline`) until every one has stopped.
    pub async fn stop(mut self, deadline: Duration) {
        self.release();
        let _ = tokio::time::timeout(deadline, self.stopped.recv()).await;
    }

    fn release(&mut self) {
        self.ctx.kill.cancel();
        // Supervisors restart an actor only while someone holds its address.
        self.watcher.take();
        self.poller.take();
        self.arbiter.take();
        self.retrier.take();
        self.recovery.take();
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.release();
    }
}
