//! The quick start (`bash scripts/demo`): starts etcd and PostgreSQL in a
//! temporary directory, three etcd-pg-sync replicas, writes sample data in
//! both stores and shows it mirrored, then one conflict settled by policy,
//! a leader failover and a look back into the history; it prints the
//! commands to try next and waits for Ctrl-C.

use std::path::Path;
use std::time::{Duration, Instant};

use eps_harness::{Etcd, Postgres, Service, ServiceConfig, TestDatabase, wait_for};

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/demo/"
table = "kv"
direction = "both"
policy = "newest-wins"
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("etcd-pg-sync"))
        .ok_or_else(|| anyhow::anyhow!("cannot locate the etcd-pg-sync binary"))?;
    println!("starting etcd and PostgreSQL…");
    let etcd = Etcd::start().await?;
    let postgres = Postgres::start().await?;
    let db = postgres.create_database().await?;
    let config_for = |node: &str| {
        let mut config = ServiceConfig::new(&binary, &etcd.endpoint(), &db.url(), node, MAPPINGS);
        config.toml = config
            .toml
            .replace("log_format = \"json\"", "log_format = \"pretty\"");
        config
    };
    // The commands below read the same configuration as the replicas.
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config_for("cli").toml)?;

    println!("starting three replicas…");
    let mut replicas = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        replicas.push(Service::start(config_for(node), node).await?);
    }
    let leader = wait_for_leader(&replicas).await?;
    println!("leader: {}", replicas[leader].node_id);

    let mut kv = etcd.client().await?;
    let pg = db.client().await?;
    mirror_both_ways(&mut kv, &pg).await?;
    conflict(&mut kv, &pg, &db, &config_path).await?;
    history(&mut kv, &pg).await?;
    let killed = leader;
    let leader = failover(&mut replicas, leader, &pg).await?;

    println!("\nTry it yourself while this runs:");
    println!("  config: {}", config_path.display());
    let config_arg = format!("--config {}", config_path.display());
    for command in ["status", "verify", "conflicts list", "doctor"] {
        println!("  {} {command} {config_arg}", binary.display());
    }
    println!(
        "  etcdctl --endpoints {} put /demo/hello world",
        etcd.endpoint()
    );
    println!(
        "  psql -h 127.0.0.1 -p {} -U postgres {} -c \"UPDATE etcd_sync.kv_text SET value = 'changed' WHERE key = '/demo/hello'\"",
        db.port, db.name
    );
    for (i, replica) in replicas.iter().enumerate() {
        if i == killed {
            continue;
        }
        println!(
            "  curl http://{}/status   # {}{}",
            replica.http,
            replica.node_id,
            if replica.node_id == replicas[leader].node_id {
                " (leader)"
            } else {
                ""
            }
        );
    }
    println!("\nCtrl-C stops the replicas, etcd and PostgreSQL and removes their files.");
    tokio::signal::ctrl_c().await?;
    println!("\nstopping…");
    for replica in &mut replicas {
        let _ = replica.terminate(Duration::from_secs(10)).await;
    }
    drop(etcd);
    postgres.stop();
    println!("stopped cleanly");
    Ok(())
}

