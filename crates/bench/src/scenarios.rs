//! The scenarios (issue "Benchmark"): each returns its figures and the raw
//! baseline measured on the same stores.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eps_harness::{Etcd, Postgres, PostgresOptions, Service, ServiceConfig, TestDatabase};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::probe::{self, Samples};
use crate::{Outcome, Sizes};

pub const ALL: &[&str] = &[
    "etcd-to-pg-live",
    "etcd-to-pg-catchup",
    "conflict-catchup",
    "pg-to-etcd",
    "pg-txn-to-etcd",
    "latency-1k",
    "latency-5k",
    "snapshot",
    "failover",
    "vs-make-mirror",
    "long-run-memory",
    "history-queries",
    "pg-backlog-drain",
];

pub async fn run(name: &str, binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    match name {
        "etcd-to-pg-live" => live(binary, sizes).await,
        "etcd-to-pg-catchup" => catchup(binary, sizes).await,
        "conflict-catchup" => conflict_catchup(binary, sizes).await,
        "pg-to-etcd" => pg_to_etcd(binary, sizes).await,
        "pg-txn-to-etcd" => pg_txn_to_etcd(binary, sizes).await,
        "latency-1k" => latency(binary, sizes).await,
        "latency-5k" => latency_5k(binary, sizes).await,
        "snapshot" => snapshot(binary, sizes).await,
        "failover" => failover(binary, sizes).await,
        "vs-make-mirror" => vs_make_mirror(binary, sizes).await,
        "long-run-memory" => long_run_memory(binary, sizes).await,
        "history-queries" => history_queries(binary, sizes).await,
        "pg-backlog-drain" => pg_backlog_drain(binary, sizes).await,
        other => anyhow::bail!("unknown scenario {other:?}; one of {ALL:?} or all"),
    }
}

const MAPPING: &str = "\n[[mappings]]\nprefix = \"/bench/\"\ntable = \"kv_bench\"\n";

/// `--profile-sql`: see [`Stores`]'s `Drop`.
pub static PROFILE_SQL: AtomicBool = AtomicBool::new(false);

/// etcd and a PostgreSQL with default durability (fsync and synchronous
/// commit on, unlike the test harness's default).
struct Stores {
    etcd: Etcd,
    pg: Postgres,
    db: TestDatabase,
}

async fn stores() -> anyhow::Result<Stores> {
    let profile = PROFILE_SQL.load(Ordering::Relaxed);
    let etcd = Etcd::start().await?;
    let mut settings = vec![
        ("fsync".into(), "on".into()),
        ("synchronous_commit".into(), "on".into()),
        ("full_page_writes".into(), "on".into()),
    ];
    if profile {
        settings.extend([
            (
                "shared_preload_libraries".into(),
                "pg_stat_statements,auto_explain".into(),
            ),
            ("pg_stat_statements.track".into(), "all".into()),
            ("auto_explain.log_min_duration".into(), "8ms".into()),
            ("auto_explain.log_analyze".into(), "on".into()),
            ("auto_explain.log_timing".into(), "off".into()),
            ("auto_explain.log_nested_statements".into(), "on".into()),
        ]);
    }
    let pg = Postgres::start_custom(PostgresOptions {
        settings,
        ..PostgresOptions::default()
    })
    .await?;
    let db = pg.create_database().await?;
    if profile {
        db.client()
            .await?
            .batch_execute("CREATE EXTENSION pg_stat_statements")
            .await?;
    }
    Ok(Stores { etcd, pg, db })
}

