//! Compaction recovery (docs/design.md G5), drift verification and repair, restore
//! of a lost etcd from the mirror, and time travel with `value_at`.

mod support;

use std::time::Duration;

use eps_harness::{Etcd, FaultMode, Proxy, Service};
use support::*;
use tokio_util::sync::CancellationToken;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/a/"
table = "kv_a"
policy = "etcd-wins"

[[mappings]]
prefix = "/b/"
table = "kv_b"
policy = "pg-wins"
"#;

async fn converge_both(world: &World) -> anyhow::Result<()> {
    wait_converged(world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    wait_converged(world, "kv_b", b"/b/", Duration::from_secs(20)).await?;
    Ok(())
}

#[tokio::test]
async fn compaction_while_stopped_resyncs_and_keeps_pending_pg_changes() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..50 {
        etcd.put(format!("/a/k{i:02}"), format!("v{i}"), None)
            .await?;
    }
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    // The rows can match before the snapshot's checkpoint is written.
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    let checkpoint_before = count(&pg, "SELECT applied_revision FROM sync_state").await?;
    service.terminate(Duration::from_secs(10)).await?;

    for i in 0..20 {
        etcd.put(format!("/a/k{i:02}"), format!("changed {i}"), None)
            .await?;
    }
    for i in 20..30 {
        etcd.delete(format!("/a/k{i:02}"), None).await?;
    }
    for i in 50..60 {
        etcd.put(format!("/a/k{i:02}"), format!("new {i}"), None)
            .await?;
    }
    // Local changes while the service is away: one on a key etcd did not
    // touch, one on a key etcd changed too.
    pg.execute(
        "UPDATE kv_a_text SET value = 'local only' WHERE key = '/a/k40'",
        &[],
    )
    .await?;
    pg.execute(
        "UPDATE kv_a_text SET value = 'local too' WHERE key = '/a/k00'",
        &[],
    )
    .await?;
    let head = etcd_revision(&world).await?;
    world.etcd.compact(head).await?;

    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    assert_eq!(
        state[b"/a/k40".as_slice()],
        b"local only",
        "the pending local change reached etcd"
    );
    assert_eq!(state[b"/a/k00".as_slice()], b"changed 0", "etcd-wins");
    assert!(!state.contains_key(b"/a/k25".as_slice()));
    assert_eq!(state[b"/a/k55".as_slice()], b"new 55");
    let recoveries =
        awaited_event_details(&pg, "compaction-recovery", Duration::from_secs(10)).await?;
    assert_eq!(recoveries.len(), 1, "{recoveries:?}");
    assert_eq!(recoveries[0]["gap_from"], checkpoint_before);
    assert!(recoveries[0]["gap_to"].as_i64().unwrap() >= head);
    assert_eq!(recoveries[0]["counts"]["conflicts"], 1);
    let conflict = pg
        .query_one("SELECT key, pg_value, winner FROM conflicts", &[])
        .await?;
    assert_eq!(conflict.get::<_, Vec<u8>>(0), b"/a/k00");
    assert_eq!(
        conflict.get::<_, Option<Vec<u8>>>(1).as_deref(),
        Some(&b"local too"[..]),
        "the loser is kept"
    );
    // The gap is marked as a resync: revisions in between are unknown.
    let resync_rows = count(&pg, "SELECT count(*) FROM history WHERE origin = 'resync'").await?;
    assert_eq!(resync_rows, 40, "20 changed, 10 deleted, 10 new");
    let tombstones = count(
        &pg,
        "SELECT count(*) FROM history WHERE origin = 'resync' AND op = 'delete'",
    )
    .await?;
    assert_eq!(tombstones, 10);
    Ok(())
}

