//! Conflicts, retries and dead letters (docs/design.md D1, D2, G3, G7, G8).
#![allow(clippy::type_complexity, clippy::unwrap_used)] // test tables and setup

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use support::*;

fn mappings(policy: &str) -> String {
    format!("[[mappings]]\nprefix = \"/a/\"\ntable = \"kv_a\"\npolicy = \"{policy}\"\n")
}

fn under_a(key: &[u8]) -> bool {
    key.starts_with(b"/a/")
}

#[derive(Debug)]
struct Conflict {
    id: i64,
    key: Vec<u8>,
    etcd_value: Option<Vec<u8>>,
    etcd_revision: i64,
    pg_value: Option<Vec<u8>>,
    pg_superseded: Vec<Option<Vec<u8>>>,
    winner: Option<String>,
    status: String,
    /// By the revision clock: "pg" (written after etcd's change was made),
    /// "etcd" (committed before it), "tie" (neither).
    newer: String,
    decided_by_tie: bool,
}

async fn conflicts(pg: &tokio_postgres::Client) -> anyhow::Result<Vec<Conflict>> {
    let rows = pg
        .query(
            "SELECT id, key, etcd_value, etcd_revision, pg_value, winner, status, \
                    CASE WHEN pg_changed_at > etcd_changed_by THEN 'pg' \
                         WHEN pg_committed_by <= etcd_changed_after THEN 'etcd' ELSE 'tie' END, \
                    pg_superseded, decided_by_tie \
             FROM etcd_sync.conflicts ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Conflict {
            id: r.get(0),
            key: r.get(1),
            etcd_value: r.get(2),
            etcd_revision: r.get(3),
            pg_value: r.get(4),
            winner: r.get(5),
            status: r.get(6),
            newer: r.get(7),
            pg_superseded: r.get(8),
            decided_by_tie: r.get(9),
        })
        .collect())
}

/// Starts a replica, waits until it has mirrored etcd's `/a/` keys, and
/// stops it: changes made now meet it when it restarts.
async fn synced_then_stopped(world: &World) -> anyhow::Result<eps_harness::Service> {
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(world).await?;
    wait_converged(world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;
    Ok(service)
}

/// Keys changed on both sides while the replica is stopped: one conflict
/// each, settled by the policy when it comes back.
async fn conflicts_while_stopped(
    policy: &str,
    keys: usize,
) -> anyhow::Result<(World, eps_harness::Service)> {
    let world = World::new(&mappings(policy)).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..keys {
        etcd.put(format!("/a/k{i:03}"), "agreed", None).await?;
    }
    let mut service = synced_then_stopped(&world).await?;

    let pg = world.pg().await?;
    for i in 0..keys {
        pg.execute(
            "UPDATE kv_a_text SET value = $2 WHERE key = $1",
            &[&format!("/a/k{i:03}"), &format!("pg {i}")],
        )
        .await?;
        etcd.put(format!("/a/k{i:03}"), format!("etcd {i}"), None)
            .await?;
    }
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    Ok((world, service))
}

#[tokio::test]
async fn etcd_wins_keeps_etcds_value_and_records_the_loser() -> anyhow::Result<()> {
    let (world, _service) = conflicts_while_stopped("etcd-wins", 50).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    for i in 0..50 {
        assert_eq!(
            state[format!("/a/k{i:03}").as_bytes()],
            format!("etcd {i}").into_bytes()
        );
    }
    let pg = world.pg().await?;
    let found = conflicts(&pg).await?;
    assert_eq!(
        found.len(),
        50,
        "one conflict per key changed on both sides"
    );
    for c in &found {
        assert_eq!(c.winner.as_deref(), Some("etcd"));
        assert_eq!(c.status, "resolved");
        let i: usize = String::from_utf8_lossy(&c.key[4..]).parse()?;
        assert_eq!(
            c.pg_value.as_deref(),
            Some(format!("pg {i}").as_bytes()),
            "the loser is kept"
        );
    }
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM sync_events WHERE kind = 'conflict'"
        )
        .await?,
        50
    );
    Ok(())
}

