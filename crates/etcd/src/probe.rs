//! Preflight probes (`etcd-pg-sync doctor`): what the service will ask of
//! etcd, asked without changing anything. Writes are only ever in the
//! branch of a txn that cannot run (its compare, a version below 0, is
//! never true); etcd checks the permissions and limits of both branches
//! before it evaluates the compare.

use eps_core::keys;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};

use crate::{EtcdClient, EtcdError};

/// The key a probe names under `prefix` (etcd refuses an empty key).
fn probe_key(prefix: &[u8]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(b"etcd-pg-sync-doctor-probe");
    key
}

/// The etcd wire form of the end of the range under `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    keys::range_end_for_etcd(keys::prefix_end(prefix).as_deref())
}

/// A compare that is never true.
fn never(key: &[u8]) -> Compare {
    Compare::version(key.to_vec(), CompareOp::Less, 0)
}

/// What `doctor` learns of the etcd cluster.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    pub version: String,
    pub cluster_id: u64,
    pub revision: i64,
    pub db_size: i64,
}

impl EtcdClient {
    /// The answering member's version, the cluster id and revision.
    pub async fn server_status(&self) -> Result<ServerStatus, EtcdError> {
        let mut client = self.raw().clone();
        let status = self.timed(client.status()).await?;
        Ok(ServerStatus {
            version: status.version().to_owned(),
            cluster_id: status.header().map_or(0, |h| h.cluster_id()),
            revision: status.header().map_or(0, |h| h.revision()),
            db_size: status.db_size(),
        })
    }

    /// How many keys `prefix` holds.
    pub async fn count_under(&self, prefix: &[u8]) -> Result<i64, EtcdError> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only();
        let mut kv = self.kv();
        let response = self
            .timed(kv.get(prefix_or_zero(prefix), Some(options)))
            .await?;
        Ok(response.count())
    }

    /// Whether this client may read every key under `prefix` and, with
    /// `write`, put and delete them: `Err(PermissionDenied)` when not.
    pub async fn probe_access(&self, prefix: &[u8], write: bool) -> Result<(), EtcdError> {
        let key = probe_key(prefix);
        let end = prefix_end(prefix);
        let read = TxnOp::get(
            prefix_or_zero(prefix),
            Some(
                GetOptions::new()
                    .with_range(end.clone())
                    .with_keys_only()
                    .with_limit(1),
            ),
        );
        // Deleting the whole range needs write permission on all of it.
        let writes = if write {
            vec![TxnOp::delete(
                prefix_or_zero(prefix),
                Some(DeleteOptions::new().with_range(end)),
            )]
        } else {
            Vec::new()
        };
        let txn = Txn::new()
            .when([never(&key)])
            .and_then(writes)
            .or_else([read]);
        let mut kv = self.kv();
        self.timed(kv.txn(txn)).await.map(|_| ())
    }

    /// Whether etcd takes a txn of `ops` operations per branch (its
    /// `--max-txn-ops`): `Err(Invalid("too many operations ..."))` when not.
    pub async fn probe_txn_ops(&self, prefix: &[u8], ops: usize) -> Result<(), EtcdError> {
        let key = probe_key(prefix);
        let gets: Vec<TxnOp> = (0..ops).map(|_| TxnOp::get(key.clone(), None)).collect();
        let txn = Txn::new().when([never(&key)]).and_then(gets);
        let mut kv = self.kv();
        self.timed(kv.txn(txn)).await.map(|_| ())
    }

    /// Whether etcd takes a request of about `bytes` (its
    /// `--max-request-bytes`): `Err(TooLarge)` when not.
    pub async fn probe_request_bytes(&self, prefix: &[u8], bytes: usize) -> Result<(), EtcdError> {
        let key = probe_key(prefix);
        // The compare's value carries the size; the request's other bytes
        // are a few dozen.
        let value = vec![b'x'; bytes.saturating_sub(key.len() + 64)];
        // A txn with a write is checked against etcd's limit before it is
        // applied (a read-only one is not); the write is in the branch
        // that cannot run.
        let txn = Txn::new()
            .when([never(&key)])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        let mut kv = self.kv();
        self.timed(kv.txn(txn)).await.map(|_| ())
    }
}

/// etcd refuses an empty key; a range from `\0` covers every key.
fn prefix_or_zero(prefix: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.to_vec()
    }
}
