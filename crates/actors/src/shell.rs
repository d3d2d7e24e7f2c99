//! The contract every sync actor follows (docs/design.md D7): one loop future per
//! incarnation; a typed exit; restart with capped backoff by the actix
//! `Supervisor`; a progress watchdog that restarts a stuck loop; a status
//! entry for `/status`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::fut::{ActorFutureExt, wrap_future};
use actix::{Actor, ActorContext, AsyncContext, Context};
use eps_core::Backoff;
use eps_core::Classify;
use eps_etcd::EtcdError;
use eps_store::StoreError;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Why an actor's loop ended.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// Another leader took over: the whole term must stop.
    #[error("fenced: this replica is no longer the leader")]
    Fenced,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Etcd(EtcdError),
    /// No progress for longer than allowed (watch silent, loop stuck).
    #[error("stalled: {0}")]
    Stalled(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ActorError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Fenced { .. } => ActorError::Fenced,
            other => ActorError::Store(other),
        }
    }
}

impl From<EtcdError> for ActorError {
    fn from(error: EtcdError) -> Self {
        ActorError::Etcd(error)
    }
}

impl From<actix::MailboxError> for ActorError {
    fn from(error: actix::MailboxError) -> Self {
        ActorError::Internal(format!("actor mailbox: {error}"))
    }
}

impl Classify for ActorError {
    fn retryable(&self) -> bool {
        match self {
            ActorError::Fenced => false,
            ActorError::Store(e) => e.retryable(),
            ActorError::Etcd(e) => e.retryable(),
            ActorError::Stalled(_) | ActorError::Internal(_) => true,
        }
    }

    fn connection_level(&self) -> bool {
        match self {
            ActorError::Store(e) => e.connection_level(),
            ActorError::Etcd(e) => e.connection_level(),
            _ => false,
        }
    }
}

/// One actor's entry in `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ActorStatus {
    pub state: &'static str,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// Seconds since the loop last reported progress.
    pub idle_secs: Option<f64>,
}

/// Status shared by the actors of every term of this node.
#[derive(Debug, Default)]
pub struct StatusBoard {
    inner: Mutex<BoardInner>,
    recovered: StoreRecovered,
}

/// Counts the times a store answered again after failing (the health
/// monitor reports it): retries sleeping out their backoff wake up then,
/// so sync resumes within a probe interval of the store's return.
#[derive(Debug)]
struct StoreRecovered(tokio::sync::watch::Sender<u64>);

impl Default for StoreRecovered {
    fn default() -> Self {
        StoreRecovered(tokio::sync::watch::channel(0).0)
    }
}

#[derive(Debug, Default)]
struct BoardInner {
    actors: BTreeMap<&'static str, (ActorStatus, Option<Arc<Progress>>)>,
    last_error: Option<String>,
}

impl StatusBoard {
    fn update(&self, name: &'static str, f: impl FnOnce(&mut ActorStatus)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = inner.actors.entry(name).or_default();
        f(&mut entry.0);
    }

    fn attach(&self, name: &'static str, progress: Arc<Progress>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.actors.entry(name).or_default().1 = Some(progress);
    }

    pub fn record_error(&self, name: &'static str, error: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.last_error = Some(format!("{name}: {error}"));
        inner.actors.entry(name).or_default().0.last_error = Some(error.to_owned());
    }

    pub fn last_error(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    pub fn clear_last_error(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = None;
    }

    /// A snapshot of every actor's status.
    pub fn actors(&self) -> BTreeMap<&'static str, ActorStatus> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .actors
            .iter()
            .map(|(name, (status, progress))| {
                let mut status = status.clone();
                status.idle_secs = progress.as_ref().map(|p| p.idle().as_secs_f64());
                (*name, status)
            })
            .collect()
    }

    /// A store answers again after failing: wake every retry that waits.
    pub fn store_recovered(&self) {
        self.recovered.0.send_modify(|n| *n += 1);
    }

