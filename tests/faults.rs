//! Randomized fault injection with a consistency checker (the guarantees
//! of docs/design.md as a whole). Three replicas reach etcd and PostgreSQL through their own
//! proxies; a seeded random workload writes both sides (puts, deletes,
//! multi-key txns, expiring leases, SQL inserts/updates/deletes,
//! multi-row statements and multi-statement transactions, SQL edits of
//! leased keys, refused TRUNCATEs, often
//! on the same keys); a leader that takes over 50 revisions behind
//! catches up in parallel key ranges; a seeded schedule kills, pauses and partitions
//! replicas, restarts both stores, compacts etcd and runs an operator's
//! `verify --repair`.
//! Then everything heals and the checker verifies: both stores equal, no
//! acknowledged write vanished, no SQL transaction torn across etcd
//! revisions, history revisions unique, no history row written by a term
//! after a later one was elected, outbox empty, `verify` clean.
//!
//! Short form in the normal test run; long form:
//! `FAULT_SEED=7 FAULT_MINUTES=30 cargo test --test faults -- --nocapture`
//! (`just faults 7 30`). A failure prints the seed and the schedule.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eps_harness::{Etcd, FaultMode, Postgres, Proxy, Service, ServiceConfig, TestDatabase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(3);
const KEYS: usize = 60;

/// One acknowledged write, as the client saw it.
#[derive(Debug, Clone)]
struct Ack {
    side: &'static str,
    key: Vec<u8>,
    /// `None`: a delete.
    value: Option<Vec<u8>>,
    at: Instant,
    /// etcd's revision of the write (etcd writes only).
    revision: Option<i64>,
}

type Log = Arc<Mutex<Vec<Ack>>>;

fn key(i: usize) -> Vec<u8> {
    format!("/f/k{i:03}").into_bytes()
}

/// etcd writers: puts, deletes, multi-key txns, leased keys.
fn etcd_writer(
    endpoint: String,
    seed: u64,
    log: Log,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut client: Option<etcd_client::Client> = None;
        let mut n = 0u64;
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(2..15))).await;
            if client.is_none() {
                client = tokio::time::timeout(
                    Duration::from_secs(1),
                    etcd_client::Client::connect([endpoint.clone()], None),
                )
                .await
                .ok()
                .and_then(Result::ok);
                continue;
            }
            let Some(c) = client.as_mut() else { continue };
            n += 1;
            let value = format!("etcd-{seed}-{n}").into_bytes();
            let roll = rng.random_range(0..100);
            let attempt: Result<Vec<Ack>, ()> = async {
                if roll < 55 {
                    let k = key(rng.random_range(0..KEYS));
                    let put = timed(c.put(k.clone(), value.clone(), None)).await?;
                    Ok(vec![Ack {
                        side: "etcd",
                        key: k,
                        value: Some(value),
                        at: Instant::now(),
                        revision: put.header().map(|h| h.revision()),
                    }])
                } else if roll < 70 {
                    let k = key(rng.random_range(0..KEYS));
                    let deleted = timed(c.delete(k.clone(), None)).await?;
                    Ok(vec![Ack {
                        side: "etcd",
                        key: k,
                        value: None,
                        at: Instant::now(),
                        revision: deleted.header().map(|h| h.revision()),
                    }])
                } else if roll < 92 {
                    let mut ks: Vec<Vec<u8>> = (0..rng.random_range(2..5))
                        .map(|_| key(rng.random_range(0..KEYS)))
                        .collect();
                    ks.sort();
                    ks.dedup();
                    let ops: Vec<(Vec<u8>, bool)> =
                        ks.into_iter().map(|k| (k, rng.random_bool(0.8))).collect();
                    let txn_ops: Vec<etcd_client::TxnOp> = ops
                        .iter()
                        .map(|(k, put)| {
                            if *put {
                                etcd_client::TxnOp::put(k.clone(), value.clone(), None)
                            } else {
                                etcd_client::TxnOp::delete(k.clone(), None)
                            }
                        })
                        .collect();
                    let txn = timed(c.txn(etcd_client::Txn::new().and_then(txn_ops))).await?;
                    let at = Instant::now();
                    let revision = txn.header().map(|h| h.revision());
                    Ok(ops
                        .into_iter()
                        .map(|(k, put)| Ack {
                            side: "etcd",
                            key: k,
                            value: put.then(|| value.clone()),
                            at,
                            revision,
                        })
                        .collect())
                } else {
                    let lease = timed(c.lease_grant(1, None)).await?;
                    let k = key(rng.random_range(0..KEYS));
                    let put = timed(c.put(
                        k.clone(),
                        value.clone(),
                        Some(etcd_client::PutOptions::new().with_lease(lease.id())),
                    ))
                    .await?;
                    Ok(vec![Ack {
                        side: "etcd",
                        key: k,
                        value: Some(value),
                        at: Instant::now(),
                        revision: put.header().map(|h| h.revision()),
                    }])
                }
            }
            .await;
            match attempt {
                Ok(acks) => log.lock().unwrap().extend(acks),
                Err(()) => client = None,
            }
        }
    })
}

