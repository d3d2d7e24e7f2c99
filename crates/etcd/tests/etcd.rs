//! The etcd adapter against a real etcd.

use eps_core::config::EtcdConfig;
use eps_core::model::Op;
use eps_etcd::txn::compare_and_swap;
use eps_etcd::{CasOutcome, CasWrite, EtcdClient, LeaderFence, WatchItem, WatchSession};
use eps_harness::Etcd;

async fn client(etcd: &Etcd) -> anyhow::Result<EtcdClient> {
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..EtcdConfig::default()
    };
    Ok(EtcdClient::connect(&config).await?)
}

#[tokio::test]
async fn compare_and_swap_applies_reports_conflicts_and_fences() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = client(&etcd).await?;
    let lease = client.grant_lease(10).await?;
    let term = client
        .create_if_absent(b"__etcd_pg_sync/t/election/1", b"n1", lease)
        .await?;
    let fence = LeaderFence {
        key: b"__etcd_pg_sync/t/election/1".to_vec(),
        term,
    };

    // Creating keys that must not exist (expect 0), in one txn.
    let writes = vec![
        CasWrite {
            key: b"a".to_vec(),
            value: Some(b"1".to_vec()),
            expect_mod_revision: 0,
            lease: 0,
        },
        CasWrite {
            key: b"b".to_vec(),
            value: Some(vec![0, 255]),
            expect_mod_revision: 0,
            lease: 0,
        },
    ];
    let CasOutcome::Applied {
        revision,
        noop_deletes,
    } = compare_and_swap(&client, Some(&fence), &writes).await?
    else {
        panic!("expected applied");
    };
    assert!(noop_deletes.is_empty());
    let (a, _) = client.get(b"a").await?;
    assert_eq!(a.unwrap().meta.mod_revision, revision);

    // A stale base is a conflict, and nothing of the txn is applied.
    let writes = vec![
        CasWrite {
            key: b"a".to_vec(),
            value: Some(b"2".to_vec()),
            expect_mod_revision: revision,
            lease: 0,
        },
        CasWrite {
            key: b"b".to_vec(),
            value: Some(b"x".to_vec()),
            expect_mod_revision: revision - 1,
            lease: 0,
        },
    ];
    let CasOutcome::Conflicts { conflicts, .. } =
        compare_and_swap(&client, Some(&fence), &writes).await?
    else {
        panic!("expected conflicts");
    };
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].0, 1);
    assert_eq!(conflicts[0].1.as_ref().unwrap().value, vec![0, 255]);
    assert_eq!(client.get(b"a").await?.0.unwrap().value, b"1");

    // Deleting an absent key is applied but leaves no event.
    let writes = vec![CasWrite {
        key: b"gone".to_vec(),
        value: None,
        expect_mod_revision: 0,
        lease: 0,
    }];
    let CasOutcome::Applied { noop_deletes, .. } =
        compare_and_swap(&client, Some(&fence), &writes).await?
    else {
        panic!("expected applied");
    };
    assert_eq!(noop_deletes, vec![0]);

    // Once the leader key is gone, every write is fenced.
    client.revoke_lease(lease).await?;
    let writes = vec![CasWrite {
        key: b"a".to_vec(),
        value: Some(b"3".to_vec()),
        expect_mod_revision: revision,
        lease: 0,
    }];
    assert_eq!(
        compare_and_swap(&client, Some(&fence), &writes).await?,
        CasOutcome::Fenced
    );
    assert_eq!(client.get(b"a").await?.0.unwrap().value, b"1");
    Ok(())
}

