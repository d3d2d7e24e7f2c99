//! Core types of etcd-pg-sync: configuration, key mappings, conflict policy and
//! retry backoff. Pure logic without I/O (the config loader reads files, nothing
//! else), so every other crate can depend on it.
//!
//! *Architecture invariant*: this crate knows neither etcd-client nor diesel.

pub mod audit;
pub mod backoff;
pub mod config;
pub mod ident;
pub mod keys;
pub mod mapping;
pub mod model;
pub mod policy;
pub mod reconcile;
#[cfg(feature = "sql")]
mod sql;

pub use backoff::Backoff;
pub use config::{Config, ConfigError};
pub use mapping::{Direction, Mapping, MappingSet, Policy};

/// Prefix of the keys the service itself keeps in etcd (election). Never
/// mirrored, whatever the mappings say.
pub const INTERNAL_PREFIX: &[u8] = b"__etcd_pg_sync/";

/// The keys one cluster of replicas keeps in etcd: `__etcd_pg_sync/<cluster>/`
/// (its election, its timeline mark).
pub fn cluster_prefix(cluster: &str) -> Vec<u8> {
    let mut prefix = INTERNAL_PREFIX.to_vec();
    prefix.extend_from_slice(cluster.as_bytes());
    prefix.push(b'/');
    prefix
}

/// Classifies a failure for the retry machinery (docs/design.md D8): may a retry
/// succeed, and is the failure about the connection (pause the whole pipeline)
/// rather than about one change.
pub trait Classify {
    fn retryable(&self) -> bool;
    /// Connection-level failures are retried forever with the pipeline paused.
    fn connection_level(&self) -> bool {
        false
    }
}
