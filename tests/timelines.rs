//! An etcd restored from a backup, or replaced, is a new timeline: detected
//! (cluster id, a revision gone back, or the last applied change missing),
//! audited, followed — every value of PostgreSQL's it rolls back recorded —
//! and kept apart in `history`.

mod support;

use std::time::Duration;

use support::*;

const MAPPINGS: &str = "\n[[mappings]]\nprefix = \"/t/\"\ntable = \"kv_t\"\npolicy = \"pg-wins\"\n";

async fn put_many(
    world: &World,
    keys: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let mut etcd = world.etcd_client().await?;
    for (key, value) in keys {
        etcd.put(key, value, None).await?;
    }
    Ok(())
}

/// The values of PostgreSQL's a new timeline rolled back (not the queued
/// changes settled by policy on it, which carry the same reason).
async fn rolled_back(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    count(
        pg,
        "SELECT count(*) FROM etcd_sync.conflicts \
         WHERE reason = 'timeline-change' AND resolved_by = 'timeline-change'",
    )
    .await
}

#[tokio::test]
async fn an_etcd_restored_from_an_older_backup_is_followed_and_what_it_rolls_back_is_recorded()
-> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    put_many(
        &world,
        (0..20).map(|i| (format!("/t/k{i:02}"), "v0".to_string())),
    )
    .await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    let backup = world.etcd.backup().await?;
    put_many(
        &world,
        (0..50).map(|i| (format!("/t/new{i:02}"), "after".to_string())),
    )
    .await?;
    put_many(
        &world,
        (0..10).map(|i| (format!("/t/k{i:02}"), "v1".to_string())),
    )
    .await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    // A change made in PostgreSQL while etcd is down and being restored:
    // based on the old history, it is settled against the new one by the
    // mapping's policy (pg-wins here), not looped.
    service.terminate(Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    pg.execute(
        "UPDATE kv_t_text SET value = 'sql during restore' WHERE key = '/t/k15'",
        &[],
    )
    .await?;

    world.etcd.restore(backup.path()).await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(20)).await?;
    assert_eq!(
        state.len(),
        20,
        "the keys created after the backup are gone"
    );
    assert_eq!(
        state[b"/t/k03".as_slice()],
        b"v0",
        "changed values reverted"
    );
    assert_eq!(state[b"/t/k15".as_slice()], b"sql during restore");
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;

    let changes = event_details(&pg, "timeline-change").await?;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["reason"], "revision-went-back");
    assert_eq!(changes[0]["timeline"], 2);
    assert_eq!(
        rolled_back(&pg).await?,
        60,
        "50 keys deleted and 10 values reverted, recorded"
    );
    let settled: i64 = count(
        &pg,
        "SELECT count(*) FROM etcd_sync.conflicts WHERE reason = 'timeline-change' \
         AND resolved_by = 'policy' AND winner = 'pg' AND key = '/t/k15'",
    )
    .await?;
    assert_eq!(settled, 1, "the queued change settled by policy says why");

    // New revisions reuse numbers the old timeline used: both stay.
    let mut etcd = world.etcd_client().await?;
    let revision = etcd
        .put("/t/after-restore", "x", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    let now: Option<Vec<u8>> = pg
        .query_one("SELECT value_at('/t/after-restore', $1)", &[&revision])
        .await?
        .get(0);
    assert_eq!(now.as_deref(), Some(&b"x"[..]));
    let old_timeline: i64 = count(
        &pg,
        "SELECT count(*) FROM history WHERE timeline = 1 AND key = '\\x2f742f6e65773030'::bytea",
    )
    .await?;
    assert_eq!(old_timeline, 1, "the old timeline keeps its history");
    let then: Option<Vec<u8>> = pg
        .query_one("SELECT value_at('/t/new00', 1000000, 1)", &[])
        .await?
        .get(0);
    assert_eq!(then.as_deref(), Some(&b"after"[..]));

    // One command puts the rolled-back values back, except where the key
    // has changed since.
    etcd.put("/t/k04", "newer", None).await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    let url = world.db.url();
    let endpoint = world.etcd.endpoint();
    let (code, stdout, stderr) = run_cli(
        &["conflicts", "resolve", "--timeline-changes", "--take", "pg"],
        &[
            ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("59 resolved"), "{stdout}");
    assert!(stdout.contains("1 skipped"), "{stdout}");
    let state = eps_harness::wait_for(
        "the rolled-back values back",
        Duration::from_secs(30),
        || {
            let world = &world;
            async move {
                let state = wait_converged(world, "kv_t", b"/t/", Duration::from_secs(1)).await;
                Ok(state.ok().filter(|s| s.len() == 71))
            }
        },
    )
    .await?;
    assert_eq!(state[b"/t/k03".as_slice()], b"v1");
    assert_eq!(
        state[b"/t/k04".as_slice()],
        b"newer",
        "a value written since is not overwritten"
    );
    Ok(())
}

#[tokio::test]
async fn a_restored_etcd_that_has_passed_the_checkpoint_is_detected() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    put_many(
        &world,
        (0..10).map(|i| (format!("/t/k{i:02}"), "v0".to_string())),
    )
    .await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let backup = world.etcd.backup().await?;
    put_many(
        &world,
        (0..10).map(|i| (format!("/t/k{i:02}"), "lost".to_string())),
    )
    .await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    // Restored, then written to well past the old checkpoint before any
    // replica runs: only the last applied change shows the difference.
    world.etcd.restore(backup.path()).await?;
    put_many(
        &world,
        (0..40).map(|i| (format!("/t/post{i:02}"), "p".to_string())),
    )
    .await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(20))
        .await
        .map_err(|e| e.context(service.log_tail(60)))?;
    assert_eq!(state[b"/t/k05".as_slice()], b"v0");
    let pg = world.pg().await?;
    let changes = event_details(&pg, "timeline-change").await?;
    assert_eq!(changes.len(), 1, "{changes:?}");
    // The last applied change is gone, and the mark with it.
    let reason = changes[0]["reason"].as_str().unwrap_or_default();
    assert!(
        ["last-change-missing", "mark-missing"].contains(&reason),
        "{changes:?}"
    );
    assert_eq!(rolled_back(&pg).await?, 10);
    Ok(())
}