async fn timed<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, ()> {
    match tokio::time::timeout(Duration::from_secs(2), f).await {
        Ok(Ok(v)) => Ok(v),
        _ => Err(()),
    }
}

/// The value a multi-key transaction writes: unique, and naming the
/// transaction (`-x<id>`), which the service's `transaction-split` audit
/// events name too.
async fn transaction_value(c: &tokio_postgres::Client, value: &[u8]) -> Result<Vec<u8>, ()> {
    let xact: i64 = timed(c.query_one("SELECT pg_current_xact_id()::text::int8", &[]))
        .await?
        .get(0);
    Ok([value, format!("-x{xact}").as_bytes()].concat())
}

/// PostgreSQL writers: upserts, updates, deletes, multi-row statements.
fn pg_writer(
    db: TestDatabase,
    seed: u64,
    log: Log,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut client: Option<tokio_postgres::Client> = None;
        let mut n = 0u64;
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(3..20))).await;
            if client.is_none() {
                client = tokio::time::timeout(Duration::from_secs(1), db.client())
                    .await
                    .ok()
                    .and_then(Result::ok);
                continue;
            }
            let Some(c) = client.as_ref() else { continue };
            n += 1;
            let value = format!("pg-{seed}-{n}").into_bytes();
            let roll = rng.random_range(0..100);
            let attempt: Result<Vec<Ack>, ()> = async {
                if roll < 50 {
                    let k = key(rng.random_range(0..KEYS));
                    timed(c.execute(
                        "INSERT INTO etcd_sync.kv_f (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&k, &value],
                    ))
                    .await?;
                    Ok(vec![Ack { side: "pg", key: k, value: Some(value), at: Instant::now(), revision: None }])
                } else if roll < 70 {
                    let k = key(rng.random_range(0..KEYS));
                    let rows = timed(c.query("DELETE FROM etcd_sync.kv_f WHERE key = $1 RETURNING key", &[&k])).await?;
                    Ok(rows.iter().map(|r| Ack { side: "pg", key: r.get(0), value: None, at: Instant::now(), revision: None }).collect())
                } else if roll < 79 {
                    // A key etcd holds under a lease, edited from SQL: it
                    // keeps the lease and expires.
                    let rows = timed(c.query(
                        "UPDATE etcd_sync.kv_f SET value = $1 WHERE key = (SELECT key FROM etcd_sync.kv_f WHERE lease <> 0 LIMIT 1) RETURNING key",
                        &[&value],
                    ))
                    .await?;
                    Ok(rows.iter().map(|r| Ack { side: "pg", key: r.get(0), value: Some(value.clone()), at: Instant::now(), revision: None }).collect())
                } else if roll < 80 && rng.random_bool(0.2) {
                    // TRUNCATE would empty PostgreSQL and leave etcd as it
                    // was: it must be refused (after taking the table's
                    // exclusive lock for a moment, which the sync survives).
                    match timed(c.batch_execute("TRUNCATE etcd_sync.kv_f")).await {
                        Ok(()) => panic!("TRUNCATE of a mirror table was accepted"),
                        Err(()) => Ok(Vec::new()),
                    }
                } else if roll < 90 {
                    // A transaction of several statements: its puts reach
                    // etcd at one revision or not at all.
                    let mut picked: Vec<usize> = (0..rng.random_range(2..5)).map(|_| rng.random_range(0..KEYS)).collect();
                    picked.sort_unstable();
                    picked.dedup();
                    timed(c.batch_execute("BEGIN")).await?;
                    let value = transaction_value(c, &value).await?;
                    for i in &picked {
                        timed(c.execute(
                            "INSERT INTO etcd_sync.kv_f (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                            &[&key(*i), &value],
                        ))
                        .await?;
                    }
                    timed(c.batch_execute("COMMIT")).await?;
                    let at = Instant::now();
                    Ok(picked.into_iter().map(|i| Ack { side: "pg", key: key(i), value: Some(value.clone()), at, revision: None }).collect())
                } else {
                    let first = rng.random_range(0..KEYS - 5);
                    let keys: Vec<Vec<u8>> = (first..first + rng.random_range(2..6)).map(key).collect();
                    timed(c.batch_execute("BEGIN")).await?;
                    let value = transaction_value(c, &value).await?;
                    timed(c.execute(
                        "INSERT INTO etcd_sync.kv_f (key, value) SELECT k, $2 FROM unnest($1::bytea[]) k \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&keys, &value],
                    ))
                    .await?;
                    timed(c.batch_execute("COMMIT")).await?;
                    let at = Instant::now();
                    Ok(keys.into_iter().map(|k| Ack { side: "pg", key: k, value: Some(value.clone()), at, revision: None }).collect())
                }
            }
            .await;
            match attempt {
                Ok(acks) => log.lock().unwrap().extend(acks),
                Err(()) => client = None,
            }
        }
    })
}

