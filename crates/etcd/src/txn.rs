//! The PostgreSQL → etcd write: one txn that applies many keys' changes only
//! if every key is still at the revision the change was based on, and only
//! while this replica is the leader (fencing).

use eps_core::model::KeyValue;
use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::error::EtcdError;
use crate::{EtcdClient, convert};

/// The leader key and its create revision (the term): every write compares
/// it, so a deposed leader's writes fail once its key is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderFence {
    pub key: Vec<u8>,
    pub term: i64,
}

/// One key's change: put `value` (or delete when `None`) if the key's mod
/// revision is `expect_mod_revision` (0 = the key must not exist).
///
/// A put over an existing key keeps the key's lease (etcd's `ignore_lease`):
/// a value edited in PostgreSQL must not turn an expiring key into a
/// permanent one. A put creating the key attaches `lease` (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasWrite {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub expect_mod_revision: i64,
    pub lease: i64,
}

impl CasWrite {
    fn put_options(&self) -> Option<PutOptions> {
        if self.expect_mod_revision > 0 {
            // The compare guarantees the key exists, which ignore_lease needs.
            Some(PutOptions::new().with_ignore_lease())
        } else if self.lease != 0 {
            Some(PutOptions::new().with_lease(self.lease))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Every write was applied at `revision`. `noop_deletes` lists the writes
    /// (by index) that deleted a key that was already absent: etcd records
    /// no event for them.
    Applied {
        revision: i64,
        noop_deletes: Vec<usize>,
    },
    /// Nothing was applied: these writes (by index) found the key elsewhere
    /// (etcd's current state, `None` = absent) at store revision `revision`.
    Conflicts {
        revision: i64,
        conflicts: Vec<(usize, Option<KeyValue>)>,
    },
    /// Nothing was applied: the leader key is gone or has another term.
    Fenced,
}

/// Applies `writes` (distinct keys) in one txn.
pub async fn compare_and_swap(
    client: &EtcdClient,
    fence: Option<&LeaderFence>,
    writes: &[CasWrite],
) -> Result<CasOutcome, EtcdError> {
    debug_assert!(!writes.is_empty());
    let mut compares = Vec::with_capacity(writes.len() + 1);
    let mut on_failure = Vec::with_capacity(writes.len() + 1);
    if let Some(fence) = fence {
        compares.push(Compare::create_revision(
            fence.key.clone(),
            CompareOp::Equal,
            fence.term,
        ));
        on_failure.push(TxnOp::get(fence.key.clone(), None));
    }
    let mut on_success = Vec::with_capacity(writes.len());
    for write in writes {
        compares.push(Compare::mod_revision(
            write.key.clone(),
            CompareOp::Equal,
            write.expect_mod_revision,
        ));
        on_success.push(match &write.value {
            Some(value) => TxnOp::put(write.key.clone(), value.clone(), write.put_options()),
            None => TxnOp::delete(write.key.clone(), Some(DeleteOptions::new())),
        });
        on_failure.push(TxnOp::get(write.key.clone(), None));
    }
    let txn = Txn::new()
        .when(compares)
        .and_then(on_success)
        .or_else(on_failure);
    let mut kv = client.kv();
    let response = tokio::time::timeout(client.request_timeout(), kv.txn(txn))
        .await
        .map_err(|_| EtcdError::Timeout(client.request_timeout()))??;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut results = response.op_responses().into_iter();
    if response.succeeded() {
        let noop_deletes = results
            .enumerate()
            .filter_map(|(i, r)| match r {
                TxnOpResponse::Delete(d) if d.deleted() == 0 => Some(i),
                _ => None,
            })
            .collect();
        return Ok(CasOutcome::Applied {
            revision,
            noop_deletes,
        });
    }
    let current = |results: &mut std::vec::IntoIter<TxnOpResponse>| match results.next() {
        Some(TxnOpResponse::Get(get)) => Ok(get.kvs().first().map(convert::key_value)),
        other => Err(EtcdError::Other {
            message: format!("unexpected txn response {other:?}"),
            retryable: false,
        }),
    };
    if let Some(fence) = fence {
        let leader = current(&mut results)?;
        if leader.is_none_or(|kv| kv.meta.create_revision != fence.term) {
            return Ok(CasOutcome::Fenced);
        }
    }
    let mut conflicts = Vec::new();
    for (i, write) in writes.iter().enumerate() {
        let state = current(&mut results)?;
        let actual = state.as_ref().map_or(0, |kv| kv.meta.mod_revision);
        if actual != write.expect_mod_revision {
            conflicts.push((i, state));
        }
    }
    Ok(CasOutcome::Conflicts {
        revision,
        conflicts,
    })
}

/// Puts `value` at `key` (whatever it held) while `fence`'s leader key
/// stands: the put's revision, or `None` when fenced.
pub async fn fenced_put(
    client: &EtcdClient,
    fence: &LeaderFence,
    key: &[u8],
    value: &[u8],
) -> Result<Option<i64>, EtcdError> {
    let txn = Txn::new()
        .when([Compare::create_revision(
            fence.key.clone(),
            CompareOp::Equal,
            fence.term,
        )])
        .and_then([TxnOp::put(key.to_vec(), value.to_vec(), None)]);
    let mut kv = client.kv();
    let response = tokio::time::timeout(client.request_timeout(), kv.txn(txn))
        .await
        .map_err(|_| EtcdError::Timeout(client.request_timeout()))??;
    Ok(response
        .succeeded()
        .then(|| response.header().map_or(0, |h| h.revision())))
}