#[tokio::test]
async fn watch_delivers_events_progress_and_compaction() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = client(&etcd).await?;
    let start = client.current_revision().await?;
    client.put(b"/w/a", b"1").await?;
    client.put(b"/w/a", b"2").await?;
    client.delete(b"/w/a").await?;
    client.put(b"/other", b"x").await?;

    let mut session = WatchSession::start(&client, b"/w/", Some(b"/w0"), start + 1).await?;
    let mut events = Vec::new();
    while events.len() < 3 {
        match session.next().await?.expect("stream open") {
            WatchItem::Events(batch) => events.extend(batch),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(events[0].op, Op::Put);
    assert_eq!(events[1].prev.as_ref().unwrap().value, b"1");
    assert_eq!(events[2].op, Op::Delete);
    assert_eq!(events[2].prev_revision(), events[1].revision);

    session.request_progress().await?;
    let current = client.current_revision().await?;
    let ordered = client.progress_requests_ordered().await;
    // An etcd that answers progress requests out of order (before 3.4.31
    // and 3.5.13) is only heard from; its periodic notification (every
    // 250 ms in the harness) then tells the progress.
    let mut alive = 0;
    loop {
        match session.next().await? {
            Some(WatchItem::Progress(revision)) => {
                assert_eq!(revision, current);
                break;
            }
            Some(WatchItem::Alive) => alive += 1,
            other => panic!("expected progress, got {other:?}"),
        }
    }
    assert_eq!(
        alive > 0,
        !ordered,
        "answers to requests taken as progress only when ordered"
    );

    etcd.compact(current).await?;
    let mut session = WatchSession::start(&client, b"/w/", Some(b"/w0"), start + 1).await?;
    match session.next().await? {
        Some(WatchItem::Compacted { compact_revision }) => assert_eq!(compact_revision, current),
        other => panic!("expected compacted, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn range_pages_walk_a_prefix_at_one_revision() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = client(&etcd).await?;
    for i in 0..25u8 {
        client.put(&[b'/', b'p', b'/', i], &[i]).await?;
    }
    let first = client.range_page(b"/p/", Some(b"/p0"), 0, 10).await?;
    assert!(first.more);
    // A write after the first page is invisible at the page's revision.
    client.put(b"/p/\x05", b"changed").await?;
    let mut all = first.kvs;
    let mut next = eps_core::keys::successor(&all.last().unwrap().key);
    loop {
        let page = client
            .range_page(&next, Some(b"/p0"), first.revision, 10)
            .await?;
        all.extend(page.kvs);
        if !page.more {
            break;
        }
        next = eps_core::keys::successor(&all.last().unwrap().key);
    }
    assert_eq!(all.len(), 25);
    assert_eq!(all[5].value, vec![5]);
    Ok(())
}

/// etcd issuing JWT tokens that expire after 2 s (`--auth-token jwt`,
/// common in production): the client re-authenticates by itself, so a
/// replica is not locked out with "invalid auth token" after a quiet spell.
#[tokio::test]
async fn an_expired_auth_token_is_renewed_without_the_operator() -> anyhow::Result<()> {
    use std::time::Duration;
    let keys = tempfile::tempdir()?;
    let pair = rcgen::KeyPair::generate()?; // ECDSA P-256: etcd's ES256
    std::fs::write(keys.path().join("jwt.pem"), pair.serialize_pem())?;
    std::fs::write(keys.path().join("jwt.pub"), pair.public_key_pem())?;
    let etcd = Etcd::start_with(eps_harness::etcd::EtcdOptions {
        extra_args: vec![
            "--auth-token".into(),
            format!(
                "jwt,pub-key={},priv-key={},sign-method=ES256,ttl=2s",
                keys.path().join("jwt.pub").display(),
                keys.path().join("jwt.pem").display()
            ),
        ],
        ..Default::default()
    })
    .await?;
    let mut root = etcd.client().await?;
    root.user_add("root", "root-pw", None).await?;
    root.user_grant_role("root", "root").await?;
    root.auth_enable().await?;

    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        username: Some("root".into()),
        password: Some(eps_core::config::Secret::new("root-pw")),
        ..EtcdConfig::default()
    };
    let client = EtcdClient::connect(&config).await?;
    client.get(b"/k").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .get(b"/k")
        .await
        .map_err(|e| anyhow::anyhow!("after the token expired: {e}"))?;
    Ok(())
}
