//! etcd → PostgreSQL (docs/design.md G1, G2, G4, G7): snapshot, streaming,
//! exactly-once ordered apply, history, restarts and faults.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio_util::sync::CancellationToken;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/a/"
table = "kv_a"

[[mappings]]
prefix = "/b/"
table = "kv_b"

[[mappings]]
prefix = "/c/"
table = "kv_c"
direction = "etcd-to-pg"
"#;

fn mapped(key: &[u8]) -> bool {
    key.starts_with(b"/a/") || key.starts_with(b"/b/") || key.starts_with(b"/c/")
}

async fn converge_all(world: &World, timeout: Duration) -> anyhow::Result<()> {
    for (table, prefix) in [("kv_a", b"/a/"), ("kv_b", b"/b/"), ("kv_c", b"/c/")] {
        wait_converged(world, table, prefix, timeout).await?;
    }
    Ok(())
}

#[tokio::test]
async fn ten_thousand_changes_converge_and_history_is_etcds_log() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let started = Instant::now();
    etcd_workload(&world, &["/a/", "/b/", "/c/", "/x/"], 10_000, 8, 1).await?;
    let wrote = started.elapsed();
    let quiet = Instant::now();
    // docs/design.md G1: converged within 2 s of the writes stopping.
    converge_all(&world, Duration::from_secs(2)).await?;
    println!(
        "10,000 ops written in {wrote:?}, converged {:?} after the last write",
        quiet.elapsed()
    );
    let changes = assert_history_is_etcd_log(&world, mapped).await?;
    println!("history holds etcd's {changes} changes exactly once");
    let pg = world.pg().await?;
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM history WHERE substring(key FROM 1 FOR 3) = '/x/'"
        )
        .await?,
        0,
        "unmapped keys stay out"
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM outbox").await?,
        0,
        "the service's writes do not echo"
    );
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM history WHERE origin NOT IN ('etcd', 'snapshot')"
        )
        .await?,
        0
    );
    let lease_deletes = count(&pg, "SELECT count(*) FROM history WHERE op = 'delete'").await?;
    assert!(lease_deletes > 0);
    Ok(())
}

#[tokio::test]
async fn initial_snapshot_copies_the_keyspace_page_by_page() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__SNAPSHOT_PAGE_SIZE".into(),
        "100".into(),
    );
    let mut etcd = world.etcd_client().await?;
    for i in 0..2_500 {
        let prefix = ["/a/", "/b/", "/c/", "/x/"][i % 4];
        etcd.put(format!("{prefix}{i:05}"), format!("value {i}"), None)
            .await?;
    }
    etcd.delete("/a/00000", None).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    converge_all(&world, Duration::from_secs(20)).await?;
    let pg = world.pg().await?;
    let snapshot_rows = count(
        &pg,
        "SELECT count(*) FROM history WHERE origin = 'snapshot'",
    )
    .await?;
    assert_eq!(
        snapshot_rows, 1_874,
        "one history row per key present at the snapshot"
    );
    let event = pg
        .query_one(
            "SELECT detail::text FROM sync_events WHERE kind = 'snapshot'",
            &[],
        )
        .await?;
    let detail: serde_json::Value = serde_json::from_str(event.get(0))?;
    assert_eq!(detail["counts"]["upserts"], 1_874);
    // Changes after the snapshot stream in.
    etcd.put("/b/after", "streamed", None).await?;
    converge_all(&world, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn binary_keys_and_large_values_round_trip_exactly() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    let large: Vec<u8> = (0..1_500 * 1024).map(|i| (i % 251) as u8).collect();
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            b"/a/nul\x00inside".to_vec(),
            b"value\x00with\x00nuls".to_vec(),
        ),
        (
            b"/a/\xff\xfe not utf-8".to_vec(),
            vec![0xc3, 0x28, 0xa0, 0xa1],
        ),
        (b"/a/empty-value".to_vec(), Vec::new()),
        (b"/b/'; DROP TABLE kv_b; --".to_vec(), b"robert".to_vec()),
        (b"/b/large".to_vec(), large.clone()),
        (
            "/b/ünïcödé ✓".as_bytes().to_vec(),
            "välüe ✓".as_bytes().to_vec(),
        ),
    ];
    for (key, value) in &cases {
        etcd.put(key.clone(), value.clone(), None).await?;
    }
    converge_all(&world, Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    for (key, value) in &cases {
        let table = if key.starts_with(b"/a/") {
            "kv_a"
        } else {
            "kv_b"
        };
        let row = pg
            .query_one(&format!("SELECT value FROM {table} WHERE key = $1"), &[key])
            .await?;
        assert_eq!(&row.get::<_, Vec<u8>>(0), value, "key {key:?}");
    }
    let tables = count(
        &pg,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'etcd_sync' AND tablename = 'kv_b'",
    )
    .await?;
    assert_eq!(tables, 1, "a key that looks like SQL is only data");
    assert_history_is_etcd_log(&world, mapped).await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_watch_advances_the_checkpoint() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/one", "1", None).await?;
    for i in 0..20 {
        etcd.put(format!("/unmapped/{i}"), "x", None).await?;
    }
    let head = etcd_revision(&world).await?;
    // Only progress notifications can tell the service that nothing mapped
    // happened up to `head`.
    wait_applied(&world, head, Duration::from_secs(10)).await?;
    Ok(())
}