struct Cluster {
    etcd: Etcd,
    postgres: Postgres,
    db: TestDatabase,
    replicas: Vec<Service>,
    etcd_proxies: Vec<Proxy>,
    pg_proxies: Vec<Proxy>,
    paused: HashSet<usize>,
    down: HashSet<usize>,
    /// Compactions of history the leader had not applied: what was
    /// overwritten there is unknowable (docs/design.md G5).
    gaps: Vec<Gap>,
    /// The replicas' mapping (TOML).
    mapping: String,
}

/// No etcd revision holds part of a SQL transaction: each multi-key
/// transaction's puts (one value per transaction) that came back from etcd
/// did so at one revision, for every key of it (a revision is applied
/// whole, or lost whole in a compaction gap).
async fn check_transactions_whole(
    pg: &tokio_postgres::Client,
    acks: &[Ack],
    in_gap: impl Fn(&Ack) -> bool,
    schedule: &mut String,
) -> anyhow::Result<()> {
    let mut transactions: std::collections::BTreeMap<&[u8], HashSet<&[u8]>> = Default::default();
    let mut unverifiable: HashSet<&[u8]> = HashSet::new();
    for ack in acks.iter().filter(|a| a.side == "pg") {
        if let Some(value) = &ack.value {
            transactions.entry(value).or_default().insert(&ack.key);
            if in_gap(ack) {
                unverifiable.insert(value);
            }
        }
    }
    transactions.retain(|_, keys| keys.len() > 1);
    // A transaction larger than what the service could send whole reaches
    // etcd in several txns, and says so.
    let split: HashSet<String> = pg
        .query(
            "SELECT detail->>'transaction' FROM etcd_sync.sync_events WHERE kind = 'transaction-split'",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0))
        .collect();
    let audited = |value: &[u8]| {
        let text = String::from_utf8_lossy(value);
        text.rsplit_once("-x")
            .is_some_and(|(_, xact)| split.contains(xact))
    };
    let mut torn = Vec::new();
    for (value, keys) in &transactions {
        let echoed: Vec<(Vec<u8>, i64)> = pg
            .query(
                // Values are unique per transaction; a resync or snapshot
                // row says only that the value was there at its revision.
                "SELECT key, revision FROM etcd_sync.history WHERE value = $1 AND origin IN ('pg', 'etcd')",
                &[value],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // A key whose echo is missing may have come back otherwise: read by
        // a resync (its event lost to a compaction, or an input deferred
        // behind a user's lock and superseded by the resync), or it was
        // overwritten inside a compaction gap before anyone saw it.
        let seen_otherwise: HashSet<Vec<u8>> = pg
            .query(
                "SELECT DISTINCT key FROM etcd_sync.history WHERE value = $1 AND origin IN ('resync', 'snapshot')",
                &[value],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let revisions: HashSet<i64> = echoed.iter().map(|(_, r)| *r).collect();
        let accounted = |k: &&[u8]| {
            echoed.iter().any(|(e, _)| e == k)
                || seen_otherwise.contains(*k)
                || unverifiable.contains(value)
        };
        let whole = audited(value)
            || (revisions.len() <= 1 && (echoed.is_empty() || keys.iter().all(accounted)));
        if !whole {
            // Each key's history around the revisions, every origin.
            let keys: Vec<&[u8]> = keys.iter().copied().collect();
            let low = revisions.iter().min().copied().unwrap_or(0) - 3;
            let high = revisions.iter().max().copied().unwrap_or(0) + 3;
            let around: Vec<String> = pg
                .query(
                    "SELECT format('%s@%s %s %s %s t%s', convert_from(key, 'UTF8'), revision, op, \
                            convert_from(coalesce(value, ''), 'UTF8'), origin, term) \
                     FROM etcd_sync.history WHERE key = ANY($1) AND revision BETWEEN $2 AND $3 \
                     ORDER BY revision, key",
                    &[&keys, &low, &high],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let events: Vec<String> = pg
                .query(
                    "SELECT kind || ' ' || detail::text FROM etcd_sync.sync_events \
                     WHERE kind IN ('transaction-split', 'transaction-settled', 'compaction-recovery', 'verify') \
                     ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            torn.push(format!(
                "{} over {} keys: echoed {:?}\nhistory around: {around:#?}\nevents: {events:#?}",
                String::from_utf8_lossy(value),
                keys.len(),
                echoed
                    .iter()
                    .map(|(k, r)| format!("{}@{r}", String::from_utf8_lossy(k)))
                    .collect::<Vec<_>>()
            ));
        }
    }
    writeln!(
        schedule,
        "multi-key transactions checked: {}",
        transactions.len()
    )?;
    anyhow::ensure!(
        torn.is_empty(),
        "transactions torn across etcd revisions: {torn:#?}"
    );
    Ok(())
}

/// One compaction ahead of the service's checkpoint.
struct Gap {
    /// The checkpoint when etcd compacted (read from PostgreSQL directly).
    checkpoint: i64,
    /// The compact revision.
    compacted: i64,
    /// When the leader could have started lagging (for PostgreSQL writes,
    /// whose etcd revision the test does not know) and when the
    /// compaction was done.
    from: Instant,
    to: Instant,
}

impl Gap {
    /// An etcd write in the compacted, unapplied revisions, or a
    /// PostgreSQL write that may have reached etcd there.
    fn covers(&self, ack: &Ack, etcd_lag_from: Instant) -> bool {
        match ack.revision {
            Some(r) => r > self.checkpoint && r <= self.compacted,
            None => ack.at >= self.from.min(etcd_lag_from) && ack.at <= self.to,
        }
    }
}

impl Cluster {
    async fn start(policy: &str) -> anyhow::Result<Cluster> {
        let etcd = Etcd::start().await?;
        // Lock waits in the server log help a post-mortem (FAULT_LOG_DIR).
        let postgres = Postgres::start_with(vec![
            ("log_lock_waits".into(), "on".into()),
            ("deadlock_timeout".into(), "500ms".into()),
            ("log_line_prefix".into(), "%m [%p] %a ".into()),
        ])
        .await?;
        let db = postgres.create_database().await?;
        let mut cluster = Cluster {
            etcd,
            postgres,
            db,
            replicas: Vec::new(),
            etcd_proxies: Vec::new(),
            pg_proxies: Vec::new(),
            paused: HashSet::new(),
            down: HashSet::new(),
            gaps: Vec::new(),
            mapping: format!(
                "\n[[mappings]]\nprefix = \"/f/\"\ntable = \"kv_f\"\npolicy = \"{policy}\"\n"
            ),
        };
        let mapping = cluster.mapping.clone();
        for i in 0..3 {
            let etcd_proxy =
                Proxy::start(format!("127.0.0.1:{}", cluster.etcd.client_port()).parse()?).await?;
            let pg_proxy = Proxy::start(format!("127.0.0.1:{}", cluster.db.port).parse()?).await?;
            let node = format!("n{}", i + 1);
            let config = ServiceConfig::new(
                BIN,
                &format!("http://127.0.0.1:{}", etcd_proxy.port()),
                &cluster.db.url_via(pg_proxy.port()),
                &node,
                &mapping,
            );
            let mut config = config;
            // A leader that takes over behind replays in parallel key
            // ranges (off by default; the default needs 10,000 revisions
            // behind).
            config
                .env
                .insert("ETCD_PG_SYNC__SYNC__CATCHUP_STREAMS".into(), "8".into());
            config
                .env
                .insert("ETCD_PG_SYNC__SYNC__CATCHUP_MIN_BEHIND".into(), "50".into());
            config.toml = config.toml.replace(
                "log_level = \"info\"",
                "log_level = \"warn,eps_cluster=info,eps_actors=info,eps_actors::watcher=debug\"",
            );
            cluster.replicas.push(Service::start(config, &node).await?);
            cluster.etcd_proxies.push(etcd_proxy);
            cluster.pg_proxies.push(pg_proxy);
        }
        Ok(cluster)
    }

    async fn leader(&self) -> Option<usize> {
        for (i, replica) in self.replicas.iter().enumerate() {
            if self.paused.contains(&i) || self.down.contains(&i) {
                continue;
            }
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(500), status(replica)).await
                && s["role"] == "leader"
            {
                return Some(i);
            }
        }
        None
    }

    async fn heal(&mut self) -> anyhow::Result<()> {
        for proxy in self.etcd_proxies.iter().chain(&self.pg_proxies) {
            proxy.set(FaultMode::Pass);
        }
        for i in self.paused.drain() {
            self.replicas[i].resume();
        }
        if !self.etcd.is_running() {
            self.etcd.restart().await?;
        }
        for i in self.down.drain().collect::<Vec<_>>() {
            self.replicas[i].restart()?;
        }
        for replica in &mut self.replicas {
            if !replica.is_running() {
                replica.restart()?;
            }
            replica.wait_ready(Duration::from_secs(60)).await?;
        }
        Ok(())
    }
}

