//! newest-wins by when each change was made: the revision clock the
//! replicas keep (`docs/clocks.md`) times etcd's side of a conflict, also
//! across a failover and while no replica runs.

mod support;

use std::time::Duration;

use eps_harness::Service;
use support::*;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/c/"
table = "kv_c"
policy = "newest-wins"
"#;

/// One conflict row as the tests read it.
#[derive(Debug)]
struct Conflict {
    winner: Option<String>,
    decided_by_tie: bool,
    /// Seconds since the epoch, PostgreSQL's clock.
    pg_changed_at: f64,
    etcd_changed_after: Option<f64>,
    etcd_changed_by: Option<f64>,
    pg_committed_by: Option<f64>,
}

async fn conflict_of(pg: &tokio_postgres::Client, key: &str) -> anyhow::Result<Conflict> {
    let row = pg
        .query_one(
            "SELECT convert_from(key, 'UTF8'), winner, decided_by_tie, \
                    extract(epoch FROM pg_changed_at)::float8, \
                    extract(epoch FROM etcd_changed_after)::float8, \
                    extract(epoch FROM etcd_changed_by)::float8, \
                    extract(epoch FROM pg_committed_by)::float8 \
             FROM conflicts WHERE key = convert_to($1, 'UTF8')",
            &[&key],
        )
        .await?;
    Ok(Conflict {
        winner: row.get(1),
        decided_by_tie: row.get(2),
        pg_changed_at: row.get(3),
        etcd_changed_after: row.get(4),
        etcd_changed_by: row.get(5),
        pg_committed_by: row.get(6),
    })
}

/// PostgreSQL's clock, seconds since the epoch.
async fn pg_now(pg: &tokio_postgres::Client) -> anyhow::Result<f64> {
    Ok(pg
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .get(0))
}

async fn sql_put(pg: &tokio_postgres::Client, key: &str, value: &str) -> anyhow::Result<()> {
    let updated = pg
        .execute(
            "UPDATE kv_c_text SET value = $2 WHERE key = $1",
            &[&key, &value],
        )
        .await?;
    anyhow::ensure!(updated == 1, "{key} has no row");
    Ok(())
}

/// Seeds `/c/a` and `/c/b` and waits until the mirror has them.
async fn seed(world: &World) -> anyhow::Result<()> {
    let mut etcd = world.etcd_client().await?;
    for key in ["/c/a", "/c/b"] {
        etcd.put(key, "init", None).await?;
    }
    wait_synced(world).await?;
    wait_converged(world, "kv_c", b"/c/", Duration::from_secs(10)).await?;
    Ok(())
}

async fn wait_conflicts(pg: &tokio_postgres::Client, n: i64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(
        pg,
        "SELECT count(*) FROM conflicts WHERE status = 'resolved'",
    )
    .await?
        < n
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} conflicts settled within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The leader is paused past its lease while both sides write the same
/// keys: an etcd write at t and an SQL write at t+3 s (key a), an SQL write
/// at t and an etcd write at t+3 s (key b). The replica that takes over
/// finds the conflicts seconds later; the standbys' samples of etcd's
/// revision tell when etcd's writes were made, so the later write wins
/// each time, and neither is a tie.
#[tokio::test]
async fn newest_wins_keeps_the_later_write_across_a_failover() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    // Long enough for both writes to land before a standby takes over.
    world
        .env
        .insert("ETCD_PG_SYNC__CLUSTER__LEASE_TTL_SECS".into(), "8".into());
    let mut replicas: Vec<Service> = Vec::new();
    for node in ["n1", "n2", "n3"] {
        replicas.push(world.start(node).await?);
    }
    let refs: Vec<&Service> = replicas.iter().collect();
    let leader = wait_leader(&refs, Duration::from_secs(20)).await?;
    seed(&world).await?;
    let pg = world.pg().await?;
    let mut etcd = world.etcd_client().await?;
    // A couple of samples before the writes.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    replicas[leader].pause();
    let t = pg_now(&pg).await?;
    etcd.put("/c/a", "etcd at t", None).await?;
    sql_put(&pg, "/c/b", "pg at t").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sql_put(&pg, "/c/a", "pg at t+3").await?;
    etcd.put("/c/b", "etcd at t+3", None).await?;
    let written = pg_now(&pg).await? - t;
    assert!(
        written < 6.0,
        "both writes must precede the failover ({written:.1} s)"
    );

    wait_conflicts(&pg, 2).await?;
    let state = wait_converged(&world, "kv_c", b"/c/", Duration::from_secs(20)).await?;
    replicas[leader].resume();
    let a = conflict_of(&pg, "/c/a").await?;
    let b = conflict_of(&pg, "/c/b").await?;
    println!("{a:?}\n{b:?}");
    assert_eq!(
        state.get(b"/c/a".as_slice()).map(Vec::as_slice),
        Some(&b"pg at t+3"[..]),
        "the SQL write 3 s after etcd's wins"
    );
    assert_eq!(
        state.get(b"/c/b".as_slice()).map(Vec::as_slice),
        Some(&b"etcd at t+3"[..]),
        "the etcd write 3 s after the SQL one wins"
    );
    assert_eq!(a.winner.as_deref(), Some("pg"));
    assert_eq!(b.winner.as_deref(), Some("etcd"));
    for c in [&a, &b] {
        assert!(!c.decided_by_tie, "{c:?}");
        let (after, by) = (
            c.etcd_changed_after.expect("a sample before the write"),
            c.etcd_changed_by.expect("a sample after the write"),
        );
        // The standbys kept sampling while the leader was paused.
        assert!(by - after < 2.0, "window of about a second: {c:?}");
    }
    // The windows hold the writes' times (t and t+3, PostgreSQL's clock).
    assert!(
        a.etcd_changed_after.unwrap_or(f64::MAX) <= t + 0.5
            && a.etcd_changed_by.unwrap_or(0.0) >= t
    );
    assert!(a.pg_changed_at > a.etcd_changed_by.unwrap_or(f64::MAX));
    assert!(b.pg_changed_at <= b.etcd_changed_after.unwrap_or(f64::MIN));
    Ok(())
}

