//! Shared helpers of the integration tests: a world of real stores, the
//! service binary, and comparisons of etcd with PostgreSQL.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::time::Duration;

use eps_harness::{Etcd, Postgres, Service, ServiceConfig, TestDatabase};

pub const BIN: &str = env!("CARGO_BIN_EXE_etcd-pg-sync");

/// A real etcd, a fresh database on the binary's shared PostgreSQL, and a
/// way to start replicas of the service against them.
pub struct World {
    pub etcd: Etcd,
    pub db: TestDatabase,
    /// Extra TOML for every replica (mappings, sections).
    pub extra_toml: String,
    pub env: BTreeMap<String, String>,
}

impl World {
    pub async fn new(extra_toml: &str) -> anyhow::Result<World> {
        let etcd = Etcd::start().await?;
        let db = Postgres::fresh_database().await?;
        Ok(World {
            etcd,
            db,
            extra_toml: extra_toml.to_owned(),
            env: BTreeMap::new(),
        })
    }

    pub fn config(&self, node: &str) -> ServiceConfig {
        let mut config = ServiceConfig::new(
            BIN,
            &self.etcd.endpoint(),
            &self.db.url(),
            node,
            &self.extra_toml,
        );
        config.env = self.env.clone();
        config
    }

    pub async fn start(&self, node: &str) -> anyhow::Result<Service> {
        Service::start(self.config(node), node).await
    }

    pub async fn etcd_client(&self) -> anyhow::Result<etcd_client::Client> {
        self.etcd.client().await
    }

    pub async fn pg(&self) -> anyhow::Result<tokio_postgres::Client> {
        let client = self.db.client().await?;
        client.batch_execute("SET search_path TO etcd_sync").await?;
        Ok(client)
    }
}

/// Every key and value under `prefix` in etcd (internal keys left out).
pub async fn etcd_snapshot(
    client: &mut etcd_client::Client,
    prefix: &[u8],
) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let options = if prefix.is_empty() {
        etcd_client::GetOptions::new().with_all_keys()
    } else {
        etcd_client::GetOptions::new().with_prefix()
    };
    let key = if prefix.is_empty() {
        vec![0u8]
    } else {
        prefix.to_vec()
    };
    let response = client.get(key, Some(options)).await?;
    Ok(response
        .kvs()
        .iter()
        .filter(|kv| !kv.key().starts_with(b"__etcd_pg_sync/"))
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect())
}

/// Every key and value of a mirror table with the prefix.
pub async fn pg_snapshot(
    pg: &tokio_postgres::Client,
    table: &str,
    prefix: &[u8],
) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let rows = pg
        .query(
            &format!(
                "SELECT key, value FROM etcd_sync.{table} WHERE substring(key FROM 1 FOR $2) = $1"
            ),
            &[&prefix, &(prefix.len() as i32)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Waits until etcd and the mirror table hold the same keys and values
/// under `prefix`; on timeout, fails with the first differences.
pub async fn wait_converged(
    world: &World,
    table: &str,
    prefix: &[u8],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut etcd = world.etcd_client().await?;
    let pg = world.pg().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let a = etcd_snapshot(&mut etcd, prefix).await?;
        let b = pg_snapshot(&pg, table, prefix).await?;
        if a == b {
            return Ok(a);
        }
        if tokio::time::Instant::now() > deadline {
            let only_etcd: Vec<_> = a
                .keys()
                .filter(|k| !b.contains_key(*k))
                .take(5)
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let only_pg: Vec<_> = b
                .keys()
                .filter(|k| !a.contains_key(*k))
                .take(5)
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let differ: Vec<_> = a
                .iter()
                .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
                .take(5)
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect();
            anyhow::bail!(
                "not converged after {timeout:?}: etcd {} keys, pg {} keys; only in etcd {only_etcd:?}, only in pg {only_pg:?}, different {differ:?}",
                a.len(),
                b.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn count(pg: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(pg.query_one(sql, &[]).await?.get::<_, i64>(0))
}

/// The `/status` JSON of a replica.
pub async fn status(service: &Service) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&service.status().await?)?)
}

/// Waits until one of `services` reports `role = leader`; returns its index.
pub async fn wait_leader(services: &[&Service], timeout: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        for (i, service) in services.iter().enumerate() {
            if let Ok(s) = status(service).await {
                if s["role"] == "leader" {
                    return Ok(i);
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no leader within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the binary with arguments and environment; returns (code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String, String)> {
    let output = std::process::Command::new(BIN)
        .args(args)
        .env_remove("ETCD_PG_SYNC_CONFIG")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}