/// One fault, applied and (unless it is instantaneous) undone.
async fn inject(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    schedule: &mut String,
    started: Instant,
) -> anyhow::Result<()> {
    let t = started.elapsed().as_secs_f64();
    let target = rng.random_range(0..3);
    let hold = Duration::from_millis(rng.random_range(800..3_000));
    match rng.random_range(0..9) {
        0 => {
            let victim = cluster.leader().await.unwrap_or(target);
            writeln!(
                schedule,
                "{t:7.2}s SIGKILL n{} (restart after {hold:?})",
                victim + 1
            )?;
            cluster.replicas[victim].kill();
            cluster.down.insert(victim);
            tokio::time::sleep(hold).await;
            cluster.replicas[victim].restart()?;
            cluster.down.remove(&victim);
        }
        1 => {
            let victim = cluster.leader().await.unwrap_or(target);
            let pause = TTL + Duration::from_millis(rng.random_range(500..2_000));
            writeln!(
                schedule,
                "{t:7.2}s SIGSTOP n{} for {pause:?} (past the lease), then SIGCONT",
                victim + 1
            )?;
            cluster.replicas[victim].pause();
            cluster.paused.insert(victim);
            tokio::time::sleep(pause).await;
            cluster.replicas[victim].resume();
            cluster.paused.remove(&victim);
        }
        2 | 3 => {
            let mode = if rng.random_bool(0.5) {
                FaultMode::Cut
            } else {
                FaultMode::Blackhole
            };
            let to_etcd = rng.random_bool(0.5);
            writeln!(
                schedule,
                "{t:7.2}s {mode:?} n{} from {} for {hold:?}",
                target + 1,
                if to_etcd { "etcd" } else { "PostgreSQL" }
            )?;
            let proxy = if to_etcd {
                &cluster.etcd_proxies[target]
            } else {
                &cluster.pg_proxies[target]
            };
            proxy.set(mode);
            tokio::time::sleep(hold).await;
            proxy.set(FaultMode::Pass);
        }
        4 => {
            writeln!(schedule, "{t:7.2}s PostgreSQL restart (down {hold:?})")?;
            cluster.postgres.stop();
            tokio::time::sleep(hold).await;
            cluster.postgres.start_again().await?;
        }
        5 => {
            writeln!(schedule, "{t:7.2}s etcd restart")?;
            cluster.etcd.restart().await?;
        }
        8 => {
            // An operator's `verify --repair` while everything runs: it may
            // only repair real drift, never a change in flight.
            writeln!(schedule, "{t:7.2}s verify --repair")?;
            let dir = tempfile::tempdir()?;
            let config = dir.path().join("verify.toml");
            std::fs::write(
                &config,
                format!("[cluster]\nname = \"test\"\n{}", cluster.mapping),
            )?;
            let url = cluster.db.url();
            let endpoint = cluster.etcd.endpoint();
            let config_path = config.display().to_string();
            let args = ["verify", "--repair", "--config", config_path.as_str()];
            let env = [
                ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
                ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
            ];
            match tokio::time::timeout(Duration::from_secs(60), run_cli(&args, &env)).await {
                Ok(Ok((code, stdout, _))) => {
                    let summary = stdout.lines().last().unwrap_or_default().to_owned();
                    writeln!(schedule, "          exit {code}: {summary}")?;
                }
                Ok(Err(e)) => writeln!(schedule, "          verify failed to run: {e}")?,
                Err(_) => writeln!(schedule, "          verify timed out")?,
            }
        }
        _ => {
            // Compaction while the leader may lag: make it lag first.
            let victim = cluster.leader().await.unwrap_or(target);
            writeln!(
                schedule,
                "{t:7.2}s black-hole n{}'s PostgreSQL, compact etcd at its head, heal",
                victim + 1
            )?;
            let lag_from = Instant::now();
            cluster.pg_proxies[victim].set(FaultMode::Blackhole);
            tokio::time::sleep(hold).await;
            let checkpoint = count(
                &cluster.db.client().await?,
                "SELECT applied_revision FROM etcd_sync.sync_state",
            )
            .await?;
            let head = cluster.etcd.revision().await?;
            cluster.etcd.compact(head).await?;
            // The leader lagged from at most a progress interval before the
            // black hole; a failover meanwhile lags for the lease as well.
            cluster.gaps.push(Gap {
                checkpoint,
                compacted: head,
                from: lag_from - TTL - Duration::from_secs(1),
                to: Instant::now(),
            });
            cluster.pg_proxies[victim].set(FaultMode::Pass);
        }
    }
    Ok(())
}