/// Keys written on each side, shown on both once mirrored.
async fn mirror_both_ways(
    kv: &mut etcd_client::Client,
    pg: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    println!("\nwriting /demo/from-etcd/* in etcd and /demo/from-pg/* in PostgreSQL…");
    for i in 1..=3 {
        kv.put(
            format!("/demo/from-etcd/{i}"),
            format!("etcd value {i}"),
            None,
        )
        .await?;
    }
    for i in 1..=3 {
        pg.execute(
            "INSERT INTO etcd_sync.kv_text (key, value) VALUES ($1, $2)",
            &[&format!("/demo/from-pg/{i}"), &format!("pg value {i}")],
        )
        .await?;
    }
    let started = Instant::now();
    wait_for(
        "both sides to hold all six keys",
        Duration::from_secs(30),
        || {
            let mut kv = kv.clone();
            async move {
                let in_etcd = kv
                    .get(
                        "/demo/from-",
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await?
                    .count();
                let in_pg: i64 = pg
                    .query_one(
                        "SELECT count(*) FROM etcd_sync.kv_text WHERE key LIKE '/demo/from-%'",
                        &[],
                    )
                    .await?
                    .get(0);
                Ok((in_etcd == 6 && in_pg == 6).then_some(()))
            }
        },
    )
    .await?;
    println!(
        "mirrored in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    println!("\netcd (range /demo/):");
    let listing = kv
        .get("/demo/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    for entry in listing.kvs() {
        println!(
            "  {} = {}",
            String::from_utf8_lossy(entry.key()),
            String::from_utf8_lossy(entry.value())
        );
    }
    println!("\nPostgreSQL (SELECT key, value, origin FROM etcd_sync.kv_text ORDER BY key):");
    for row in pg
        .query(
            "SELECT key, value, origin FROM etcd_sync.kv_text ORDER BY key",
            &[],
        )
        .await?
    {
        let key: Option<String> = row.get(0);
        let value: Option<String> = row.get(1);
        let origin: String = row.get(2);
        println!(
            "  {} = {}   (last written in {origin})",
            key.unwrap_or_default(),
            value.unwrap_or_default()
        );
    }
    Ok(())
}

/// A key changed on both sides at once: a SQL transaction updates it and
/// stays open while etcd gets another value; the mapping's policy
/// (newest-wins) settles it, and the loser is kept in `conflicts`.
async fn conflict(
    kv: &mut etcd_client::Client,
    pg: &tokio_postgres::Client,
    db: &TestDatabase,
    config_path: &Path,
) -> anyhow::Result<()> {
    println!("\na conflict: /demo/from-etcd/1 changed in a SQL transaction and in etcd at once…");
    let mut session = db.client().await?;
    let open = session.transaction().await?;
    open.execute(
        "UPDATE etcd_sync.kv_text SET value = 'changed in SQL' WHERE key = '/demo/from-etcd/1'",
        &[],
    )
    .await?;
    kv.put("/demo/from-etcd/1", "changed in etcd", None).await?;
    open.commit().await?;
    let outcome = wait_for("the conflict to be settled", Duration::from_secs(30), || async move {
        let row = pg
            .query_opt(
                "SELECT policy, coalesce(winner, 'pending'), convert_from(etcd_value, 'UTF8'), \
                        convert_from(pg_value, 'UTF8') \
                 FROM etcd_sync.conflicts WHERE key = '/demo/from-etcd/1'::bytea ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?;
        Ok(row.map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
            )
        }))
    })
    .await?;
    let (policy, winner, etcd_value, pg_value) = outcome;
    println!(
        "  {policy}: {winner} won (etcd had {:?}, PostgreSQL had {:?}); both sides now agree",
        etcd_value.unwrap_or_default(),
        pg_value.unwrap_or_default()
    );
    println!(
        "  see it with: etcd-pg-sync conflicts list --config {}",
        config_path.display()
    );
    Ok(())
}

/// The history keeps every revision: the value a key had before its last
/// change, by revision.
async fn history(kv: &mut etcd_client::Client, pg: &tokio_postgres::Client) -> anyhow::Result<()> {
    let before = kv.get("/demo/from-etcd/2", None).await?;
    let revision = before.kvs().first().map_or(0, |kv| kv.mod_revision());
    kv.put("/demo/from-etcd/2", "newer value", None).await?;
    let query = format!(
        "SELECT convert_from(etcd_sync.value_at('/demo/from-etcd/2'::bytea, {revision}), 'UTF8')"
    );
    let old: Option<String> =
        wait_for("the change in the history", Duration::from_secs(30), || {
            let query = query.clone();
            async move {
                let changed: i64 = pg
                .query_one(
                    "SELECT count(*) FROM etcd_sync.history WHERE key = '/demo/from-etcd/2'::bytea",
                    &[],
                )
                .await?
                .get(0);
                if changed < 2 {
                    return Ok(None);
                }
                Ok(Some(pg.query_one(&query, &[]).await?.get(0)))
            }
        })
        .await?;
    println!("\nhistory: /demo/from-etcd/2 is now \"newer value\"; at revision {revision} it was:");
    println!("  {query};\n  → {:?}", old.unwrap_or_default());
    Ok(())
}

/// Kills the leader and shows how long the next one took to take over.
async fn failover(
    replicas: &mut [Service],
    leader: usize,
    pg: &tokio_postgres::Client,
) -> anyhow::Result<usize> {
    println!(
        "\nfailover: killing the leader ({}) …",
        replicas[leader].node_id
    );
    let killed = Instant::now();
    replicas[leader].kill();
    let alive: Vec<&Service> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, r)| r)
        .collect();
    let next = eps_harness::service::wait_leader(&alive, Duration::from_secs(30)).await?;
    let node = alive[next].node_id.clone();
    let term: i64 = pg
        .query_one("SELECT term FROM etcd_sync.sync_state", &[])
        .await?
        .get(0);
    println!(
        "  {node} leads (term {term}) {:.1} s later: the lease of the killed leader had to expire",
        killed.elapsed().as_secs_f64()
    );
    Ok(replicas
        .iter()
        .position(|r| r.node_id == node)
        .unwrap_or(leader))
}

async fn wait_for_leader(replicas: &[Service]) -> anyhow::Result<usize> {
    let all: Vec<&Service> = replicas.iter().collect();
    eps_harness::service::wait_leader(&all, Duration::from_secs(10)).await
}
