//! The etcd side of etcd-pg-sync: a client with timeouts and TLS/auth from
//! the config, paginated reads at one revision, watch sessions, the fenced
//! compare-and-swap txn of the PostgreSQL → etcd path, and lease helpers for
//! the election.
//!
//! *Architecture invariant*: only this crate depends on etcd-client; the rest
//! of the service sees `eps_core::model` values and [`EtcdError`].

pub mod convert;
pub mod error;
pub mod lease;
pub mod probe;
pub mod txn;
pub mod watch;

use std::time::Duration;

use eps_core::config::EtcdConfig;
use eps_core::model::KeyValue;
use etcd_client::{GetOptions, SortOrder, SortTarget};

pub use error::EtcdError;
pub use txn::{CasOutcome, CasWrite, LeaderFence};
pub use watch::{ProgressRequester, WatchItem, WatchItems, WatchSession};

/// A connected etcd client. Cheap to clone (shares the channel).
#[derive(Clone)]
pub struct EtcdClient {
    client: etcd_client::Client,
    kv: etcd_client::KvClient,
    request_timeout: Duration,
    /// tonic's limit on one message from etcd (its default, 4 MiB, is less
    /// than a txn response of large values): `etcd.max_response_bytes`.
    max_response_bytes: usize,
    /// What it connected with: [`EtcdClient::progress_requests_ordered`]
    /// asks each endpoint on its own.
    config: std::sync::Arc<EtcdConfig>,
    /// Its last answer and when: asked again after a minute.
    progress_order: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, bool)>>>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").finish_non_exhaustive()
    }
}

/// One page of a range read.
#[derive(Debug)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// The revision the page was read at.
    pub revision: i64,
    pub more: bool,
}

impl EtcdClient {
    /// Connects to the configured endpoints (TLS, authentication).
    pub async fn connect(config: &EtcdConfig) -> Result<Self, EtcdError> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            // HTTP/2 pings find a dead connection (black-holed network) even
            // on an idle watch stream.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(user) = &config.username {
            let password = config
                .password
                .as_ref()
                .map(|p| p.expose())
                .unwrap_or_default();
            // Tokens expire (5 min by default with `--auth-token=jwt`):
            // re-authenticate on "invalid auth token" instead of failing
            // every request until a restart.
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = tls_options(config)? {
            options = options.with_tls(tls);
        }
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let connect = etcd_client::Client::connect(config.endpoints.clone(), Some(options));
        let client = tokio::time::timeout(
            request_timeout.max(Duration::from_millis(config.connect_timeout_ms)),
            connect,
        )
        .await
        .map_err(|_| EtcdError::Timeout(request_timeout))??;
        let max_response_bytes = config.max_response_bytes;
        let kv = client
            .kv_client()
            .max_decoding_message_size(max_response_bytes);
        let connected = Self {
            client,
            kv,
            request_timeout,
            max_response_bytes,
            config: std::sync::Arc::new(config.clone()),
            progress_order: Default::default(),
        };
        // Channels connect lazily: ask once so that a refused certificate
        // or password shows here, with its reason.
        connected.current_revision().await?;
        Ok(connected)
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }

    /// Runs one unary request under the request timeout.
    async fn timed<T, F>(&self, request: F) -> Result<T, EtcdError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| EtcdError::Timeout(self.request_timeout))?
            .map_err(EtcdError::from)
    }

    /// The cluster's current revision (and proof that it answers).
    pub async fn current_revision(&self) -> Result<i64, EtcdError> {
        let mut client = self.client.clone();
        let status = self.timed(client.status()).await?;
        Ok(status.header().map_or(0, |h| h.revision()))
    }

    /// The cluster's id and current revision, read linearizably (a status
    /// request answers from whichever member it reaches, and a lagging one
    /// would report a revision behind what the mirror applied). etcd
    /// derives the id from its members' names, addresses and token: a
    /// replaced or restored cluster started with the same flags keeps the
    /// old one's id. `probe` is a key the service may read (with auth on,
    /// a range elsewhere is refused); only its count is fetched.
    pub async fn identity(&self, probe: &[u8]) -> Result<(u64, i64), EtcdError> {
        let mut kv = self.kv.clone();
        let options = GetOptions::new().with_count_only();
        // etcd refuses an empty key; the empty prefix covers every key.
        let probe = if probe.is_empty() {
            vec![0]
        } else {
            probe.to_vec()
        };
        let response = self.timed(kv.get(probe, Some(options))).await?;
        Ok(response
            .header()
            .map_or((0, 0), |h| (h.cluster_id(), h.revision())))
    }

    /// One key as of `revision`: `Ok(None)` when absent then; a compacted
    /// revision is `EtcdError::Compacted`.
    pub async fn get_at(&self, key: &[u8], revision: i64) -> Result<Option<KeyValue>, EtcdError> {
        let mut kv = self.kv.clone();
        let options = GetOptions::new().with_revision(revision);
        let response = self.timed(kv.get(key.to_vec(), Some(options))).await?;
        Ok(response.kvs().first().map(convert::key_value))
    }

    /// One page of `[start, end)` at `revision` (0 = now), in key order.
    pub async fn range_page(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        revision: i64,
        limit: usize,
    ) -> Result<Page, EtcdError> {
        let range_end = eps_core::keys::range_end_for_etcd(end);
        let options = GetOptions::new()
            .with_range(range_end)
            .with_revision(revision)
            .with_limit(limit as i64)
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let mut kv = self.kv.clone();
        let response = self
            .timed(kv.get(range_start(start), Some(options)))
            .await?;
        Ok(Page {
            revision: response.header().map_or(revision, |h| h.revision()),
            more: response.more(),
            kvs: response.kvs().iter().map(convert::key_value).collect(),
        })
    }

    /// How many keys `[start, end)` holds at `revision`.
    pub async fn count_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        revision: i64,
    ) -> Result<i64, EtcdError> {
        let options = GetOptions::new()
            .with_range(eps_core::keys::range_end_for_etcd(end))
            .with_revision(revision)
            .with_count_only();
        let mut kv = self.kv.clone();
        let response = self
            .timed(kv.get(range_start(start), Some(options)))
            .await?;
        Ok(response.count())
    }

    /// The keys of one page of `[start, end)` at `revision`, in order, and
    /// whether more follow.
    pub async fn key_page(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        revision: i64,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        let options = GetOptions::new()
            .with_range(eps_core::keys::range_end_for_etcd(end))
            .with_revision(revision)
            .with_limit(limit as i64)
            .with_keys_only()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let mut kv = self.kv.clone();
        let response = self
            .timed(kv.get(range_start(start), Some(options)))
            .await?;
        let keys = response.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        Ok((keys, response.more()))
    }

    /// The current value of one key.
    pub async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let mut kv = self.kv.clone();
        let response = self.timed(kv.get(key.to_vec(), None)).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((response.kvs().first().map(convert::key_value), revision))
    }

    /// Whether every configured endpoint answers a requested progress
    /// notification in order with the events of its watches (see
    /// [`orders_progress_requests`]). Asked of each endpoint on its own: a
    /// watch may be served by any of them. An endpoint that cannot be asked
    /// counts as not ordering them.
    pub async fn progress_requests_ordered(&self) -> bool {
        let cached = *self
            .progress_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, ordered)) = cached
            && at.elapsed() < Duration::from_secs(60)
        {
            return ordered;
        }
        let ordered = self.ask_progress_order().await;
        *self
            .progress_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), ordered));
        ordered
    }

    async fn ask_progress_order(&self) -> bool {
        for endpoint in &self.config.endpoints {
            let mut one = (*self.config).clone();
            one.endpoints = vec![endpoint.clone()];
            let version = match EtcdClient::connect(&one).await {
                Ok(client) => client.server_status().await.map(|s| s.version),
                Err(error) => Err(error),
            };
            match version {
                Ok(version) if orders_progress_requests(&version) => {}
                Ok(version) => {
                    tracing::debug!(
                        endpoint,
                        version,
                        "etcd answers progress requests out of order"
                    );
                    return false;
                }
                Err(error) => {
                    tracing::debug!(endpoint, %error, "cannot ask etcd its version");
                    return false;
                }
            }
        }
        true
    }

    /// The underlying client, for the modules of this crate.
    pub(crate) fn raw(&self) -> etcd_client::Client {
        self.client.clone()
    }

    pub(crate) fn kv(&self) -> etcd_client::KvClient {
        self.kv.clone()
    }
}