/// Runs one seed for `fault_time`; returns the schedule on success.
async fn run_seed(seed: u64, fault_time: Duration) -> anyhow::Result<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let policy = ["newest-wins", "etcd-wins", "pg-wins"][rng.random_range(0..3)];
    let mut schedule = format!("seed {seed}, policy {policy}\n");
    let mut cluster = Cluster::start(policy).await?;
    let refs: Vec<&Service> = cluster.replicas.iter().collect();
    wait_leader(&refs, Duration::from_secs(20)).await?;
    // Writes start after the initial snapshot: what came before it is not
    // history by design.
    let head = cluster.etcd.revision().await?;
    let pg = cluster.db.client().await?;
    while count(&pg, "SELECT applied_revision FROM etcd_sync.sync_state").await? < head {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log: Log = Arc::default();
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..2u64 {
        writers.push(etcd_writer(
            cluster.etcd.endpoint(),
            seed * 10 + w,
            log.clone(),
            stop.clone(),
        ));
        writers.push(pg_writer(
            cluster.db.clone(),
            seed * 10 + 5 + w,
            log.clone(),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    let outcome = async {
        while started.elapsed() < fault_time {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_500))).await;
            inject(&mut cluster, &mut rng, &mut schedule, started).await?;
        }
        writeln!(
            schedule,
            "{:7.2}s heal everything, stop writers",
            started.elapsed().as_secs_f64()
        )?;
        cluster.heal().await?;
        stop.cancel();
        for writer in writers {
            writer.await?;
        }
        let acks = log.lock().unwrap().clone();
        check(&cluster, &acks, &mut schedule).await
    }
    .await;
    // FAULT_LOG_DIR keeps the replicas' whole logs for a post-mortem.
    if let Ok(dir) = std::env::var("FAULT_LOG_DIR") {
        for (i, replica) in cluster.replicas.iter().enumerate() {
            let target = std::path::Path::new(&dir).join(format!("n{}.log", i + 1));
            if let Err(e) = std::fs::copy(replica.log_path(), &target) {
                eprintln!("could not keep {}: {e}", target.display());
            }
        }
        let target = std::path::Path::new(&dir).join("postgres.log");
        if let Err(e) = std::fs::copy(cluster.postgres.log_path(), &target) {
            eprintln!("could not keep {}: {e}", target.display());
        }
    }
    match outcome {
        Ok(()) => Ok(schedule),
        Err(error) => {
            let tails: Vec<String> = cluster.replicas.iter().map(|r| r.log_tail(80)).collect();
            Err(error.context(format!(
                "FAULT SUITE FAILED — replay with FAULT_SEED={seed}\n{schedule}\n{}",
                tails.join("\n")
            )))
        }
    }
}