#[tokio::test]
async fn compaction_while_the_watcher_lags_under_load() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", world.db.port).parse()?).await?;
    world.env.insert(
        "ETCD_PG_SYNC__POSTGRES__URL".into(),
        world.db.url_via(proxy.port()),
    );
    let etcd_proxy =
        Proxy::start(format!("127.0.0.1:{}", world.etcd.client_port()).parse()?).await?;
    world.env.insert(
        "ETCD_PG_SYNC__ETCD__ENDPOINTS".into(),
        format!("http://127.0.0.1:{}", etcd_proxy.port()),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let stop = CancellationToken::new();
    let writer = background_writer(world.etcd.endpoint(), "/a/", stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The service cannot reach PostgreSQL: the watcher falls behind.
    proxy.set(FaultMode::Blackhole);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg = world.pg().await?;
    pg.execute(
        "INSERT INTO kv_b_text (key, value) VALUES ('/b/during-lag', 'x')",
        &[],
    )
    .await?;
    // Cut the watch as well: a watch that etcd still streams to (its events
    // buffered in the service) would survive the compaction; a new one must
    // ask for history that is gone.
    etcd_proxy.set(FaultMode::Cut);
    let head = etcd_revision(&world).await?;
    world.etcd.compact(head).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd_proxy.set(FaultMode::Pass);
    proxy.set(FaultMode::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    assert!(writer.await? > 0);
    converge_both(&world).await?;
    awaited_event_details(&pg, "compaction-recovery", Duration::from_secs(20)).await?;
    let mut etcd = world.etcd_client().await?;
    assert_eq!(
        etcd.get("/b/during-lag", None).await?.kvs()[0].value(),
        b"x"
    );
    Ok(())
}

#[tokio::test]
async fn verify_finds_each_kind_of_drift_and_repair_fixes_it() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..10 {
        etcd.put(format!("/a/k{i}"), format!("v{i}"), None).await?;
        etcd.put(format!("/b/k{i}"), format!("v{i}"), None).await?;
    }
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    let (code, stdout, stderr) = world.cli(&["verify"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("0 difference(s)"), "{stdout}");
    service.terminate(Duration::from_secs(10)).await?;

    // Behind the service's back (the trigger-skipping flag, as a careless
    // script might use it) and in etcd while the service is stopped.
    let pg = world.pg().await?;
    pg.batch_execute(
        "BEGIN; SET LOCAL etcd_sync.applying = 'on'; \
         UPDATE kv_a SET value = 'tampered' WHERE key = '/a/k1'; \
         DELETE FROM kv_a WHERE key = '/a/k2'; \
         UPDATE kv_b SET value = 'pg is right' WHERE key = '/b/k3'; COMMIT;",
    )
    .await?;
    etcd.put("/a/added-while-stopped", "new", None).await?;

    let (code, stdout, _) = world.cli(&["verify"]).await?;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("different-value") && stdout.contains("/a/k1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("missing-in-pg") && stdout.contains("/a/k2"),
        "{stdout}"
    );
    // etcd's change after the checkpoint is not drift: the leader has not
    // applied it yet (none runs). "Repairing" it could push the mirror's
    // older state over etcd's newer one.
    assert!(!stdout.contains("/a/added-while-stopped"), "{stdout}");
    assert!(stdout.contains("1 in flight"), "{stdout}");
    assert!(stdout.contains("/b/k3"), "{stdout}");
    assert!(stdout.contains("3 difference(s)"), "{stdout}");
    // The same as JSON lines: one per difference, then the summary.
    let (code, stdout, _) = world.cli(&["verify", "--json"]).await?;
    assert_eq!(code, 1, "{stdout}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let (summary, differences) = lines.split_last().expect("a summary line");
    assert_eq!(summary["summary"]["different_values"], 2, "{stdout}");
    assert_eq!(summary["summary"]["missing_in_pg"], 1, "{stdout}");
    let k1 = differences
        .iter()
        .find(|d| d["key"] == "/a/k1")
        .expect("/a/k1 listed");
    assert_eq!(k1["kind"], "different-value");
    assert_eq!(k1["table"], "kv_a");
    assert_eq!(k1["pg"]["value"], "tampered");
    assert_eq!(k1["outcome"], "found");
    let (code, stdout, _) = world.cli(&["verify", "--prefix", "/b/"]).await?;
    assert_eq!(code, 1);
    assert!(
        stdout.contains("1 difference(s)") && !stdout.contains("/a/k1"),
        "{stdout}"
    );

    let (code, stdout, stderr) = world.cli(&["verify", "--repair"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("3 repaired"), "{stdout}");
    // etcd-wins repaired PostgreSQL; pg-wins queued PostgreSQL's value for
    // etcd, which the leader applies when it runs.
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/b/k3".as_slice()], b"pg is right");
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/a/k1".as_slice()], b"v1");
    let (code, stdout, _) = world.cli(&["verify"]).await?;
    assert_eq!(code, 0, "{stdout}");
    assert!(event_details(&pg, "verify").await?.len() >= 4);
    Ok(())
}

#[tokio::test]
async fn anti_entropy_repairs_drift_inside_the_leader() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__SYNC__ANTI_ENTROPY_INTERVAL_SECS".into(),
        "1".into(),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/x", "right", None).await?;
    converge_both(&world).await?;
    let pg = world.pg().await?;
    pg.batch_execute("BEGIN; SET LOCAL etcd_sync.applying = 'on'; UPDATE kv_a SET value = 'drifted' WHERE key = '/a/x'; COMMIT;")
        .await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(15)).await?;
    assert_eq!(state[b"/a/x".as_slice()], b"right");
    // The run's audit event follows the repair's transaction.
    eps_harness::wait_for("the verify run's event", Duration::from_secs(10), || {
        let pg = &pg;
        async move {
            let runs = event_details(pg, "verify").await?;
            anyhow::ensure!(
                runs.iter().any(|r| r["report"]["repaired"] == 1),
                "verify events: {runs:?}"
            );
            Ok(Some(()))
        }
    })
    .await?;
    let (_, metrics) = service.get("/metrics").await?;
    assert!(
        metrics.contains("etcd_pg_sync_drifted_keys"),
        "drift metric exported"
    );
    Ok(())
}

#[tokio::test]
async fn restore_etcd_rebuilds_a_lost_etcd_from_the_mirror() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    let large = vec![9u8; 1_000_000];
    etcd.put(b"/a/binary\x00\xff".to_vec(), vec![0u8, 1, 2, 255], None)
        .await?;
    etcd.put("/a/large", large.clone(), None).await?;
    for i in 0..300 {
        etcd.put(format!("/b/k{i:03}"), format!("v{i}"), None)
            .await?;
    }
    // A key under a lease (a registration, a lock): its lease dies with the
    // old etcd.
    let lease = etcd.lease_grant(120, None).await?.id();
    etcd.put(
        "/b/leased",
        "registered",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    let original_a = etcd_snapshot(&mut etcd, b"/a/").await?;
    let original_b = etcd_snapshot(&mut etcd, b"/b/").await?;
    service.terminate(Duration::from_secs(10)).await?;

    // etcd is lost; a new, empty one takes its place.
    world.etcd = Etcd::start().await?;
    let (code, stdout, stderr) = world
        .cli(&["restore-etcd", "--leased-keys-ttl", "4"])
        .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("restored 303 keys"), "{stdout}");
    assert!(stdout.contains("1 key(s) that had a lease"), "{stdout}");
    let mut fresh = world.etcd_client().await?;
    assert_eq!(
        etcd_snapshot(&mut fresh, b"/a/").await?,
        original_a,
        "byte for byte"
    );
    assert_eq!(etcd_snapshot(&mut fresh, b"/b/").await?, original_b);
    let restored_lease = fresh.get("/b/leased", None).await?.kvs()[0].lease();
    assert_ne!(
        restored_lease, 0,
        "a leased key must not come back permanent"
    );
    let ttl = fresh.lease_time_to_live(restored_lease, None).await?.ttl();
    assert!((1..=4).contains(&ttl), "ttl {ttl}");
    let (code, _, stderr) = world.cli(&["restore-etcd"]).await?;
    assert_eq!(code, 1, "a second restore refuses a non-empty etcd");
    assert!(stderr.contains("not empty"), "{stderr}");

    // Sync continues as normal against the new etcd, both ways.
    let service = Service::start(world.config("n1"), "n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    fresh.put("/a/after-restore", "from etcd", None).await?;
    let pg = world.pg().await?;
    pg.execute(
        "UPDATE kv_b_text SET value = 'from pg' WHERE key = '/b/k007'",
        &[],
    )
    .await?;
    let state = wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/b/k007".as_slice()], b"from pg");
    // The restored lease ends: the key is gone from both stores.
    eps_harness::wait_for(
        "the restored leased key to expire",
        Duration::from_secs(15),
        || {
            let mut fresh = fresh.clone();
            let pg = &pg;
            async move {
                let in_etcd = !fresh.get("/b/leased", None).await?.kvs().is_empty();
                let in_pg = !pg
                    .query("SELECT 1 FROM kv_b WHERE key = '/b/leased'", &[])
                    .await?
                    .is_empty();
                Ok((!in_etcd && !in_pg).then_some(()))
            }
        },
    )
    .await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    assert_eq!(
        count(&pg, "SELECT count(*) FROM conflicts").await?,
        0,
        "restored metadata is the new etcd's"
    );
    // The history of the new etcd answers for its revisions, although they
    // are smaller than those of the first sync on the lost one.
    let head = etcd_revision(&world).await?;
    wait_applied(&world, head, Duration::from_secs(10)).await?;
    assert_eq!(
        state_at(&pg, "kv_b", head).await?,
        etcd_snapshot(&mut fresh, b"/b/").await?
    );
    Ok(())
}

#[tokio::test]
async fn value_at_answers_for_revisions_etcd_has_compacted() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    // The snapshot first: changes it covers have no revisions of their own.
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    let r1 = etcd
        .put("/a/doc", "first", None)
        .await?
        .header()
        .unwrap()
        .revision();
    let r2 = etcd
        .put("/a/doc", "second", None)
        .await?
        .header()
        .unwrap()
        .revision();
    let r3 = etcd
        .delete("/a/doc", None)
        .await?
        .header()
        .unwrap()
        .revision();
    let r4 = etcd
        .put("/a/doc", "third", None)
        .await?
        .header()
        .unwrap()
        .revision();
    wait_applied(&world, r4, Duration::from_secs(10)).await?;
    world.etcd.compact(r4).await?;
    assert!(
        etcd.get(
            "/a/doc",
            Some(etcd_client::GetOptions::new().with_revision(r1))
        )
        .await
        .is_err(),
        "etcd forgot r1"
    );
    let pg = world.pg().await?;
    let at = |revision: i64| {
        let pg = &pg;
        async move {
            let row = pg
                .query_one(
                    "SELECT convert_from(value_at('/a/doc', $1), 'UTF8')",
                    &[&revision],
                )
                .await?;
            anyhow::Ok(row.get::<_, Option<String>>(0))
        }
    };
    assert_eq!(at(r1 - 1).await?, None);
    assert_eq!(at(r1).await?.as_deref(), Some("first"));
    assert_eq!(at(r2).await?.as_deref(), Some("second"));
    assert_eq!(at(r3).await?, None, "deleted at r3");
    assert_eq!(at(r4).await?.as_deref(), Some("third"));
    Ok(())
}

/// A mapping added to a deployment that already has a checkpoint: the keys
/// etcd holds under its prefix were written before the watch covered them,
/// and must still reach the new mirror table.
#[tokio::test]
async fn a_mapping_added_later_gets_the_keys_etcd_already_has() -> anyhow::Result<()> {
    let mut world = World::new("\n[[mappings]]\nprefix = \"/a/\"\ntable = \"kv_a\"\n").await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/x", "1", None).await?;
    etcd.put("/b/old", "from before the mapping", None).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.extra_toml = MAPPINGS.into();
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(15)).await?;
    assert_eq!(state.len(), 1);
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(5)).await?;
    Ok(())
}

