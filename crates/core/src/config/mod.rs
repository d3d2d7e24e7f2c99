//! Configuration (README "Configuration"): a TOML file, every key overridable by
//! `ETCD_PG_SYNC__SECTION__KEY` environment variables, deserialized into typed
//! structs with named defaults, then validated with errors that name the key.
//!
//! The environment is passed in as a map so tests control it (docs/design.md D10).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::INTERNAL_PREFIX;
use crate::backoff::Backoff;
use crate::ident::{Ident, RESERVED_TABLES};
use crate::mapping::{Direction, Mapping, MappingSet, Policy, ValueFormat, prefixes_overlap};

/// Environment variable prefix; sections and keys are separated by `__`.
pub const ENV_PREFIX: &str = "ETCD_PG_SYNC";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or parsed.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value parsed but is not acceptable.
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A secret string: never printed by `Debug`, `Display` or serialization.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// A connection URL that may hold a password (in its user info or its
/// query string): `Debug`, `Display` and serialization show it redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// Key prefixes to sync. None configured = the whole keyspace into `kv`.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name: replicas with the same name elect one leader among them.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// This replica's id in status, events and history. Default: the host name.
    #[serde(default)]
    pub node_id: String,
    /// TTL of the leader's etcd lease: a dead leader is replaced after this.
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: default_cluster_name(),
            node_id: String::new(),
            lease_ttl_secs: default_lease_ttl_secs(),
        }
    }
}

fn default_cluster_name() -> String {
    "default".into()
}
fn default_lease_ttl_secs() -> u64 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd cluster (`http://` or `https://`).
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// User for etcd authentication (RBAC); none = no authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password of `username`; prefer `password_file` or the environment.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: EtcdTlsConfig,
    /// Time allowed to open a connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for one request (not for watches).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// etcd's `--max-txn-ops` (128 by default): bounds the ops of one txn.
    #[serde(default = "default_max_txn_ops")]
    pub max_txn_ops: usize,
    /// etcd's `--max-request-bytes` (1.5 MiB by default): larger values are
    /// dead-lettered instead of sent.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Largest message accepted from etcd. Reads are paged and watch
    /// responses fragmented by bytes, so one message holds one page (about
    /// 8 MiB) or one revision; this is only the guard against a larger one.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

