//! Shared setup of the store's tests: a store on a fresh database of the
//! binary's PostgreSQL, rows written as the service writes them.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;

use eps_core::config::Config;
use eps_harness::{Postgres, TestDatabase};
use eps_store::{Fence, Store};

/// A store with `toml_extra` appended to its configuration (not migrated).
pub async fn store_with(toml_extra: &str) -> anyhow::Result<(Store, TestDatabase)> {
    let db = Postgres::fresh_database().await?;
    let store = store_for(&db.url(), toml_extra).await?;
    Ok((store, db))
}

/// A store connecting with `url`.
pub async fn store_for(url: &str, toml_extra: &str) -> anyhow::Result<Store> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("[postgres]\nurl = \"{url}\"\n{toml_extra}"))?;
    let config = Config::load(Some(&path), &HashMap::new())?;
    Ok(Store::new(&config).await?)
}

/// Claims term 1 for node `n1` and returns its fence.
pub async fn term_one(store: &Store) -> anyhow::Result<Fence> {
    anyhow::ensure!(store.claim_term(1, "n1", 1).await?, "term 1 taken");
    Ok(Fence {
        term: 1,
        node: "n1".into(),
    })
}

/// Writes `key = value` into `etcd_sync.kv` as the service does (its
/// metadata at `revision`, no outbox row).
pub async fn insert_as_service(
    client: &tokio_postgres::Client,
    key: &str,
    value: &str,
    revision: i64,
) -> anyhow::Result<()> {
    client
        .execute("SELECT set_config('etcd_sync.applying', 'on', false)", &[])
        .await?;
    let inserted = client
        .execute(
            "INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES (convert_to($1, 'UTF8'), convert_to($2, 'UTF8'), $3, $3, 1, 'etcd')",
            &[&key, &value, &revision],
        )
        .await;
    client
        .execute("SELECT set_config('etcd_sync.applying', '', false)", &[])
        .await?;
    inserted?;
    Ok(())
}

/// etcd's put of `key = value` at `revision`, the key created at
/// `create_revision` and at `version`, as the watcher hands it to an apply.
pub fn put_event(
    key: &str,
    value: &str,
    revision: i64,
    create_revision: i64,
    version: i64,
) -> eps_store::KeyInputs {
    use eps_core::model::{EtcdEvent, KeyMeta, Op};
    eps_store::KeyInputs {
        key: key.as_bytes().to_vec(),
        inputs: vec![eps_core::reconcile::KeyInput::Event(EtcdEvent {
            op: Op::Put,
            key: key.as_bytes().to_vec(),
            revision,
            value: value.as_bytes().to_vec(),
            meta: KeyMeta {
                create_revision,
                mod_revision: revision,
                version,
                lease: 0,
            },
            prev: None,
        })],
    }
}

/// Inserts `key` into `etcd_sync.kv` as a user does; returns the id of
/// the outbox row the insert queued.
pub async fn queued_insert(client: &tokio_postgres::Client, key: &str) -> anyhow::Result<i64> {
    client
        .execute(
            "INSERT INTO etcd_sync.kv (key, value) VALUES (convert_to($1, 'UTF8'), 'v')",
            &[&key],
        )
        .await?;
    Ok(client
        .query_one(
            "SELECT id FROM etcd_sync.outbox WHERE key = convert_to($1, 'UTF8')",
            &[&key],
        )
        .await?
        .get(0))
}
