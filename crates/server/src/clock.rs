//! The revision clock's sampler: every replica, leader or standby, reads
//! etcd's revision linearizably about once a second between two readings
//! of PostgreSQL's clock and records it, so the time of every etcd
//! revision is known to within about a second whenever one replica runs,
//! through a leader's pause, crash or failover alike (`docs/clocks.md`).

use std::time::Duration;

use eps_actors::telemetry;
use eps_etcd::EtcdClient;
use eps_store::Store;
use tokio_util::sync::CancellationToken;

/// Longest a sample may take; a slower one is abandoned (its bounds would
/// be valid, only loose).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Samples every `interval` until `shutdown`. `probe` is a key the service
/// may read (see [`EtcdClient::identity`]).
pub async fn run(
    store: Store,
    etcd: EtcdClient,
    probe: Vec<u8>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut other_cluster_reported = false;
    loop {
        let result = match tokio::time::timeout(SAMPLE_TIMEOUT, sample(&store, &etcd, &probe)).await
        {
            Ok(Ok(true)) => "recorded",
            Ok(Ok(false)) => {
                if !other_cluster_reported {
                    tracing::warn!(
                        "etcd's cluster id is not the one the mirror follows: revision clock samples are not recorded until the leader has checked it"
                    );
                    other_cluster_reported = true;
                }
                "other-cluster"
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "revision clock sample failed");
                "failed"
            }
            Err(_) => "failed",
        };
        if result == "recorded" {
            other_cluster_reported = false;
        }
        metrics::counter!(telemetry::CLOCK_SAMPLES_TOTAL, "result" => result).increment(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One sample: PostgreSQL's clock, then etcd's revision, then the record
/// (whose insert reads PostgreSQL's clock again). The linearizable read
/// happened between the two readings.
async fn sample(store: &Store, etcd: &EtcdClient, probe: &[u8]) -> anyhow::Result<bool> {
    let started = store.clock_sample_start().await?;
    let (cluster_id, revision) = etcd.identity(probe).await?;
    anyhow::ensure!(revision > 0, "etcd's answer carried no revision");
    Ok(store
        .record_clock_sample(cluster_id, revision, started)
        .await?)
}