/// With every replica stopped, nothing samples etcd: its change is only
/// known to lie between the last sample before the stop and the first
/// after the start, the SQL write made meanwhile falls inside, and the
/// configured tie rule (here `pg`) decides; the conflict row says so.
#[tokio::test]
async fn with_every_replica_stopped_the_tie_rule_decides_and_the_row_says_so() -> anyhow::Result<()>
{
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__NEWEST_WINS_TIE".into(), "pg".into());
    let mut replica = world.start("n1").await?;
    wait_leader(&[&replica], Duration::from_secs(20)).await?;
    seed(&world).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replica.terminate(Duration::from_secs(15)).await?;
    let pg = world.pg().await?;
    let mut etcd = world.etcd_client().await?;
    let stopped = pg_now(&pg).await?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    sql_put(&pg, "/c/a", "pg, nobody watching").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.put("/c/a", "etcd, nobody watching", None).await?;
    let etcd_written = pg_now(&pg).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    replica.restart()?;
    wait_conflicts(&pg, 1).await?;
    let state = wait_converged(&world, "kv_c", b"/c/", Duration::from_secs(20)).await?;
    let a = conflict_of(&pg, "/c/a").await?;
    println!("{a:?}");
    assert!(a.decided_by_tie, "{a:?}");
    assert_eq!(a.winner.as_deref(), Some("pg"), "the tie rule decides");
    assert_eq!(
        state.get(b"/c/a".as_slice()).map(Vec::as_slice),
        Some(&b"pg, nobody watching"[..])
    );
    // The window spans the outage: from before the stop to after the write.
    let after = a.etcd_changed_after.expect("samples before the stop");
    let by = a.etcd_changed_by.expect("bounded by the restart");
    assert!(after <= stopped, "{a:?}");
    assert!(by >= etcd_written, "{a:?}");
    assert!(a.pg_changed_at > after && a.pg_changed_at <= by, "{a:?}");
    Ok(())
}

/// A user's transaction that wrote before etcd's change and committed after
/// it cannot be called older than it: its change took effect at the commit.
/// The conflict (found once the commit frees the row) is a tie, which the
/// rule configured here (`pg`) gives to the user's write.
#[tokio::test]
async fn a_transaction_open_across_etcds_change_is_not_older_than_it() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    world
        .env
        .insert("ETCD_PG_SYNC__SYNC__NEWEST_WINS_TIE".into(), "pg".into());
    let replica = world.start("n1").await?;
    wait_leader(&[&replica], Duration::from_secs(20)).await?;
    seed(&world).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut user = world.db.client().await?;
    let pg = world.pg().await?;
    let mut etcd = world.etcd_client().await?;

    let tx = user.transaction().await?;
    tx.execute(
        "UPDATE etcd_sync.kv_c_text SET value = 'pg, committed late' WHERE key = '/c/a'",
        &[],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.put("/c/a", "etcd, while the user's transaction was open", None)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tx.commit().await?;

    wait_conflicts(&pg, 1).await?;
    let state = wait_converged(&world, "kv_c", b"/c/", Duration::from_secs(20)).await?;
    let a = conflict_of(&pg, "/c/a").await?;
    println!("{a:?}");
    assert!(a.decided_by_tie, "written before, committed after: {a:?}");
    assert_eq!(a.winner.as_deref(), Some("pg"));
    assert_eq!(
        state.get(b"/c/a".as_slice()).map(Vec::as_slice),
        Some(&b"pg, committed late"[..])
    );
    let committed_by = a.pg_committed_by.expect("the commit is stamped");
    assert!(committed_by - a.pg_changed_at >= 3.5, "{a:?}");
    Ok(())
}
