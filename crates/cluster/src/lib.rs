//! Leader election (docs/design.md G6). Every replica campaigns with a key under
//! `__etcd_pg_sync/<cluster>/election/`, bound to a lease it keeps alive.
//! The key with the lowest create revision leads; the others wait for the
//! key just before theirs to go. The leader's **term** is its key's create
//! revision, strictly increasing across elections: it is written to
//! PostgreSQL (only if greater than the stored one) before any sync actor
//! starts, every PostgreSQL transaction checks it, and every etcd write
//! compares the leader key's create revision with it.
//!
//! Losing the lease (keepalive failing for a TTL, a long pause) or being
//! fenced stops the whole pipeline at once; the replica campaigns again.
//! Shutdown resigns (revokes the lease) so a standby takes over at once.

use eps_core::audit::AuditKind;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_actors::{Pipeline, StatusBoard, SyncContext, telemetry};
use eps_core::config::Config;
use eps_etcd::{EtcdClient, EtcdError, LeaderFence};
use eps_store::{Fence, Store, StoreError};
use tokio_util::sync::CancellationToken;

/// The election prefix of a cluster.
pub fn election_prefix(cluster: &str) -> Vec<u8> {
    let mut prefix = eps_core::cluster_prefix(cluster);
    prefix.extend_from_slice(b"election/");
    prefix
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Standby,
    Leader,
}

/// This node's view of the election, for `/status` and metrics.
#[derive(Debug)]
pub struct NodeStatus {
    role: Mutex<Role>,
    term: AtomicI64,
    leader: Mutex<Option<String>>,
}

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus {
            role: Mutex::new(Role::Standby),
            term: AtomicI64::new(0),
            leader: Mutex::new(None),
        }
    }
}

impl NodeStatus {
    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The term this node leads with (0 when standby).
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::Relaxed)
    }

    /// The current leader's node id, as last observed.
    pub fn leader(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_leader(&self, leader: Option<String>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    fn become_leader(&self, term: i64) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Leader;
        self.term.store(term, Ordering::Relaxed);
        metrics::gauge!(telemetry::IS_LEADER).set(1.0);
        metrics::gauge!(telemetry::TERM).set(term as f64);
        metrics::counter!(telemetry::LEADER_CHANGES_TOTAL).increment(1);
    }

    fn become_standby(&self) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Standby;
        self.term.store(0, Ordering::Relaxed);
        metrics::gauge!(telemetry::IS_LEADER).set(0.0);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("term {term} is not newer than the stored one: a newer leader exists")]
    StaleTerm { term: i64 },
}

/// What a node needs to campaign and lead.
#[derive(Clone)]
pub struct Node {
    pub config: Arc<Config>,
    pub store: Store,
    pub etcd: EtcdClient,
    pub board: Arc<StatusBoard>,
    pub status: Arc<NodeStatus>,
    /// Leases of earlier rounds not revoked yet (etcd was unreachable).
    pub leftover_leases: Arc<Mutex<Vec<i64>>>,
}