/// A mirror table dropped by its owner and created again by `migrate` (a
/// replica starting) while the leader runs: it is filled again from etcd,
/// not left empty under an advanced checkpoint.
#[tokio::test]
async fn a_mirror_table_dropped_and_created_again_is_filled_from_etcd() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..20 {
        etcd.put(format!("/a/k{i:02}"), format!("v{i}"), None)
            .await?;
    }
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    let pg = world.pg().await?;
    pg.batch_execute("DROP TABLE kv_a CASCADE").await?;
    let (code, stdout, stderr) = world.cli(&["migrate"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(15)).await?;
    assert_eq!(state.len(), 20);
    // And it keeps syncing.
    etcd.put("/a/after", "x", None).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(5)).await?;
    Ok(())
}

/// 6,000 keys under `/a/`, in txns of 100.
async fn put_6000_keys(etcd: &mut etcd_client::Client) -> anyhow::Result<()> {
    for chunk in 0..60 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| etcd_client::TxnOp::put(format!("/a/k{chunk:03}{i:03}"), "v", None))
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// The watcher's watchdog at 1 s (four stall timeouts of 250 ms) and walks
/// of ten keys a page: a walk over 6,000 keys outlasts the watchdog.
fn one_second_watchdog_small_pages(world: &mut World) {
    for (key, value) in [
        ("ETCD_PG_SYNC__SYNC__PROGRESS_INTERVAL_MS", "100"),
        ("ETCD_PG_SYNC__SYNC__WATCH_STALL_TIMEOUT_MS", "250"),
        ("ETCD_PG_SYNC__SYNC__SNAPSHOT_PAGE_SIZE", "10"),
    ] {
        world.env.insert(key.into(), value.into());
    }
}

