//! Three replicas, one leader, fencing, failover (docs/design.md G6), under a steady
//! write load on both sides.

mod support;

use std::time::Duration;

use eps_harness::{FaultMode, Proxy, Service};
use support::*;
use tokio_util::sync::CancellationToken;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/s/"
table = "kv_s"
policy = "etcd-wins"
"#;

/// Lease TTL of the test config (harness default).
const TTL: Duration = Duration::from_secs(3);

fn under_s(key: &[u8]) -> bool {
    key.starts_with(b"/s/")
}

struct Load {
    stop: CancellationToken,
    etcd: tokio::task::JoinHandle<u64>,
    pg: tokio::task::JoinHandle<u64>,
}

impl Load {
    fn start(world: &World) -> Load {
        let stop = CancellationToken::new();
        Load {
            etcd: background_writer(world.etcd.endpoint(), "/s/e", stop.clone()),
            pg: background_pg_writer(world.db.clone(), "kv_s", "/s/", stop.clone()),
            stop,
        }
    }

    async fn finish(self) -> anyhow::Result<(u64, u64)> {
        self.stop.cancel();
        Ok((self.etcd.await?, self.pg.await?))
    }
}

async fn three(world: &World) -> anyhow::Result<Vec<Service>> {
    let mut replicas = Vec::new();
    for node in ["n1", "n2", "n3"] {
        replicas.push(world.start(node).await?);
    }
    Ok(replicas)
}

async fn leader_of(replicas: &[Service]) -> anyhow::Result<usize> {
    let refs: Vec<&Service> = replicas.iter().collect();
    wait_leader(&refs, Duration::from_secs(20)).await
}

async fn terms(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    count(pg, "SELECT term FROM sync_state").await
}