/// When the first etcd write after `revision` was acknowledged: the
/// service lagged at least from then (less the lease, for a failover).
fn first_ack_after(acks: &[Ack], revision: i64) -> Instant {
    let first = acks
        .iter()
        .filter(|a| a.revision.is_some_and(|r| r > revision))
        .map(|a| a.at)
        .min()
        .unwrap_or_else(Instant::now);
    first - TTL - Duration::from_secs(1)
}

/// A store's keys and values under the workload's prefix.
type Snapshot = BTreeMap<Vec<u8>, Vec<u8>>;

/// The consistency checker.
async fn check(cluster: &Cluster, acks: &[Ack], schedule: &mut String) -> anyhow::Result<()> {
    let pg = cluster.db.client().await?;
    let etcd_state = quiesce(cluster, &pg).await?;
    writeln!(schedule, "converged: {} keys", etcd_state.len())?;
    let in_gap = |ack: &Ack| {
        cluster
            .gaps
            .iter()
            .any(|gap| gap.covers(ack, first_ack_after(acks, gap.checkpoint)))
    };
    check_transactions_whole(&pg, acks, in_gap, schedule).await?;
    let excused = check_nothing_vanished(cluster, &pg, acks, &etcd_state).await?;
    let (history_rows, terms) = check_fencing(&pg).await?;
    let dead = count(&pg, "SELECT count(*) FROM etcd_sync.dead_letters").await?;
    anyhow::ensure!(dead == 0, "{dead} dead letters");
    check_verify(cluster).await?;
    writeln!(
        schedule,
        "checked: {} acknowledged writes ({excused} inside compaction gaps unverifiable), {history_rows} history rows, {terms} terms, {} conflicts",
        acks.len(),
        count(&pg, "SELECT count(*) FROM etcd_sync.conflicts").await?
    )?;
    Ok(())
}

/// Waits (90 s at most) for quiescence: outbox drained, checkpoint at
/// etcd's head, stores equal. Returns the stores' common state.
async fn quiesce(cluster: &Cluster, pg: &tokio_postgres::Client) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut etcd = cluster.etcd.client().await?;
        let head = cluster.etcd.revision().await?;
        let outbox = count(pg, "SELECT count(*) FROM etcd_sync.outbox").await?;
        let applied = count(pg, "SELECT applied_revision FROM etcd_sync.sync_state").await?;
        let a = etcd_snapshot(&mut etcd, b"/f/").await?;
        let b = pg_snapshot(pg, "kv_f", b"/f/").await?;
        if outbox == 0 && applied >= head && a == b {
            return Ok(a);
        }
        if Instant::now() > deadline {
            let why = no_quiescence(cluster, pg, (&a, &b), (outbox, applied, head)).await?;
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the stores look like when they did not settle.
async fn no_quiescence(
    cluster: &Cluster,
    pg: &tokio_postgres::Client,
    (a, b): (&Snapshot, &Snapshot),
    (outbox, applied, head): (i64, i64, i64),
) -> anyhow::Result<anyhow::Error> {
    let differ: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .take(5)
        .map(|k| {
            format!(
                "{} etcd={:?} pg={:?}",
                String::from_utf8_lossy(k),
                a.get(k).map(|v| String::from_utf8_lossy(v).into_owned()),
                b.get(k).map(|v| String::from_utf8_lossy(v).into_owned())
            )
        })
        .collect();
    let stuck: Vec<String> = pg
        .query(
            "SELECT o.id, convert_from(o.key, 'UTF8'), o.op, o.base_revision, o.attempts, \
                    coalesce(o.last_error, ''), coalesce(o.conflict_id, 0), \
                    coalesce(m.mod_revision, 0), o.created_at::text \
             FROM etcd_sync.outbox o LEFT JOIN etcd_sync.kv_f m ON m.key = o.key \
             ORDER BY o.id LIMIT 10",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            format!(
                "#{} {} {} base {} attempts {} error {:?} conflict {} mirror rev {} at {}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3),
                r.get::<_, i32>(4),
                r.get::<_, String>(5),
                r.get::<_, i64>(6),
                r.get::<_, i64>(7),
                r.get::<_, String>(8),
            )
        })
        .collect();
    let mut statuses = Vec::new();
    for replica in &cluster.replicas {
        statuses.push(
            status(replica)
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string()),
        );
    }
    Ok(anyhow::anyhow!(
        "no quiescence: outbox {outbox}, applied {applied} of {head}, differing keys {differ:?}\n\
                 outbox: {stuck:#?}\nstatus: {statuses:#?}"
    ))
}