    /// Resolves at the next [`StatusBoard::store_recovered`].
    pub fn next_recovery(&self) -> impl Future<Output = ()> + use<> {
        let mut receiver = self.recovered.0.subscribe();
        async move {
            // An error means the board is gone: never wake.
            if receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Marks every actor stopped (the term ended).
    pub fn all_stopped(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (status, _) in inner.actors.values_mut() {
            status.state = "stopped";
        }
    }
}

/// A loop's heartbeat: the watchdog restarts a loop whose heartbeat is old.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Progress {
    pub fn tick(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Shared lifecycle state of one actor.
pub struct Shell {
    pub name: &'static str,
    kill: CancellationToken,
    board: Arc<StatusBoard>,
    backoff: Backoff,
    watchdog: Duration,
    restarts: u32,
    /// Shared with the running loop, which clears it when a store's return
    /// ends its backoff early.
    consecutive_failures: Arc<std::sync::atomic::AtomicU32>,
    started_at: Instant,
    pub progress: Arc<Progress>,
    /// Held while the actor lives; the pipeline waits for all to drop.
    _alive: tokio::sync::mpsc::Sender<()>,
}

/// How long a loop may run without progress before the watchdog restarts it.
const DEFAULT_WATCHDOG: Duration = Duration::from_secs(120);

impl Shell {
    pub fn new(
        name: &'static str,
        kill: CancellationToken,
        board: Arc<StatusBoard>,
        backoff: Backoff,
        alive: tokio::sync::mpsc::Sender<()>,
    ) -> Self {
        let progress = Arc::new(Progress::default());
        board.attach(name, progress.clone());
        board.update(name, |s| s.state = "starting");
        Shell {
            name,
            kill,
            board,
            backoff,
            watchdog: DEFAULT_WATCHDOG,
            restarts: 0,
            consecutive_failures: Arc::default(),
            started_at: Instant::now(),
            progress,
            _alive: alive,
        }
    }

    pub fn with_watchdog(mut self, watchdog: Duration) -> Self {
        self.watchdog = watchdog;
        self
    }

    /// Called from `Supervised::restarting`.
    pub fn restarting(&mut self) {
        if self.kill.is_cancelled() {
            // Not a restart: the term is over and the actor idles out.
            return;
        }
        self.restarts += 1;
        // A loop that ran well for a while starts its backoff over.
        if self.started_at.elapsed() > Duration::from_secs(60) {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        let name = self.name;
        self.board.update(name, |s| s.restarts += 1);
        metrics::counter!(crate::telemetry::ACTOR_RESTARTS, "actor" => name).increment(1);
    }

    /// Runs `body` as this incarnation's loop: after the backoff delay (on
    /// restarts), until it ends or the kill switch trips. Then the actor
    /// stops; the supervisor restarts it unless the term is over.
    pub fn spawn_loop<A, F>(&mut self, ctx: &mut Context<A>, body: F)
    where
        A: Actor<Context = Context<A>>,
        F: Future<Output = Result<(), ActorError>> + 'static,
    {
        if self.kill.is_cancelled() {
            // The term is over. Stay idle: the actor ends once the pipeline
            // releases its address. Stopping here instead would make the
            // supervisor restart it at once, synchronously, in a loop that
            // never yields the thread, so the pipeline could never release
            // it (a replica fenced by its own actor froze that way).
            self.board.update(self.name, |s| s.state = "stopped");
            return;
        }
        self.started_at = Instant::now();
        let delay = match self.consecutive_failures.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            n => self.backoff.delay(n - 1),
        };
        let (recovered, failures) = (
            self.board.next_recovery(),
            self.consecutive_failures.clone(),
        );
        let (name, kill, board, progress) = (
            self.name,
            self.kill.clone(),
            self.board.clone(),
            self.progress.clone(),
        );
        board.update(name, |s| {
            s.state = if delay.is_zero() {
                "running"
            } else {
                "backoff"
            }
        });
        progress.tick();
        let run = async move {
            tokio::select! {
                _ = kill.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
                _ = recovered, if !delay.is_zero() => {
                    // The store is back: go now, with a fresh backoff (a
                    // store that keeps failing brings it back up).
                    failures.store(0, Ordering::Relaxed);
                }
            }
            board.update(name, |s| s.state = "running");
            progress.tick();
            tokio::select! {
                _ = kill.cancelled() => Ok(()),
                result = body => result,
            }
        };
        let (kill, board) = (self.kill.clone(), self.board.clone());
        ctx.spawn(wrap_future::<_, A>(run).map(move |result, _actor, ctx| {
            match result {
                Ok(()) => {}
                Err(ActorError::Fenced) => {
                    tracing::warn!(actor = name, "fenced: another replica is leader, stopping the term");
                    kill.cancel();
                }
                Err(error) => {
                    let retryable = error.retryable();
                    let kind = if error.connection_level() { "connection" } else { "actor" };
                    metrics::counter!(crate::telemetry::RETRIES_TOTAL, "kind" => kind).increment(1);
                    tracing::warn!(actor = name, %error, retryable, "actor failed, restarting with backoff");
                    board.record_error(name, &error.to_string());
                }
            }
            board.update(name, |s| s.state = "stopped");
            ctx.stop();
        }));
        let (watchdog, progress) = (self.watchdog, self.progress.clone());
        ctx.run_interval(Duration::from_secs(1), move |_actor, ctx| {
            if progress.idle() > watchdog {
                tracing::warn!(
                    actor = name,
                    idle_secs = progress.idle().as_secs(),
                    "no progress, restarting"
                );
                ctx.stop();
            }
        });
    }
}

/// Seconds since the epoch, for JSON.
pub fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::{Supervised, Supervisor};

    /// An actor whose loop finds the term taken over at once.
    struct FencedAtOnce {
        shell: Shell,
    }

    impl Actor for FencedAtOnce {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            self.shell
                .spawn_loop(ctx, async { Err(ActorError::Fenced) });
        }
    }

    impl Supervised for FencedAtOnce {
        fn restarting(&mut self, _ctx: &mut Context<Self>) {
            self.shell.restarting();
        }
    }

    #[test]
    fn an_actor_that_ends_its_term_leaves_the_thread_to_the_others() {
        let (done, finished) = std::sync::mpsc::channel();
        // Its own thread: a livelocked actix thread must fail the test, not
        // hang it.
        std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let kill = CancellationToken::new();
                let board = Arc::new(StatusBoard::default());
                let (alive, mut stopped) = tokio::sync::mpsc::channel::<()>(1);
                let backoff =
                    Backoff::new(Duration::from_millis(1), 2.0, Duration::from_millis(10));
                let addr = {
                    let (kill, board) = (kill.clone(), board.clone());
                    Supervisor::start(move |_| FencedAtOnce {
                        shell: Shell::new("fenced", kill, board, backoff, alive),
                    })
                };
                kill.cancelled().await;
                // Another task on this thread still runs (the pipeline's
                // stop, in the service)...
                tokio::time::sleep(Duration::from_millis(20)).await;
                // ...and releasing the address ends the actor.
                drop(addr);
                let ended = tokio::time::timeout(Duration::from_secs(5), stopped.recv()).await;
                let restarts = board.actors()["fenced"].restarts;
                let _ = done.send((ended.is_ok(), restarts));
            });
        });
        let (ended, restarts) = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the actix thread was livelocked by the supervisor");
        assert!(ended, "the actor outlived its released address");
        assert_eq!(restarts, 0, "the end of a term is not a restart");
    }
}
