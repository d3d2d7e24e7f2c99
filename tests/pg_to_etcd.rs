//! PostgreSQL → etcd (docs/design.md G3, G4): the outbox, LISTEN/NOTIFY and
//! polling, fenced compare-and-swap, no echo, durability across a crash
//! between the etcd write and the PostgreSQL commit, dead letters.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/a/"
table = "kv_a"

[[mappings]]
prefix = "/c/"
table = "kv_c"
direction = "etcd-to-pg"
"#;

fn under_a(key: &[u8]) -> bool {
    key.starts_with(b"/a/")
}

#[tokio::test]
async fn ten_thousand_sql_writes_converge_in_etcd_without_echo() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let started = Instant::now();
    let mut sessions = Vec::new();
    for session in 0..6u64 {
        let db = world.db.clone();
        sessions.push(tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let pg = db.client().await?;
            pg.batch_execute("SET search_path TO etcd_sync").await?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(session);
            let mut statements = 0usize;
            let mut changes = 0usize;
            while changes < 10_000 / 6 {
                let k = rng.random_range(0..300);
                let roll = rng.random_range(0..100);
                let value = format!("s{session}-{changes}");
                changes += if roll < 35 {
                    pg.execute(
                        "INSERT INTO kv_a (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&format!("/a/k{k:03}").into_bytes(), &value.into_bytes()],
                    )
                    .await? as usize
                } else if roll < 55 {
                    pg.execute("UPDATE kv_a_text SET value = $2 WHERE key = $1", &[&format!("/a/k{k:03}"), &value]).await? as usize
                } else if roll < 70 {
                    pg.execute("DELETE FROM kv_a WHERE key = $1", &[&format!("/a/k{k:03}").into_bytes()]).await? as usize
                } else if roll < 85 {
                    // One statement, many rows.
                    pg.execute(
                        "INSERT INTO kv_a (key, value) SELECT convert_to('/a/m' || lpad(g::text, 3, '0'), 'UTF8'), $1::bytea FROM generate_series($2::int, $2::int + 24) g \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&value.into_bytes(), &{ k }],
                    )
                    .await? as usize
                } else {
                    pg.execute(
                        "INSERT INTO kv_a_text (key, value) VALUES ($1, $2)",
                        &[&format!("/a/t{session}-{changes}"), &value],
                    )
                    .await? as usize
                };
                statements += 1;
            }
            anyhow::Ok((statements, changes))
        }));
    }
    let mut total = 0;
    for session in sessions {
        total += session.await??.1;
    }
    let wrote = started.elapsed();
    let quiet = Instant::now();
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(30)).await?;
    println!(
        "{total} row changes from SQL in {wrote:?}, converged {:?} after the last commit",
        quiet.elapsed()
    );
    let pg = world.pg().await?;
    // The stores match as soon as etcd has the values; the echoes that
    // consume the outbox rows follow within milliseconds.
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    let conflicts: Vec<String> = pg
        .query("SELECT row_to_json(c)::text FROM conflicts c", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        conflicts.is_empty(),
        "conflicts without etcd writers: {conflicts:#?}\n{}",
        service.log_tail(40)
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM dead_letters").await?, 0);
    // Every etcd change came from PostgreSQL, and is in the history once:
    // no echo went back into PostgreSQL as a new change.
    let changes = assert_history_is_etcd_log(&world, under_a).await?;
    assert_eq!(
        count(&pg, "SELECT count(*) FROM history WHERE origin <> 'pg'").await?,
        0
    );
    assert!(
        changes >= total / 2,
        "{changes} etcd changes for {total} row changes"
    );
    Ok(())
}

