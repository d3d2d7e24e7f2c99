//! The quick start (`bash scripts/demo`): starts etcd and PostgreSQL in a
//! temporary directory, three etcd-pg-sync replicas, writes sample data in
//! both stores and shows it mirrored, then waits for Ctrl-C.

use std::time::Duration;

use eps_harness::{Etcd, Postgres, Service, ServiceConfig};

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

    println!("starting three replicas…");
    let mut replicas = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        let mut config = ServiceConfig::new(&binary, &etcd.endpoint(), &db.url(), node, MAPPINGS);
        config.toml = config
            .toml
            .replace("log_format = \"json\"", "log_format = \"pretty\"");
        replicas.push(Service::start(config, node).await?);
    }
    let leader = wait_for_leader(&replicas).await?;
    println!("leader: {leader}");

    println!("\nwriting /demo/from-etcd/* in etcd and /demo/from-pg/* in PostgreSQL…");
    let mut kv = etcd.client().await?;
    for i in 1..=3 {
        kv.put(
            format!("/demo/from-etcd/{i}"),
            format!("etcd value {i}"),
            None,
        )
        .await?;
    }
    let pg = db.client().await?;
    for i in 1..=3 {
        pg.execute(
            "INSERT INTO etcd_sync.kv_text (key, value) VALUES ($1, $2)",
            &[&format!("/demo/from-pg/{i}"), &format!("pg value {i}")],
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

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

    println!("\nTry it yourself while this runs:");
    println!(
        "  etcdctl --endpoints {} put /demo/hello world",
        etcd.endpoint()
    );
    println!(
        "  psql -h 127.0.0.1 -p {} -U postgres {} -c \"UPDATE etcd_sync.kv_text SET value = 'changed' WHERE key = '/demo/hello'\"",
        db.port, db.name
    );
    for replica in &replicas {
        println!(
            "  curl http://{}/status   # {}",
            replica.http, replica.node_id
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

async fn wait_for_leader(replicas: &[Service]) -> anyhow::Result<String> {
    let all: Vec<&Service> = replicas.iter().collect();
    let leader = eps_harness::service::wait_leader(&all, Duration::from_secs(10)).await?;
    Ok(replicas[leader].node_id.clone())
}
