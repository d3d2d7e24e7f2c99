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

    /// Runs a command of the binary with a replica's configuration (and
    /// the world's environment): exit code, stdout, stderr.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let config = self.config("cli");
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &config.toml)?;
        let path = file.path().display().to_string();
        let mut all = args.to_vec();
        all.extend(["--config", path.as_str()]);
        let env: Vec<(&str, &str)> = config
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_cli(&all, &env).await
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
    // Large values (tests/large_values.rs) exceed tonic's 4 MiB default.
    let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
    let response = kv.get(key, Some(options)).await?;
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

pub use eps_harness::service::wait_leader;

/// Runs the binary with arguments and environment; returns (code, stdout, stderr).
/// Async, so the test's runtime (and the fault proxies on it) keeps running
/// while the command waits for the service.
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String, String)> {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("ETCD_PG_SYNC_CONFIG")
        .envs(env.iter().copied())
        .output()
        .await?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// One change as etcd's own event log has it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LoggedChange {
    pub revision: i64,
    pub key: Vec<u8>,
    pub op: String,
    pub value: Option<Vec<u8>>,
}

/// etcd's event log of every key accepted by `keep`, from revision 1 to
/// `until` (watch from revision 1: valid before any compaction).
pub async fn etcd_event_log(
    world: &World,
    until: i64,
    keep: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<LoggedChange>> {
    if until <= 1 {
        return Ok(Vec::new());
    }
    let mut client = world.etcd_client().await?;
    // Every revision after 1 changed at least one key, so the log reaches
    // `until` exactly.
    let options = etcd_client::WatchOptions::new()
        .with_all_keys()
        .with_start_revision(1);
    let mut stream = client.watch(vec![0u8], Some(options)).await?;
    let mut log = Vec::new();
    let mut last = 0;
    while last < until {
        let Some(response) =
            tokio::time::timeout(Duration::from_secs(10), stream.message()).await??
        else {
            anyhow::bail!("watch ended");
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(kv.mod_revision());
            if !keep(kv.key()) || kv.mod_revision() > until {
                continue;
            }
            let delete = event.event_type() == etcd_client::EventType::Delete;
            log.push(LoggedChange {
                revision: kv.mod_revision(),
                key: kv.key().to_vec(),
                op: if delete {
                    "delete".into()
                } else {
                    "put".into()
                },
                value: (!delete).then(|| kv.value().to_vec()),
            });
        }
    }
    log.sort();
    Ok(log)
}

/// The history table as the same kind of list.
pub async fn history_log(pg: &tokio_postgres::Client) -> anyhow::Result<Vec<LoggedChange>> {
    let rows = pg
        .query(
            "SELECT revision, key, op, value FROM etcd_sync.history ORDER BY revision, key",
            &[],
        )
        .await?;
    let mut log: Vec<LoggedChange> = rows
        .iter()
        .map(|r| LoggedChange {
            revision: r.get(0),
            key: r.get(1),
            op: r.get(2),
            value: r.get(3),
        })
        .collect();
    log.sort();
    Ok(log)
}

/// The current etcd revision.
pub async fn etcd_revision(world: &World) -> anyhow::Result<i64> {
    world.etcd.revision().await
}

/// Waits until the checkpoint reaches `revision`.
pub async fn wait_applied(world: &World, revision: i64, timeout: Duration) -> anyhow::Result<()> {
    let pg = world.pg().await?;
    eps_harness::wait_for(&format!("the checkpoint at {revision}"), timeout, || {
        let pg = &pg;
        async move {
            let applied = count(pg, "SELECT applied_revision FROM etcd_sync.sync_state").await?;
            anyhow::ensure!(applied >= revision, "applied revision {applied}");
            Ok(Some(()))
        }
    })
    .await
}

/// Waits until the leader has taken its initial snapshot and applied
/// everything up to now (tests comparing with etcd's whole log start
/// writing after this: changes before the snapshot are not history).
pub async fn wait_synced(world: &World) -> anyhow::Result<()> {
    let head = etcd_revision(world).await?;
    wait_applied(world, head, Duration::from_secs(20)).await
}

/// Asserts that history holds exactly etcd's event log for the kept keys:
/// every change once, nothing else.
pub async fn assert_history_is_etcd_log(
    world: &World,
    keep: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<usize> {
    let until = etcd_revision(world).await?;
    wait_applied(world, until, Duration::from_secs(20)).await?;
    let expected = etcd_event_log(world, until, keep).await?;
    // Leases of the workload may still expire after `until`: compare the
    // revisions both sides have seen.
    let mut actual = history_log(&world.pg().await?).await?;
    actual.retain(|change| change.revision <= until);
    if expected != actual {
        let missing: Vec<_> = expected
            .iter()
            .filter(|c| !actual.contains(c))
            .take(5)
            .collect();
        let extra: Vec<_> = actual
            .iter()
            .filter(|c| !expected.contains(c))
            .take(5)
            .collect();
        let pg = world.pg().await?;
        let mut details = Vec::new();
        for change in &extra {
            let row = pg
                .query_one(
                    "SELECT origin, term, recorded_at::text FROM history WHERE key = $1 AND revision = $2",
                    &[&change.key, &change.revision],
                )
                .await?;
            details.push(format!(
                "{:?}@{} {}: origin {} term {} at {}",
                String::from_utf8_lossy(&change.key),
                change.revision,
                change.op,
                row.get::<_, String>(0),
                row.get::<_, i64>(1),
                row.get::<_, String>(2)
            ));
        }
        let events: Vec<String> = pg
            .query(
                "SELECT kind || ' ' || detail::text FROM sync_events ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        anyhow::bail!(
            "history differs from etcd's log: {} expected, {} recorded; missing {missing:?}; extra {details:?}; events {events:?}",
            expected.len(),
            actual.len()
        );
    }
    Ok(expected.len())
}

/// A seeded random etcd workload: puts, deletes, multi-key txns and leased
/// keys over `prefixes`, from `clients` concurrent clients, `ops` in all.
pub async fn etcd_workload(
    world: &World,
    prefixes: &[&str],
    ops: usize,
    clients: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let endpoint = world.etcd.endpoint();
    let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let endpoint = endpoint.clone();
        let prefixes = prefixes.clone();
        let share = ops / clients + usize::from(client_index < ops % clients);
        tasks.push(tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                seed.wrapping_mul(1_000_003)
                    .wrapping_add(client_index as u64),
            );
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            let key = |rng: &mut rand::rngs::StdRng| {
                let prefix = &prefixes[rng.random_range(0..prefixes.len())];
                format!("{prefix}k{:03}", rng.random_range(0..100))
            };
            for op in 0..share {
                let roll = rng.random_range(0..100);
                let value = format!("v{client_index}-{op}-{}", rng.random::<u32>());
                let result = if roll < 55 {
                    client.put(key(&mut rng), value, None).await.map(|_| ())
                } else if roll < 75 {
                    client.delete(key(&mut rng), None).await.map(|_| ())
                } else if roll < 95 {
                    let mut keys: Vec<String> =
                        (0..rng.random_range(2..5)).map(|_| key(&mut rng)).collect();
                    keys.sort();
                    keys.dedup();
                    let txn_ops: Vec<etcd_client::TxnOp> = keys
                        .into_iter()
                        .map(|k| {
                            if rng.random_bool(0.7) {
                                etcd_client::TxnOp::put(k, value.clone(), None)
                            } else {
                                etcd_client::TxnOp::delete(k, None)
                            }
                        })
                        .collect();
                    client
                        .txn(etcd_client::Txn::new().and_then(txn_ops))
                        .await
                        .map(|_| ())
                } else {
                    match client.lease_grant(1, None).await {
                        Ok(lease) => client
                            .put(
                                key(&mut rng),
                                value,
                                Some(etcd_client::PutOptions::new().with_lease(lease.id())),
                            )
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    }
                };
                if let Err(error) = result {
                    anyhow::bail!("client {client_index} op {op}: {error}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Puts to etcd at a steady pace until stopped, retrying through outages;
/// returns how many puts were acknowledged.
pub fn background_writer(
    endpoint: String,
    prefix: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut acknowledged = 0u64;
        let mut client = None;
        let mut i = 0u64;
        while !stop.is_cancelled() {
            if client.is_none() {
                client = tokio::time::timeout(
                    Duration::from_secs(1),
                    etcd_client::Client::connect([endpoint.clone()], None),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            if let Some(c) = client.as_mut() {
                let put = tokio::time::timeout(
                    Duration::from_secs(1),
                    c.put(
                        format!("{prefix}w{:03}", i % 200),
                        format!("value-{i}"),
                        None,
                    ),
                )
                .await;
                match put {
                    Ok(Ok(_)) => {
                        acknowledged += 1;
                        i += 1;
                    }
                    _ => client = None,
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        acknowledged
    })
}

/// Upserts rows into a mirror table at a steady pace until stopped,
/// retrying through outages; returns how many commits were acknowledged.
pub fn background_pg_writer(
    db: TestDatabase,
    table: &'static str,
    prefix: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut acknowledged = 0u64;
        let mut client: Option<tokio_postgres::Client> = None;
        let mut i = 0u64;
        while !stop.is_cancelled() {
            if client.is_none() {
                client = db.client().await.ok();
            }
            if let Some(c) = client.as_ref() {
                let sql = format!(
                    "INSERT INTO etcd_sync.{table} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                );
                let key = format!("{prefix}p{:03}", i % 200).into_bytes();
                let value = format!("pg-{i}").into_bytes();
                match tokio::time::timeout(Duration::from_secs(2), c.execute(&sql, &[&key, &value]))
                    .await
                {
                    Ok(Ok(_)) => {
                        acknowledged += 1;
                        i += 1;
                    }
                    _ => client = None,
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        acknowledged
    })
}

/// Waits until the count `sql` returns satisfies `done`; `failing` names
/// what the test waits against (the error gives the last count).
pub async fn wait_count(
    pg: &tokio_postgres::Client,
    failing: &str,
    sql: &str,
    done: impl Fn(i64) -> bool,
    timeout: Duration,
) -> anyhow::Result<i64> {
    eps_harness::wait_for(&format!("`{sql}` ({failing})"), timeout, || {
        let done = &done;
        async move {
            let n = count(pg, sql).await?;
            anyhow::ensure!(done(n), "last count {n}");
            Ok(Some(n))
        }
    })
    .await
}

/// Waits until every outbox row is consumed.
pub async fn wait_outbox_empty(world: &World, timeout: Duration) -> anyhow::Result<()> {
    let pg = world.pg().await?;
    wait_count(
        &pg,
        "outbox not drained",
        "SELECT count(*) FROM outbox",
        |n| n <= 0,
        timeout,
    )
    .await?;
    Ok(())
}

/// The audit events of a kind once there is one (they follow the
/// transactions they describe); an error if none comes within `timeout`.
pub async fn awaited_event_details(
    pg: &tokio_postgres::Client,
    kind: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    eps_harness::wait_for(&format!("a {kind} event"), timeout, || async move {
        let events = event_details(pg, kind).await?;
        Ok((!events.is_empty()).then_some(events))
    })
    .await
}

/// Waits until etcd holds `key`.
pub async fn wait_etcd_has(
    client: &etcd_client::Client,
    key: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    eps_harness::wait_for(&format!("{key} in etcd"), timeout, || {
        let mut client = client.clone();
        async move { Ok((!client.get(key, None).await?.kvs().is_empty()).then_some(())) }
    })
    .await
}

pub async fn event_details(
    pg: &tokio_postgres::Client,
    kind: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let rows = pg
        .query(
            "SELECT detail::text FROM etcd_sync.sync_events WHERE kind = $1 ORDER BY id",
            &[&kind],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(serde_json::from_str(r.get(0))?))
        .collect()
}

/// Writes a secret file only its owner may read: the service refuses
/// secret and key files that other users can read.
pub fn write_secret(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The keys and values `state_at(table, revision)` returns.
pub async fn state_at(
    pg: &tokio_postgres::Client,
    table: &str,
    revision: i64,
) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let rows = pg
        .query(
            "SELECT key, value FROM etcd_sync.state_at($1, $2)",
            &[&table, &revision],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