/// A snapshot that takes longer than the watcher's watchdog (four times
/// `sync.watch_stall_timeout_ms`) but keeps moving is not taken for a
/// stuck watcher: the watcher, which waits for it, is not restarted (a
/// restart would queue a second snapshot behind the first).
#[tokio::test]
async fn a_long_snapshot_that_moves_does_not_restart_the_watcher() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    put_6000_keys(&mut etcd).await?;
    one_second_watchdog_small_pages(&mut world);
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(60)).await?;
    let pg = world.pg().await?;
    let snapshot = awaited_event_details(&pg, "snapshot", Duration::from_secs(10)).await?;
    let took = snapshot[0]["duration_ms"].as_u64().unwrap_or(0);
    assert!(
        took > 1_500,
        "the snapshot must outlast the watchdog (1 s) for this test to mean anything: {took} ms"
    );
    let status = status(&service).await?;
    assert_eq!(
        status["actors"]["etcd_watcher"]["restarts"], 0,
        "snapshot took {took} ms: {status}"
    );
    Ok(())
}

/// A resync after a compaction that finds almost every key unchanged
/// still reports progress (page by page, not only per difference): it is
/// not cut off as stalled and started over for ever.
#[tokio::test]
async fn a_resync_over_keys_that_all_match_is_not_taken_for_stalled() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    put_6000_keys(&mut etcd).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(60)).await?;
    wait_synced(&world).await?;
    service.terminate(Duration::from_secs(10)).await?;
    // One change while stopped, compacted away: the resync walks 6,000
    // keys, one page of ten at a time, to find one difference.
    etcd.put("/a/zz-changed", "while stopped", None).await?;
    world.etcd.compact(etcd_revision(&world).await?).await?;
    one_second_watchdog_small_pages(&mut world);
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(60)).await?;
    assert_eq!(state[b"/a/zz-changed".as_slice()], b"while stopped");
    let status = status(&service).await?;
    assert_eq!(status["actors"]["etcd_watcher"]["restarts"], 0, "{status}");
    let pg = world.pg().await?;
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM sync_events WHERE kind = 'compaction-recovery'"
        )
        .await?,
        1,
        "one resync, not one per try"
    );
    Ok(())
}