/// Whether etcd of `version` sends the answer to a requested progress
/// notification in order with the events of the watch. Before 3.4.31 and
/// 3.5.13 it answers at once, with its current revision, through a path
/// that overtakes events not yet sent — all of a catching-up watch's
/// backlog (etcd issues 15220 and 17507; Kubernetes gates its use of
/// progress requests on the same versions). Its own periodic progress
/// notifications are in order in every version.
pub fn orders_progress_requests(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u64>().ok());
    let (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    match (major, minor) {
        (3, 4) => patch >= 31,
        (3, 5) => patch >= 13,
        (3, m) => m >= 6,
        (m, _) => m > 3,
    }
}

/// etcd rejects an empty key: the range "from the beginning" starts at
/// the smallest key there can be, "\0".
pub(crate) fn range_start(start: &[u8]) -> Vec<u8> {
    if start.is_empty() {
        vec![0]
    } else {
        start.to_vec()
    }
}

fn tls_options(config: &EtcdConfig) -> Result<Option<etcd_client::TlsOptions>, EtcdError> {
    let https = config.endpoints.iter().any(|e| e.starts_with("https://"));
    let tls = &config.tls;
    if !https && tls.ca_file.is_none() && tls.cert_file.is_none() {
        return Ok(None);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| EtcdError::Invalid(format!("{key}: cannot read {}: {e}", path.display())))
    };
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca_file {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(
            "etcd.tls.ca_file",
            ca,
        )?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.identity(etcd_client::Identity::from_pem(
            read("etcd.tls.cert_file", cert)?,
            read("etcd.tls.key_file", key)?,
        ));
    }
    if let Some(domain) = &tls.domain {
        options = options.domain_name(domain.clone());
    }
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use super::orders_progress_requests;

    #[test]
    fn progress_requests_are_ordered_from_3_4_31_and_3_5_13() {
        for version in [
            "3.4.31", "3.4.34", "3.5.13", "3.5.17", "3.6.0", "v3.6.4", "4.0.0",
        ] {
            assert!(orders_progress_requests(version), "{version}");
        }
        for version in [
            "3.4.23", "3.4.30", "3.5.0", "3.5.12", "3.3.27", "3.4", "", "x.y.z",
        ] {
            assert!(!orders_progress_requests(version), "{version}");
        }
    }
}
