//! Watches both stores once a second for `/readyz`, `/status` and the
//! gauges: reachability, etcd's revision, the checkpoint, the lag, the
//! outbox, conflicts and dead letters.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_actors::{StatusBoard, telemetry};
use eps_cluster::{NodeStatus, Role};
use eps_etcd::EtcdClient;
use eps_store::Store;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How stale a successful check may be and still count as "connected".
const FRESH: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Health {
    inner: Mutex<Snapshot>,
}

#[derive(Debug, Default, Clone)]
struct Snapshot {
    etcd_ok_at: Option<Instant>,
    pg_ok_at: Option<Instant>,
    etcd_revision: i64,
    applied_revision: i64,
    stored_term: i64,
    outbox_pending: i64,
    conflicts_pending: i64,
    dead_letters: i64,
    last_error: Option<String>,
    /// A new etcd timeline held for an operator (`sync.on_etcd_restore =
    /// "pause"`): what was detected.
    timeline_paused: Option<serde_json::Value>,
}

/// The `/status` document (the fields README documents first).
#[derive(Debug, Serialize)]
pub struct StatusDocument {
    pub node_id: String,
    pub role: Role,
    pub term: i64,
    pub applied_revision: i64,
    pub etcd_revision: i64,
    pub lag_revisions: i64,
    pub outbox_pending: i64,
    pub conflicts_pending: i64,
    pub dead_letters: i64,
    pub last_error: Option<String>,
    pub cluster: String,
    pub leader: Option<String>,
    pub ready: bool,
    pub etcd_connected: bool,
    pub postgres_connected: bool,
    pub actors: std::collections::BTreeMap<&'static str, eps_actors::shell::ActorStatus>,
    /// Set while sync is paused on a restored or replaced etcd, waiting for
    /// `etcd-pg-sync timeline resume`: what was detected.
    pub timeline_paused: Option<serde_json::Value>,
}

impl Health {
    pub fn ready(&self) -> bool {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        fresh(s.etcd_ok_at) && fresh(s.pg_ok_at) && s.timeline_paused.is_none()
    }

    pub fn document(
        &self,
        node_id: &str,
        cluster: &str,
        node: &NodeStatus,
        board: &StatusBoard,
    ) -> StatusDocument {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let role = node.role();
        StatusDocument {
            node_id: node_id.to_owned(),
            role,
            term: match role {
                Role::Leader => node.term(),
                Role::Standby => s.stored_term,
            },
            applied_revision: s.applied_revision,
            etcd_revision: s.etcd_revision,
            lag_revisions: (s.etcd_revision - s.applied_revision).max(0),
            outbox_pending: s.outbox_pending,
            conflicts_pending: s.conflicts_pending,
            dead_letters: s.dead_letters,
            last_error: board.last_error().or(s.last_error),
            cluster: cluster.to_owned(),
            leader: node.leader(),
            ready: fresh(s.etcd_ok_at) && fresh(s.pg_ok_at) && s.timeline_paused.is_none(),
            etcd_connected: fresh(s.etcd_ok_at),
            postgres_connected: fresh(s.pg_ok_at),
            actors: board.actors(),
            timeline_paused: s.timeline_paused,
        }
    }
}

/// Resident memory, CPU time and open descriptors, from /proc (Linux; the
/// metrics are left out elsewhere).
fn process_metrics() {
    const PAGE: f64 = 4096.0;
    const TICKS_PER_SECOND: f64 = 100.0;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(resident) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<f64>().ok())
    {
        metrics::gauge!(telemetry::PROCESS_RESIDENT_MEMORY).set(resident * PAGE);
    }
    // utime and stime are fields 14 and 15, after the parenthesized name.
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        metrics::gauge!(telemetry::PROCESS_CPU_SECONDS).set(ticks as f64 / TICKS_PER_SECOND);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(telemetry::PROCESS_OPEN_FDS).set(fds.count() as f64);
    }
}