impl Node {
    /// Campaigns, leads, steps down and campaigns again until `shutdown`.
    /// Must run on the actix system's thread (it starts the actors).
    pub async fn run(self, shutdown: CancellationToken) {
        let backoff = self.config.backoff();
        let mut failures = 0u32;
        metrics::gauge!(telemetry::IS_LEADER).set(0.0);
        while !shutdown.is_cancelled() {
            match self.campaign_and_lead(&shutdown).await {
                Ok(()) => failures = 0,
                Err(error) => {
                    tracing::warn!(%error, "election round failed, campaigning again");
                    self.board.record_error("election", &error.to_string());
                    let delay = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                        // A store is back: campaign now, backoff afresh.
                        _ = self.board.next_recovery() => failures = 0,
                    }
                }
            }
        }
    }

    async fn campaign_and_lead(&self, shutdown: &CancellationToken) -> Result<(), ClusterError> {
        let cluster = &self.config.cluster;
        let ttl = cluster.lease_ttl_secs as i64;
        self.revoke_leftover_leases().await;
        let lease = self.etcd.grant_lease(ttl).await?;
        let granted_at = Instant::now();
        let resign = Resign {
            etcd: self.etcd.clone(),
            lease,
            revoked: false,
        };
        let outcome = self.stand_and_lead(lease, granted_at, shutdown).await;
        // Awaited, not left to `Drop`: on shutdown the process exits right
        // after this, and a lease left behind would hold the election for
        // a whole TTL.
        if !resign.revoke().await {
            self.leftover_leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(lease);
        }
        outcome
    }

    /// Revokes the leases of earlier rounds that could not be revoked then
    /// (etcd was unreachable). etcd keeps leases alive across its own
    /// restart, so an old round's key would otherwise stay the oldest and
    /// hold the election — this replica's new key included — for a TTL.
    async fn revoke_leftover_leases(&self) {
        let leftover: Vec<i64> = std::mem::take(
            &mut *self
                .leftover_leases
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for lease in leftover {
            let revoked =
                tokio::time::timeout(Duration::from_secs(3), self.etcd.revoke_lease(lease)).await;
            match revoked {
                Ok(Ok(())) => tracing::info!(lease, "revoked the lease of an earlier round"),
                // Gone already (expired): nothing holds the election.
                Ok(Err(error)) if error.to_string().contains("lease not found") => {}
                _ => self
                    .leftover_leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(lease),
            }
        }
    }

    /// One round on `lease`: campaign, stand by, lead, step down.
    async fn stand_and_lead(
        &self,
        lease: i64,
        granted_at: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), ClusterError> {
        let cluster = &self.config.cluster;
        let lost = CancellationToken::new();
        let _keepalive = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keep_alive(
            self.etcd.clone(),
            lease,
            Duration::from_secs(cluster.lease_ttl_secs),
            granted_at,
            lost.clone(),
        )));
        let Some((key, term)) = self.campaign(lease, &lost, shutdown).await? else {
            return Ok(());
        };
        if self.claim_term(term, &lost, shutdown).await? {
            self.lead(key, term, &lost, shutdown).await;
        }
        // The caller revokes the lease: the key goes, a standby takes over.
        Ok(())
    }

    /// Creates our election key on `lease` and waits until it is the
    /// oldest: our key and term (its create revision), or `None` when the
    /// lease or the key was lost meanwhile, or on shutdown (stand again).
    async fn campaign(
        &self,
        lease: i64,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Vec<u8>, i64)>, ClusterError> {
        let cluster = &self.config.cluster;
        let prefix = election_prefix(&cluster.name);
        let mut key = prefix.clone();
        key.extend_from_slice(format!("{lease:016x}").as_bytes());
        let term = self
            .etcd
            .create_if_absent(&key, cluster.node_id.as_bytes(), lease)
            .await?;
        tracing::info!(term, "campaigning");
        loop {
            if lost.is_cancelled() || shutdown.is_cancelled() {
                return Ok(None);
            }
            let leader = self.etcd.oldest_under(&prefix).await?;
            self.status.set_leader(
                leader
                    .as_ref()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            );
            if leader.as_ref().is_some_and(|kv| kv.key == key) {
                return Ok(Some((key, term)));
            }
            let Some(predecessor) = self.etcd.predecessor_under(&prefix, term).await? else {
                // Not the oldest, and nothing older than our key: our key is
                // gone (deleted by hand, lost in an etcd restore) while the
                // lease lives. Stand again with a new lease and key.
                tracing::warn!(term, "our election key is gone, campaigning again");
                return Ok(None);
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = lost.cancelled() => {
                    tracing::warn!("lease lost while standing by, campaigning again");
                    return Ok(None);
                }
                waited = self.etcd.wait_deleted(&predecessor.key, predecessor.meta.mod_revision) => waited?,
                gone = self.etcd.wait_deleted(&key, term) => {
                    gone?;
                    tracing::warn!(term, "our election key was deleted, campaigning again");
                    return Ok(None);
                }
                // Refresh the observed leader now and then.
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Makes `term` current in PostgreSQL: waits for the old leader's open
    /// transactions, after which every one of them fails. `false` when the
    /// lease was lost meanwhile, or on shutdown.
    async fn claim_term(
        &self,
        term: i64,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<bool, ClusterError> {
        let node = &self.config.cluster.node_id;
        loop {
            if lost.is_cancelled() || shutdown.is_cancelled() {
                return Ok(false);
            }
            let etcd_revision = self.etcd.current_revision().await?;
            match self.store.claim_term(term, node, etcd_revision).await {
                Ok(true) => return Ok(true),
                Ok(false) => return Err(ClusterError::StaleTerm { term }),
                Err(error) if eps_core::Classify::retryable(&error) => {
                    tracing::warn!(%error, "cannot record the term in PostgreSQL yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Leads `term` until the lease is lost, the pipeline is fenced, or
    /// shutdown; then stops the pipeline and stands by.
    async fn lead(
        &self,
        key: Vec<u8>,
        term: i64,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        let node = &self.config.cluster.node_id;
        let fence = Fence {
            term,
            node: node.clone(),
        };
        self.status.become_leader(term);
        self.status.set_leader(Some(node.clone()));
        self.board.clear_last_error();
        tracing::info!(term, %node, "became leader");
        let event = serde_json::json!({"node": node, "term": term, "event": "elected"});
        if let Err(error) = self
            .store
            .record_event(&fence, AuditKind::Leadership, None, &event)
            .await
        {
            tracing::warn!(%error, "cannot record the leadership change");
        }

        let ctx = SyncContext::new(
            self.config.clone(),
            self.store.clone(),
            self.etcd.clone(),
            fence.clone(),
            LeaderFence { key, term },
            self.board.clone(),
        );
        let pipeline = Pipeline::start(ctx);
        let reason = tokio::select! {
            _ = lost.cancelled() => StepDown::LeaseLost,
            _ = pipeline.killed() => StepDown::Fenced,
            _ = shutdown.cancelled() => StepDown::Shutdown,
        };
        tracing::warn!(term, reason = reason.as_str(), "stepping down");
        pipeline.stop(Duration::from_secs(5)).await;
        self.board.all_stopped();
        self.status.become_standby();
        if reason == StepDown::Shutdown {
            let event = serde_json::json!({"node": node, "term": term, "event": "resigned"});
            let _ = self
                .store
                .record_event(&fence, AuditKind::Leadership, None, &event)
                .await;
        }
    }
}

/// Revokes the lease when the round ends (resigning leadership); a lease
/// that cannot be revoked expires after its TTL.
struct Resign {
    etcd: EtcdClient,
    lease: i64,
    revoked: bool,
}

impl Resign {
    /// Revokes now, waiting at most a few seconds (etcd may be
    /// unreachable); false when the lease may still live.
    async fn revoke(mut self) -> bool {
        self.revoked = true;
        match tokio::time::timeout(Duration::from_secs(3), self.etcd.revoke_lease(self.lease)).await
        {
            Ok(Ok(())) => true,
            Ok(Err(error)) if error.to_string().contains("lease not found") => true,
            Ok(Err(error)) => {
                tracing::debug!(%error, "lease revoke failed; retried next round");
                false
            }
            Err(_) => {
                tracing::debug!("lease revoke timed out; retried next round");
                false
            }
        }
    }
}

impl Drop for Resign {
    /// A round abandoned mid-way (its future dropped) revokes in the
    /// background.
    fn drop(&mut self) {
        if self.revoked {
            return;
        }
        let (etcd, lease) = (self.etcd.clone(), self.lease);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(error) = etcd.revoke_lease(lease).await {
                    tracing::debug!(%error, "lease revoke failed; it will expire");
                }
            });
        }
    }
}

/// Renews the lease every third of its TTL. When no renewal has succeeded
/// for a whole TTL (counted from when the last successful request was
/// sent), etcd may have expired it: `lost` trips and the leader stops.
async fn keep_alive(
    etcd: EtcdClient,
    lease: i64,
    ttl: Duration,
    granted_at: Instant,
    lost: CancellationToken,
) {
    let interval = (ttl / 3).max(Duration::from_millis(300));
    let mut valid_from = granted_at;
    let mut stream = None;
    loop {
        if valid_from.elapsed() >= ttl {
            tracing::warn!(lease, "lease not renewed for its whole TTL");
            lost.cancel();
            return;
        }
        let sent_at = Instant::now();
        if stream.is_none() {
            stream = etcd.keep_alive(lease).await.ok();
        }
        let renewed = match stream.as_mut() {
            Some(s) => s.renew().await,
            None => Err(EtcdError::Unavailable("no keepalive stream".into())),
        };
        match renewed {
            Ok(ttl_left) if ttl_left > 0 => {
                valid_from = sent_at;
                tokio::time::sleep(interval).await;
            }
            Ok(_) => {
                tracing::warn!(lease, "lease expired");
                lost.cancel();
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "lease renewal failed, retrying");
                stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepDown {
    /// Its lease could not be renewed within its TTL.
    LeaseLost,
    /// A write found another term in force (or an actor gave up).
    Fenced,
    /// The process is shutting down: it resigns.
    Shutdown,
}

impl StepDown {
    fn as_str(self) -> &'static str {
        match self {
            StepDown::LeaseLost => "lease lost",
            StepDown::Fenced => "fenced",
            StepDown::Shutdown => "shutdown",
        }
    }
}