#[tokio::test]
async fn successive_changes_to_one_key_are_never_coalesced() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    let keys = 10;
    let rounds = 30;
    for round in 0..rounds {
        for k in 0..keys {
            if round == 0 {
                pg.execute(
                    "INSERT INTO kv_a_text (key, value) VALUES ($1, 'start')",
                    &[&format!("/a/hot{k}")],
                )
                .await?;
            }
            pg.execute(
                "UPDATE kv_a_text SET value = $2 WHERE key = $1",
                &[&format!("/a/hot{k}"), &format!("round {round}")],
            )
            .await?;
        }
    }
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    let until = etcd_revision(&world).await?;
    let log = etcd_event_log(&world, until, under_a).await?;
    let mut per_key: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for change in log {
        per_key
            .entry(change.key)
            .or_default()
            .push(String::from_utf8(change.value.unwrap_or_default())?);
    }
    for k in 0..keys {
        let values = &per_key[format!("/a/hot{k}").as_bytes()];
        let expected: Vec<String> = std::iter::once("start".to_string())
            .chain((0..rounds).map(|r| format!("round {r}")))
            .collect();
        assert_eq!(
            values, &expected,
            "etcd saw every change of /a/hot{k}, in order"
        );
    }
    Ok(())
}

#[tokio::test]
async fn notify_wakes_the_poller_and_polling_covers_lost_notifications() -> anyhow::Result<()> {
    // NOTIFY: with a 10 s poll interval, a change still arrives at once.
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__POLL_INTERVAL_MS".into(),
        "10000".into(),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the listener connects
    let pg = world.pg().await?;
    let mut etcd = world.etcd_client().await?;
    let mut latencies = Vec::new();
    for i in 0..20 {
        let key = format!("/a/notify{i}");
        let sent = Instant::now();
        pg.execute(
            "INSERT INTO kv_a_text (key, value) VALUES ($1, 'x')",
            &[&key],
        )
        .await?;
        loop {
            if !etcd.get(key.clone(), None).await?.kvs().is_empty() {
                break;
            }
            anyhow::ensure!(
                sent.elapsed() < Duration::from_secs(5),
                "{key} not in etcd after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    println!(
        "commit → readable in etcd via NOTIFY: p50 {:?}, max {:?}",
        latencies[10], latencies[19]
    );
    assert!(
        latencies[19] < Duration::from_secs(5),
        "NOTIFY path, not the 10 s poll"
    );
    drop(service);

    // Polling only: notifications disabled, the poll interval carries it.
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__LISTEN_NOTIFY".into(), "false".into());
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__POLL_INTERVAL_MS".into(), "300".into());
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    pg.execute(
        "INSERT INTO kv_a_text (key, value) VALUES ('/a/polled', 'x')",
        &[],
    )
    .await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn a_crash_between_etcd_write_and_postgres_commit_loses_and_duplicates_nothing()
-> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut config = world.config("n1");
    config.env.insert(
        "ETCD_PG_SYNC_FAILPOINT".into(),
        "crash-after-etcd-commit".into(),
    );
    let mut service = eps_harness::Service::start(config, "n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    // Two transactions: the update queues behind the insert.
    pg.batch_execute(
        "INSERT INTO kv_a (key, value) SELECT convert_to('/a/crash' || g, 'UTF8'), convert_to('v' || g, 'UTF8') FROM generate_series(1, 50) g;",
    )
    .await?;
    pg.batch_execute("UPDATE kv_a SET value = 'second' WHERE key = '/a/crash1';")
        .await?;
    // The failpoint aborts the process right after etcd committed.
    let exit = service.wait_exit(Duration::from_secs(10)).await?;
    assert!(!exit.success(), "the failpoint crashed the replica");
    let mut etcd = world.etcd_client().await?;
    let in_etcd = etcd
        .get(
            "/a/crash",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await?
        .count();
    assert!(in_etcd > 0, "the crash came after etcd's commit");
    assert!(
        count(&pg, "SELECT count(*) FROM outbox").await? > 0,
        "and before the rows were consumed"
    );

    service.set_env("ETCD_PG_SYNC_FAILPOINT", None);
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    // Each change reached etcd exactly once, and the history has it once.
    let changes = assert_history_is_etcd_log(&world, under_a).await?;
    assert_eq!(changes, 51, "50 inserts and one update");
    assert_eq!(count(&pg, "SELECT count(*) FROM conflicts").await?, 0);
    Ok(())
}

#[tokio::test]
async fn changes_that_cannot_go_to_etcd_are_dead_lettered_and_others_flow() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    let too_large = vec![7u8; 2 * 1024 * 1024];
    pg.execute(
        "INSERT INTO kv_a (key, value) VALUES ('/a/huge', $1)",
        &[&too_large],
    )
    .await?;
    pg.execute(
        "INSERT INTO kv_a (key, value) VALUES ('/z/outside', 'x')",
        &[],
    )
    .await?;
    pg.execute(
        "INSERT INTO kv_c (key, value) VALUES ('/c/read-only', 'x')",
        &[],
    )
    .await?;
    for i in 0..20 {
        pg.execute(
            "INSERT INTO kv_a_text (key, value) VALUES ($1, 'fine')",
            &[&format!("/a/fine{i}")],
        )
        .await?;
    }
    pg.execute(
        "UPDATE kv_a SET value = 'small again' WHERE key = '/a/huge'",
        &[],
    )
    .await?;
    wait_count(
        &pg,
        "dead letters missing",
        "SELECT count(*) FROM dead_letters",
        |n| n >= 3,
        Duration::from_secs(10),
    )
    .await?;
    let rows = pg
        .query(
            "SELECT kind, reason, key FROM dead_letters ORDER BY id",
            &[],
        )
        .await?;
    let kinds: Vec<(String, String, Vec<u8>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        kinds.iter().any(|(k, r, key)| k == "too-large"
            && r.contains("value of 2097152 bytes")
            && key == b"/a/huge"),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, r, _)| k == "unmapped" && r.contains("outside the prefix")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, r, _)| k == "read-only-mapping" && r.contains("etcd-to-pg")),
        "{kinds:?}"
    );
    // The changes behind them keep flowing, including the next change of
    // the key whose value was too large.
    let mut etcd = world.etcd_client().await?;
    eps_harness::wait_for("the other changes to flow", Duration::from_secs(10), || {
        let mut etcd = etcd.clone();
        async move {
            let huge = etcd.get("/a/huge", None).await?;
            let fine = etcd
                .get(
                    "/a/fine",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await?;
            Ok((fine.count() == 20
                && huge
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.value() == b"small again"))
            .then_some(()))
        }
    })
    .await?;
    assert!(etcd.get("/z/outside", None).await?.kvs().is_empty());
    assert!(etcd.get("/c/read-only", None).await?.kvs().is_empty());
    let events = count(
        &pg,
        "SELECT count(*) FROM sync_events WHERE kind = 'dead-letter'",
    )
    .await?;
    assert_eq!(events, 3);
    // The CLI lists them with their reasons.
    let url = world.db.url();
    let (code, stdout, stderr) = run_cli(
        &["dead-letters", "list"],
        &[("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())],
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("too-large") && stdout.contains("read-only-mapping"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn deletes_propagate_and_updates_that_change_nothing_do_not() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/keep", "same", None).await?;
    etcd.put("/a/drop", "x", None).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(5)).await?;
    let before = etcd_revision(&world).await?;
    let pg = world.pg().await?;
    pg.execute("UPDATE kv_a SET value = value", &[]).await?;
    pg.execute(
        "UPDATE kv_a_text SET value = 'same' WHERE key = '/a/keep'",
        &[],
    )
    .await?;
    pg.execute("DELETE FROM kv_a WHERE key = '/a/drop'", &[])
        .await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(5)).await?;
    assert_eq!(
        etcd_revision(&world).await?,
        before + 1,
        "only the delete reached etcd"
    );
    assert_history_is_etcd_log(&world, under_a).await?;
    Ok(())
}

/// A key etcd holds under a lease, edited with SQL: the new value keeps the
/// lease, and the key still expires on both sides when the lease ends.
#[tokio::test]
async fn a_leased_key_edited_in_sql_keeps_its_lease_and_expires_on_both_sides() -> anyhow::Result<()>
{
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let mut etcd = world.etcd_client().await?;
    let lease = etcd.lease_grant(6, None).await?.id();
    etcd.put(
        "/a/leased",
        "from etcd",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let pg = world.pg().await?;
    let mirrored_lease = eps_harness::wait_for(
        "the leased key in PostgreSQL",
        Duration::from_secs(5),
        || async {
            let rows = pg
                .query("SELECT lease FROM kv_a WHERE key = '/a/leased'", &[])
                .await?;
            Ok(rows.first().map(|r| r.get::<_, i64>(0)))
        },
    )
    .await?;
    assert_eq!(mirrored_lease, lease);

    pg.execute(
        "UPDATE kv_a_text SET value = 'from sql' WHERE key = '/a/leased'",
        &[],
    )
    .await?;
    let written = eps_harness::wait_for("the SQL edit in etcd", Duration::from_secs(5), || {
        let mut etcd = etcd.clone();
        async move {
            let response = etcd.get("/a/leased", None).await?;
            Ok(response
                .kvs()
                .first()
                .filter(|kv| kv.value() == b"from sql")
                .map(|kv| kv.lease()))
        }
    })
    .await?;
    assert_eq!(written, lease, "the SQL edit dropped the key's lease");

    // The lease is not kept alive: the key expires in etcd, then in
    // PostgreSQL.
    eps_harness::wait_for("expiry on both sides", Duration::from_secs(15), || {
        let mut etcd = etcd.clone();
        let pg = &pg;
        async move {
            let in_etcd = !etcd.get("/a/leased", None).await?.kvs().is_empty();
            let in_pg = !pg
                .query("SELECT 1 FROM kv_a WHERE key = '/a/leased'", &[])
                .await?
                .is_empty();
            Ok((!in_etcd && !in_pg).then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// A PostgreSQL transaction reaches etcd in one txn (one revision): 8
/// sessions commit 200 transactions of 2 to 8 keys each over 40 shared keys,
/// each writing its first key twice; every transaction's values appear in
/// etcd's history at one revision, never a torn update a watcher could see
/// half of, and the value a transaction overwrote itself never reaches etcd.
#[tokio::test]
async fn each_sql_transaction_reaches_etcd_in_one_revision() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut sessions = Vec::new();
    for session in 0..8u64 {
        let db = world.db.clone();
        sessions.push(tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let mut pg = db.client().await?;
            pg.batch_execute("SET search_path TO etcd_sync").await?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(session);
            let mut transactions: Vec<Vec<(Vec<u8>, Vec<u8>)>> = Vec::new();
            for n in 0..25 {
                let size = rng.random_range(2..=8);
                let mut keys: Vec<usize> = rand::seq::index::sample(&mut rng, 40, size).into_vec();
                // One order for every session: no deadlocks.
                keys.sort_unstable();
                let tx = pg.transaction().await?;
                let mut written = Vec::new();
                tx.execute(
                    "INSERT INTO kv_a (key, value) VALUES ($1, 'overwritten in its transaction') \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&format!("/a/t{:02}", keys[0]).into_bytes()],
                )
                .await?;
                for k in keys {
                    let key = format!("/a/t{k:02}").into_bytes();
                    let value = format!("s{session}-t{n}-k{k}").into_bytes();
                    tx.execute(
                        "INSERT INTO kv_a (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&key, &value],
                    )
                    .await?;
                    written.push((key, value));
                }
                tx.commit().await?;
                transactions.push(written);
            }
            anyhow::Ok(transactions)
        }));
    }
    let mut transactions = Vec::new();
    for session in sessions {
        transactions.extend(session.await??);
    }
    wait_outbox_empty(&world, Duration::from_secs(30)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    let mut torn = 0;
    for written in &transactions {
        let keys: Vec<&[u8]> = written.iter().map(|(k, _)| k.as_slice()).collect();
        let values: Vec<&[u8]> = written.iter().map(|(_, v)| v.as_slice()).collect();
        let revisions: Vec<i64> = pg
            .query(
                "SELECT DISTINCT h.revision FROM history h \
                 JOIN unnest($1::bytea[], $2::bytea[]) AS w(key, value) \
                   ON h.key = w.key AND h.value = w.value",
                &[&keys, &values],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if revisions.len() != 1 {
            torn += 1;
            println!(
                "transaction of {} keys at revisions {revisions:?}",
                written.len()
            );
        }
    }
    assert!(
        event_details(&pg, "transaction-split").await?.is_empty(),
        "no transaction was too large for one txn"
    );
    assert_eq!(transactions.len(), 200);
    assert_eq!(torn, 0, "transactions spread over several etcd revisions");
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM history WHERE value = 'overwritten in its transaction'"
        )
        .await?,
        0,
        "a value its own transaction overwrote reached etcd"
    );
    Ok(())
}

/// A transaction larger than one etcd txn (`etcd.max_txn_ops` 4 here: 3
/// changes and the leader's fence) is split in order, and says so.
#[tokio::test]
async fn a_transaction_too_large_for_one_txn_is_split_and_audited() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS".into(), "4".into());
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut pg = world.pg().await?;
    let tx = pg.transaction().await?;
    for k in 0..10 {
        tx.execute(
            "INSERT INTO kv_a_text (key, value) VALUES ($1, 'big')",
            &[&format!("/a/big{k}")],
        )
        .await?;
    }
    tx.commit().await?;
    wait_outbox_empty(&world, Duration::from_secs(20)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    let splits = event_details(&pg, "transaction-split").await?;
    assert_eq!(splits.len(), 1, "{splits:?}");
    assert_eq!(splits[0]["changes"], 10);
    assert_eq!(splits[0]["etcd_txns"], 4);
    let (_, metrics) = service.get("/metrics").await?;
    assert!(metrics.contains("etcd_pg_sync_transaction_splits_total 1"));
    Ok(())
}

/// A change that can never go (too large) takes its whole transaction to
/// the dead-letter list: etcd gets all of a transaction or none of it.
#[tokio::test]
async fn a_transaction_with_a_change_etcd_cannot_take_is_dead_lettered_whole() -> anyhow::Result<()>
{
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__ETCD__MAX_REQUEST_BYTES".into(),
        "65536".into(),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut pg = world.pg().await?;
    let tx = pg.transaction().await?;
    tx.execute(
        "INSERT INTO kv_a_text (key, value) VALUES ('/a/small', 'fits')",
        &[],
    )
    .await?;
    tx.execute(
        "INSERT INTO kv_a (key, value) VALUES ('/a/huge', $1)",
        &[&vec![b'x'; 100_000]],
    )
    .await?;
    tx.commit().await?;
    wait_outbox_empty(&world, Duration::from_secs(20)).await?;
    let letters: Vec<(String, String)> = pg
        .query(
            "SELECT convert_from(key, 'UTF8'), kind FROM dead_letters ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        letters,
        vec![
            ("/a/huge".to_string(), "too-large".to_string()),
            ("/a/small".to_string(), "too-large".to_string()),
        ]
    );
    let mut etcd = world.etcd_client().await?;
    let small = etcd.get("/a/small", None).await?;
    assert!(
        small.kvs().is_empty(),
        "no part of the transaction reached etcd"
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(DISTINCT pg_xact) FROM dead_letters WHERE pg_xact IS NOT NULL"
        )
        .await?,
        1,
        "linked by their transaction"
    );
    // Retrying one of them replays the whole transaction, which cannot go
    // again (the huge value still does not fit): both come back.
    let small_id: i64 = pg
        .query_one("SELECT id FROM dead_letters WHERE key = '/a/small'", &[])
        .await?
        .get(0);
    let url = world.db.url();
    let env = [("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())];
    let (code, stdout, _) = run_cli(&["dead-letters", "list", "--json"], &env).await?;
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout)?;
    let kinds: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert_eq!(kinds, vec!["too-large", "too-large"], "{stdout}");
    let (code, stdout, stderr) =
        run_cli(&["dead-letters", "retry", &small_id.to_string()], &env).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    eps_harness::wait_for(
        "the retried transaction dead-lettered again",
        Duration::from_secs(20),
        || {
            let pg = &pg;
            async move {
                let again = count(
                    pg,
                    "SELECT count(*) FROM dead_letters WHERE retried_at IS NULL",
                )
                .await?;
                Ok((again == 2).then_some(()))
            }
        },
    )
    .await?;
    assert!(etcd.get("/a/small", None).await?.kvs().is_empty());
    Ok(())
}

/// A transaction that read what another wrote reaches etcd after it, even
/// when it wrote before it read (its outbox row is older than the other's):
/// the poller sends transactions in commit order, one txn at a time.
#[tokio::test]
async fn a_transaction_that_read_another_reaches_etcd_after_it() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    // Two changes per txn: the reader (two keys) and the writer (one) do
    // not fit one txn together.
    world
        .env
        .insert("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS".into(), "3".into());
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    service.terminate(Duration::from_secs(10)).await?;

    let mut reader = world.pg().await?;
    let writer = world.pg().await?;
    let reading = reader.transaction().await?;
    reading
        .execute(
            "INSERT INTO kv_a_text (key, value) VALUES ('/a/r1', 'first')",
            &[],
        )
        .await?;
    writer
        .execute(
            "INSERT INTO kv_a_text (key, value) VALUES ('/a/w', 'written')",
            &[],
        )
        .await?;
    let seen: String = reading
        .query_one("SELECT value FROM kv_a_text WHERE key = '/a/w'", &[])
        .await?
        .get(0);
    reading
        .execute(
            "INSERT INTO kv_a_text (key, value) VALUES ('/a/r2', $1)",
            &[&format!("saw {seen}")],
        )
        .await?;
    reading.commit().await?;

    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_outbox_empty(&world, Duration::from_secs(20)).await?;
    let mut etcd = world.etcd_client().await?;
    let revision = async |key: &str| -> anyhow::Result<i64> {
        let got = etcd.clone().get(key, None).await?;
        got.kvs()
            .first()
            .map(|kv| kv.mod_revision())
            .ok_or_else(|| anyhow::anyhow!("{key} not in etcd"))
    };
    let written = revision("/a/w").await?;
    let read_it = revision("/a/r2").await?;
    assert!(
        written < read_it,
        "the reader (revision {read_it}) reached etcd before what it read (revision {written})"
    );
    assert_eq!(
        revision("/a/r1").await?,
        read_it,
        "the reader is one revision"
    );
    let _ = &mut etcd;
    Ok(())
}

/// A transaction held back for a round (its key's earlier change goes
/// first) holds back the transactions committed after it: one of them may
/// have read its writes.
#[tokio::test]
async fn a_transaction_that_read_one_held_back_waits_for_it() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    service.terminate(Duration::from_secs(10)).await?;

    let pg = world.pg().await?;
    // Three transactions (one query string would be one transaction).
    for sql in [
        "INSERT INTO kv_a_text (key, value) VALUES ('/a/k', 'zero')",
        "BEGIN; \
         UPDATE kv_a_text SET value = 'one' WHERE key = '/a/k'; \
         INSERT INTO kv_a_text (key, value) VALUES ('/a/j', 'one'); \
         COMMIT",
        "INSERT INTO kv_a_text (key, value) \
             SELECT '/a/m', 'saw ' || value FROM kv_a_text WHERE key = '/a/j'",
    ] {
        pg.batch_execute(sql).await?;
    }

    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_outbox_empty(&world, Duration::from_secs(20)).await?;
    let etcd = world.etcd_client().await?;
    let revision = async |key: &str| -> anyhow::Result<i64> {
        let got = etcd.clone().get(key, None).await?;
        got.kvs()
            .first()
            .map(|kv| kv.mod_revision())
            .ok_or_else(|| anyhow::anyhow!("{key} not in etcd"))
    };
    let written = revision("/a/j").await?;
    let read_it = revision("/a/m").await?;
    // The same revision is one etcd txn: a watcher sees both at once.
    assert!(
        written <= read_it,
        "the reader (revision {read_it}) reached etcd before what it read (revision {written})"
    );
    assert_eq!(
        revision("/a/k").await?,
        written,
        "the writer is one revision"
    );
    Ok(())
}