/// Nothing acknowledged vanished: each acknowledged write is in etcd, in
/// the history, or recorded as a conflict's loser, or lies inside a
/// compaction gap (counted, returned).
async fn check_nothing_vanished(
    cluster: &Cluster,
    pg: &tokio_postgres::Client,
    acks: &[Ack],
    etcd_state: &Snapshot,
) -> anyhow::Result<usize> {
    let history: HashSet<(Vec<u8>, Option<Vec<u8>>)> = pg
        .query("SELECT key, value, op FROM etcd_sync.history", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let history_deletes: HashSet<Vec<u8>> = pg
        .query("SELECT key FROM etcd_sync.history WHERE op = 'delete'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut losers: HashSet<(Vec<u8>, Option<Vec<u8>>)> = HashSet::new();
    for row in pg
        .query(
            "SELECT key, etcd_value, pg_value, pg_superseded FROM etcd_sync.conflicts",
            &[],
        )
        .await?
    {
        let key: Vec<u8> = row.get(0);
        losers.insert((key.clone(), row.get(1)));
        losers.insert((key.clone(), row.get(2)));
        for superseded in row.get::<_, Vec<Option<Vec<u8>>>>(3) {
            losers.insert((key.clone(), superseded));
        }
    }
    let mut vanished = Vec::new();
    let mut vanished_keys: Vec<Vec<u8>> = Vec::new();
    let mut excused = 0usize;
    for ack in acks {
        let pair = (ack.key.clone(), ack.value.clone());
        let kept = match &ack.value {
            Some(value) => etcd_state.get(&ack.key) == Some(value),
            None => !etcd_state.contains_key(&ack.key) || history_deletes.contains(&ack.key),
        };
        if kept || history.contains(&pair) || losers.contains(&pair) {
            continue;
        }
        // Overwritten inside a compaction gap before the service saw it.
        if cluster
            .gaps
            .iter()
            .any(|gap| gap.covers(ack, first_ack_after(acks, gap.checkpoint)))
        {
            excused += 1;
            continue;
        }
        vanished_keys.push(ack.key.clone());
        vanished.push(format!(
            "{} {} = {:?}",
            ack.side,
            String::from_utf8_lossy(&ack.key),
            ack.value
                .as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned())
        ));
    }
    if vanished.is_empty() {
        return Ok(excused);
    }
    Err(vanished_report(pg, acks, &vanished, &vanished_keys).await?)
}

/// The history, conflicts, dead letters, events and client log of the
/// first vanished key.
async fn vanished_report(
    pg: &tokio_postgres::Client,
    acks: &[Ack],
    vanished: &[String],
    vanished_keys: &[Vec<u8>],
) -> anyhow::Result<anyhow::Error> {
    let first = &vanished_keys[0];
    let rows: Vec<String> = pg
        .query("SELECT revision, op, convert_from(coalesce(value, ''), 'UTF8'), origin, term, recorded_at::text FROM etcd_sync.history WHERE key = $1 ORDER BY revision", &[first])
        .await?
        .iter()
        .map(|r| format!("{}:{}:{}:{}:t{}:{}", r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3), r.get::<_, i64>(4), r.get::<_, String>(5)))
        .collect();
    let first_text = String::from_utf8_lossy(first).into_owned();
    let events: Vec<String> = pg
        .query(
            "SELECT at::text || ' ' || kind || ' ' || detail::text FROM etcd_sync.sync_events \
                WHERE kind <> 'batch-applied' AND coalesce(detail->>'key', $1) = $1 ORDER BY id",
            &[&first_text],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let per_term: Vec<String> = pg
        .query("SELECT term, count(*), min(revision), max(revision), min(recorded_at)::text, max(recorded_at)::text FROM etcd_sync.history GROUP BY term ORDER BY term", &[])
        .await?
        .iter()
        .map(|r| format!("term {}: {} rows, revisions {}..{}, {} .. {}", r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3), r.get::<_, String>(4), r.get::<_, String>(5)))
        .collect();
    let conflicts: Vec<String> = pg
        .query(
            "SELECT format('#%s etcd=%s@%s pg=%s@%s superseded=[%s] changed %s winner=%s %s detected %s by %s t%s', \
                    id, convert_from(coalesce(etcd_value, ''), 'UTF8'), etcd_revision, \
                    convert_from(coalesce(pg_value, ''), 'UTF8'), pg_revision, \
                    array_to_string(ARRAY(SELECT convert_from(coalesce(v, ''), 'UTF8') FROM unnest(pg_superseded) v), ','), \
                    pg_changed_at, coalesce(winner, '-'), status, detected_at, node, term) \
             FROM etcd_sync.conflicts WHERE key = $1 ORDER BY id",
            &[first],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dead_letters: Vec<String> = pg
        .query(
            "SELECT format('%s %s=%s base %s: %s (%s) at %s by %s t%s', kind, op, \
                    convert_from(coalesce(value, ''), 'UTF8'), base_revision, reason, attempts, created_at, node, term) \
             FROM etcd_sync.dead_letters ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The client-side log of the key, in wall-clock time to line up
    // with PostgreSQL's timestamps.
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let key_acks: Vec<String> = acks
        .iter()
        .filter(|a| a.key == *first)
        .map(|a| {
            let wall = wall_now - now.duration_since(a.at);
            let secs = wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
                % 86_400.0;
            format!(
                "{:02}:{:02}:{:06.3} {} {} rev {:?}",
                (secs / 3600.0) as u64,
                (secs % 3600.0 / 60.0) as u64,
                secs % 60.0,
                a.side,
                a.value
                    .as_ref()
                    .map_or("(delete)".into(), |v| String::from_utf8_lossy(v)
                        .into_owned()),
                a.revision
            )
        })
        .collect();
    Ok(anyhow::anyhow!(
        "{} acknowledged writes vanished, e.g. {:?}\nhistory by term: {per_term:#?}\nhistory of {first_text}: {rows:#?}\n\
         acknowledged writes of {first_text} (UTC): {key_acks:#?}\nconflicts of {first_text}: {conflicts:#?}\n\
         dead letters: {dead_letters:#?}\nevents: {events:#?}",
        vanished.len(),
        &vanished[..vanished.len().min(5)],
    ))
}

/// Every term that wrote was elected, and none wrote after a later one was
/// elected; no revision of a key is recorded twice. Returns the history's
/// rows and the terms elected.
async fn check_fencing(pg: &tokio_postgres::Client) -> anyhow::Result<(usize, usize)> {
    // Every term that wrote was elected, and no history row of a term was
    // written after a later term was elected: a deposed leader never
    // wrote. (Terms need not grow along the revisions: an input deferred
    // behind a user's row lock is applied later, maybe by the next leader.
    // A row's `recorded_at` is its transaction's start, before the commit
    // that the next term's fence waits for, and `elected` is recorded after
    // that term took the fence.)
    let deposed = count(
        pg,
        "SELECT count(*) FROM etcd_sync.history h JOIN etcd_sync.sync_events e \
           ON e.kind = 'leadership' AND e.detail->>'event' = 'elected' \
          AND e.term > h.term AND e.at < h.recorded_at",
    )
    .await?;
    anyhow::ensure!(
        deposed == 0,
        "{deposed} history rows written by a deposed leader"
    );
    let rows = pg
        .query(
            "SELECT revision, term FROM etcd_sync.history ORDER BY revision, key",
            &[],
        )
        .await?;
    let elected: HashSet<i64> = pg
        .query("SELECT term FROM etcd_sync.sync_events WHERE kind = 'leadership' AND detail->>'event' = 'elected'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for row in &rows {
        let (revision, term): (i64, i64) = (row.get(0), row.get(1));
        anyhow::ensure!(
            elected.contains(&term),
            "history at revision {revision} has term {term}, never elected"
        );
    }
    let duplicates = count(pg, "SELECT count(*) FROM (SELECT key, revision FROM etcd_sync.history GROUP BY 1, 2 HAVING count(*) > 1) d").await?;
    anyhow::ensure!(duplicates == 0, "duplicate history revisions");

    Ok((rows.len(), elected.len()))
}

/// The service's own verification agrees.
async fn check_verify(cluster: &Cluster) -> anyhow::Result<()> {
    let mapping = tempfile::NamedTempFile::new()?;
    std::fs::write(
        mapping.path(),
        "[[mappings]]\nprefix = \"/f/\"\ntable = \"kv_f\"\n",
    )?;
    let (code, stdout, stderr) = run_cli(
        &["verify", "--config", mapping.path().to_str().unwrap()],
        &[
            ("ETCD_PG_SYNC__POSTGRES__URL", &cluster.db.url()),
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", &cluster.etcd.endpoint()),
            ("ETCD_PG_SYNC__CLUSTER__NAME", "test"),
        ],
    )
    .await?;
    anyhow::ensure!(code == 0, "verify exited {code}: {stdout}{stderr}");
    Ok(())
}

#[tokio::test]
async fn randomized_faults_keep_both_stores_consistent() -> anyhow::Result<()> {
    let first_seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let minutes: f64 = std::env::var("FAULT_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let phase = Duration::from_secs(
        std::env::var("FAULT_PHASE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45),
    );
    let started = Instant::now();
    let mut seed = first_seed;
    let mut clean = 0;
    loop {
        let schedule = run_seed(seed, phase).await?;
        clean += 1;
        println!("{schedule}");
        seed += 1;
        if started.elapsed().as_secs_f64() >= minutes * 60.0 {
            break;
        }
    }
    println!(
        "{clean} seed(s) clean in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