impl EtcdConfig {
    /// Changes and request bytes one etcd txn of the service may carry:
    /// etcd's limits less `reserved_ops` (compares the service adds, such as
    /// the leader fence) and 64 KiB of headroom for the request's framing.
    pub fn txn_limits(&self, reserved_ops: usize) -> (usize, usize) {
        (
            self.max_txn_ops.saturating_sub(reserved_ops).max(1),
            self.max_request_bytes.saturating_sub(64 * 1024).max(1),
        )
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: default_etcd_endpoints(),
            username: None,
            password: None,
            password_file: None,
            tls: EtcdTlsConfig::default(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            max_txn_ops: default_max_txn_ops(),
            max_request_bytes: default_max_request_bytes(),
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_txn_ops() -> usize {
    128
}
fn default_max_request_bytes() -> usize {
    1_572_864
}
fn default_max_response_bytes() -> usize {
    512 * 1024 * 1024
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// CA certificate (PEM) that signed the etcd server certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Server name to verify instead of the endpoint's host.
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user@host:port/db`; a password in it is
    /// redacted in every output. `sslmode`, `sslrootcert`, `sslcert` and
    /// `sslkey` in its query string mean what they mean to libpq and are
    /// moved into `[postgres.tls]`; `prefer` and `allow`, which fall back to
    /// plaintext without telling, are refused.
    #[serde(default = "default_postgres_url")]
    pub url: SecretUrl,
    /// Password, overriding one in the URL; prefer `password_file`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Schema holding the mirror tables and the service's own tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Connections in the pool (the sync uses up to 4 at once).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Time allowed to open a connection or wait for a pooled one.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub tls: PostgresTlsConfig,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: default_postgres_url(),
            password: None,
            password_file: None,
            schema: default_schema(),
            pool_size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            tls: PostgresTlsConfig::default(),
        }
    }
}

fn default_postgres_url() -> SecretUrl {
    SecretUrl::new("postgres://postgres@127.0.0.1:5432/postgres")
}
fn default_schema() -> String {
    "etcd_sync".into()
}
fn default_pool_size() -> u32 {
    8
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTlsConfig {
    /// `disable`, `require` (encrypt, trust any certificate), `verify-ca`
    /// (certificate signed by `ca_file`), `verify-full` (and the host name).
    #[serde(default)]
    pub mode: SslMode,
    /// CA certificate (PEM) for `verify-ca` and `verify-full`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for certificate authentication.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// etcd key prefix; the mirror table holds the full key.
    pub prefix: String,
    /// Mirror table in the schema.
    pub table: String,
    /// `both`, `etcd-to-pg` or `pg-to-etcd`.
    #[serde(default = "default_direction")]
    pub direction: String,
    /// `newest-wins`, `etcd-wins`, `pg-wins` or `manual`.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// `bytes`, or `json`: the mirror table also shows each value as
    /// `value_json jsonb` (NULL when the value is not JSON).
    #[serde(default = "default_value_format")]
    pub value_format: String,
    /// With `json`: a GIN index on `value_json`.
    #[serde(default)]
    pub json_index: bool,
}

fn default_value_format() -> String {
    "bytes".into()
}

fn default_direction() -> String {
    "both".into()
}
fn default_policy() -> String {
    "newest-wins".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Most etcd events applied in one PostgreSQL transaction (a revision is
    /// never split, so one multi-key txn may exceed it).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a batch waits for more events before it is applied. 0 applies
    /// whatever has arrived as soon as the previous batch committed.
    #[serde(default)]
    pub batch_linger_ms: u64,
    /// Outbox rows read per poll.
    #[serde(default = "default_batch_size")]
    pub outbox_batch_size: usize,
    /// Fallback outbox poll interval when no NOTIFY arrives.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Wake the outbox poller by LISTEN/NOTIFY (off = polling only).
    #[serde(default = "default_true")]
    pub listen_notify: bool,
    /// Keys per page of the snapshot's range reads.
    #[serde(default = "default_snapshot_page_size")]
    pub snapshot_page_size: usize,
    /// How often an idle watch asks etcd for a progress notification, which
    /// advances the checkpoint without events.
    #[serde(default = "default_progress_interval_ms")]
    pub progress_interval_ms: u64,
    /// A watch that answers nothing for this long is reconnected.
    #[serde(default = "default_watch_stall_timeout_ms")]
    pub watch_stall_timeout_ms: u64,
    /// Watches replaying a large backlog in parallel, one per key range
    /// (etcd replays each watch at about 10,000 revisions a second; on 2
    /// cores 8 did best, bench/RESULTS.md). More than 1 relaxes "an etcd
    /// txn is applied in one PostgreSQL transaction" while catching up (a
    /// txn's keys in different ranges land apart), so 1, one watch, is the
    /// default.
    #[serde(default = "default_catchup_streams")]
    pub catchup_streams: u32,
    /// How many revisions behind etcd's head a leader must be for the
    /// parallel catch-up (one watch replays fewer in about a second).
    #[serde(default = "default_catchup_min_behind")]
    pub catchup_min_behind: u64,
    /// Drop history older than this many days, a partition at a time
    /// (keeping each key's newest row); 0 keeps history forever.
    #[serde(default)]
    pub history_retention_days: u32,
    /// About how many days of changes one history partition holds (sized
    /// by the rate the revision clock measures); retention drops a
    /// partition once all of it is older than `history_retention_days`.
    #[serde(default = "default_history_partition_days")]
    pub history_partition_days: u32,
    /// Delete audit events older than this many days; 0 keeps them forever.
    #[serde(default = "default_events_retention_days")]
    pub events_retention_days: u32,
    /// Compare etcd and PostgreSQL this often inside the leader (0 = off).
    #[serde(default)]
    pub anti_entropy_interval_secs: u64,
    /// A key whose mirror row a user's transaction holds this long (its
    /// etcd changes wait meanwhile) is reported: a `key-blocked` audit event
    /// naming the holding backend's pid.
    #[serde(default = "default_key_blocked_alert_secs")]
    pub key_blocked_alert_secs: u64,
    /// Which side `newest-wins` keeps when PostgreSQL's write falls inside
    /// the window in which etcd's change was made, so that neither can be
    /// called newer: `etcd` (default) or `pg`.
    #[serde(default = "default_newest_wins_tie")]
    pub newest_wins_tie: crate::policy::Side,
    /// How often every replica samples etcd's revision into the revision
    /// clock (the width of the window of an etcd change's time).
    #[serde(default = "default_clock_interval_ms")]
    pub clock_interval_ms: u64,
    /// Delete revision clock samples older than this many days; 0 keeps
    /// them forever (a row per sample that saw a new revision).
    #[serde(default = "default_clock_retention_days")]
    pub clock_retention_days: u32,
    /// What the leader does when etcd turns out to be restored from a
    /// backup or replaced (a new timeline): follow it, or pause for an
    /// operator.
    #[serde(default)]
    pub on_etcd_restore: OnEtcdRestore,
}

/// `sync.on_etcd_restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnEtcdRestore {
    /// The mirror converges to the restored etcd; every value this rolls
    /// back is recorded (and can be put back).
    #[default]
    FollowEtcd,
    /// Syncing stops, `/readyz` fails and an alert fires until an operator
    /// runs `etcd-pg-sync timeline resume --take etcd|pg`.
    Pause,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            batch_linger_ms: 0,
            outbox_batch_size: default_batch_size(),
            poll_interval_ms: default_poll_interval_ms(),
            listen_notify: true,
            snapshot_page_size: default_snapshot_page_size(),
            progress_interval_ms: default_progress_interval_ms(),
            watch_stall_timeout_ms: default_watch_stall_timeout_ms(),
            catchup_streams: default_catchup_streams(),
            catchup_min_behind: default_catchup_min_behind(),
            history_retention_days: 0,
            history_partition_days: default_history_partition_days(),
            events_retention_days: default_events_retention_days(),
            anti_entropy_interval_secs: 0,
            key_blocked_alert_secs: default_key_blocked_alert_secs(),
            newest_wins_tie: default_newest_wins_tie(),
            clock_interval_ms: default_clock_interval_ms(),
            clock_retention_days: default_clock_retention_days(),
            on_etcd_restore: OnEtcdRestore::default(),
        }
    }
}

fn default_batch_size() -> usize {
    1_000
}
fn default_poll_interval_ms() -> u64 {
    1_000
}
fn default_true() -> bool {
    true
}
fn default_snapshot_page_size() -> usize {
    1_000
}
fn default_progress_interval_ms() -> u64 {
    5_000
}
fn default_watch_stall_timeout_ms() -> u64 {
    30_000
}
fn default_events_retention_days() -> u32 {
    30
}
fn default_key_blocked_alert_secs() -> u64 {
    30
}
fn default_newest_wins_tie() -> crate::policy::Side {
    crate::policy::Side::Etcd
}
fn default_clock_interval_ms() -> u64 {
    1_000
}
fn default_clock_retention_days() -> u32 {
    30
}

fn default_catchup_streams() -> u32 {
    1
}
fn default_catchup_min_behind() -> u64 {
    10_000
}
fn default_history_partition_days() -> u32 {
    30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First retry waits up to this long (full jitter).
    #[serde(default = "default_retry_initial_ms")]
    pub initial_ms: u64,
    /// Growth of the wait per retry.
    #[serde(default = "default_retry_multiplier")]
    pub multiplier: f64,
    /// Longest wait between retries.
    #[serde(default = "default_retry_max_ms")]
    pub max_ms: u64,
    /// Attempts of one change before it goes to the dead-letter list
    /// (connection-level failures retry forever).
    #[serde(default = "default_retry_max_attempts")]
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_ms: default_retry_initial_ms(),
            multiplier: default_retry_multiplier(),
            max_ms: default_retry_max_ms(),
            max_attempts: default_retry_max_attempts(),
        }
    }
}

fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_multiplier() -> f64 {
    2.0
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_retry_max_attempts() -> u32 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /healthz, /readyz, /status and /metrics.
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

fn default_http_listen() -> String {
    "127.0.0.1:8479".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`; unset = no
    /// trace export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `pretty` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log filter, `tracing` env-filter syntax (`info`, `eps_actors=debug`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            log_format: LogFormat::Pretty,
            log_level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

impl ClusterConfig {
    /// Checks the `cluster` values.
    fn validate(&self) -> Result<(), ConfigError> {
        let cluster = self;
        if cluster.name.is_empty()
            || !cluster
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::invalid(
                "cluster.name",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        if cluster.node_id.is_empty() || cluster.node_id.len() > 200 {
            return Err(ConfigError::invalid(
                "cluster.node_id",
                "must be 1 to 200 characters",
            ));
        }
        if !(2..=300).contains(&cluster.lease_ttl_secs) {
            return Err(ConfigError::invalid(
                "cluster.lease_ttl_secs",
                "must be between 2 and 300",
            ));
        }
        Ok(())
    }
}

impl EtcdConfig {
    /// Checks the `etcd` values.
    fn validate(&self) -> Result<(), ConfigError> {
        let etcd = self;
        if etcd.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "etcd.endpoints",
                "needs at least one endpoint",
            ));
        }
        for (i, endpoint) in etcd.endpoints.iter().enumerate() {
            let url = url::Url::parse(endpoint).map_err(|e| {
                ConfigError::invalid(format!("etcd.endpoints[{i}]"), format!("{endpoint:?}: {e}"))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::invalid(
                    format!("etcd.endpoints[{i}]"),
                    format!("{endpoint:?}: expected http://host:port or https://host:port"),
                ));
            }
        }
        if etcd.username.is_some() {
            for (i, endpoint) in etcd.endpoints.iter().enumerate() {
                if let Ok(url) = url::Url::parse(endpoint)
                    && url.scheme() == "http"
                    && !is_loopback(&url)
                {
                    return Err(ConfigError::invalid(
                        format!("etcd.endpoints[{i}]"),
                        format!(
                            "{endpoint:?}: with etcd.username set, http:// would send the password \
                             and the auth token in cleartext; use https:// (with [etcd.tls]), or \
                             a loopback address"
                        ),
                    ));
                }
            }
        }
        if etcd.password.is_some() && etcd.username.is_none() {
            return Err(ConfigError::invalid(
                "etcd.username",
                "is required when a password is set",
            ));
        }
        if etcd.tls.cert_file.is_some() != etcd.tls.key_file.is_some() {
            return Err(ConfigError::invalid(
                "etcd.tls.key_file",
                "cert_file and key_file must be set together",
            ));
        }
        if !(2..=10_000).contains(&etcd.max_txn_ops) {
            return Err(ConfigError::invalid(
                "etcd.max_txn_ops",
                "must be between 2 and 10000",
            ));
        }
        if etcd.max_request_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "etcd.max_request_bytes",
                "must be at least 65536",
            ));
        }
        // One watch event carries a value and its previous value, each up to
        // a request's size: a message must hold that, and a page.
        if etcd.max_response_bytes < 4 * etcd.max_request_bytes {
            return Err(ConfigError::invalid(
                "etcd.max_response_bytes",
                "must be at least 4 times etcd.max_request_bytes",
            ));
        }
        positive("etcd.connect_timeout_ms", etcd.connect_timeout_ms)?;
        positive("etcd.request_timeout_ms", etcd.request_timeout_ms)?;
        Ok(())
    }
}

impl PostgresConfig {
    /// Checks the `postgres` values.
    fn validate(&self) -> Result<(), ConfigError> {
        let pg = self;
        let url = url::Url::parse(pg.url.expose()).map_err(|e| {
            ConfigError::invalid("postgres.url", format!("{}: {e}", pg.url.redacted()))
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::invalid(
                "postgres.url",
                "expected postgres://user@host:port/database",
            ));
        }
        Ident::parse(&pg.schema).map_err(|m| ConfigError::invalid("postgres.schema", m))?;
        if pg.pool_size < 4 {
            return Err(ConfigError::invalid(
                "postgres.pool_size",
                "must be at least 4 (watcher, poller, arbiter and listener)",
            ));
        }
        positive("postgres.connect_timeout_ms", pg.connect_timeout_ms)?;
        if matches!(pg.tls.mode, SslMode::VerifyCa | SslMode::VerifyFull)
            && pg.tls.ca_file.is_none()
        {
            return Err(ConfigError::invalid(
                "postgres.tls.ca_file",
                "is required for verify-ca and verify-full",
            ));
        }
        if pg.tls.cert_file.is_some() != pg.tls.key_file.is_some() {
            return Err(ConfigError::invalid(
                "postgres.tls.key_file",
                "cert_file and key_file must be set together",
            ));
        }
        Ok(())
    }
}

impl SyncConfig {
    /// Checks the `sync` values.
    fn validate(&self) -> Result<(), ConfigError> {
        let sync = self;
        positive("sync.batch_size", sync.batch_size as u64)?;
        positive("sync.outbox_batch_size", sync.outbox_batch_size as u64)?;
        positive("sync.poll_interval_ms", sync.poll_interval_ms)?;
        positive("sync.snapshot_page_size", sync.snapshot_page_size as u64)?;
        positive("sync.progress_interval_ms", sync.progress_interval_ms)?;
        positive("sync.clock_interval_ms", sync.clock_interval_ms)?;
        positive(
            "sync.history_partition_days",
            sync.history_partition_days as u64,
        )?;
        if !(1..=64).contains(&sync.catchup_streams) {
            return Err(ConfigError::invalid(
                "sync.catchup_streams",
                "must be between 1 and 64",
            ));
        }
        if sync.watch_stall_timeout_ms <= sync.progress_interval_ms {
            return Err(ConfigError::invalid(
                "sync.watch_stall_timeout_ms",
                "must be greater than sync.progress_interval_ms",
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// Checks the `retry` values.
    fn validate(&self) -> Result<(), ConfigError> {
        let retry = self;
        positive("retry.initial_ms", retry.initial_ms)?;
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                "retry.multiplier",
                "must be a number >= 1.0",
            ));
        }
        if retry.max_ms < retry.initial_ms {
            return Err(ConfigError::invalid(
                "retry.max_ms",
                "must be at least retry.initial_ms",
            ));
        }
        positive("retry.max_attempts", retry.max_attempts as u64)?;
        Ok(())
    }
}

impl Config {
    /// Loads the file (if any), applies `ETCD_PG_SYNC__*` overrides from `env`,
    /// reads secret files, fills derived defaults and validates.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Parse(format!("config file {}: {e}", path.display())))?;
            check_toml_syntax(path, &text)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let prefix = format!("{ENV_PREFIX}__");
        let endpoints_key = format!("{prefix}ETCD__ENDPOINTS");
        let (lists, overrides): (HashMap<String, String>, HashMap<String, String>) = env
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| *k == endpoints_key);
        let environment = || {
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
        };
        builder = builder
            // Values stay strings until a setting asks for a number or a
            // boolean: a password `007` must not become `7`.
            .add_source(environment().source(Some(overrides)))
            .add_source(
                environment()
                    .list_separator(",")
                    .with_list_parse_key("etcd.endpoints")
                    .try_parsing(true)
                    .source(Some(lists)),
            );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Parse(describe_load_error(&e)))?;
        let mut config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(describe_load_error(&e)))?;
        config.resolve()?;
        config.validate()?;
        Ok(config)
    }

    /// Fills defaults that depend on the machine and reads `*_file` secrets.
    fn resolve(&mut self) -> Result<(), ConfigError> {
        if self.cluster.node_id.is_empty() {
            self.cluster.node_id = hostname();
        }
        if let Some(path) = &self.etcd.password_file {
            self.etcd.password = Some(read_secret_file("etcd.password_file", path)?);
        }
        if let Some(path) = &self.postgres.password_file {
            self.postgres.password = Some(read_secret_file("postgres.password_file", path)?);
        }
        self.postgres.take_tls_from_url()?;
        for (key, path) in [
            ("etcd.tls.key_file", &self.etcd.tls.key_file),
            ("postgres.tls.key_file", &self.postgres.tls.key_file),
        ] {
            if let Some(path) = path {
                check_private_file(key, path)?;
            }
        }
        Ok(())
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster.validate()?;
        self.etcd.validate()?;
        self.postgres.validate()?;
        self.validated_mappings()?;
        self.sync.validate()?;
        self.retry.validate()?;
        self.http.listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("http.listen", format!("{:?}: {e}", self.http.listen))
        })?;

        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            url::Url::parse(endpoint).map_err(|e| {
                ConfigError::invalid("telemetry.otlp_endpoint", format!("{endpoint:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// The mappings, validated; the default whole-keyspace mapping when none
    /// is configured.
    pub fn validated_mappings(&self) -> Result<MappingSet, ConfigError> {
        if self.mappings.is_empty() {
            return Ok(MappingSet::new(vec![Mapping {
                prefix: Vec::new(),
                table: Ident::parse("kv").expect("'kv' is a valid identifier"),
                direction: Direction::Both,
                policy: Policy::NewestWins,
                tie: self.sync.newest_wins_tie,
                value_format: ValueFormat::Bytes,
                json_index: false,
            }]));
        }
        let mut mappings: Vec<Mapping> = Vec::with_capacity(self.mappings.len());
        for (i, raw) in self.mappings.iter().enumerate() {
            let key = |field: &str| format!("mappings[{i}].{field}");
            let prefix = raw.prefix.as_bytes().to_vec();
            if prefix.starts_with(INTERNAL_PREFIX)
                || INTERNAL_PREFIX.starts_with(&prefix) && !prefix.is_empty()
            {
                return Err(ConfigError::invalid(
                    key("prefix"),
                    format!(
                        "{:?} overlaps the service's own prefix {:?}",
                        raw.prefix,
                        String::from_utf8_lossy(INTERNAL_PREFIX)
                    ),
                ));
            }
            let table =
                Ident::parse(&raw.table).map_err(|m| ConfigError::invalid(key("table"), m))?;
            if RESERVED_TABLES.contains(&table.as_str()) || table.as_str().ends_with("_text") {
                return Err(ConfigError::invalid(
                    key("table"),
                    format!("{:?} is reserved by the service", raw.table),
                ));
            }
            // Read as text and parsed here, not by serde, so an unknown
            // word is reported with the mapping's key.
            let direction = Direction::parse(&raw.direction).ok_or_else(|| {
                ConfigError::invalid(
                    key("direction"),
                    format!(
                        "unknown direction {:?}, expected both, etcd-to-pg or pg-to-etcd",
                        raw.direction
                    ),
                )
            })?;
            let policy: Policy = raw
                .policy
                .parse()
                .map_err(|m: String| ConfigError::invalid(key("policy"), m))?;
            let value_format = ValueFormat::parse(&raw.value_format).ok_or_else(|| {
                ConfigError::invalid(
                    key("value_format"),
                    format!(
                        "unknown value format {:?}, expected bytes or json",
                        raw.value_format
                    ),
                )
            })?;
            if raw.json_index && value_format != ValueFormat::Json {
                return Err(ConfigError::invalid(
                    key("json_index"),
                    "needs value_format = \"json\"",
                ));
            }
            for (j, earlier) in mappings.iter().enumerate() {
                if prefixes_overlap(&earlier.prefix, &prefix) {
                    return Err(ConfigError::invalid(
                        key("prefix"),
                        format!(
                            "{:?} overlaps mappings[{j}].prefix {:?}",
                            raw.prefix, self.mappings[j].prefix
                        ),
                    ));
                }
                if earlier.table == table {
                    return Err(ConfigError::invalid(
                        key("table"),
                        format!("{:?} is already used by mappings[{j}]", raw.table),
                    ));
                }
            }
            mappings.push(Mapping {
                prefix,
                table,
                direction,
                policy,
                tie: self.sync.newest_wins_tie,
                value_format,
                json_index: raw.json_index,
            });
        }
        Ok(MappingSet::new(mappings))
    }

    pub fn schema(&self) -> Ident {
        Ident::parse(&self.postgres.schema).expect("validated at load")
    }

    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.retry.initial_ms),
            self.retry.multiplier,
            Duration::from_millis(self.retry.max_ms),
        )
    }

    /// The PostgreSQL URL with any password replaced, for logs and output.
    pub fn postgres_url_redacted(&self) -> String {
        self.postgres.url.redacted()
    }

    /// The effective configuration as TOML, secrets redacted (`check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl PostgresConfig {
    /// True when a password is sent to a server whose certificate is not
    /// verified (`require`): an active attacker could pose as the server,
    /// ask for the password in cleartext or weaken SCRAM. SCRAM with channel
    /// binding ties the exchange to the TLS session, so the service insists
    /// on it then (unless the URL sets `channel_binding` itself).
    pub fn requires_channel_binding(&self) -> bool {
        let Ok(url) = url::Url::parse(self.url.expose()) else {
            return false;
        };
        let password_in_url =
            url.password().is_some() || url.query_pairs().any(|(name, _)| name == "password");
        let explicit = url.query_pairs().any(|(name, _)| name == "channel_binding");
        self.tls.mode == SslMode::Require
            && (self.password.is_some() || password_in_url)
            && !explicit
    }

    /// Moves libpq's TLS parameters from the URL's query string into
    /// `tls` (the connection library understands only part of them), and
    /// refuses those that could fall back to plaintext.
    fn take_tls_from_url(&mut self) -> Result<(), ConfigError> {
        let key = "postgres.url";
        let Ok(mut url) = url::Url::parse(self.url.expose()) else {
            return Ok(()); // reported by validate, redacted
        };
        let mut mode = None;
        let mut kept = Vec::new();
        let mut files: [(&str, Option<PathBuf>); 3] =
            [("sslrootcert", None), ("sslcert", None), ("sslkey", None)];
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "sslmode" => {
                    mode = Some(match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        "allow" | "prefer" => {
                            return Err(ConfigError::invalid(
                                key,
                                format!(
                                    "sslmode={value} falls back to plaintext without telling; use \
                                     sslmode=verify-full (or require), or sslmode=disable to choose \
                                     plaintext"
                                ),
                            ));
                        }
                        other => {
                            return Err(ConfigError::invalid(
                                key,
                                format!(
                                    "unknown sslmode {other:?}, expected disable, require, \
                                     verify-ca or verify-full"
                                ),
                            ));
                        }
                    });
                }
                "sslrootcert" | "sslcert" | "sslkey" => {
                    for (file_name, file) in files.iter_mut() {
                        if *file_name == name.as_ref() {
                            *file = Some(PathBuf::from(value.as_ref()));
                        }
                    }
                }
                "sslcrl"
                | "sslcrldir"
                | "sslpassword"
                | "sslsni"
                | "sslcompression"
                | "sslcertmode"
                | "ssl_min_protocol_version"
                | "ssl_max_protocol_version" => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{name} is not supported; see [postgres.tls] for what is"),
                    ));
                }
                _ => kept.push((name.into_owned(), value.into_owned())),
            }
        }
        let [(_, ca_file), (_, cert_file), (_, key_file)] = files;
        // libpq: with a root certificate, `require` verifies the chain.
        let mode = match mode {
            Some(SslMode::Require) if ca_file.is_some() => Some(SslMode::VerifyCa),
            other => other,
        };
        if let Some(mode) = mode {
            if self.tls.mode != SslMode::Disable && self.tls.mode != mode {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "sslmode in the URL ({mode:?}) disagrees with postgres.tls.mode ({:?}); \
                         set one of them",
                        self.tls.mode
                    ),
                ));
            }
            self.tls.mode = mode;
        }
        for (name, from_url, setting) in [
            ("sslrootcert", ca_file, &mut self.tls.ca_file),
            ("sslcert", cert_file, &mut self.tls.cert_file),
            ("sslkey", key_file, &mut self.tls.key_file),
        ] {
            let Some(from_url) = from_url else { continue };
            if setting.as_ref().is_some_and(|set| *set != from_url) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{name} in the URL disagrees with [postgres.tls]; set one of them"),
                ));
            }
            *setting = Some(from_url);
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        self.url = SecretUrl::new(url.to_string());
        Ok(())
    }
}