/// A leader that has synced `/a/held` = "v1", and a user's open
/// transaction holding its mirror row (on the returned client).
async fn hold_a_synced_row(world: &World) -> anyhow::Result<(Service, tokio_postgres::Client)> {
    world
        .etcd_client()
        .await?
        .put("/a/held", "v1", None)
        .await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    let user = world.pg().await?;
    user.batch_execute("BEGIN; SELECT 1 FROM kv_a WHERE key = '/a/held' FOR UPDATE")
        .await?;
    Ok((service, user))
}

/// An etcd change that waited behind a user's open transaction on its row
/// (deferred) is a committed write of the lost etcd, newer than the
/// mirror's value: `restore-etcd` applies it before copying the mirror,
/// instead of discarding it with the lost etcd's other leftovers.
#[tokio::test]
async fn restore_etcd_keeps_an_etcd_change_that_waited_for_a_held_row() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    let (mut service, user) = hold_a_synced_row(&world).await?;
    etcd.put("/a/held", "v2", None).await?;
    let pg = world.pg().await?;
    wait_count(
        &pg,
        "the etcd change deferred behind the held row",
        "SELECT count(*) FROM deferred_inputs WHERE key = '/a/held'",
        |n| n > 0,
        Duration::from_secs(10),
    )
    .await?;
    service.terminate(Duration::from_secs(10)).await?;
    user.batch_execute("COMMIT").await?;

    world.etcd = Etcd::start().await?;
    let (code, stdout, stderr) = world.cli(&["restore-etcd"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let mut fresh = world.etcd_client().await?;
    assert_eq!(
        fresh.get("/a/held", None).await?.kvs()[0].value(),
        b"v2",
        "the change that waited for the row is not lost"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM deferred_inputs").await?, 0);
    Ok(())
}

/// etcd changes that waited behind a user's held row are committed etcd
/// writes: a compaction resync supersedes their effect on the mirror (it
/// reads the key's state after them) but keeps them in the history.
#[tokio::test]
async fn a_compaction_resync_keeps_the_history_of_changes_that_waited_for_a_held_row()
-> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    let (mut service, user) = hold_a_synced_row(&world).await?;
    let r2 = etcd
        .put("/a/held", "v2", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let r3 = etcd
        .put("/a/held", "v3", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let pg = world.pg().await?;
    wait_count(
        &pg,
        "the etcd changes deferred behind the held row",
        "SELECT count(*) FROM deferred_inputs WHERE key = '/a/held'",
        |n| n >= 2,
        Duration::from_secs(10),
    )
    .await?;
    // Compacted while the service is down: the watch resumes into a
    // resync, the row still held.
    service.terminate(Duration::from_secs(10)).await?;
    etcd.put("/a/other", "x", None).await?;
    world.etcd.compact(etcd_revision(&world).await?).await?;
    service.restart()?;
    wait_leader(&[&service], Duration::from_secs(15)).await?;
    wait_count(
        &pg,
        "the compaction resync",
        "SELECT count(*) FROM sync_events WHERE kind = 'compaction-recovery'",
        |n| n > 0,
        Duration::from_secs(20),
    )
    .await?;
    user.batch_execute("COMMIT").await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?;
    let kept = count(
        &pg,
        &format!(
            "SELECT count(*) FROM history WHERE key = '/a/held'::bytea AND revision IN ({r2}, {r3})"
        ),
    )
    .await?;
    assert_eq!(kept, 2, "both changes that waited are in the history");
    Ok(())
}

/// `restore-etcd --at-revision R` rebuilds a lost etcd with the state of
/// revision R, from the history: etcd then holds what its own `Range` at R
/// returned (read before R was lost), and the mirror follows it back.
#[tokio::test]
async fn restore_etcd_at_a_revision_rebuilds_the_state_of_then() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    // Written before the first sync, so the history is whole only from
    // revisions larger than the new etcd's.
    for i in 0..200 {
        etcd.put(format!("/b/k{i:03}"), format!("v{i}"), None)
            .await?;
    }
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let lease = etcd.lease_grant(120, None).await?.id();
    etcd.put(
        "/a/leased",
        "held",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let mut change = async |etcd: &mut etcd_client::Client| -> anyhow::Result<()> {
        let prefix = if rng.random_bool(0.5) { "/a/" } else { "/b/" };
        let key = format!("{prefix}k{:03}", rng.random_range(0..250));
        if rng.random_bool(0.3) {
            etcd.delete(key, None).await?;
        } else {
            let value: Vec<u8> = (0..rng.random_range(0..20)).map(|_| rng.random()).collect();
            etcd.put(key, value, None).await?;
        }
        Ok(())
    };
    for _ in 0..300 {
        change(&mut etcd).await?;
    }
    let target = etcd_revision(&world).await?;
    let at_a = etcd_snapshot(&mut etcd, b"/a/").await?;
    let at_b = etcd_snapshot(&mut etcd, b"/b/").await?;
    for _ in 0..300 {
        change(&mut etcd).await?;
    }
    etcd.lease_revoke(lease).await?;
    let head = etcd_revision(&world).await?;
    wait_applied(&world, head, Duration::from_secs(20)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.etcd = Etcd::start().await?;
    let to = target.to_string();
    let (code, _, stderr) = world
        .cli(&["restore-etcd", "--at-revision", "999999"])
        .await?;
    assert_eq!(code, 2, "a revision the mirror never applied: {stderr}");
    // A change written in PostgreSQL and still queued is newer than R:
    // restoring R would silently drop it, so the restore refuses.
    let pg = world.pg().await?;
    let written = pg
        .execute(
            "INSERT INTO kv_b_text (key, value) VALUES ('/b/queued', 'queued')",
            &[],
        )
        .await?;
    assert_eq!(written, 1);
    let (code, _, stderr) = world.cli(&["restore-etcd", "--at-revision", &to]).await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("queued"), "{stderr}");
    // Set aside, it waits in the dead-letter list.
    let (code, stdout, stderr) = world
        .cli(&["restore-etcd", "--at-revision", &to, "--set-aside-queued"])
        .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("state of revision {target}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 queued PostgreSQL change(s) were set aside"),
        "{stdout}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM outbox").await?, 0);
    let set_aside: i64 = pg
        .query_one(
            "SELECT id FROM dead_letters WHERE kind = 'set-aside-by-restore' AND key = '/b/queued'",
            &[],
        )
        .await?
        .get(0);
    let mut fresh = world.etcd_client().await?;
    assert_eq!(
        etcd_snapshot(&mut fresh, b"/a/").await?,
        at_a,
        "byte for byte"
    );
    assert_eq!(etcd_snapshot(&mut fresh, b"/b/").await?, at_b);
    assert_ne!(
        fresh.get("/a/leased", None).await?.kvs()[0].lease(),
        0,
        "a key leased at R comes back under a lease"
    );

    // The mirror follows etcd back, and sync goes on from there.
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    assert_eq!(
        wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(20)).await?,
        at_a
    );
    assert_eq!(
        wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(20)).await?,
        at_b
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM conflicts").await?, 0);
    let new_head = etcd_revision(&world).await?;
    wait_applied(&world, new_head, Duration::from_secs(10)).await?;
    assert_eq!(state_at(&pg, "kv_b", new_head).await?, at_b);
    let audited = awaited_event_details(&pg, "restore-etcd", Duration::from_secs(5)).await?;
    assert_eq!(audited[0]["at_revision"], target);
    assert_eq!(audited[0]["queued_changes_set_aside"], 1);
    // The change set aside goes on top of the restored state when retried.
    let (code, stdout, stderr) = world
        .cli(&["dead-letters", "retry", &set_aside.to_string()])
        .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    wait_etcd_has(&fresh, "/b/queued", Duration::from_secs(10)).await?;
    Ok(())
}