/// The checkpoint is a promise: every change up to it is in the mirror (a
/// restart resumes after it). etcd before 3.4.31 and 3.5.13 answers a
/// requested progress notification at once with its current revision,
/// ahead of the events a catching-up watch has yet to deliver; trusting it
/// would move the checkpoint past changes not applied, and a restart then
/// would skip them for good.
#[tokio::test]
async fn a_catching_up_watch_never_claims_changes_it_has_not_applied() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    // Asked for progress whenever the watch pauses between etcd's batches.
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__PROGRESS_INTERVAL_MS".into(),
        "20".into(),
    );
    // One watch (a parallel catch-up moves the checkpoint only at its end).
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__CATCHUP_STREAMS".into(), "1".into());
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    service.terminate(Duration::from_secs(15)).await?;
    // One new key per revision: at checkpoint A the mirror must hold at
    // least the keys of revisions base+1..=A.
    let base = etcd_revision(&world).await?;
    let mut tasks = Vec::new();
    for c in 0..8 {
        let endpoint = world.etcd.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await?;
            for i in 0..2_500 {
                client
                    .put(format!("/a/backlog/{c}/{i:05}"), "v", None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let head = etcd_revision(&world).await?;
    assert_eq!(head - base, 20_000, "one revision per put");
    let pg = world.pg().await?;
    service.restart()?;
    let started = Instant::now();
    let mut checks = 0;
    loop {
        // One statement: one snapshot of the checkpoint and the mirror.
        let row = pg
            .query_one(
                "SELECT s.applied_revision, \
                        (SELECT count(*) FROM kv_a WHERE key >= '/a/backlog/'::bytea \
                                                     AND key < '/a/backlog0'::bytea) \
                 FROM sync_state s",
                &[],
            )
            .await?;
        let (applied, keys): (i64, i64) = (row.get(0), row.get(1));
        checks += 1;
        // Revisions past `head` are the service's own (its election key).
        let claimed = applied.min(head) - base;
        assert!(
            keys >= claimed,
            "checkpoint {applied} claims {claimed} backlog changes, the mirror holds {keys}"
        );
        if applied >= head {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no catch-up in 60 s (checkpoint {applied})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{checks} checks while catching up {} changes", head - base);
    Ok(())
}

/// A leader far behind etcd replays the backlog in parallel key ranges,
/// each with its own checkpoint; killed in the middle, the next leader
/// resumes every range from its own. The history is etcd's log exactly
/// once, and the mirror converges.
#[tokio::test]
async fn a_far_behind_leader_catches_up_in_parallel_ranges_and_resumes_after_a_kill()
-> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__CATCHUP_STREAMS".into(), "4".into());
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__CATCHUP_MIN_BEHIND".into(),
        "2000".into(),
    );
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    service.terminate(Duration::from_secs(15)).await?;
    // Keys created and deleted first...
    let mut etcd = world.etcd_client().await?;
    for i in 0..20 {
        etcd.put(format!("/a/gone/{i:02}"), "etcd", None).await?;
        etcd.delete(format!("/a/gone/{i:02}"), None).await?;
    }
    let gone = etcd_revision(&world).await?;
    // ...then puts, deletes, multi-key txns and leases over 300 mapped
    // keys (and unmapped ones), many changes per key.
    etcd_workload(&world, &["/a/", "/b/", "/c/", "/x/"], 12_000, 8, 11).await?;
    let pg = world.pg().await?;
    service.restart()?;
    // Killed once the range of the deleted keys has passed their deletes
    // (and so the global checkpoint).
    let started = Instant::now();
    loop {
        let passed = count(
            &pg,
            &format!(
                "SELECT count(*) FROM catchup_ranges \
                 WHERE range_start <= '/a/gone/'::bytea \
                   AND (range_end IS NULL OR range_end > '/a/gone0'::bytea) \
                   AND applied_revision > {gone}"
            ),
        )
        .await?;
        if passed > 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no catch-up range moved in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ranges = count(&pg, "SELECT count(*) FROM catchup_ranges").await?;
    assert!(ranges >= 2, "the keyspace was cut ({ranges} ranges)");
    service.kill();
    // Written in SQL on top of the deletes the range applied: the resumed
    // replay must not take etcd's older changes for newer ones.
    pg.execute(
        "INSERT INTO kv_a (key, value) \
         SELECT convert_to('/a/gone/' || lpad(i::text, 2, '0'), 'UTF8'), 'sql' \
         FROM generate_series(0, 19) i",
        &[],
    )
    .await?;
    service.restart()?;
    wait_leader(&[&service], Duration::from_secs(15)).await?;
    converge_all(&world, Duration::from_secs(60)).await?;
    assert_eq!(
        count(&pg, "SELECT count(*) FROM conflicts").await?,
        0,
        "no change was taken for a conflict"
    );
    let (gone_keys, _) = etcd
        .get(
            "/a/gone/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map(|r| (r.kvs().iter().filter(|kv| kv.value() == b"sql").count(), ()))?;
    assert_eq!(gone_keys, 20, "the SQL writes reached etcd");
    let head = etcd_revision(&world).await?;
    wait_applied(&world, head, Duration::from_secs(30)).await?;
    assert_eq!(
        count(&pg, "SELECT count(*) FROM catchup_ranges").await?,
        0,
        "the ranges go once the checkpoint passed them"
    );
    let changes = assert_history_is_etcd_log(&world, mapped).await?;
    println!("{changes} changes recorded exactly once through a parallel catch-up and a SIGKILL");
    Ok(())
}

#[tokio::test]
async fn a_killed_service_resumes_without_gap_or_duplicate() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let stop = CancellationToken::new();
    let writers: Vec<_> = ["/a/", "/b/"]
        .into_iter()
        .map(|prefix| background_writer(world.etcd.endpoint(), prefix, stop.clone()))
        .collect();
    let workload = etcd_workload(&world, &["/a/", "/b/", "/c/"], 1_500, 3, 7);
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        service.kill(); // SIGKILL: no clean-up at all
        tokio::time::sleep(Duration::from_millis(500)).await;
        service.restart()?;
        service.wait_ready(Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        service.kill();
        service.restart()?;
        anyhow::Ok(())
    };
    let (load, chaos) = tokio::join!(workload, chaos);
    load?;
    chaos?;
    stop.cancel();
    for writer in writers {
        assert!(writer.await? > 0);
    }
    wait_leader(&[&service], Duration::from_secs(15)).await?;
    converge_all(&world, Duration::from_secs(20)).await?;
    let changes = assert_history_is_etcd_log(&world, mapped).await?;
    println!("{changes} changes recorded exactly once across two SIGKILLs");
    Ok(())
}

#[tokio::test]
async fn etcd_restart_mid_stream_pauses_and_resumes() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let stop = CancellationToken::new();
    let writer = background_writer(world.etcd.endpoint(), "/a/", stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.etcd.restart().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    assert!(writer.await? > 0);
    wait_leader(&[&service], Duration::from_secs(20)).await?;
    converge_all(&world, Duration::from_secs(20)).await?;
    assert_history_is_etcd_log(&world, mapped).await?;
    Ok(())
}

#[tokio::test]
async fn postgres_restart_mid_stream_pauses_and_resumes() -> anyhow::Result<()> {
    let postgres = eps_harness::Postgres::start().await?;
    let mut world = World::new(MAPPINGS).await?;
    world.db = postgres.create_database().await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let stop = CancellationToken::new();
    let writer = background_writer(world.etcd.endpoint(), "/b/", stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await; // writes keep landing in etcd meanwhile
    postgres.start_again().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    assert!(writer.await? > 0);
    converge_all(&world, Duration::from_secs(30)).await?;
    assert_history_is_etcd_log(&world, mapped).await?;
    Ok(())
}

#[tokio::test]
async fn etcd_partition_stops_the_leader_and_healing_resumes() -> anyhow::Result<()> {
    // The replica reaches etcd only through a proxy that black-holes
    // traffic: the watch stalls, the lease runs out, the pipeline stops;
    // once healed, it leads again and catches up.
    let mut world = World::new(MAPPINGS).await?;
    let proxy =
        eps_harness::Proxy::start(format!("127.0.0.1:{}", world.etcd.client_port()).parse()?)
            .await?;
    let real_endpoint = world.etcd.endpoint();
    world.env.insert(
        "ETCD_PG_SYNC__ETCD__ENDPOINTS".into(),
        format!("http://127.0.0.1:{}", proxy.port()),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    proxy.set(eps_harness::FaultMode::Blackhole);
    let mut etcd = etcd_client::Client::connect([real_endpoint], None).await?;
    for i in 0..50 {
        etcd.put(format!("/a/during-partition-{i}"), "x", None)
            .await?;
    }
    // Lease TTL is 3 s in tests: the leader must notice and step down.
    eps_harness::wait_for("the leader to step down", Duration::from_secs(15), || {
        let service = &service;
        async move {
            let s = status(service).await?;
            anyhow::ensure!(s["role"] == "standby", "status: {s}");
            Ok(Some(()))
        }
    })
    .await?;
    proxy.set(eps_harness::FaultMode::Pass);
    wait_leader(&[&service], Duration::from_secs(30)).await?;
    converge_all(&world, Duration::from_secs(20)).await?;
    assert_history_is_etcd_log(&world, mapped).await?;
    Ok(())
}

/// Puts `key` and returns how long it took to appear in `table`.
async fn time_to_mirror(world: &World, table: &str, key: &str) -> anyhow::Result<Duration> {
    let pg = world.pg().await?;
    let mut etcd = world.etcd_client().await?;
    let started = Instant::now();
    etcd.put(key, "after the outage", None).await?;
    eps_harness::wait_for(
        "the first change after the outage",
        Duration::from_secs(60),
        || {
            let pg = &pg;
            async move {
                let rows = pg
                    .query(
                        &format!("SELECT 1 FROM {table} WHERE key = $1"),
                        &[&key.as_bytes()],
                    )
                    .await?;
                Ok((!rows.is_empty()).then_some(()))
            }
        },
    )
    .await?;
    Ok(started.elapsed())
}

/// After a 10 s outage of either store, sync resumes within about a second
/// of its return, not after the actors sleep out their backoff.
#[tokio::test]
async fn sync_resumes_within_a_second_or_two_after_an_outage_of_either_store() -> anyhow::Result<()>
{
    let postgres = eps_harness::Postgres::start().await?;
    let mut world = World::new(MAPPINGS).await?;
    world.db = postgres.create_database().await?;
    // The production backoff (up to 30 s between attempts), not the tests'.
    world
        .env
        .insert("ETCD_PG_SYNC__RETRY__INITIAL_MS".into(), "100".into());
    world
        .env
        .insert("ETCD_PG_SYNC__RETRY__MAX_MS".into(), "30000".into());
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;

    world.etcd.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    world.etcd.restart().await?;
    let after_etcd = time_to_mirror(&world, "kv_a", "/a/after-etcd-outage").await?;

    wait_leader(&[&service], Duration::from_secs(10)).await?;
    postgres.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    postgres.start_again().await?;
    let after_pg = time_to_mirror(&world, "kv_a", "/a/after-pg-outage").await?;
    println!(
        "first change applied {:.2} s after etcd returned, {:.2} s after PostgreSQL returned",
        after_etcd.as_secs_f64(),
        after_pg.as_secs_f64()
    );
    for (store, took) in [("etcd", after_etcd), ("PostgreSQL", after_pg)] {
        assert!(
            took < Duration::from_secs(2),
            "after {store}'s outage, the first change took {took:?}\n{}",
            service.log_tail(30)
        );
    }
    Ok(())
}

/// A user's transaction that updates one mirror row and stays open delays
/// only that key: the other keys etcd writes meanwhile reach PostgreSQL at
/// once, and the held key converges within about a second of the
/// transaction's end (COMMIT, then ROLLBACK).
#[tokio::test]
async fn a_users_open_transaction_delays_only_the_row_it_holds() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__KEY_BLOCKED_ALERT_SECS".into(),
        "1".into(),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/held", "v0", None).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    for end in ["COMMIT", "ROLLBACK"] {
        let user = world.pg().await?;
        user.batch_execute(
            "BEGIN; UPDATE kv_a SET value = 'by an open transaction' WHERE key = '/a/held'",
        )
        .await?;
        etcd.put("/a/held", format!("etcd while held ({end})"), None)
            .await?;
        let started = Instant::now();
        for i in 0..20 {
            etcd.put(format!("/a/other-{end}-{i:02}"), "x", None)
                .await?;
        }
        let pg = world.pg().await?;
        eps_harness::wait_for("the 20 other keys", Duration::from_secs(5), || {
            let pg = &pg;
            async move {
                let n = count(
                    pg,
                    &format!("SELECT count(*) FROM kv_a WHERE key::text LIKE '%other-{end}%' OR convert_from(key, 'UTF8') LIKE '/a/other-{end}-%'"),
                )
                .await?;
                Ok((n == 20).then_some(()))
            }
        })
        .await?;
        let others = started.elapsed();
        // Held for long: counted, and reported with the holder's pid.
        let holder: i32 = user.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let metrics_text = eps_harness::wait_for(
            "the blocked key in /metrics",
            Duration::from_secs(5),
            || {
                let service = &service;
                async move {
                    let (_, text) = service.get("/metrics").await?;
                    Ok(text.contains("etcd_pg_sync_keys_blocked 1").then_some(text))
                }
            },
        )
        .await?;
        assert!(metrics_text.contains("etcd_pg_sync_keys_blocked 1"));
        let reported = eps_harness::wait_for("a key-blocked event", Duration::from_secs(5), || {
            let pg = &pg;
            async move {
                let events = event_details(pg, "key-blocked").await?;
                Ok(events.into_iter().find(|e| e["pid"] == holder))
            }
        })
        .await?;
        assert_eq!(reported["key"], "/a/held");
        tokio::time::sleep(Duration::from_secs(1)).await;
        user.batch_execute(end).await?;
        let released = Instant::now();
        wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
        let converged = released.elapsed();
        println!(
            "{end}: 20 other keys applied in {:.2} s while the row was held; held key converged {:.2} s after {end}",
            others.as_secs_f64(),
            converged.as_secs_f64()
        );
        assert!(
            converged < Duration::from_secs(2),
            "the held key took {converged:?} after {end}"
        );
    }
    Ok(())
}

/// Keys, values and mod revisions of a range, in key order.
type Range = Vec<(Vec<u8>, Vec<u8>, i64)>;

/// `state_at(table, revision)` answers as etcd's own `Range` at that
/// revision did, byte for byte (keys, values, mod revisions), also after
/// etcd compacted it; `state_at_time` answers through the revision clock.
#[tokio::test]
async fn state_at_answers_as_etcd_did_at_every_revision() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    let first = etcd_revision(&world).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    for _ in 0..300 {
        let key = format!("/a/k{:02}", rng.random_range(0..20));
        if rng.random_bool(0.2) {
            etcd.delete(key, None).await?;
        } else {
            // Binary values too: bytes, not text, must match.
            let value: Vec<u8> = (0..rng.random_range(0..8)).map(|_| rng.random()).collect();
            etcd.put(key, value, None).await?;
        }
    }
    // Another mapping's keys stay out of kv_a's state.
    etcd.put("/b/elsewhere", "b", None).await?;
    let head = etcd_revision(&world).await?;
    wait_applied(&world, head, Duration::from_secs(20)).await?;
    let pg = world.pg().await?;
    let state_at = async |revision: i64| -> anyhow::Result<Range> {
        Ok(pg
            .query(
                "SELECT key, value, mod_revision FROM state_at('kv_a', $1)",
                &[&revision],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    };
    let mut expected = Vec::new();
    let mut revisions: Vec<i64> = (0..25).map(|_| rng.random_range(first..=head)).collect();
    revisions.extend([first, head]);
    for revision in revisions {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_revision(revision);
        let range: Range = etcd
            .get("/a/", Some(options))
            .await?
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
            .collect();
        assert_eq!(state_at(revision).await?, range, "at revision {revision}");
        expected.push((revision, range));
    }
    // After compaction etcd forgets; the history does not.
    world.etcd.compact(head).await?;
    for (revision, range) in &expected {
        assert_eq!(
            &state_at(*revision).await?,
            range,
            "at compacted revision {revision}"
        );
    }
    // By time: what existed when a pause began (the revision clock samples
    // every second), not what came after.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let at: std::time::SystemTime = pg.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.put("/a/k00", "after the pause", None).await?;
    wait_applied(
        &world,
        etcd_revision(&world).await?,
        Duration::from_secs(20),
    )
    .await?;
    let by_time: Range = pg
        .query(
            "SELECT key, value, mod_revision FROM state_at_time('kv_a', $1)",
            &[&at],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let at_head = expected
        .iter()
        .find(|(r, _)| *r == head)
        .map(|(_, s)| s.clone());
    assert_eq!(
        Some(by_time),
        at_head,
        "state_at_time = the state before the pause"
    );
    Ok(())
}

/// `rollback --prefix P --to-revision R --apply` puts every key under P
/// back to its state at R: afterwards etcd holds what its own `Range` at R
/// returned (read before R was compacted away), written through the
/// normal PostgreSQL → etcd path and audited.
#[tokio::test]
async fn rollback_puts_a_prefix_back_to_its_state_at_a_revision() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let world = World::new(MAPPINGS).await?;
    // Written before the first sync: the snapshot records this key at its
    // own revision, so the history knows the range only from the snapshot.
    let mut etcd = world.etcd_client().await?;
    let before_sync = etcd.put("/a/pre", "early", None).await?;
    let before_sync = before_sync.header().map_or(0, |h| h.revision());
    etcd.put("/a/pre2", "early", None).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    // A key bound to a lease at the target revision, gone since: putting
    // it back would make it permanent, so rollback leaves it out.
    let lease = etcd.lease_grant(60, None).await?.id();
    etcd.put(
        "/a/leased",
        "held",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut change = async |etcd: &mut etcd_client::Client| -> anyhow::Result<()> {
        let key = format!("/a/r{:02}", rng.random_range(0..50));
        if rng.random_bool(0.25) {
            etcd.delete(key, None).await?;
        } else {
            etcd.put(key, format!("v{}", rng.random::<u32>()), None)
                .await?;
        }
        Ok(())
    };
    for _ in 0..500 {
        change(&mut etcd).await?;
    }
    let target = etcd_revision(&world).await?;
    let mut at_target = etcd_snapshot(&mut etcd, b"/a/").await?;
    for _ in 0..500 {
        change(&mut etcd).await?;
    }
    etcd.lease_revoke(lease).await?;
    at_target.remove(b"/a/leased".as_slice());
    etcd.put("/b/untouched", "b", None).await?;
    let head = etcd_revision(&world).await?;
    wait_applied(&world, head, Duration::from_secs(20)).await?;
    world.etcd.compact(head).await?;

    let to = target.to_string();
    // A dry run changes nothing and lists the changes.
    let (code, stdout, stderr) = world
        .cli(&[
            "rollback",
            "--prefix",
            "/a/",
            "--to-revision",
            &to,
            "--json",
        ])
        .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let (summary, changes) = lines.split_last().expect("a summary");
    assert!(!changes.is_empty());
    assert_eq!(summary["summary"]["leased_skipped"], 1, "{stdout}");
    assert_eq!(
        summary["summary"]["puts"].as_u64().unwrap_or(0)
            + summary["summary"]["deletes"].as_u64().unwrap_or(0),
        changes.len() as u64
    );
    assert_ne!(etcd_snapshot(&mut etcd, b"/a/").await?, at_target);

    let (code, stdout, stderr) = world
        .cli(&[
            "rollback",
            "--prefix",
            "/a/",
            "--to-revision",
            &to,
            "--apply",
        ])
        .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("hold the state of revision {target}")),
        "it waits for its changes and checks: {stdout}"
    );
    wait_outbox_empty(&world, Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(30)).await?;
    assert_eq!(
        state, at_target,
        "etcd and the mirror hold the state at {target}"
    );
    assert_eq!(
        etcd.get("/b/untouched", None).await?.kvs()[0].value(),
        b"b",
        "other prefixes are left alone"
    );
    let pg = world.pg().await?;
    let audited = awaited_event_details(&pg, "rollback", Duration::from_secs(5)).await?;
    assert_eq!(audited[0]["to_revision"], target);
    assert_eq!(audited[0]["written"], changes.len());
    // Nothing left to do.
    let (code, stdout, _) = world
        .cli(&["rollback", "--prefix", "/a/", "--to-revision", &to])
        .await?;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("0 change(s)"), "{stdout}");
    // A revision the mirror has not applied is refused.
    let (code, _, stderr) = world
        .cli(&["rollback", "--prefix", "/a/", "--to-revision", "999999"])
        .await?;
    assert_eq!(code, 2, "{stderr}");
    // So is one before the history knows the whole range.
    let (code, _, stderr) = world
        .cli(&[
            "rollback",
            "--prefix",
            "/a/",
            "--to-revision",
            &before_sync.to_string(),
        ])
        .await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("before what the history"), "{stderr}");
    let refused = pg
        .query("SELECT * FROM state_at('kv_a', $1)", &[&before_sync])
        .await;
    assert!(refused.is_err(), "state_at refuses it too");
    Ok(())
}

/// A `json` mapping: etcd's values are queryable as JSON in PostgreSQL, and
/// a value that is not JSON still syncs (NULL JSON).
#[tokio::test]
async fn json_values_from_etcd_are_queryable_in_postgres() -> anyhow::Result<()> {
    let world = World::new(
        "[[mappings]]\nprefix = \"/j/\"\ntable = \"kv_j\"\nvalue_format = \"json\"\njson_index = true\n",
    )
    .await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/j/svc", r#"{"replicas": 3, "image": "v2"}"#, None)
        .await?;
    etcd.put("/j/raw", "not json", None).await?;
    wait_converged(&world, "kv_j", b"/j/", Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    let rows: Vec<(String, Option<String>)> = pg
        .query(
            "SELECT key, value_json->>'image' FROM kv_j_text ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("/j/raw".into(), None),
            ("/j/svc".into(), Some("v2".into()))
        ]
    );
    Ok(())
}