fn fresh(at: Option<Instant>) -> bool {
    at.is_some_and(|t| t.elapsed() < FRESH)
}

/// Runs the checks until `shutdown`.
pub async fn run(
    health: Arc<Health>,
    board: Arc<StatusBoard>,
    store: Store,
    etcd: Option<EtcdClient>,
    shutdown: CancellationToken,
) {
    let mut behind_since: Option<Instant> = None;
    // Whether each store answered the previous probe (etcd, PostgreSQL).
    let mut answered = (true, true);
    loop {
        let etcd_revision = match &etcd {
            Some(etcd) => tokio::time::timeout(Duration::from_secs(2), etcd.current_revision())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let state = tokio::time::timeout(Duration::from_secs(2), store.state())
            .await
            .ok();
        let counts = tokio::time::timeout(Duration::from_secs(2), store.counts())
            .await
            .ok();
        let answers = (
            etcd_revision.is_some() || etcd.is_none(),
            matches!(state, Some(Ok(_))),
        );
        if (answers.0 && !answered.0) || (answers.1 && !answered.1) {
            tracing::info!("a store answers again: resuming at once");
            board.store_recovered();
        }
        answered = answers;
        process_metrics();
        {
            let mut s = health.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(revision) = etcd_revision {
                s.etcd_ok_at = Some(Instant::now());
                s.etcd_revision = revision;
                metrics::gauge!(telemetry::ETCD_REVISION).set(revision as f64);
            }
            match state {
                Some(Ok(state)) => {
                    s.pg_ok_at = Some(Instant::now());
                    s.applied_revision = state.applied_revision;
                    s.stored_term = state.term;
                    s.last_error = None;
                    metrics::gauge!(telemetry::TIMELINE_PAUSED).set(
                        if state.timeline_hold.is_some() {
                            1.0
                        } else {
                            0.0
                        },
                    );
                    s.timeline_paused = state.timeline_hold;
                }
                Some(Err(error)) => s.last_error = Some(format!("postgres: {error}")),
                None => s.last_error = Some("postgres: no answer within 2 s".into()),
            }
            if etcd_revision.is_none() && etcd.is_some() {
                s.last_error = Some("etcd: no answer within 2 s".into());
            }
            if let Some(Ok(counts)) = counts {
                s.outbox_pending = counts.outbox_pending;
                s.conflicts_pending = counts.conflicts_pending;
                s.dead_letters = counts.dead_letters;
                metrics::gauge!(telemetry::OUTBOX_DEPTH).set(counts.outbox_pending as f64);
                metrics::gauge!(telemetry::CONFLICTS_PENDING).set(counts.conflicts_pending as f64);
                metrics::gauge!(telemetry::DEAD_LETTERS).set(counts.dead_letters as f64);
                metrics::gauge!(telemetry::KEYS_BLOCKED).set(counts.keys_blocked as f64);
            }
            let lag = (s.etcd_revision - s.applied_revision).max(0);
            metrics::gauge!(telemetry::WATCH_LAG_REVISIONS).set(lag as f64);
            behind_since = if lag == 0 {
                None
            } else {
                behind_since.or(Some(Instant::now()))
            };
            metrics::gauge!(telemetry::WATCH_LAG_SECONDS)
                .set(behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()));
            metrics::gauge!(telemetry::UP, "store" => "etcd").set(if fresh(s.etcd_ok_at) {
                1.0
            } else {
                0.0
            });
            metrics::gauge!(telemetry::UP, "store" => "postgres").set(if fresh(s.pg_ok_at) {
                1.0
            } else {
                0.0
            });
        }
        let pool = store.pool().state();
        metrics::gauge!(telemetry::PG_POOL_CONNECTIONS, "state" => "idle")
            .set(pool.idle_connections as f64);
        metrics::gauge!(telemetry::PG_POOL_CONNECTIONS, "state" => "in_use")
            .set(pool.connections.saturating_sub(pool.idle_connections) as f64);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
