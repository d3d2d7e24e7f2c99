//! Large values never wedge the pipeline: every page, watch message and
//! outbox read is bounded in bytes as well as in count. The client here
//! accepts messages of at most 16 MiB (`etcd.max_response_bytes`), so a
//! keyspace of 1 MiB values that a count-bounded page or an unfragmented
//! catch-up response would carry in one message (the production default,
//! 512 MiB, is reached the same way with 600 such values) must still sync
//! through the snapshot, a catch-up, the live watch, the outbox and
//! `verify`.

mod support;

use std::time::Duration;

use support::*;

const MAPPINGS: &str = "\n[[mappings]]\nprefix = \"/big/\"\ntable = \"kv_big\"\n";
const LIMIT: &str = "16777216";
const MIB: usize = 1 << 20;

fn value(tag: u8) -> Vec<u8> {
    vec![tag; MIB]
}

async fn put_all(world: &World, keys: std::ops::Range<usize>, tag: u8) -> anyhow::Result<()> {
    let mut writers = Vec::new();
    for chunk in keys.collect::<Vec<_>>().chunks(8) {
        let mut etcd = world.etcd_client().await?;
        let chunk = chunk.to_vec();
        writers.push(tokio::spawn(async move {
            for i in chunk {
                etcd.put(format!("/big/k{i:03}"), value(tag), None).await?;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    Ok(())
}

#[tokio::test]
async fn one_mib_values_sync_through_every_path_with_bounded_messages() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__ETCD__MAX_RESPONSE_BYTES".into(),
        LIMIT.into(),
    );
    // Snapshot: 60 MiB under the prefix.
    put_all(&world, 0..60, b'a').await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let state = wait_converged(&world, "kv_big", b"/big/", Duration::from_secs(60)).await?;
    assert_eq!(state.len(), 60);

    // Catch-up: 40 revisions of 1 MiB (and their 1 MiB previous values)
    // written while the replica is down arrive on one watch.
    service.terminate(Duration::from_secs(10)).await?;
    put_all(&world, 0..40, b'b').await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    wait_converged(&world, "kv_big", b"/big/", Duration::from_secs(60)).await?;

    // Live watch.
    put_all(&world, 40..60, b'c').await?;
    wait_converged(&world, "kv_big", b"/big/", Duration::from_secs(60)).await?;

    // The outbox: one statement changes every row to a new 1 MiB value.
    let pg = world.pg().await?;
    pg.execute(
        "UPDATE kv_big SET value = decode(repeat('64', $1), 'hex')",
        &[&(MIB as i32)],
    )
    .await?;
    let state = eps_harness::wait_for("the SQL values in etcd", Duration::from_secs(90), || {
        let world = &world;
        async move {
            let state = wait_converged(world, "kv_big", b"/big/", Duration::from_secs(1)).await;
            Ok(state
                .ok()
                .filter(|s| s.values().all(|v| v.iter().all(|b| *b == b'd'))))
        }
    })
    .await?;
    assert_eq!(state.len(), 60);

    // verify pages both sides in bytes too.
    let url = world.db.url();
    let endpoint = world.etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("verify.toml");
    std::fs::write(&config, format!("[cluster]\nname = \"test\"\n{MAPPINGS}"))?;
    let config = config.display().to_string();
    let (code, stdout, stderr) = run_cli(
        &["verify", "--config", &config],
        &[
            ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
            ("ETCD_PG_SYNC__ETCD__MAX_RESPONSE_BYTES", LIMIT),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("0 difference(s)"), "{stdout}");
    Ok(())
}