/// Writes to the new etcd while `restore-etcd` runs (clients do not wait
/// for an operator) reach PostgreSQL once a replica runs: the checkpoint is
/// the restore's start, not its end.
#[tokio::test]
async fn writes_to_etcd_during_restore_reach_postgres() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..20 {
        etcd.put(format!("/a/k{i:02}"), format!("v{i}"), None)
            .await?;
    }
    for i in 0..400 {
        etcd.put(format!("/b/k{i:03}"), format!("v{i}"), None)
            .await?;
    }
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.etcd = Etcd::start().await?;
    let (code, stdout, stderr) = world.cli(&["restore-etcd", "--prefix", "/a/"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    // A client writes under /a/ while /b/ is restored, in small pages.
    let stop = CancellationToken::new();
    let writer = background_writer(world.etcd.endpoint(), "/a/live", stop.clone());
    for (key, value) in [
        ("ETCD_PG_SYNC__SYNC__SNAPSHOT_PAGE_SIZE", "5"),
        ("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS", "5"),
    ] {
        world.env.insert(key.into(), value.into());
    }
    let (code, stdout, stderr) = world.cli(&["restore-etcd", "--prefix", "/b/"]).await?;
    world.env.remove("ETCD_PG_SYNC__SYNC__SNAPSHOT_PAGE_SIZE");
    world.env.remove("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS");
    assert_eq!(code, 0, "{stdout}{stderr}");
    stop.cancel();
    assert!(writer.await? > 0);

    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(15)).await?;
    assert!(state.keys().any(|k| k.starts_with(b"/a/live")));
    wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(15)).await?;
    Ok(())
}

/// A mapping removed from the configuration and added back later: what etcd
/// did under its prefix meanwhile reaches its table.
#[tokio::test]
async fn a_mapping_removed_and_added_back_catches_up() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/b/before", "1", None).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    converge_both(&world).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.extra_toml = "\n[[mappings]]\nprefix = \"/a/\"\ntable = \"kv_a\"\n".into();
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    etcd.put("/b/while-unmapped", "2", None).await?;
    etcd.put("/a/x", "3", None).await?;
    wait_converged(&world, "kv_a", b"/a/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.extra_toml = MAPPINGS.into();
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_b", b"/b/", Duration::from_secs(15)).await?;
    assert!(state.contains_key(b"/b/while-unmapped".as_slice()));
    Ok(())
}