impl Drop for Stores {
    /// With `--profile-sql`, prints the statements that took the most
    /// server time in the scenario (its set-up included) before the
    /// servers stop. `psql` runs synchronously: a drop cannot await.
    fn drop(&mut self) {
        if !PROFILE_SQL.load(Ordering::Relaxed) {
            return;
        }
        let Ok(bin) = eps_harness::postgres::pg_bindir() else {
            return;
        };
        let statements = "SELECT calls, round(total_exec_time) AS total_ms, \
                            round(mean_exec_time::numeric, 3) AS mean_ms, rows, \
                            left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query \
                     FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25";
        // The apply transactions as their `batch-applied` audit events saw
        // them: from reading etcd to their last statement (not the commit).
        let batches = "SELECT count(*) AS batches, sum((detail->>'changes')::int) AS changes, \
                              sum((detail->>'conflicts')::int) AS conflicts, \
                              round(avg((detail->>'duration_ms')::int), 1) AS mean_ms, \
                              percentile_disc(0.5) WITHIN GROUP (ORDER BY (detail->>'duration_ms')::int) AS p50_ms, \
                              percentile_disc(0.99) WITHIN GROUP (ORDER BY (detail->>'duration_ms')::int) AS p99_ms, \
                              max((detail->>'duration_ms')::int) AS max_ms \
                       FROM etcd_sync.sync_events WHERE kind = 'batch-applied'";
        let slowest = "SELECT (detail->>'duration_ms')::int AS ms, detail->>'changes' AS changes, \
                              detail->>'conflicts' AS conflicts, detail->>'mirror_upserts' AS upserts, \
                              detail->>'from_pg_confirmed' AS echoes \
                       FROM etcd_sync.sync_events WHERE kind = 'batch-applied' \
                       ORDER BY (detail->>'duration_ms')::int DESC LIMIT 5";
        match std::process::Command::new(bin.join("psql"))
            .arg(self.db.url())
            .args(["-X", "-c", statements, "-c", batches, "-c", slowest])
            .output()
        {
            Ok(out) => eprintln!(
                "-- statements by server time\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(error) => eprintln!("--profile-sql: psql failed: {error}"),
        }
        // The plans of statements slower than 8 ms, as `auto_explain`
        // logged them.
        let log = std::env::temp_dir().join(format!("eps-bench-postgres-{}.log", self.db.port));
        match std::fs::copy(self.pg.dir().join("postgres.log"), &log) {
            Ok(_) => eprintln!(
                "-- server log with slow statements' plans: {}",
                log.display()
            ),
            Err(error) => eprintln!("--profile-sql: keeping the server log failed: {error}"),
        }
    }
}

fn config(binary: &Path, stores: &Stores, node: &str, env: &[(&str, &str)]) -> ServiceConfig {
    config_with(binary, stores, node, env, MAPPING)
}

fn config_with(
    binary: &Path,
    stores: &Stores,
    node: &str,
    env: &[(&str, &str)],
    mapping: &str,
) -> ServiceConfig {
    let mut config = ServiceConfig::new(
        binary,
        &stores.etcd.endpoint(),
        &stores.db.url(),
        node,
        mapping,
    );
    config.toml = config
        .toml
        .replace("log_level = \"info\"", "log_level = \"warn\"");
    for (k, v) in env {
        config.env.insert((*k).into(), (*v).into());
    }
    config
}

async fn pg(stores: &Stores) -> anyhow::Result<tokio_postgres::Client> {
    eps_harness::postgres::connect(&stores.db.url()).await
}

async fn applied(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(pg
        .query_one("SELECT applied_revision FROM etcd_sync.sync_state", &[])
        .await?
        .get(0))
}

async fn wait_leader(service: &Service) -> anyhow::Result<()> {
    eps_harness::service::wait_leader(&[service], Duration::from_secs(30)).await?;
    Ok(())
}

/// Waits until the checkpoint reaches `revision`; returns the wait.
async fn wait_applied(
    pg: &tokio_postgres::Client,
    revision: i64,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while applied(pg).await? < revision {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "checkpoint did not reach {revision} in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

/// Current and peak resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `clients` tasks putting as fast as etcd accepts for `duration`; returns
/// acknowledged puts.
async fn put_load(
    endpoint: &str,
    prefix: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<u64> {
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (endpoint, prefix, acked) = (endpoint.to_owned(), prefix.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            let value = vec![b'x'; 64];
            let mut i = 0u64;
            while Instant::now() < deadline {
                client
                    .put(
                        format!("{prefix}c{c:02}/{:04}", i % 1000),
                        value.clone(),
                        None,
                    )
                    .await?;
                acked.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(acked.load(Ordering::Relaxed))
}

async fn live(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    wait_applied(&pg, stores.etcd.revision().await?, Duration::from_secs(30)).await?;
    probe::install_visibility_trigger(&pg, "kv_bench", "/bench/probe/").await?;
    let (_listener, seen) = probe::listen_visible(&stores.db.url()).await?;
    let stop = CancellationToken::new();
    let markers = probe::etcd_markers(
        stores.etcd.endpoint(),
        "/bench/probe/",
        Duration::from_millis(20),
        stop.clone(),
    );
    let duration = Duration::from_secs(sizes.live_secs);
    let started = Instant::now();
    let puts = put_load(
        &stores.etcd.endpoint(),
        "/bench/live/",
        sizes.live_clients,
        duration,
    )
    .await?;
    let wrote = started.elapsed();
    stop.cancel();
    let acked = markers.await??;
    let head = stores.etcd.revision().await?;
    let lag_revisions = head - applied(&pg).await?;
    let catch_up = wait_applied(&pg, head, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let latency = probe::latencies(&acked, &seen.lock().unwrap_or_else(|p| p.into_inner()));
    let etcd_rate = puts as f64 / wrote.as_secs_f64();
    let mirror_rate = puts as f64 / (wrote + catch_up).as_secs_f64();
    let ratio = mirror_rate / etcd_rate;
    Ok(Outcome {
        scenario: "etcd-to-pg-live".into(),
        parameters: json!({"clients": sizes.live_clients, "seconds": sizes.live_secs}),
        figures: json!({
            "etcd_puts": puts, "mirror_rate_per_s": mirror_rate, "lag_revisions_at_end": lag_revisions,
            "catch_up_after_load_ms": catch_up.as_millis() as u64, "put_ack_to_row_visible": latency.summary(),
        }),
        baseline: json!({"etcd_put_rate_per_s": etcd_rate, "summary": format!("etcd {etcd_rate:.0} puts/s")}),
        ratio: Some(ratio),
        goal: "≥ 1.0".into(),
        summary: format!(
            "mirror {mirror_rate:.0} changes/s; lag at end {lag_revisions} rev, caught up {:.2} s later; put→row p50 {:.1} ms p99 {:.1} ms",
            catch_up.as_secs_f64(),
            latency.quantile(0.5).unwrap_or(f64::NAN) * 1e3,
            latency.quantile(0.99).unwrap_or(f64::NAN) * 1e3
        ),
    })
}

async fn catchup(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    // The service's default; `EPS_BENCH_CATCHUP_STREAMS` tries another.
    let streams: usize = std::env::var("EPS_BENCH_CATCHUP_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let stores = stores().await?;
    let mut service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    let per_client = sizes.catchup_changes / 16;

    // Round 1, one watch: against the watch + INSERT loop and the bare
    // replay of the same backlog by one watch.
    let (from, head) = backlog(&stores, &mut service, &pg, "/bench/catchup/", per_client).await?;
    let changes = (head - from) as f64;
    let written = (per_client * 16) as u64;
    let baseline_rate = watch_insert_baseline(&stores, &pg, from, head).await?;
    let single_watch =
        watch_replay(&stores, from, written, &writer_ranges("/bench/catchup/", 1)).await?;
    service.set_env("ETCD_PG_SYNC__SYNC__CATCHUP_STREAMS", Some("1"));
    let (rate, seconds) = catch_up(&mut service, &pg, changes, head).await?;

    // Round 2, parallel ranges: a backlog as large on other keys, against
    // the bare replay of it by one watch (and, for reference, by as many
    // watches as streams on the writers' prefixes).
    let (from2, head2) =
        backlog(&stores, &mut service, &pg, "/bench/catchup2/", per_client).await?;
    let changes2 = (head2 - from2) as f64;
    let single_watch2 = watch_replay(
        &stores,
        from2,
        written,
        &writer_ranges("/bench/catchup2/", 1),
    )
    .await?;
    let raw_parallel = watch_replay(
        &stores,
        from2,
        written,
        &writer_ranges("/bench/catchup2/", streams),
    )
    .await?;
    service.set_env(
        "ETCD_PG_SYNC__SYNC__CATCHUP_STREAMS",
        Some(&streams.to_string()),
    );
    let (parallel_rate, parallel_seconds) = catch_up(&mut service, &pg, changes2, head2).await?;
    Ok(Outcome {
        scenario: "etcd-to-pg-catchup".into(),
        parameters: json!({"changes": changes, "writers": 16}),
        figures: json!({
            "catch_up_rate_per_s": rate,
            "seconds": seconds,
            "single_watch_replay_per_s": single_watch,
            "ratio_vs_single_watch": rate / single_watch,
            "parallel_streams": {
                "streams": streams,
                "changes": changes2,
                "seconds": parallel_seconds,
                "rate_per_s": parallel_rate,
                "single_watch_replay_per_s": single_watch2,
                "ratio_vs_single_watch": parallel_rate / single_watch2,
                "bare_parallel_replay_per_s": raw_parallel,
            },
        }),
        baseline: json!({"watch_and_multirow_insert_rate_per_s": baseline_rate, "summary": format!("watch + INSERT loop {baseline_rate:.0} changes/s")}),
        ratio: Some(rate / baseline_rate),
        goal: "≥ 1.0".into(),
        summary: format!(
            "one watch: {rate:.0} changes/s ({changes:.0} in {seconds:.1} s; {:.2} × the bare replay's {single_watch:.0}/s); \
             {streams} ranges: {parallel_rate:.0} changes/s ({:.2} × the bare replay's {single_watch2:.0}/s; {streams} bare watches {raw_parallel:.0}/s)",
            rate / single_watch,
            parallel_rate / single_watch2,
        ),
    })
}

/// Stops the service and puts `16 × per_client` new keys under `prefix`,
/// one revision each, from 16 clients; returns the revisions before and
/// after.
async fn backlog(
    stores: &Stores,
    service: &mut Service,
    pg: &tokio_postgres::Client,
    prefix: &str,
    per_client: usize,
) -> anyhow::Result<(i64, i64)> {
    let from = stores.etcd.revision().await?;
    wait_applied(pg, from, Duration::from_secs(30)).await?;
    service.terminate(Duration::from_secs(15)).await?;
    let from = stores.etcd.revision().await?;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (endpoint, prefix) = (stores.etcd.endpoint(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for i in 0..per_client {
                client
                    .put(format!("{prefix}c{c:02}/{i:06}"), vec![b'v'; 64], None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((from, stores.etcd.revision().await?))
}

/// Starts the service and waits until its checkpoint reaches `head`:
/// changes per second from the moment it leads, and the seconds.
async fn catch_up(
    service: &mut Service,
    pg: &tokio_postgres::Client,
    changes: f64,
    head: i64,
) -> anyhow::Result<(f64, f64)> {
    service.restart()?;
    service.wait_ready(Duration::from_secs(60)).await?;
    wait_leader(service).await?;
    let started = Instant::now();
    wait_applied(pg, head, Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok((changes / seconds, seconds))
}

/// Keys changed on both sides while the service was down, under `pg-wins`:
/// during catch-up every etcd change of such a key is a conflict (recorded,
/// audited, settled). Catch-up rate vs. the plain watch + INSERT loop.
async fn conflict_catchup(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    const KEYS: usize = 1_000;
    let stores = stores().await?;
    let mapping = format!("{MAPPING}policy = \"pg-wins\"\n");
    let mut service =
        Service::start(config_with(binary, &stores, "n1", &[], &mapping), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    sql_writes(&stores.db, "/bench/both/", KEYS).await?;
    let started = Instant::now();
    loop {
        let outbox: i64 = pg
            .query_one("SELECT count(*) FROM etcd_sync.outbox", &[])
            .await?
            .get(0);
        if outbox == 0 && etcd_count(&stores.etcd, "/bench/both/").await? == KEYS as i64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the keys did not reach etcd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let from = stores.etcd.revision().await?;
    wait_applied(&pg, from, Duration::from_secs(60)).await?;
    service.terminate(Duration::from_secs(15)).await?;

    // Every key changed once in PostgreSQL and many times in etcd.
    pg.execute("UPDATE etcd_sync.kv_bench SET value = 'pg-side'", &[])
        .await?;
    let per_client = sizes.catchup_changes / 5 / 16;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let endpoint = stores.etcd.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for i in 0..per_client {
                let key = (c * per_client + i) % KEYS;
                client
                    .put(format!("/bench/both/{key:07}"), vec![b'e'; 64], None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let head = stores.etcd.revision().await?;
    let changes = (head - from) as f64;
    let baseline_rate = watch_insert_baseline(&stores, &pg, from, head).await?;

    service.restart()?;
    service.wait_ready(Duration::from_secs(60)).await?;
    wait_leader(&service).await?;
    let started = Instant::now();
    wait_applied(&pg, head, Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let rate = changes / seconds;
    let conflicts: i64 = pg
        .query_one("SELECT count(*) FROM etcd_sync.conflicts", &[])
        .await?
        .get(0);
    Ok(Outcome {
        scenario: "conflict-catchup".into(),
        parameters: json!({"changes": changes, "keys": KEYS, "policy": "pg-wins", "writers": 16}),
        figures: json!({"catch_up_rate_per_s": rate, "seconds": seconds, "conflicts": conflicts}),
        baseline: json!({"watch_and_multirow_insert_rate_per_s": baseline_rate, "summary": format!("watch + INSERT loop {baseline_rate:.0} changes/s")}),
        ratio: Some(rate / baseline_rate),
        goal: "(none; the baseline records no conflicts)".into(),
        summary: format!(
            "{rate:.0} changes/s with {conflicts} conflicts recorded ({changes:.0} changes in {seconds:.1} s)"
        ),
    })
}

/// The raw baseline of a catch-up: a minimal loop reading the watch stream
/// from `from + 1` to `head` and upserting each response's rows with one
/// multi-row INSERT. Returns changes per second.
async fn watch_insert_baseline(
    stores: &Stores,
    pg: &tokio_postgres::Client,
    from: i64,
    head: i64,
) -> anyhow::Result<f64> {
    pg.batch_execute(
        "CREATE TABLE baseline_rows (key bytea PRIMARY KEY, value bytea, revision bigint)",
    )
    .await?;
    let baseline_started = Instant::now();
    let mut client = stores.etcd.client().await?;
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(from + 1)
        .with_prev_key();
    let mut stream = client.watch("/bench/", Some(options)).await?;
    let mut last = from;
    while last < head {
        let Some(response) = stream.message().await? else {
            anyhow::bail!("watch ended")
        };
        if response.events().is_empty() {
            continue;
        }
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut values: Vec<Vec<u8>> = Vec::new();
        let mut revisions: Vec<i64> = Vec::new();
        let mut latest: HashMap<Vec<u8>, usize> = HashMap::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(kv.mod_revision());
            match latest.get(kv.key()) {
                Some(i) => {
                    values[*i] = kv.value().to_vec();
                    revisions[*i] = kv.mod_revision();
                }
                None => {
                    latest.insert(kv.key().to_vec(), keys.len());
                    keys.push(kv.key().to_vec());
                    values.push(kv.value().to_vec());
                    revisions.push(kv.mod_revision());
                }
            }
        }
        pg.execute(
            "INSERT INTO baseline_rows SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[]) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision",
            &[&keys, &values, &revisions],
        )
        .await?;
    }
    Ok((head - from) as f64 / baseline_started.elapsed().as_secs_f64())
}

/// The bare replay of `(from, head]` by one watch per key range (with
/// previous values and fragments, as the service watches), nothing
/// written: events per second over all ranges, until they delivered the
/// `expected` events of the backlog.
async fn watch_replay(
    stores: &Stores,
    from: i64,
    expected: u64,
    ranges: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<f64> {
    let delivered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let mut tasks: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    for (start, end) in ranges.iter().cloned() {
        let mut client = stores.etcd.client().await?;
        let (delivered, done) = (delivered.clone(), done.clone());
        tasks.spawn(async move {
            let options = etcd_client::WatchOptions::new()
                .with_range(end)
                .with_start_revision(from + 1)
                .with_prev_key()
                .with_fragment();
            let mut stream = client.watch(start, Some(options)).await?;
            while let Some(response) = stream.message().await? {
                let n = response.events().len() as u64;
                if delivered.fetch_add(n, Ordering::SeqCst) + n >= expected {
                    done.notify_one();
                }
            }
            anyhow::bail!("watch ended")
        });
    }
    tokio::select! {
        () = done.notified() => {}
        failed = tasks.join_next() => anyhow::bail!("replay stopped: {failed:?}"),
    }
    let rate = expected as f64 / started.elapsed().as_secs_f64();
    tasks.shutdown().await;
    Ok(rate)
}

/// `prefix` split into `n` ranges of whole writers' prefixes (`c00` to
/// `c15`), for a replay by `n` watches.
fn writer_ranges(prefix: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bounds: Vec<usize> = (0..=n).map(|i| i * 16 / n).collect();
    bounds
        .windows(2)
        .map(|w| {
            (
                format!("{prefix}c{:02}", w[0]).into_bytes(),
                format!("{prefix}c{:02}", w[1]).into_bytes(),
            )
        })
        .collect()
}

/// Commits `n` single-row inserts from 8 sessions; returns when committed.
async fn sql_writes(db: &TestDatabase, prefix: &str, n: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for s in 0..8 {
        let (db, prefix) = (db.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = db.client().await?;
            let insert = client
                .prepare("INSERT INTO etcd_sync.kv_bench (key, value) VALUES ($1, $2)")
                .await?;
            for i in (s..n).step_by(8) {
                client
                    .execute(
                        &insert,
                        &[&format!("{prefix}{i:07}").into_bytes(), &vec![b'p'; 64]],
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

async fn etcd_count(etcd: &Etcd, prefix: &str) -> anyhow::Result<i64> {
    let mut client = etcd.client().await?;
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    Ok(client.get(prefix, Some(options)).await?.count())
}

async fn pg_to_etcd_rate(
    binary: &Path,
    sizes: Sizes,
    env: &[(&str, &str)],
) -> anyhow::Result<(f64, f64)> {
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", env), "n1").await?;
    wait_leader(&service).await?;
    let n = sizes.pg_writes;
    let started = Instant::now();
    sql_writes(&stores.db, "/bench/pg/", n).await?;
    let committed = started.elapsed();
    while etcd_count(&stores.etcd, "/bench/pg/").await? < n as i64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "not all SQL writes reached etcd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Baseline: the same puts straight to etcd, 8 in flight.
    let baseline_started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..8 {
        let endpoint = stores.etcd.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for i in (s..n).step_by(8) {
                client
                    .put(format!("/bench/raw/{i:07}"), vec![b'p'; 64], None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let baseline = n as f64 / baseline_started.elapsed().as_secs_f64();
    eprintln!(
        "pg-to-etcd: {n} commits in {committed:?}, all in etcd after {:?}",
        started.elapsed()
    );
    Ok((rate, baseline))
}

async fn pg_to_etcd(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let (batched, baseline) = pg_to_etcd_rate(binary, sizes, &[]).await?;
    // Batching off: one key per etcd txn.
    let (unbatched, _) =
        pg_to_etcd_rate(binary, sizes, &[("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS", "2")]).await?;
    Ok(Outcome {
        scenario: "pg-to-etcd".into(),
        parameters: json!({"writes": sizes.pg_writes, "sessions": 8}),
        figures: json!({"rate_per_s": batched, "rate_without_batching_per_s": unbatched}),
        baseline: json!({"direct_puts_8_in_flight_per_s": baseline, "summary": format!("direct puts {baseline:.0}/s")}),
        ratio: Some(batched / baseline),
        goal: "≥ 1.0".into(),
        summary: format!("{batched:.0} changes/s (one key per txn: {unbatched:.0}/s)"),
    })
}

/// Keys per transaction in `pg-txn-to-etcd`.
const TXN_KEYS: usize = 5;

/// 8 sessions commit 5-key SQL transactions; each reaches etcd whole (one
/// txn). Baseline: the same 5-key etcd txns sent directly, 8 in flight.
async fn pg_txn_to_etcd(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let transactions = sizes.pg_writes / TXN_KEYS;
    let keys = (transactions * TXN_KEYS) as i64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..8 {
        let db = stores.db.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = db.client().await?;
            let insert = client
                .prepare("INSERT INTO etcd_sync.kv_bench (key, value) VALUES ($1, $2)")
                .await?;
            for t in (s..transactions).step_by(8) {
                let tx = client.transaction().await?;
                for k in 0..TXN_KEYS {
                    tx.execute(
                        &insert,
                        &[
                            &format!("/bench/txn/{t:07}/{k}").into_bytes(),
                            &vec![b'p'; 64],
                        ],
                    )
                    .await?;
                }
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let committed = started.elapsed();
    while etcd_count(&stores.etcd, "/bench/txn/").await? < keys {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "not all SQL transactions reached etcd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (rate, txn_rate) = (keys as f64 / elapsed, transactions as f64 / elapsed);
    let baseline_started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..8 {
        let endpoint = stores.etcd.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for t in (s..transactions).step_by(8) {
                let ops: Vec<etcd_client::TxnOp> = (0..TXN_KEYS)
                    .map(|k| {
                        etcd_client::TxnOp::put(
                            format!("/bench/rawtxn/{t:07}/{k}"),
                            vec![b'p'; 64],
                            None,
                        )
                    })
                    .collect();
                client.txn(etcd_client::Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let baseline = keys as f64 / baseline_started.elapsed().as_secs_f64();
    eprintln!(
        "pg-txn-to-etcd: {transactions} transactions committed in {committed:?}, all in etcd after {elapsed:.2}s"
    );
    Ok(Outcome {
        scenario: "pg-txn-to-etcd".into(),
        parameters: json!({"transactions": transactions, "keys_per_transaction": TXN_KEYS, "sessions": 8}),
        figures: json!({"keys_per_s": rate, "transactions_per_s": txn_rate}),
        baseline: json!({"direct_5_key_txns_8_in_flight_keys_per_s": baseline, "summary": format!("direct 5-key txns {baseline:.0} keys/s")}),
        ratio: Some(rate / baseline),
        goal: "≥ 0.8".into(),
        summary: format!("{rate:.0} keys/s, {txn_rate:.0} transactions/s"),
    })
}

async fn latency(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    latency_at(binary, sizes, "latency-1k", 1_000, true).await
}

/// etcd → PostgreSQL alone at 5,000 changes/s: the watcher's latency when
/// the service is busy but PostgreSQL takes no other writes.
async fn latency_5k(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    latency_at(binary, sizes, "latency-5k", 5_000, false).await
}

/// Puts into etcd (and, with `both`, inserts into PostgreSQL) at `rate`
/// changes/s per direction, 250/s per writer; the latency of each change
/// from its acknowledgement to its arrival on the other side.
async fn latency_at(
    binary: &Path,
    sizes: Sizes,
    name: &str,
    rate: usize,
    both: bool,
) -> anyhow::Result<Outcome> {
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    wait_applied(&pg, stores.etcd.revision().await?, Duration::from_secs(30)).await?;
    probe::install_visibility_trigger(&pg, "kv_bench", "/bench/lat-e/").await?;
    let (_listener, seen_pg) = probe::listen_visible(&stores.db.url()).await?;
    // pg → etcd: a watch on etcd notes when each row's value arrives.
    let seen_etcd: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut watch_client = stores.etcd.client().await?;
    let mut watch = watch_client
        .watch(
            "/bench/lat-p/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    let sink = seen_etcd.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(response)) = watch.message().await {
            for event in response.events() {
                if let Some(kv) = event.kv() {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        Instant::now(),
                    );
                }
            }
        }
    });
    let duration = Duration::from_secs(sizes.latency_secs);
    let deadline = Instant::now() + duration;
    let mut etcd_tasks = Vec::new();
    let mut pg_tasks = Vec::new();
    // Writers at 250 changes/s each.
    for w in 0..rate / 250 {
        let endpoint = stores.etcd.endpoint();
        etcd_tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            let mut acked = HashMap::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let key = format!("/bench/lat-e/{w}/{i:06}");
                client.put(key.clone(), "e", None).await?;
                acked.insert(key, Instant::now());
                i += 1;
            }
            anyhow::Ok(acked)
        }));
        if !both {
            continue;
        }
        let db = stores.db.clone();
        pg_tasks.push(tokio::spawn(async move {
            let client = db.client().await?;
            let insert = client
                .prepare("INSERT INTO etcd_sync.kv_bench (key, value) VALUES ($1, 'p')")
                .await?;
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            let mut committed = HashMap::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let key = format!("/bench/lat-p/{w}/{i:06}");
                client
                    .execute(&insert, &[&key.clone().into_bytes()])
                    .await?;
                committed.insert(key, Instant::now());
                i += 1;
            }
            anyhow::Ok(committed)
        }));
    }
    let mut etcd_acked = HashMap::new();
    for task in etcd_tasks {
        etcd_acked.extend(task.await??);
    }
    let mut pg_committed = HashMap::new();
    for task in pg_tasks {
        pg_committed.extend(task.await??);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let to_pg = probe::latencies(
        &etcd_acked,
        &seen_pg.lock().unwrap_or_else(|p| p.into_inner()),
    );
    let to_etcd = probe::latencies(
        &pg_committed,
        &seen_etcd.lock().unwrap_or_else(|p| p.into_inner()),
    );
    let achieved = etcd_acked.len() as f64 / duration.as_secs_f64();
    let p99 = |s: &Samples| s.quantile(0.99).unwrap_or(f64::NAN) * 1e3;
    let etcd_to_pg = format!(
        "etcd→pg p50 {:.1} / p99 {:.1} / max {:.1} ms",
        to_pg.quantile(0.5).unwrap_or(f64::NAN) * 1e3,
        p99(&to_pg),
        to_pg.max().unwrap_or(f64::NAN) * 1e3,
    );
    Ok(Outcome {
        scenario: name.into(),
        parameters: json!({"seconds": sizes.latency_secs, "target_rate_per_direction": rate, "directions": if both { 2 } else { 1 }, "etcd_rate_achieved": achieved, "pg_rate_achieved": pg_committed.len() as f64 / duration.as_secs_f64()}),
        figures: json!({"etcd_to_pg": to_pg.summary(), "pg_to_etcd": both.then(|| to_etcd.summary()), "lost_samples": (etcd_acked.len() - to_pg.0.len()) + (pg_committed.len() - to_etcd.0.len())}),
        baseline: json!({"summary": "goal: p99 < 100 ms"}),
        ratio: None,
        goal: "p99 < 100 ms".into(),
        summary: if both {
            format!(
                "{etcd_to_pg}; pg→etcd p50 {:.1} / p99 {:.1} / max {:.1} ms",
                to_etcd.quantile(0.5).unwrap_or(f64::NAN) * 1e3,
                p99(&to_etcd),
                to_etcd.max().unwrap_or(f64::NAN) * 1e3
            )
        } else {
            format!("{etcd_to_pg} at {achieved:.0} puts/s (etcd → PostgreSQL only)")
        },
    })
}

/// Loads `keys` keys (txns of 100 puts, 4 in flight).
async fn preload(etcd: &Etcd, prefix: &str, keys: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (endpoint, prefix) = (etcd.endpoint(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for chunk in (t * 100..keys).step_by(400) {
                let ops: Vec<etcd_client::TxnOp> = (chunk..(chunk + 100).min(keys))
                    .map(|i| {
                        etcd_client::TxnOp::put(format!("{prefix}{i:08}"), vec![b's'; 100], None)
                    })
                    .collect();
                client.txn(etcd_client::Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

async fn snapshot_once(binary: &Path, keys: usize) -> anyhow::Result<(f64, f64, f64)> {
    let stores = stores().await?;
    preload(&stores.etcd, "/bench/snap/", keys).await?;
    // Baseline: paginated range reads of the same keys at one revision.
    let client = eps_etcd_shim::connect(&stores.etcd).await?;
    let started = Instant::now();
    let mut read = 0usize;
    let mut next = b"/bench/".to_vec();
    let mut revision = 0;
    loop {
        let page = client
            .range_page(&next, Some(b"/bench0"), revision, 1000)
            .await?;
        revision = page.0;
        read += page.1.len();
        match page.1.last() {
            Some(last) if page.2 => {
                next = last.clone();
                next.push(0);
            }
            _ => break,
        }
    }
    anyhow::ensure!(read == keys, "read {read} of {keys}");
    let baseline = keys as f64 / started.elapsed().as_secs_f64();
    let pg = pg(&stores).await?;
    let head = stores.etcd.revision().await?;
    let service = Service::spawn(config(binary, &stores, "n1", &[]), "n1")?;
    let pid = service.pid().unwrap_or(0);
    let peak = Arc::new(std::sync::Mutex::new(0.0f64));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let (_, hwm) = rss_mib(pid);
                {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.max(hwm);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait_leader(&service).await?;
    let started = Instant::now();
    wait_applied(&pg, head, Duration::from_secs(1800)).await?;
    let rate = keys as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sampler.abort();
    let peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    Ok((rate, baseline, peak))
}

/// Range reads without the service (the bench has no eps-etcd dependency).
mod eps_etcd_shim {
    pub struct Reader(etcd_client::Client);

    pub async fn connect(etcd: &eps_harness::Etcd) -> anyhow::Result<Reader> {
        Ok(Reader(etcd.client().await?))
    }

    impl Reader {
        /// (revision, keys, more)
        pub async fn range_page(
            &self,
            from: &[u8],
            end: Option<&[u8]>,
            revision: i64,
            limit: i64,
        ) -> anyhow::Result<(i64, Vec<Vec<u8>>, bool)> {
            let mut client = self.0.clone();
            let mut options = etcd_client::GetOptions::new()
                .with_limit(limit)
                .with_revision(revision);
            if let Some(end) = end {
                options = options.with_range(end.to_vec());
            }
            let response = client.get(from.to_vec(), Some(options)).await?;
            let keys = response.kvs().iter().map(|kv| kv.key().to_vec()).collect();
            Ok((
                response.header().map_or(0, |h| h.revision()),
                keys,
                response.more(),
            ))
        }
    }
}

async fn snapshot(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let mut runs = Vec::new();
    let mut keysets: Vec<usize> = sizes.snapshot_keys.to_vec();
    if sizes.large {
        keysets.push(1_000_000);
    }
    for keys in &keysets {
        let (rate, baseline, peak) = snapshot_once(binary, *keys).await?;
        eprintln!(
            "snapshot of {keys} keys: {rate:.0} keys/s (range reads {baseline:.0}/s), peak RSS {peak:.1} MiB"
        );
        runs.push(json!({"keys": keys, "keys_per_s": rate, "range_read_keys_per_s": baseline, "peak_rss_mib": peak}));
    }
    let first = &runs[0];
    let last = &runs[runs.len() - 1];
    let rss_growth = last["peak_rss_mib"].as_f64().unwrap_or(0.0)
        / first["peak_rss_mib"].as_f64().unwrap_or(1.0);
    let rate = last["keys_per_s"].as_f64().unwrap_or(0.0);
    let baseline = last["range_read_keys_per_s"].as_f64().unwrap_or(1.0);
    Ok(Outcome {
        scenario: "snapshot".into(),
        parameters: json!({"keysets": keysets, "value_bytes": 100}),
        figures: json!({"runs": runs, "peak_rss_growth_largest_over_smallest": rss_growth}),
        baseline: json!({"summary": format!("range reads {baseline:.0} keys/s")}),
        ratio: Some(rate / baseline),
        goal: "RSS flat in keyspace size".into(),
        summary: format!(
            "{rate:.0} keys/s at {} keys; peak RSS {:.0} MiB at {} keys vs {:.0} MiB at {} keys (×{rss_growth:.2})",
            last["keys"],
            last["peak_rss_mib"].as_f64().unwrap_or(0.0),
            last["keys"],
            first["peak_rss_mib"].as_f64().unwrap_or(0.0),
            first["keys"]
        ),
    })
}

async fn failover(binary: &Path, _sizes: Sizes) -> anyhow::Result<Outcome> {
    let stores = stores().await?;
    let ttl = "3";
    let env = [("ETCD_PG_SYNC__CLUSTER__LEASE_TTL_SECS", ttl)];
    let mut replicas = Vec::new();
    for node in ["n1", "n2", "n3"] {
        replicas.push(Service::start(config(binary, &stores, node, &env), node).await?);
    }
    let mut leader = None;
    for _ in 0..400 {
        for (i, r) in replicas.iter().enumerate() {
            if r.status()
                .await
                .is_ok_and(|s| s.contains("\"role\":\"leader\""))
            {
                leader = Some(i);
            }
        }
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = leader.ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let pg = pg(&stores).await?;
    wait_applied(&pg, stores.etcd.revision().await?, Duration::from_secs(30)).await?;
    let stop = CancellationToken::new();
    let load = {
        let (endpoint, stop) = (stores.etcd.endpoint(), stop.clone());
        tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            let mut i = 0u64;
            while !stop.is_cancelled() {
                client
                    .put(format!("/bench/failover/{:04}", i % 1000), "v", None)
                    .await?;
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_term: i64 = pg
        .query_one("SELECT term FROM etcd_sync.sync_state", &[])
        .await?
        .get(0);
    let killed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    replicas[leader].kill();
    let started = Instant::now();
    let first_change = loop {
        let row = pg
            .query_opt(
                "SELECT extract(epoch FROM min(recorded_at))::float8 FROM etcd_sync.history WHERE term > $1 HAVING count(*) > 0",
                &[&old_term],
            )
            .await?;
        if let Some(row) = row {
            break row.get::<_, f64>(0);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no new leader applied anything"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.cancel();
    load.await??;
    let failover = first_change - killed;
    Ok(Outcome {
        scenario: "failover".into(),
        parameters: json!({"replicas": 3, "lease_ttl_secs": 3, "load_puts_per_s": 500}),
        figures: json!({"kill_to_first_change_s": failover}),
        baseline: json!({"summary": "lease TTL 3 s (+2 s allowed)"}),
        ratio: Some(failover / 3.0),
        goal: "≤ TTL + 2 s".into(),
        summary: format!(
            "leader SIGKILLed → first change applied by the new leader in {failover:.2} s"
        ),
    })
}

async fn vs_make_mirror(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let duration = Duration::from_secs(sizes.live_secs);
    // etcd-pg-sync.
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    wait_applied(&pg, stores.etcd.revision().await?, Duration::from_secs(30)).await?;
    let started = Instant::now();
    let ours_puts = put_load(
        &stores.etcd.endpoint(),
        "/bench/m/",
        sizes.live_clients,
        duration,
    )
    .await?;
    let ours_load = started.elapsed();
    let head = stores.etcd.revision().await?;
    let ours_catch_up = wait_applied(&pg, head, Duration::from_secs(600)).await?;
    let ours_rate = ours_puts as f64 / (ours_load + ours_catch_up).as_secs_f64();
    drop(service);

    // etcdctl make-mirror into a second etcd.
    let source = Etcd::start().await?;
    let destination = Etcd::start().await?;
    let etcdctl = std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".into());
    let mut mirror = tokio::process::Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &source.endpoint(),
            "make-mirror",
            "--prefix",
            "/bench/",
            &destination.endpoint(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("etcdctl make-mirror (install Debian's etcd-client): {e}"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let theirs_puts = put_load(
        &source.endpoint(),
        "/bench/m/",
        sizes.live_clients,
        duration,
    )
    .await?;
    let theirs_load = started.elapsed();
    // The whole prefix in one answer: past gRPC's default 4 MiB decode
    // limit at full size.
    const WHOLE_PREFIX_BYTES: usize = 1 << 30;
    let mut source_client = source
        .client()
        .await?
        .kv_client()
        .max_decoding_message_size(WHOLE_PREFIX_BYTES);
    let mut dest_client = destination
        .client()
        .await?
        .kv_client()
        .max_decoding_message_size(WHOLE_PREFIX_BYTES);
    let options = || etcd_client::GetOptions::new().with_prefix();
    let expected: HashMap<Vec<u8>, Vec<u8>> = source_client
        .get("/bench/m/", Some(options()))
        .await?
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    let catch_up_started = Instant::now();
    let theirs_catch_up = loop {
        let got: HashMap<Vec<u8>, Vec<u8>> = dest_client
            .get("/bench/m/", Some(options()))
            .await?
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        if got == expected {
            break Some(catch_up_started.elapsed());
        }
        if catch_up_started.elapsed() > Duration::from_secs(300) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = mirror.kill().await;
    let theirs_rate = match theirs_catch_up {
        Some(catch_up) => theirs_puts as f64 / (theirs_load + catch_up).as_secs_f64(),
        None => theirs_puts as f64 / (theirs_load + Duration::from_secs(300)).as_secs_f64(),
    };
    Ok(Outcome {
        scenario: "vs-make-mirror".into(),
        parameters: json!({"clients": sizes.live_clients, "seconds": sizes.live_secs}),
        figures: json!({
            "etcd_pg_sync": {"puts": ours_puts, "mirrored_per_s": ours_rate, "catch_up_after_load_s": ours_catch_up.as_secs_f64()},
            "make_mirror": {"puts": theirs_puts, "mirrored_per_s": theirs_rate, "catch_up_after_load_s": theirs_catch_up.map(|d| d.as_secs_f64())},
        }),
        baseline: json!({"summary": format!("make-mirror {theirs_rate:.0} changes/s, {} after load", theirs_catch_up.map_or("not caught up in 300 s".into(), |d| format!("caught up {:.1} s", d.as_secs_f64())))}),
        ratio: Some(ours_rate / theirs_rate),
        goal: "≥ 1.0".into(),
        summary: format!(
            "etcd-pg-sync {ours_rate:.0} changes/s, caught up {:.2} s after load (keeps history)",
            ours_catch_up.as_secs_f64()
        ),
    })
}

/// Writes `changes` changes over `keys` distinct keys, half from SQL (the
/// poller, its chains and echo traces) and half to etcd (the watcher, and
/// conflicts where both sides write a key), 8 sessions each; returns when
/// acknowledged.
async fn mixed_load(
    stores: &Stores,
    first: usize,
    changes: usize,
    keys: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for s in 0..8 {
        let db = stores.db.clone();
        tasks.push(tokio::spawn(async move {
            let client = db.client().await?;
            let upsert = client
                .prepare(
                    "INSERT INTO etcd_sync.kv_bench (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await?;
            for i in (first + s..first + changes / 2).step_by(8) {
                let key = format!("/bench/mem/{:07}", (i * 7919) % keys).into_bytes();
                client
                    .execute(&upsert, &[&key, &format!("pg-{i}").into_bytes()])
                    .await?;
            }
            anyhow::Ok(())
        }));
        let endpoint = stores.etcd.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for i in (first + s..first + changes / 2).step_by(8) {
                let key = format!("/bench/mem/{:07}", (i * 104_729) % keys);
                client.put(key, format!("etcd-{i}"), None).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Waits until the outbox is empty and the checkpoint is at etcd's head.
async fn wait_quiet(stores: &Stores, pg: &tokio_postgres::Client) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let outbox: i64 = pg
            .query_one("SELECT count(*) FROM etcd_sync.outbox", &[])
            .await?
            .get(0);
        if outbox == 0 && applied(pg).await? >= stores.etcd.revision().await? {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "the sync did not settle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Memory for the life of a term: a leader's resident memory after 10,000
/// changes and after many more over many more distinct keys (1,000,000 over
/// 100,000; 100,000 over 20,000 with --quick). Per-key state must follow
/// the work in flight, not every key ever written.
async fn long_run_memory(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let (total, keys) = if sizes.quick {
        (100_000, 20_000)
    } else {
        (1_000_000, 100_000)
    };
    let stores = stores().await?;
    let service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pid = service
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the service has no pid"))?;
    let pg = pg(&stores).await?;
    let warmup = 10_000;
    mixed_load(&stores, 0, warmup, warmup).await?;
    wait_quiet(&stores, &pg).await?;
    let (after_warmup, _) = rss_mib(pid);
    let started = Instant::now();
    mixed_load(&stores, warmup, total - warmup, keys).await?;
    wait_quiet(&stores, &pg).await?;
    let elapsed = started.elapsed();
    let (after_all, peak) = rss_mib(pid);
    let growth = after_all / after_warmup.max(1.0);
    Ok(Outcome {
        scenario: "long-run-memory".into(),
        parameters: json!({"changes": total, "distinct_keys": keys, "warmup_changes": warmup}),
        figures: json!({
            "rss_mib_after_warmup": after_warmup, "rss_mib_after_all": after_all,
            "peak_rss_mib": peak, "seconds": elapsed.as_secs_f64(),
        }),
        baseline: json!({"summary": format!("RSS after {warmup} changes: {after_warmup:.0} MiB")}),
        ratio: Some(growth),
        goal: "≤ 1.5 (flat)".into(),
        summary: format!(
            "RSS {after_all:.0} MiB after {total} changes over {keys} keys vs {after_warmup:.0} MiB after {warmup} (×{growth:.2}, peak {peak:.0} MiB)"
        ),
    })
}

/// `value_at` and `state_at` over a large history: rows generated in
/// PostgreSQL (every key changed many times, a delete now and then), then
/// random revisions asked. Figures: p50/p99 ms.
async fn history_queries(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    use rand::{Rng, SeedableRng};
    let (rows, keys): (i64, i64) = if sizes.quick {
        (1_000_000, 10_000)
    } else {
        (10_000_000, 100_000)
    };
    let stores = stores().await?;
    // The service migrates and syncs the (empty) mapping: its history
    // starts at that revision.
    let mut service = Service::start(config(binary, &stores, "n1", &[]), "n1").await?;
    wait_leader(&service).await?;
    let pg = pg(&stores).await?;
    wait_applied(&pg, 1, Duration::from_secs(30)).await?;
    service.terminate(Duration::from_secs(10)).await?;
    let from: i64 = pg
        .query_one(
            "SELECT history_from FROM etcd_sync.mirror_tables WHERE name = 'kv_bench'",
            &[],
        )
        .await?
        .get(0);
    // The history partitioned as a long-running service's would be: ten
    // partitions (months, say) over the rows, the newest one open.
    let partitions = 10i64;
    for row in pg
        .query(
            "SELECT name FROM etcd_sync.history_partitions WHERE from_timeline = 1",
            &[],
        )
        .await?
    {
        let name: String = row.get(0);
        pg.batch_execute(&format!("DROP TABLE etcd_sync.{name}"))
            .await?;
    }
    for k in 1..=partitions {
        let end = from + 1 + k * (rows / partitions);
        pg.execute("SELECT etcd_sync.add_history_partition(1, $1)", &[&end])
            .await?;
    }
    let started = Instant::now();
    pg.execute(
        "INSERT INTO etcd_sync.history (key, revision, op, value, create_revision, version, lease, origin, term) \
         SELECT convert_to('/bench/h/' || lpad((i % $2::int8)::text, 7, '0'), 'UTF8'), $3::int8 + i, \
                CASE WHEN i % 17 = 0 THEN 'delete' ELSE 'put' END, \
                CASE WHEN i % 17 = 0 THEN NULL ELSE convert_to(repeat('v', 40) || i, 'UTF8') END, \
                $3::int8 + i, 1, 0, 'etcd', 1 \
         FROM generate_series(1::int8, $1::int8) AS i",
        &[&rows, &keys, &from],
    )
    .await?;
    // As autovacuum leaves a long-written history: visibility map set, so
    // the key scans of `state_at` need not visit the heap.
    pg.batch_execute("VACUUM ANALYZE etcd_sync.history").await?;
    let loaded = started.elapsed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let percentiles = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99))
    };
    let value_at = pg
        .prepare(
            "SELECT etcd_sync.value_at(convert_to('/bench/h/' || lpad($1::int8::text, 7, '0'), 'UTF8'), $2::int8)",
        )
        .await?;
    let mut value_ms = Vec::new();
    for _ in 0..1000 {
        let key: i64 = rng.random_range(0..keys);
        let revision: i64 = from + rng.random_range(1..=rows);
        let asked = Instant::now();
        pg.query_one(&value_at, &[&key, &revision]).await?;
        value_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    let state_at = pg
        .prepare("SELECT count(*) FROM etcd_sync.state_at('kv_bench', $1)")
        .await?;
    let mut state_ms = Vec::new();
    let mut returned = 0i64;
    for _ in 0..20 {
        let revision: i64 = from + rng.random_range(1..=rows);
        let asked = Instant::now();
        returned = pg.query_one(&state_at, &[&revision]).await?.get(0);
        state_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    let (value_p50, value_p99) = percentiles(value_ms);
    let (state_p50, state_p99) = percentiles(state_ms);
    eprintln!(
        "history-queries: {rows} rows over {keys} keys in {partitions} partitions loaded in {loaded:?}; value_at p50 {value_p50:.2} ms p99 {value_p99:.2} ms; state_at ({returned} keys) p50 {state_p50:.0} ms p99 {state_p99:.0} ms"
    );
    Ok(Outcome {
        scenario: "history-queries".into(),
        parameters: json!({"history_rows": rows, "keys": keys, "partitions": partitions, "value_at_queries": 1000, "state_at_queries": 20}),
        figures: json!({
            "value_at_p50_ms": value_p50, "value_at_p99_ms": value_p99,
            "state_at_p50_ms": state_p50, "state_at_p99_ms": state_p99,
            "state_at_keys": returned,
        }),
        baseline: json!({"summary": "none: latency figures"}),
        ratio: None,
        goal: "p50/p99 reported".into(),
        summary: format!(
            "{rows} rows over {keys} keys: value_at p50 {value_p50:.2} / p99 {value_p99:.2} ms; state_at of {returned} keys p50 {state_p50:.0} / p99 {state_p99:.0} ms"
        ),
    })
}

/// SQL changes committed while the service is stopped (one key per
/// transaction), then the service started: keys/s from its start until
/// etcd holds them all. Baseline: the same keys sent directly in etcd txns
/// of 100 puts, one at a time.
async fn pg_backlog_drain(binary: &Path, sizes: Sizes) -> anyhow::Result<Outcome> {
    let changes: usize = if sizes.quick { 20_000 } else { 50_000 };
    let stores = stores().await?;
    let config = config(binary, &stores, "n1", &[]);
    let mut service = Service::start(config.clone(), "n1").await?;
    wait_leader(&service).await?;
    service.terminate(Duration::from_secs(10)).await?;
    // Committed while no replica runs, one transaction per key.
    let pg = pg(&stores).await?;
    let insert = pg
        .prepare("INSERT INTO etcd_sync.kv_bench (key, value) VALUES ($1, $2)")
        .await?;
    for i in 0..changes {
        pg.execute(
            &insert,
            &[
                &format!("/bench/backlog/{i:07}").into_bytes(),
                &vec![b'p'; 64],
            ],
        )
        .await?;
    }
    let started = Instant::now();
    let service = Service::start(config, "n1").await?;
    // Start-up (process, election, checks) apart from the drain itself.
    wait_leader(&service).await?;
    let leader_after = started.elapsed();
    let first_in_etcd = loop {
        if etcd_count(&stores.etcd, "/bench/backlog/").await? > 0 {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "nothing of the backlog reached etcd"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    while etcd_count(&stores.etcd, "/bench/backlog/").await? < changes as i64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the backlog did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    drop(service);
    let rate = changes as f64 / drained.as_secs_f64();
    let mut client = stores.etcd.client().await?;
    let baseline_started = Instant::now();
    for chunk in (0..changes).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(format!("/bench/rawbacklog/{i:07}"), vec![b'p'; 64], None)
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let baseline = changes as f64 / baseline_started.elapsed().as_secs_f64();
    eprintln!(
        "pg-backlog-drain: {changes} queued changes in etcd {drained:?} after the start (incl. start-up)"
    );
    Ok(Outcome {
        scenario: "pg-backlog-drain".into(),
        parameters: json!({"changes": changes}),
        figures: json!({
            "keys_per_s": rate, "drain_seconds_including_start": drained.as_secs_f64(),
            "leader_after_s": leader_after.as_secs_f64(),
            "first_change_in_etcd_after_s": first_in_etcd.as_secs_f64(),
            "keys_per_s_after_first": changes as f64 / (drained - first_in_etcd).as_secs_f64().max(1e-9),
        }),
        baseline: json!({"direct_100_op_txns_keys_per_s": baseline, "summary": format!("100-op etcd txns {baseline:.0} keys/s")}),
        ratio: Some(rate / baseline),
        goal: "≥ 0.5".into(),
        summary: format!(
            "{rate:.0} keys/s ({changes} changes, {:.1} s from start-up)",
            drained.as_secs_f64()
        ),
    })
}
