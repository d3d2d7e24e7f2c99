//! Leases and the key operations the leader election is built from.

use eps_core::model::KeyValue;
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};

use crate::error::EtcdError;
use crate::{EtcdClient, convert};

impl EtcdClient {
    /// Grants a lease of `ttl_secs`; returns its id.
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let mut lease = self.raw().lease_client();
        let response = self.timed(lease.grant(ttl_secs, None)).await?;
        Ok(response.id())
    }

    /// Revokes a lease (its keys are deleted).
    pub async fn revoke_lease(&self, id: i64) -> Result<(), EtcdError> {
        let mut lease = self.raw().lease_client();
        self.timed(lease.revoke(id)).await?;
        Ok(())
    }

    /// Opens a keepalive stream for the lease.
    pub async fn keep_alive(&self, id: i64) -> Result<LeaseKeepAlive, EtcdError> {
        let mut lease = self.raw().lease_client();
        let (keeper, stream) = self.timed(lease.keep_alive(id)).await?;
        Ok(LeaseKeepAlive {
            keeper,
            stream,
            timeout: self.request_timeout(),
        })
    }

    /// Puts `key` bound to `lease` unless it exists; returns the key's create
    /// revision either way.
    pub async fn create_if_absent(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<i64, EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.to_vec(),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.to_vec(), None)]);
        let mut kv = self.kv();
        let response = self.timed(kv.txn(txn)).await?;
        if response.succeeded() {
            return Ok(response.header().map_or(0, |h| h.revision()));
        }
        match response.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(|kv| kv.create_revision())
                .ok_or_else(|| {
                    EtcdError::Unavailable("election key vanished while being created".into())
                }),
            other => Err(EtcdError::Other {
                message: format!("unexpected txn response {other:?}"),
                retryable: true,
            }),
        }
    }

    /// The key under `prefix` with the lowest create revision: the
    /// leader's.
    pub async fn oldest_under(&self, prefix: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_limit(1)
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        self.first_of(prefix, options).await
    }

    /// Every key under `prefix` in create order (the election's
    /// candidates: the first leads), each with the seconds its lease has
    /// left (`None`: no lease, or it has just expired).
    pub async fn candidates_under(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<(KeyValue, Option<i64>)>, EtcdError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let mut kv = self.kv();
        let response = self.timed(kv.get(prefix.to_vec(), Some(options))).await?;
        let mut out = Vec::new();
        for kv in response.kvs().iter().map(convert::key_value) {
            let ttl = if kv.meta.lease == 0 {
                None
            } else {
                let mut lease = self.raw().lease_client();
                let left = self
                    .timed(lease.time_to_live(kv.meta.lease, None))
                    .await?
                    .ttl();
                (left >= 0).then_some(left)
            };
            out.push((kv, ttl));
        }
        Ok(out)
    }

    /// The key under `prefix` created last before `revision`: the
    /// predecessor a candidate created at `revision` waits on.
    pub async fn predecessor_under(
        &self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<Option<KeyValue>, EtcdError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_limit(1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(revision - 1);
        self.first_of(prefix, options).await
    }

    async fn first_of(
        &self,
        prefix: &[u8],
        options: GetOptions,
    ) -> Result<Option<KeyValue>, EtcdError> {
        let mut kv = self.kv();
        let response = self.timed(kv.get(prefix.to_vec(), Some(options))).await?;
        Ok(response.kvs().first().map(convert::key_value))
    }

    /// Waits until `key` is deleted (or is absent at `after_revision`).
    pub async fn wait_deleted(&self, key: &[u8], after_revision: i64) -> Result<(), EtcdError> {
        let mut start = after_revision + 1;
        loop {
            let mut watch = self.raw().watch_client();
            let options = WatchOptions::new().with_start_revision(start);
            let mut stream = self.timed(watch.watch(key.to_vec(), Some(options))).await?;
            loop {
                let Some(response) = stream.message().await? else {
                    return Err(EtcdError::Unavailable("watch closed".into()));
                };
                if response.canceled() {
                    // Compacted past `start`: the history we wanted to watch is
                    // gone, so look at the key itself. If it still exists, watch
                    // again from the revision we just read it at; failing here
                    // instead would make every standby restart its election round
                    // (new lease, new key) after each compaction.
                    let (state, revision) = self.get(key).await?;
                    if state.is_none() {
                        return Ok(());
                    }
                    start = revision + 1;
                    break;
                }
                if response
                    .events()
                    .iter()
                    .any(|e| e.event_type() == etcd_client::EventType::Delete)
                {
                    return Ok(());
                }
            }
        }
    }

    /// Deletes one key.
    pub async fn delete(&self, key: &[u8]) -> Result<(), EtcdError> {
        let mut kv = self.kv();
        self.timed(kv.delete(key.to_vec(), None)).await?;
        Ok(())
    }

    /// Puts one key (tests, tools).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<i64, EtcdError> {
        let mut kv = self.kv();
        let response = self
            .timed(kv.put(key.to_vec(), value.to_vec(), None))
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }
}

/// A lease kept alive by the caller's loop.
pub struct LeaseKeepAlive {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    timeout: std::time::Duration,
}

impl LeaseKeepAlive {
    /// Renews the lease once; returns the remaining TTL in seconds (0 or
    /// less: the lease has expired).
    pub async fn renew(&mut self) -> Result<i64, EtcdError> {
        let round_trip = async {
            self.keeper.keep_alive().await?;
            self.stream.message().await
        };
        let response = tokio::time::timeout(self.timeout, round_trip)
            .await
            .map_err(|_| EtcdError::Timeout(self.timeout))??;
        match response {
            Some(r) => Ok(r.ttl()),
            None => Err(EtcdError::Unavailable(
                "lease keepalive stream closed".into(),
            )),
        }
    }
}