/// Waits until history has a row written under a term other than `old`;
/// returns that term and when the row was recorded (seconds since epoch).
async fn first_row_of_next_term(
    pg: &tokio_postgres::Client,
    old: i64,
    timeout: Duration,
) -> anyhow::Result<(i64, f64)> {
    eps_harness::wait_for("a change applied under a new term", timeout, || async move {
        let row = pg
            .query_opt(
                "SELECT term, extract(epoch FROM min(recorded_at))::float8 FROM history WHERE term > $1 GROUP BY term ORDER BY term LIMIT 1",
                &[&old],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    })
    .await
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// After the load stops: both stores equal, outbox drained, the history is
/// etcd's log, and every PostgreSQL write reached etcd exactly once.
async fn assert_consistent(world: &World) -> anyhow::Result<()> {
    wait_converged(world, "kv_s", b"/s/", Duration::from_secs(30)).await?;
    let pg = world.pg().await?;
    wait_count(
        &pg,
        "outbox not drained",
        "SELECT count(*) FROM outbox",
        |n| n <= 0,
        Duration::from_secs(15),
    )
    .await?;
    assert_history_is_etcd_log(world, under_s).await?;
    // No value written in PostgreSQL reached etcd twice (a deposed leader
    // replaying its outbox would show up here).
    let until = etcd_revision(world).await?;
    let log = etcd_event_log(world, until, under_s).await?;
    let mut seen = std::collections::HashSet::new();
    for change in &log {
        if let Some(value) = &change.value
            && value.starts_with(b"pg-")
        {
            assert!(
                seen.insert((change.key.clone(), value.clone())),
                "{:?} written twice",
                change
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn exactly_one_leader_and_standbys_are_ready() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let replicas = three(&world).await?;
    let leader = leader_of(&replicas).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut leaders = 0;
    for (i, replica) in replicas.iter().enumerate() {
        let s = status(replica).await?;
        let (code, metrics) = replica.get("/metrics").await?;
        assert_eq!(code, 200);
        let is_leader = metrics
            .lines()
            .any(|l| l.trim() == "etcd_pg_sync_is_leader 1");
        assert_eq!(
            is_leader,
            i == leader,
            "metric on {}: {}",
            replica.node_id,
            s
        );
        leaders += usize::from(is_leader);
        assert_eq!(
            s["leader"],
            replicas[leader].node_id.as_str(),
            "every node knows the leader"
        );
        assert!(
            s["term"].as_i64().unwrap() > 0,
            "standbys show the current term too"
        );
        assert_eq!(replica.get("/readyz").await?.0, 200);
    }
    assert_eq!(leaders, 1);
    let url = world.db.url();
    let endpoint = world.etcd.endpoint();
    let (code, stdout, stderr) = run_cli(
        &["status"],
        &[
            ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
            ("ETCD_PG_SYNC__CLUSTER__NAME", "test"),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&replicas[leader].node_id), "{stdout}");
    // The whole cluster: every replica in the election, its role and lease.
    let env = [
        ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
        ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoint.as_str()),
        ("ETCD_PG_SYNC__CLUSTER__NAME", "test"),
    ];
    let (code, stdout, stderr) = run_cli(&["status", "--json"], &env).await?;
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout)?;
    let listed = status["replicas"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{status}");
    assert_eq!(listed[0]["node_id"], replicas[leader].node_id.as_str());
    assert_eq!(listed[0]["role"], "leader");
    assert!(
        listed[1..].iter().all(|r| r["role"] == "standby"),
        "{status}"
    );
    assert!(
        listed
            .iter()
            .all(|r| r["lease_ttl_secs"].as_i64().is_some_and(|t| t > 0)),
        "{status}"
    );
    // etcd down: what PostgreSQL knows, and that etcd is unreachable (3).
    world.etcd.stop();
    let (code, stdout, stderr) = run_cli(&["status"], &env).await?;
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stdout.contains("UNREACHABLE"), "{stdout}");
    assert!(stdout.contains("applied revision:"), "{stdout}");
    assert!(
        stdout.contains(&replicas[leader].node_id),
        "the last leader: {stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn killed_leader_is_replaced_within_the_lease_ttl() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut replicas = three(&world).await?;
    let leader = leader_of(&replicas).await?;
    wait_synced(&world).await?;
    let load = Load::start(&world);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pg = world.pg().await?;
    let old_term = terms(&pg).await?;
    let killed_at = unix_now();
    replicas[leader].kill();
    let (new_term, first_change_at) =
        first_row_of_next_term(&pg, old_term, TTL + Duration::from_secs(10)).await?;
    let failover = first_change_at - killed_at;
    println!(
        "failover: leader SIGKILLed → first change applied by the new leader in {failover:.3} s (lease TTL {TTL:?})"
    );
    assert!(new_term > old_term);
    assert!(
        failover < (TTL + Duration::from_secs(2)).as_secs_f64(),
        "failover took {failover:.3} s"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (etcd_writes, pg_writes) = load.finish().await?;
    assert!(etcd_writes > 0 && pg_writes > 0);
    assert_consistent(&world).await?;
    Ok(())
}

#[tokio::test]
async fn a_paused_leader_cannot_write_after_its_lease_is_gone() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let replicas = three(&world).await?;
    let leader = leader_of(&replicas).await?;
    wait_synced(&world).await?;
    let load = Load::start(&world);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pg = world.pg().await?;
    let old_term = terms(&pg).await?;
    replicas[leader].pause(); // SIGSTOP: a long GC pause, a frozen VM
    let (new_term, _) =
        first_row_of_next_term(&pg, old_term, TTL + Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resumed_at = unix_now();
    replicas[leader].resume();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing the old leader attempted after waking up landed in PostgreSQL.
    let late = pg
        .query_one(
            "SELECT count(*) FROM history WHERE term = $1 AND recorded_at > to_timestamp($2)",
            &[&old_term, &resumed_at],
        )
        .await?
        .get::<_, i64>(0);
    assert_eq!(
        late, 0,
        "history rows of the deposed term {old_term} after it resumed"
    );
    let per_term: Vec<(i64, i64)> = pg
        .query(
            "SELECT term, count(*) FROM history GROUP BY term ORDER BY term",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("history rows by term: {per_term:?} (old {old_term}, new {new_term})");
    assert_eq!(
        terms(&pg).await?,
        new_term,
        "the stored term is the new leader's"
    );
    let old = status(&replicas[leader]).await?;
    assert_eq!(old["role"], "standby", "the old leader stepped down: {old}");
    load.finish().await?;
    assert_consistent(&world).await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_cut_from_etcd_steps_down_and_a_standby_takes_over() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", world.etcd.client_port()).parse()?).await?;
    // n1 reaches etcd through the proxy and starts first, so it leads.
    let mut config = world.config("n1");
    config.env.insert(
        "ETCD_PG_SYNC__ETCD__ENDPOINTS".into(),
        format!("http://127.0.0.1:{}", proxy.port()),
    );
    let n1 = Service::start(config, "n1").await?;
    wait_leader(&[&n1], Duration::from_secs(10)).await?;
    let n2 = world.start("n2").await?;
    let n3 = world.start("n3").await?;
    wait_synced(&world).await?;
    let load = Load::start(&world);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(FaultMode::Cut);
    let new_leader = wait_leader(&[&n2, &n3], TTL + Duration::from_secs(10)).await?;
    println!("{} took over", ["n2", "n3"][new_leader]);
    eps_harness::wait_for("n1 to step down", Duration::from_secs(10), || {
        let n1 = &n1;
        async move { Ok((status(n1).await?["role"] == "standby").then_some(())) }
    })
    .await?;
    proxy.set(FaultMode::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await?;
    assert_consistent(&world).await?;
    assert_eq!(
        status(&n1).await?["role"],
        "standby",
        "the healed replica stays standby"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_on_the_leader_hands_over_at_once() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut replicas = three(&world).await?;
    let leader = leader_of(&replicas).await?;
    wait_synced(&world).await?;
    let load = Load::start(&world);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pg = world.pg().await?;
    let old_term = terms(&pg).await?;
    let stopped_at = unix_now();
    let exit = replicas[leader].terminate(Duration::from_secs(15)).await?;
    assert_eq!(exit.code(), Some(0));
    // The lease is revoked before the process exits, not left to expire.
    let mut etcd = world.etcd.client().await?;
    assert_eq!(
        election_keys(&mut etcd).await?.len(),
        2,
        "the resigned leader's election key outlived its process"
    );
    let (_, first_change_at) =
        first_row_of_next_term(&pg, old_term, Duration::from_secs(10)).await?;
    let handover = first_change_at - stopped_at;
    println!(
        "graceful handover: SIGTERM → first change applied by the new leader in {handover:.3} s"
    );
    assert!(
        handover < TTL.as_secs_f64(),
        "resigning must not wait for the lease to expire ({handover:.3} s)"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await?;
    assert_consistent(&world).await?;
    let resigned = count(&pg, "SELECT count(*) FROM sync_events WHERE kind = 'leadership' AND detail->>'event' = 'resigned'").await?;
    assert_eq!(resigned, 1);
    // A standby that stops leaves no key behind either.
    let standby = (0..replicas.len())
        .find(|&i| i != leader)
        .unwrap_or_default();
    replicas[standby].terminate(Duration::from_secs(15)).await?;
    assert_eq!(
        election_keys(&mut etcd).await?.len(),
        1,
        "the stopped standby's election key outlived its process"
    );
    Ok(())
}

#[tokio::test]
async fn all_three_restarted_at_once_elect_one_leader_and_converge() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut replicas = three(&world).await?;
    leader_of(&replicas).await?;
    wait_synced(&world).await?;
    let load = Load::start(&world);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for replica in &mut replicas {
        replica.kill();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for replica in &mut replicas {
        replica.restart()?;
    }
    for replica in &mut replicas {
        replica.wait_ready(Duration::from_secs(30)).await?;
    }
    leader_of(&replicas).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await?;
    assert_consistent(&world).await?;
    let mut leaders = 0;
    for replica in &replicas {
        leaders += usize::from(status(replica).await?["role"] == "leader");
    }
    assert_eq!(leaders, 1);
    Ok(())
}

/// The election keys (one per campaigning replica, named by its lease).
async fn election_keys(etcd: &mut etcd_client::Client) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut prefix = eps_core::INTERNAL_PREFIX.to_vec();
    prefix.extend_from_slice(b"test/election/");
    let response = etcd
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    Ok(response.kvs().iter().map(|kv| kv.key().to_vec()).collect())
}

/// A compaction past the revision a standby watches its predecessor from
/// must not make it campaign again: it keeps its key, lease and place.
#[tokio::test]
async fn standbys_keep_their_place_across_a_compaction() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let replicas = three(&world).await?;
    let leader = leader_of(&replicas).await?;
    let mut etcd = world.etcd.client().await?;
    let before = election_keys(&mut etcd).await?;
    assert_eq!(before.len(), 3, "one election key per replica");
    for i in 0..20 {
        etcd.put(format!("/s/c{i}"), "x", None).await?;
    }
    world.etcd.compact(world.etcd.revision().await?).await?;
    // Longer than a standby's periodic refresh, after which it watches its
    // predecessor again from a compacted revision.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        election_keys(&mut etcd).await?,
        before,
        "standbys campaigned again after a compaction"
    );
    assert_eq!(leader_of(&replicas).await?, leader);
    Ok(())
}

/// A standby's own election key deleted by hand while its lease lives (an
/// operator's mistake, an etcd restore): it notices, campaigns again with a
/// new key, still takes over when the leader dies, and still honours
/// SIGTERM.
#[tokio::test]
async fn a_standby_whose_election_key_vanishes_campaigns_again() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut replicas = vec![world.start("n1").await?];
    leader_of(&replicas).await?;
    replicas.push(world.start("n2").await?);
    let mut etcd = world.etcd.client().await?;
    let keys = eps_harness::wait_for("two election keys", Duration::from_secs(10), || {
        let mut etcd = etcd.clone();
        async move {
            let keys = election_keys(&mut etcd).await?;
            Ok((keys.len() == 2).then_some(keys))
        }
    })
    .await?;
    // The younger key (higher create revision) is the standby's.
    let mut newest: Option<(Vec<u8>, i64)> = None;
    for key in &keys {
        let response = etcd.get(key.clone(), None).await?;
        if let Some(kv) = response.kvs().first()
            && newest
                .as_ref()
                .is_none_or(|(_, rev)| kv.create_revision() > *rev)
        {
            newest = Some((key.clone(), kv.create_revision()));
        }
    }
    let (standby_key, _) = newest.ok_or_else(|| anyhow::anyhow!("no election key"))?;
    etcd.delete(standby_key.clone(), None).await?;
    // It stands again with a key of its own.
    eps_harness::wait_for(
        "the standby's new election key",
        Duration::from_secs(10),
        || {
            let mut etcd = etcd.clone();
            let standby_key = standby_key.clone();
            async move {
                let keys = election_keys(&mut etcd).await?;
                Ok((keys.len() == 2 && !keys.contains(&standby_key)).then_some(()))
            }
        },
    )
    .await?;
    // It takes over when the leader dies ...
    replicas[0].kill();
    let status = eps_harness::wait_for("n2 leading", TTL * 4, || {
        let replica = &replicas[1];
        async move { Ok((status(replica).await?["role"] == "leader").then_some(())) }
    })
    .await;
    status?;
    // ... and stops on SIGTERM.
    let exit = replicas[1].terminate(Duration::from_secs(10)).await?;
    assert_eq!(exit.code(), Some(0));
    Ok(())
}