#[tokio::test]
async fn pg_wins_overwrites_etcd_and_records_the_loser() -> anyhow::Result<()> {
    let (world, _service) = conflicts_while_stopped("pg-wins", 50).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    for i in 0..50 {
        assert_eq!(
            state[format!("/a/k{i:03}").as_bytes()],
            format!("pg {i}").into_bytes()
        );
    }
    let pg = world.pg().await?;
    let found = conflicts(&pg).await?;
    assert_eq!(found.len(), 50);
    for c in &found {
        assert_eq!(c.winner.as_deref(), Some("pg"));
        let i: usize = String::from_utf8_lossy(&c.key[4..]).parse()?;
        assert_eq!(
            c.etcd_value.as_deref(),
            Some(format!("etcd {i}").as_bytes())
        );
    }
    assert_history_is_etcd_log(&world, under_a).await?;
    Ok(())
}

#[tokio::test]
async fn manual_leaves_both_sides_until_an_operator_resolves() -> anyhow::Result<()> {
    let (world, _service) = conflicts_while_stopped("manual", 3).await?;
    let pg = world.pg().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(
        &pg,
        "SELECT count(*) FROM conflicts WHERE status = 'pending'",
    )
    .await?
        < 3
    {
        anyhow::ensure!(Instant::now() < deadline, "conflicts not parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both sides untouched.
    let mut etcd = world.etcd_client().await?;
    for i in 0..3 {
        let key = format!("/a/k{i:03}");
        assert_eq!(
            etcd.get(key.clone(), None).await?.kvs()[0].value(),
            format!("etcd {i}").as_bytes()
        );
        let row = pg
            .query_one("SELECT value FROM kv_a_text WHERE key = $1", &[&key])
            .await?;
        assert_eq!(row.get::<_, String>(0), format!("pg {i}"));
    }
    // A later local change stays behind the parked one.
    pg.execute(
        "UPDATE kv_a_text SET value = 'pg 0 again' WHERE key = '/a/k000'",
        &[],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(etcd.get("/a/k000", None).await?.kvs()[0].value(), b"etcd 0");

    let url = world.db.url();
    let env = [("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())];
    let (code, stdout, _) = run_cli(&["conflicts", "list"], &env).await?;
    assert_eq!(code, 0);
    assert_eq!(stdout.matches("pending").count(), 3, "{stdout}");
    let found = conflicts(&pg).await?;
    let id_of = |key: &str| {
        found
            .iter()
            .find(|c| c.key == key.as_bytes())
            .map(|c| c.id.to_string())
            .unwrap()
    };

    let (code, stdout, stderr) = run_cli(
        &["conflicts", "resolve", &id_of("/a/k000"), "--take", "pg"],
        &env,
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, _, stderr) = run_cli(
        &["conflicts", "resolve", &id_of("/a/k001"), "--take", "etcd"],
        &env,
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    eps_harness::wait_for("the resolutions applied", Duration::from_secs(10), || {
        let (mut etcd, pg) = (etcd.clone(), &pg);
        async move {
            let k0 = etcd.get("/a/k000", None).await?;
            let k1: String = pg
                .query_one("SELECT value FROM kv_a_text WHERE key = '/a/k001'", &[])
                .await?
                .get(0);
            let k0 = k0.kvs().first().map(|kv| kv.value().to_vec());
            anyhow::ensure!(
                k0.as_deref() == Some(b"pg 0 again".as_slice()) && k1 == "etcd 1",
                "etcd /a/k000 = {k0:?}, PostgreSQL /a/k001 = {k1:?}"
            );
            Ok(Some(()))
        }
    })
    .await?;
    // The third stays parked; the others converge.
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM conflicts WHERE status = 'pending'"
        )
        .await?,
        1
    );
    let mut etcd_state = etcd_snapshot(&mut etcd, b"/a/").await?;
    let mut pg_state = pg_snapshot(&pg, "kv_a", b"/a/").await?;
    etcd_state.remove(b"/a/k002".as_slice());
    pg_state.remove(b"/a/k002".as_slice());
    assert_eq!(etcd_state, pg_state);
    assert!(count(&pg, "SELECT count(*) FROM sync_events WHERE kind = 'resolution' AND detail->>'by' = 'operator'").await? == 2);
    Ok(())
}

/// Both sides write the same keys at nearly the same time, many times.
async fn race(policy: &str) -> anyhow::Result<()> {
    let world = World::new(&mappings(policy)).await?;
    let keys = 60;
    let rounds = 5;
    let mut etcd = world.etcd_client().await?;
    for i in 0..keys {
        etcd.put(format!("/a/r{i:02}"), "init", None).await?;
    }
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    let mut written: Vec<(String, String)> = Vec::new();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for i in 0..keys {
            let key = format!("/a/r{i:02}");
            let (etcd_value, pg_value) = (format!("etcd {round} {i}"), format!("pg {round} {i}"));
            written.push((key.clone(), etcd_value.clone()));
            written.push((key.clone(), pg_value.clone()));
            let endpoint = world.etcd.endpoint();
            let db = world.db.clone();
            tasks.push(tokio::spawn(async move {
                let mut etcd = etcd_client::Client::connect([endpoint], None).await?;
                let pg = db.client().await?;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&key, &pg_value];
                let (a, b) = tokio::join!(
                    etcd.put(key.clone(), etcd_value, None),
                    pg.execute(
                        "UPDATE etcd_sync.kv_a_text SET value = $2 WHERE key = $1",
                        &params
                    )
                );
                a?;
                b?;
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    let pg = world.pg().await?;
    wait_count(
        &pg,
        "outbox not drained",
        "SELECT count(*) FROM outbox",
        |n| n <= 0,
        Duration::from_secs(10),
    )
    .await?;
    let found = conflicts(&pg).await?;
    println!(
        "{policy}: {} conflicts out of {} concurrent pairs",
        found.len(),
        keys * rounds
    );
    assert!(
        !found.is_empty(),
        "simultaneous writes on both sides conflict"
    );
    let mut seen = HashSet::new();
    for c in &found {
        assert!(
            seen.insert((c.key.clone(), c.etcd_revision)),
            "one conflict row per divergence: {c:?}"
        );
        assert_eq!(c.status, "resolved");
        let expected = match policy {
            "etcd-wins" => "etcd",
            "pg-wins" => "pg",
            // The default tie rule keeps etcd's value.
            _ if c.newer == "tie" => "etcd",
            _ => c.newer.as_str(),
        };
        assert_eq!(c.winner.as_deref(), Some(expected), "{c:?}");
        assert_eq!(
            c.decided_by_tie,
            policy == "newest-wins" && c.newer == "tie",
            "{c:?}"
        );
    }
    // Nothing vanished: every written value is the final one, in etcd's
    // history, or a conflict's loser.
    let history: HashSet<(Vec<u8>, Vec<u8>)> = pg
        .query(
            "SELECT key, value FROM history WHERE value IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let losers: HashSet<(Vec<u8>, Vec<u8>)> = found
        .iter()
        .flat_map(|c| {
            [c.etcd_value.clone(), c.pg_value.clone()]
                .into_iter()
                .chain(c.pg_superseded.iter().cloned())
                .flatten()
                .map(|v| (c.key.clone(), v))
        })
        .collect();
    for (key, value) in &written {
        let pair = (key.clone().into_bytes(), value.clone().into_bytes());
        assert!(
            state.get(&pair.0) == Some(&pair.1)
                || history.contains(&pair)
                || losers.contains(&pair),
            "{key} = {value} vanished"
        );
    }
    // No flip-flop: a loser never reaches etcd after the winner.
    let until = etcd_revision(&world).await?;
    let log = etcd_event_log(&world, until, under_a).await?;
    let mut by_key: BTreeMap<Vec<u8>, Vec<(i64, Option<Vec<u8>>)>> = BTreeMap::new();
    for change in log {
        by_key
            .entry(change.key)
            .or_default()
            .push((change.revision, change.value));
    }
    for c in &found {
        let loser = match c.winner.as_deref() {
            Some("etcd") => &c.pg_value,
            _ => &c.etcd_value,
        };
        let late = by_key[&c.key]
            .iter()
            .any(|(rev, v)| *rev > c.etcd_revision && v == loser);
        assert!(
            !late,
            "conflict {} loser reached etcd after the decision",
            c.id
        );
    }
    assert_history_is_etcd_log(&world, under_a).await?;
    Ok(())
}

#[tokio::test]
async fn racing_writes_under_etcd_wins() -> anyhow::Result<()> {
    race("etcd-wins").await
}

#[tokio::test]
async fn racing_writes_under_pg_wins() -> anyhow::Result<()> {
    race("pg-wins").await
}

#[tokio::test]
async fn racing_writes_under_newest_wins() -> anyhow::Result<()> {
    race("newest-wins").await
}

#[tokio::test]
async fn a_value_etcd_rejects_is_dead_lettered_while_other_keys_flow() -> anyhow::Result<()> {
    // etcd accepts smaller requests than the service is configured for:
    // etcd itself refuses the value.
    let etcd = eps_harness::Etcd::start_with(eps_harness::etcd::EtcdOptions {
        extra_args: vec!["--max-request-bytes".into(), "65536".into()],
        ..Default::default()
    })
    .await?;
    let mut world = World::new(&mappings("newest-wins")).await?;
    world.etcd = etcd;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    for i in 0..30 {
        let value = if i == 10 {
            vec![1u8; 200_000]
        } else {
            format!("ok {i}").into_bytes()
        };
        pg.execute(
            "INSERT INTO kv_a (key, value) VALUES ($1, $2)",
            &[&format!("/a/v{i:02}").into_bytes(), &value],
        )
        .await?;
    }
    eps_harness::wait_for(
        "the dead letter and the others flowing",
        Duration::from_secs(15),
        || {
            let (pg, world) = (&pg, &world);
            async move {
                let dead = count(
                    pg,
                    "SELECT count(*) FROM dead_letters WHERE kind = 'too-large'",
                )
                .await?;
                let mut etcd = world.etcd_client().await?;
                let flowed = etcd
                    .get(
                        "/a/v",
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await?
                    .count();
                anyhow::ensure!(dead == 1 && flowed == 29, "dead={dead} flowed={flowed}");
                Ok(Some(()))
            }
        },
    )
    .await?;
    let reason: String = pg
        .query_one("SELECT reason FROM dead_letters", &[])
        .await?
        .get(0);
    assert!(reason.contains("too large"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn an_etcd_outage_longer_than_the_backoff_cap_loses_nothing() -> anyhow::Result<()> {
    // retry.max_ms is 500 in tests; the outage lasts 3 s.
    let mut world = World::new(&mappings("newest-wins")).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    world.etcd.stop();
    for i in 0..100 {
        pg.execute(
            "INSERT INTO kv_a_text (key, value) VALUES ($1, 'written during the outage')",
            &[&format!("/a/o{i:03}")],
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.etcd.restart().await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(30)).await?;
    assert_eq!(state.len(), 100);
    assert_eq!(count(&pg, "SELECT count(*) FROM dead_letters").await?, 0);
    assert_history_is_etcd_log(&world, under_a).await?;
    Ok(())
}

/// One SQL transaction changes five keys while the replica is stopped, and
/// etcd changes one of them (`/a/t2`) meanwhile: the policy must settle the
/// transaction as a unit.
async fn transaction_in_conflict(
    policy: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(World, eps_harness::Service)> {
    let mut world = World::new(&mappings(policy)).await?;
    for (name, value) in env {
        world.env.insert((*name).into(), (*value).into());
    }
    let mut etcd = world.etcd_client().await?;
    for i in 0..5 {
        etcd.put(format!("/a/t{i}"), "agreed", None).await?;
    }
    let mut service = synced_then_stopped(&world).await?;

    let mut pg = world.pg().await?;
    let tx = pg.transaction().await?;
    for i in 0..5 {
        tx.execute(
            "UPDATE kv_a_text SET value = $2 WHERE key = $1",
            &[&format!("/a/t{i}"), &format!("pg {i}")],
        )
        .await?;
    }
    tx.commit().await?;
    etcd.put("/a/t2", "etcd 2", None).await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    Ok((world, service))
}

/// The `pg_xact` of every conflict row, by key.
async fn conflict_transactions(
    pg: &tokio_postgres::Client,
) -> anyhow::Result<BTreeMap<String, (Option<i64>, Option<String>, String)>> {
    let rows = pg
        .query(
            "SELECT convert_from(key, 'UTF8'), pg_xact, winner, status FROM conflicts ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect())
}

/// The mod revision of each of the transaction's keys in etcd.
async fn transaction_revisions(world: &World) -> anyhow::Result<BTreeMap<String, (String, i64)>> {
    let mut etcd = world.etcd_client().await?;
    let got = etcd
        .get("/a/t", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    Ok(got
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                ),
            )
        })
        .collect())
}

/// Waits until etcd and PostgreSQL agree and the outbox is empty; returns
/// etcd's values of the transaction's keys.
async fn settled_transaction(world: &World) -> anyhow::Result<BTreeMap<String, (String, i64)>> {
    wait_outbox_empty(world, Duration::from_secs(15)).await?;
    wait_converged(world, "kv_a", b"/a/", Duration::from_secs(15)).await?;
    transaction_revisions(world).await
}

fn assert_dropped_whole(state: &BTreeMap<String, (String, i64)>) {
    for (key, (value, _)) in state {
        let expected = if key == "/a/t2" { "etcd 2" } else { "agreed" };
        assert_eq!(
            value, expected,
            "{key}: the whole transaction lost: {state:?}"
        );
    }
}

fn assert_applied_whole(state: &BTreeMap<String, (String, i64)>) {
    let revisions: HashSet<i64> = state.values().map(|(_, r)| *r).collect();
    for (i, (key, (value, _))) in state.iter().enumerate() {
        assert_eq!(value, &format!("pg {i}"), "{key}: {state:?}");
    }
    assert_eq!(
        revisions.len(),
        1,
        "the transaction reached etcd in one txn: {state:?}"
    );
}

/// Every key of the transaction is recorded as a conflict of the same
/// transaction, with the same winner.
async fn assert_conflicts_of_one_transaction(world: &World, winner: &str) -> anyhow::Result<()> {
    let pg = world.pg().await?;
    let found = conflict_transactions(&pg).await?;
    assert_eq!(
        found.len(),
        5,
        "one conflict row per key of the transaction: {found:?}"
    );
    let xacts: HashSet<Option<i64>> = found.values().map(|(x, _, _)| *x).collect();
    assert_eq!(xacts.len(), 1, "linked by one transaction id: {found:?}");
    assert!(xacts.iter().all(Option::is_some), "{found:?}");
    for (key, (_, w, status)) in &found {
        assert_eq!(w.as_deref(), Some(winner), "{key}: {found:?}");
        assert_eq!(status, "resolved");
    }
    Ok(())
}

#[tokio::test]
async fn etcd_wins_drops_every_change_of_a_transaction_in_conflict() -> anyhow::Result<()> {
    let (world, _service) = transaction_in_conflict("etcd-wins", &[]).await?;
    let state = settled_transaction(&world).await?;
    assert_dropped_whole(&state);
    assert_conflicts_of_one_transaction(&world, "etcd").await
}

#[tokio::test]
async fn pg_wins_applies_a_transaction_in_conflict_whole_in_one_revision() -> anyhow::Result<()> {
    let (world, _service) = transaction_in_conflict("pg-wins", &[]).await?;
    let state = settled_transaction(&world).await?;
    assert_applied_whole(&state);
    Ok(())
}

#[tokio::test]
async fn newest_wins_settles_a_transaction_as_one_by_its_tie_rule() -> anyhow::Result<()> {
    // Every replica was stopped: the revision clock cannot order the two
    // changes, so the tie rule decides, for the whole transaction.
    let (world, _service) = transaction_in_conflict("newest-wins", &[]).await?;
    assert_dropped_whole(&settled_transaction(&world).await?);
    assert_conflicts_of_one_transaction(&world, "etcd").await?;
    drop(world);
    let tie_pg = [("ETCD_PG_SYNC__SYNC__NEWEST_WINS_TIE", "pg")];
    let (world, _service) = transaction_in_conflict("newest-wins", &tie_pg).await?;
    assert_applied_whole(&settled_transaction(&world).await?);
    Ok(())
}

async fn manual_resolution_of_a_transaction(
    take: &str,
) -> anyhow::Result<BTreeMap<String, (String, i64)>> {
    let (world, _service) = transaction_in_conflict("manual", &[]).await?;
    let pg = world.pg().await?;
    let pending = "SELECT count(*) FROM conflicts WHERE status = 'pending'";
    wait_count(
        &pg,
        "conflict not parked",
        pending,
        |n| n >= 1,
        Duration::from_secs(10),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let parked = transaction_revisions(&world).await?;
    assert_dropped_whole(&parked);
    assert_eq!(
        count(&pg, pending).await?,
        1,
        "one pending conflict for the transaction"
    );
    let id: i64 = pg
        .query_one("SELECT id FROM conflicts WHERE status = 'pending'", &[])
        .await?
        .get(0);
    let url = world.db.url();
    let env = [("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())];
    let (code, stdout, _) = run_cli(&["conflicts", "list", "--json"], &env).await?;
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{stdout}");
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["status"], "pending");
    assert_eq!(listed[0]["policy"], "manual");
    let (code, stdout, stderr) = run_cli(
        &["conflicts", "resolve", &id.to_string(), "--take", take],
        &env,
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    settled_transaction(&world).await
}

#[tokio::test]
async fn manual_parks_a_transaction_whole_and_take_pg_releases_it_whole() -> anyhow::Result<()> {
    assert_applied_whole(&manual_resolution_of_a_transaction("pg").await?);
    Ok(())
}

#[tokio::test]
async fn manual_parks_a_transaction_whole_and_take_etcd_drops_it_whole() -> anyhow::Result<()> {
    assert_dropped_whole(&manual_resolution_of_a_transaction("etcd").await?);
    Ok(())
}

/// A transaction that deletes a key and creates it again sends one put,
/// based on the key's revision in etcd; a later transaction's change of the
/// re-created row is based on that same revision, so it follows the put
/// instead of conflicting with the service's own write.
#[tokio::test]
async fn a_change_after_a_delete_and_insert_in_one_transaction_is_no_conflict() -> anyhow::Result<()>
{
    let world = World::new(&mappings("etcd-wins")).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/k", "etcd", None).await?;
    let mut service = synced_then_stopped(&world).await?;

    let pg = world.pg().await?;
    pg.batch_execute(
        "BEGIN; DELETE FROM kv_a_text WHERE key = '/a/k'; \
         INSERT INTO kv_a_text (key, value) VALUES ('/a/k', 'recreated'); COMMIT;",
    )
    .await?;
    pg.execute(
        "UPDATE kv_a_text SET value = 'later' WHERE key = '/a/k'",
        &[],
    )
    .await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_outbox_empty(&world, Duration::from_secs(15)).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/a/k".as_slice()], b"later");
    assert_eq!(count(&pg, "SELECT count(*) FROM conflicts").await?, 0);
    Ok(())
}

/// A transaction over keys of mappings with different policies: the
/// policy of the key in conflict decides, for the whole transaction — an
/// etcd win on any key drops it, a PostgreSQL win sends it whole.
#[tokio::test]
async fn a_transaction_over_mappings_with_different_policies_follows_the_key_in_conflict()
-> anyhow::Result<()> {
    let toml = "[[mappings]]\nprefix = \"/a/\"\ntable = \"kv_a\"\npolicy = \"etcd-wins\"\n\
                [[mappings]]\nprefix = \"/b/\"\ntable = \"kv_b\"\npolicy = \"pg-wins\"\n";
    let world = World::new(toml).await?;
    let mut etcd = world.etcd_client().await?;
    for key in ["/a/1", "/b/1", "/a/2", "/b/2"] {
        etcd.put(key, "agreed", None).await?;
    }
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    let pg = world.pg().await?;
    // Transaction 1 is in conflict on its etcd-wins key, transaction 2 on
    // its pg-wins key.
    for n in ["1", "2"] {
        pg.batch_execute(&format!(
            "BEGIN; UPDATE kv_a_text SET value = 'pg' WHERE key = '/a/{n}'; \
             UPDATE kv_b_text SET value = 'pg' WHERE key = '/b/{n}'; COMMIT;"
        ))
        .await?;
    }
    etcd.put("/a/1", "etcd", None).await?;
    etcd.put("/b/2", "etcd", None).await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_outbox_empty(&world, Duration::from_secs(15)).await?;
    let a = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    let b = wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(10)).await?;
    assert_eq!(a[b"/a/1".as_slice()], b"etcd");
    assert_eq!(
        b[b"/b/1".as_slice()],
        b"agreed",
        "dropped with its transaction"
    );
    assert_eq!(a[b"/a/2".as_slice()], b"pg", "sent with its transaction");
    assert_eq!(b[b"/b/2".as_slice()], b"pg");
    let got = etcd.get("/a/2", None).await?;
    let revision_a2 = got.kvs()[0].mod_revision();
    let got = etcd.get("/b/2", None).await?;
    assert_eq!(got.kvs()[0].mod_revision(), revision_a2, "in one txn");
    Ok(())
}

/// Transactions waiting behind a parked key fill more than the outbox read
/// (`sync.outbox_batch_size` 4): they stay whole and wait, and unrelated
/// changes behind them still flow.
#[tokio::test]
async fn transactions_waiting_behind_a_parked_key_do_not_stop_the_others() -> anyhow::Result<()> {
    let mut world = World::new(&mappings("manual")).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__OUTBOX_BATCH_SIZE".into(), "4".into());
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/p", "agreed", None).await?;
    let mut service = synced_then_stopped(&world).await?;
    let pg = world.pg().await?;
    pg.execute("UPDATE kv_a_text SET value = 'pg' WHERE key = '/a/p'", &[])
        .await?;
    etcd.put("/a/p", "etcd", None).await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    eps_harness::wait_for("the conflict parked", Duration::from_secs(10), || {
        let pg = &pg;
        async move {
            let n = count(
                pg,
                "SELECT count(*) FROM conflicts WHERE status = 'pending'",
            )
            .await?;
            Ok((n == 1).then_some(()))
        }
    })
    .await?;
    // Ten transactions each change the parked key and one of their own.
    for i in 0..10 {
        pg.batch_execute(&format!(
            "BEGIN; UPDATE kv_a_text SET value = 'pg {i}' WHERE key = '/a/p'; \
             INSERT INTO kv_a_text (key, value) VALUES ('/a/x{i}', 'with p'); COMMIT;"
        ))
        .await?;
    }
    pg.execute(
        "INSERT INTO kv_a_text (key, value) VALUES ('/a/u', 'unrelated')",
        &[],
    )
    .await?;
    eps_harness::wait_for(
        "the unrelated change in etcd",
        Duration::from_secs(15),
        || {
            let mut etcd = etcd.clone();
            async move { Ok((!etcd.get("/a/u", None).await?.kvs().is_empty()).then_some(())) }
        },
    )
    .await?;
    let waiting = etcd
        .get("/a/x", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    assert!(
        waiting.kvs().is_empty(),
        "a transaction went without its parked change"
    );
    assert!(event_details(&pg, "transaction-split").await?.is_empty());
    Ok(())
}

/// A transaction dropped by etcd's win on one key while a user's open
/// transaction holds the row of another of its keys: that row is put back
/// once the user's transaction ends, and the stores agree.
#[tokio::test]
async fn a_dropped_change_behind_a_users_row_lock_is_put_back_when_it_ends() -> anyhow::Result<()> {
    let world = World::new(&mappings("etcd-wins")).await?;
    let mut etcd = world.etcd_client().await?;
    for key in ["/a/x", "/a/y"] {
        etcd.put(key, "agreed", None).await?;
    }
    let mut service = synced_then_stopped(&world).await?;
    let pg = world.pg().await?;
    pg.batch_execute(
        "BEGIN; UPDATE kv_a_text SET value = 'pg' WHERE key = '/a/x'; \
         UPDATE kv_a_text SET value = 'pg' WHERE key = '/a/y'; COMMIT;",
    )
    .await?;
    etcd.put("/a/x", "etcd", None).await?;
    // A user holds /a/y's row (and changes nothing).
    let mut holder = world.pg().await?;
    let held = holder.transaction().await?;
    held.execute("SELECT 1 FROM kv_a WHERE key = '/a/y' FOR UPDATE", &[])
        .await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    eps_harness::wait_for("the transaction dropped", Duration::from_secs(15), || {
        let pg = &pg;
        async move {
            let n = count(
                pg,
                "SELECT count(*) FROM conflicts WHERE reason = 'transaction'",
            )
            .await?;
            Ok((n == 1).then_some(()))
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = etcd.get("/a/y", None).await?;
    assert_eq!(
        got.kvs()[0].value(),
        b"agreed",
        "no part of the transaction reached etcd"
    );
    held.commit().await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(15)).await?;
    assert_eq!(state[b"/a/x".as_slice()], b"etcd");
    assert_eq!(state[b"/a/y".as_slice()], b"agreed");
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    Ok(())
}