#[tokio::test]
async fn a_replaced_etcd_is_a_new_timeline() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    put_many(
        &world,
        (0..10).map(|i| (format!("/t/k{i:02}"), "v0".to_string())),
    )
    .await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;

    world.etcd.wipe().await?;
    put_many(
        &world,
        [("/t/fresh".to_string(), "new cluster".to_string())],
    )
    .await?;
    let state = wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(30)).await?;
    assert_eq!(state.len(), 1);
    let pg = world.pg().await?;
    assert_eq!(event_details(&pg, "timeline-change").await?.len(), 1);
    assert_eq!(
        rolled_back(&pg).await?,
        10,
        "every key the new etcd lacks is recorded"
    );
    // The replica leads on, writing the new etcd.
    pg.execute(
        "INSERT INTO kv_t_text (key, value) VALUES ('/t/from-sql', 'y')",
        &[],
    )
    .await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    Ok(())
}

/// A change queued in PostgreSQL against the old history must not be
/// written to a restored etcd before the service has seen that it is
/// another history: there the key's revision can match the change's base
/// by chance (etcd reuses the numbers), and a conditional write would
/// silently overwrite a value written in the restored etcd. Settled by
/// policy instead (etcd-wins here: etcd's value stays, PostgreSQL's is
/// recorded).
#[tokio::test]
async fn a_change_queued_against_the_old_history_is_not_written_to_a_restored_etcd()
-> anyhow::Result<()> {
    let mappings = "\n[[mappings]]\nprefix = \"/e/\"\ntable = \"kv_e\"\npolicy = \"etcd-wins\"\n";
    let mut world = World::new(mappings).await?;
    put_many(&world, [("/e/k".to_string(), "v0".to_string())]).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_e", b"/e/", Duration::from_secs(10)).await?;
    let backup = world.etcd.backup().await?;
    let mut etcd = world.etcd_client().await?;
    let base = etcd
        .put("/e/k", "v1", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    wait_converged(&world, "kv_e", b"/e/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    pg.execute("UPDATE kv_e_text SET value = 'sql' WHERE key = '/e/k'", &[])
        .await?;

    // The restored etcd reaches the change's base revision with a write of
    // the key itself.
    world.etcd.restore(backup.path()).await?;
    let mut etcd = world.etcd_client().await?;
    let mut revision = etcd
        .get("/e/k", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    anyhow::ensure!(
        revision < base,
        "the backup is not older ({revision} >= {base})"
    );
    while revision + 1 < base {
        revision = etcd
            .put("/e/filler", revision.to_string(), None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
    }
    let written = etcd
        .put("/e/k", "etcd-new", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    assert_eq!(
        written, base,
        "the key's revision matches the change's base"
    );

    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_e", b"/e/", Duration::from_secs(20))
        .await
        .map_err(|e| e.context(service.log_tail(60)))?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    assert_eq!(
        state[b"/e/k".as_slice()],
        b"etcd-new",
        "etcd's value stays (etcd-wins)"
    );
    let recorded: i64 = count(
        &pg,
        "SELECT count(*) FROM etcd_sync.conflicts \
         WHERE key = '/e/k' AND pg_value = 'sql' AND winner = 'etcd' AND reason = 'timeline-change'",
    )
    .await?;
    assert_eq!(recorded, 1, "PostgreSQL's change is recorded");
    Ok(())
}

/// A `pg-to-etcd` table is the source of its keys: a restored etcd that
/// lacks what was written there since its backup gets it again, and the
/// table's rows go on flowing to etcd.
#[tokio::test]
async fn a_restored_etcd_gets_the_values_of_pg_to_etcd_tables_again() -> anyhow::Result<()> {
    let mappings =
        "\n[[mappings]]\nprefix = \"/p/\"\ntable = \"kv_p\"\ndirection = \"pg-to-etcd\"\n";
    let mut world = World::new(mappings).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    pg.batch_execute("INSERT INTO kv_p_text (key, value) VALUES ('/p/a', 'a0'), ('/p/b', 'b0')")
        .await?;
    wait_converged(&world, "kv_p", b"/p/", Duration::from_secs(10)).await?;
    let backup = world.etcd.backup().await?;
    pg.batch_execute(
        "INSERT INTO kv_p_text (key, value) VALUES ('/p/c', 'c0'); \
         UPDATE kv_p_text SET value = 'a1' WHERE key = '/p/a'",
    )
    .await?;
    wait_converged(&world, "kv_p", b"/p/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.etcd.restore(backup.path()).await?;
    // Other clients write on while the service comes back: etcd's revision
    // moves on between the resync's reading and anything after it.
    let writer = tokio::spawn({
        let mut etcd = world.etcd_client().await?;
        async move {
            for i in 0..400 {
                if etcd.put(format!("/other/{i}"), "x", None).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    });
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_p", b"/p/", Duration::from_secs(20))
        .await
        .map_err(|e| e.context(service.log_tail(60)))?;
    writer.abort();
    assert_eq!(state.len(), 3);
    assert_eq!(state[b"/p/a".as_slice()], b"a1");
    // A value etcd still held was not written again (a put every etcd
    // client would see): the row took etcd's metadata.
    let mut etcd = world.etcd_client().await?;
    let b = etcd.get("/p/b", None).await?;
    assert_eq!(b.kvs().first().map(|kv| kv.version()), Some(1));

    // Edits go on reaching etcd, without conflicts.
    pg.batch_execute("UPDATE kv_p_text SET value = 'b1' WHERE key = '/p/b'")
        .await?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_p", b"/p/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/p/b".as_slice()], b"b1");
    let conflicts = count(&pg, "SELECT count(*) FROM etcd_sync.conflicts").await?;
    assert_eq!(conflicts, 0);
    Ok(())
}

/// etcd restored from a backup taken after the last change of the mapped
/// keys (so that change is still there), then written to past the old
/// checkpoint (moved on by other keys' writes) before the service looks:
/// only the timeline mark shows the revisions the mirror had passed are
/// another history now. Unnoticed, the watch would resume after the old
/// checkpoint and never see the restored etcd's first writes.
#[tokio::test]
async fn a_restored_etcd_is_detected_by_the_timeline_mark() -> anyhow::Result<()> {
    restored_past_the_checkpoint_with_the_last_change(false).await
}

/// The same with a backup older than any mark (taken before the service
/// first ran, or before an upgrade): the key is absent there.
#[tokio::test]
async fn a_restored_etcd_without_any_mark_is_detected() -> anyhow::Result<()> {
    restored_past_the_checkpoint_with_the_last_change(true).await
}

async fn restored_past_the_checkpoint_with_the_last_change(
    backup_before_start: bool,
) -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    put_many(&world, [("/t/a".to_string(), "a0".to_string())]).await?;
    let early = if backup_before_start {
        Some(world.etcd.backup().await?)
    } else {
        None
    };
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    let backup = match early {
        Some(backup) => backup,
        None => world.etcd.backup().await?,
    };
    // Other keys move the checkpoint on, and a mark is written past the
    // backup.
    put_many(
        &world,
        (0..20).map(|i| (format!("/other/{i:02}"), "x".to_string())),
    )
    .await?;
    let mut etcd = world.etcd_client().await?;
    let written = etcd
        .get("/other/19", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let pg = world.pg().await?;
    eps_harness::wait_for(
        "the checkpoint past the other keys",
        Duration::from_secs(10),
        || {
            let pg = &pg;
            async move {
                let applied =
                    count(pg, "SELECT applied_revision FROM etcd_sync.sync_state").await?;
                Ok((applied >= written).then_some(()))
            }
        },
    )
    .await?;
    let checkpoint = eps_harness::wait_for("a mark past them", Duration::from_secs(10), || {
        let world = &world;
        async move {
            let mut etcd = world.etcd_client().await?;
            let mark = etcd.get("__etcd_pg_sync/test/timeline-mark", None).await?;
            let at = mark.kvs().first().map_or(0, |kv| kv.mod_revision());
            Ok((at > written).then_some(at))
        }
    })
    .await?;
    service.terminate(Duration::from_secs(10)).await?;

    world.etcd.restore(backup.path()).await?;
    let mut etcd = world.etcd_client().await?;
    let mut revision = etcd
        .get("/t/a", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let mut written = 0;
    while revision <= checkpoint + 3 {
        revision = etcd
            .put(format!("/t/new{written:02}"), "after restore", None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        written += 1;
    }
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    let state = wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(20))
        .await
        .map_err(|e| e.context(service.log_tail(60)))?;
    assert_eq!(state.len(), 1 + written, "every write of the restored etcd");
    let changes = event_details(&pg, "timeline-change").await?;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["reason"], "mark-missing");
    Ok(())
}

/// A world with `sync.on_etcd_restore = "pause"`, `/t/k00`..`/t/k09` at
/// `v0` in both stores, its replica, and a backup of etcd taken then.
async fn paused_world_backed_up() -> anyhow::Result<(World, eps_harness::Service, tempfile::TempDir)>
{
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__ON_ETCD_RESTORE".into(), "pause".into());
    put_many(
        &world,
        (0..10).map(|i| (format!("/t/k{i:02}"), "v0".to_string())),
    )
    .await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    let backup = world.etcd.backup().await?;
    Ok((world, service, backup))
}

/// `sync.on_etcd_restore = "pause"`: an etcd restored from a backup stops
/// sync — nothing applied either way, `/readyz` failing, the alert's gauge
/// at 1 — until `etcd-pg-sync timeline resume --take SIDE`; then the
/// mirror follows the restored etcd, and with `pg` every value that rolled
/// back is put back into etcd.
async fn paused_restore(
    take: &str,
) -> anyhow::Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
    let (mut world, mut service, backup) = paused_world_backed_up().await?;
    put_many(
        &world,
        (0..5)
            .map(|i| (format!("/t/k{i:02}"), "v1".to_string()))
            .chain((0..5).map(|i| (format!("/t/new{i}"), "after".to_string()))),
    )
    .await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    service.terminate(Duration::from_secs(10)).await?;
    world.etcd.restore(backup.path()).await?;
    service.restart()?;

    let pg = world.pg().await?;
    eps_harness::wait_for("the pause", Duration::from_secs(30), || {
        let service = &service;
        async move {
            let (code, _) = service.get("/readyz").await?;
            let paused = status(service).await?["timeline_paused"].is_object();
            Ok((code == 503 && paused).then_some(()))
        }
    })
    .await?;
    let (_, metrics) = service.get("/metrics").await?;
    assert!(
        metrics.contains("etcd_pg_sync_timeline_paused 1"),
        "the alert's gauge is set"
    );
    assert_eq!(event_details(&pg, "timeline-paused").await?.len(), 1);
    // Nothing moves while paused: neither an SQL change nor an etcd write.
    pg.execute(
        "UPDATE kv_t_text SET value = 'sql while paused' WHERE key = '/t/k09'",
        &[],
    )
    .await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/t/k08", "etcd while paused", None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let etcd_k09 = etcd.get("/t/k09", None).await?;
    assert_eq!(
        etcd_k09.kvs()[0].value(),
        b"v0",
        "no SQL change reaches etcd"
    );
    let pg_k08: String = pg
        .query_one("SELECT value FROM kv_t_text WHERE key = '/t/k08'", &[])
        .await?
        .get(0);
    assert_eq!(pg_k08, "v0", "no etcd change reaches PostgreSQL");
    let new_rows = count(
        &pg,
        "SELECT count(*) FROM kv_t WHERE key::text LIKE '%6e6577%'",
    )
    .await?;
    assert_eq!(
        new_rows, 5,
        "the rows created after the backup are still there"
    );

    let url = world.db.url();
    let endpoint = world.etcd.endpoint();
    let env = [
        ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
        ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
    ];
    let (code, stdout, stderr) = run_cli(&["timeline", "resume", "--take", take], &env).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let changes = event_details(&pg, "timeline-change").await?;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["decision"], take);
    let expected_keys = if take == "pg" { 15 } else { 10 };
    let state = eps_harness::wait_for("the resumed sync", Duration::from_secs(30), || {
        let world = &world;
        async move {
            let state = wait_converged(world, "kv_t", b"/t/", Duration::from_secs(1)).await;
            Ok(state.ok().filter(|s| {
                s.len() == expected_keys
                    && s.get(b"/t/k00".as_slice()).map(Vec::as_slice)
                        == Some(if take == "pg" { &b"v1"[..] } else { &b"v0"[..] })
            }))
        }
    })
    .await?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    eps_harness::wait_for("ready again", Duration::from_secs(10), || {
        let service = &service;
        async move { Ok((service.get("/readyz").await?.0 == 200).then_some(())) }
    })
    .await?;
    // Nothing is held any more.
    let (code, _, _) = run_cli(&["timeline", "resume", "--take", take], &env).await?;
    assert_eq!(code, 1, "nothing to resume");
    Ok(state)
}

#[tokio::test]
async fn a_paused_restore_resumed_with_take_etcd_follows_etcd() -> anyhow::Result<()> {
    let state = paused_restore("etcd").await?;
    assert_eq!(state[b"/t/k03".as_slice()], b"v0", "reverted to the backup");
    assert_eq!(state[b"/t/k08".as_slice()], b"etcd while paused");
    assert_eq!(
        state[b"/t/k09".as_slice()],
        b"sql while paused",
        "pg-wins settles the queued change"
    );
    Ok(())
}

#[tokio::test]
async fn a_paused_restore_resumed_with_take_pg_puts_postgresqls_state_into_etcd()
-> anyhow::Result<()> {
    let state = paused_restore("pg").await?;
    assert_eq!(
        state[b"/t/k03".as_slice()],
        b"v1",
        "the rolled-back value is back"
    );
    assert_eq!(
        state[b"/t/new3".as_slice()],
        b"after",
        "keys created after the backup are back"
    );
    assert_eq!(
        state[b"/t/k08".as_slice()],
        b"v0",
        "PostgreSQL's value wins over etcd's"
    );
    assert_eq!(state[b"/t/k09".as_slice()], b"sql while paused");
    Ok(())
}

/// A pause whose cause goes away — the original etcd put back — ends by
/// itself: the hold is released (`timeline-released`), every replica is
/// ready again, and sync goes on with nothing rolled back.
#[tokio::test]
async fn a_pause_ends_when_the_original_etcd_is_put_back() -> anyhow::Result<()> {
    let (mut world, mut service, old) = paused_world_backed_up().await?;
    put_many(
        &world,
        (0..5).map(|i| (format!("/t/k{i:02}"), "v1".to_string())),
    )
    .await?;
    wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    // Long enough for the timeline mark to record the newer state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    service.terminate(Duration::from_secs(10)).await?;
    let original = world.etcd.backup().await?;
    world.etcd.restore(old.path()).await?;
    service.restart()?;
    eps_harness::wait_for("the pause", Duration::from_secs(30), || {
        let service = &service;
        async move {
            let paused = status(service).await?["timeline_paused"].is_object();
            Ok(paused.then_some(()))
        }
    })
    .await?;

    world.etcd.restore(original.path()).await?;
    eps_harness::wait_for("ready again", Duration::from_secs(30), || {
        let service = &service;
        async move { Ok((service.get("/readyz").await?.0 == 200).then_some(())) }
    })
    .await?;
    let pg = world.pg().await?;
    assert_eq!(event_details(&pg, "timeline-released").await?.len(), 1);
    assert!(event_details(&pg, "timeline-change").await?.is_empty());
    put_many(&world, [("/t/after".to_string(), "x".to_string())]).await?;
    let state = wait_converged(&world, "kv_t", b"/t/", Duration::from_secs(10)).await?;
    assert_eq!(state[b"/t/k03".as_slice()], b"v1", "nothing rolled back");
    assert_eq!(state.len(), 11);
    Ok(())
}