/// A TOML syntax error, told by position only: the offending line may hold
/// a password.
fn check_toml_syntax(path: &Path, text: &str) -> Result<(), ConfigError> {
    let Err(error) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let position = error
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        })
        .unwrap_or_default();
    Err(ConfigError::Parse(format!(
        "{}: TOML syntax error{position}: {}",
        path.display(),
        error.message()
    )))
}

/// A loading error without the offending value, which may be a secret.
fn describe_load_error(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::Type {
            key,
            expected,
            origin,
            ..
        } => {
            let key = key.as_deref().unwrap_or("a setting");
            let origin = origin
                .as_deref()
                .map(|o| format!(" (from {o})"))
                .unwrap_or_default();
            format!("{key}: expected {expected}{origin}")
        }
        config::ConfigError::At { error, key, .. } => match key {
            Some(key) => format!("{key}: {}", describe_load_error(error)),
            None => describe_load_error(error),
        },
        config::ConfigError::FileParse { uri, .. } => format!(
            "cannot parse {}",
            uri.as_deref().unwrap_or("the configuration")
        ),
        other => other.to_string(),
    }
}

/// `http://` to this machine only: loopback addresses and `localhost`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Replaces the passwords of a URL (`scheme://user:secret@host`,
/// `?password=secret`) with a marker.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("REDACTED"));
            }
            let secret_param = |name: &str| name.contains("password");
            if url.query_pairs().any(|(name, _)| secret_param(&name)) {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if secret_param(&name) {
                            "REDACTED".to_owned()
                        } else {
                            value.into_owned()
                        };
                        (name.into_owned(), value)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        // Unparseable: show only the scheme so nothing secret leaks.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{REDACTED}"),
            None => REDACTED.into(),
        },
    }
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

/// Reads a password file: private to its owner (see [`check_private_file`])
/// and not empty; a trailing newline is not part of the password.
fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    check_private_file(key, path)?;
    let content = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = content.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(secret))
}

/// libpq's rule for private keys, applied to every secret file: nobody but
/// the owner may read it, except the group of a root-owned file (how
/// Kubernetes mounts secrets with `fsGroup`). A file that does not exist
/// is left to whoever reads it.
fn check_private_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o777;
    let world = mode & 0o007 != 0;
    let group_write = mode & 0o030 != 0;
    let group_read = mode & 0o040 != 0 && meta.uid() != 0;
    if world || group_write || group_read {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{} is accessible by others (mode {mode:04o}); `chmod 600` it (or 640 with root \
                 as owner and the service's group)",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("node-{}", std::process::id()))
}

#[cfg(test)]
mod tests;
