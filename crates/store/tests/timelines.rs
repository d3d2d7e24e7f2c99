//! Following a new etcd timeline (an etcd restored from a backup): every
//! value of PostgreSQL's the resync replaces is recorded once as rolled
//! back, and nothing else is — not etcd's own values on a retried resync,
//! not values deferred behind a user's open transaction and applied later.
#![allow(clippy::unwrap_used)] // test setup

mod common;

use std::time::Instant;

use eps_core::model::{KeyMeta, KeyValue, Origin};
use eps_core::policy::Side;
use eps_core::reconcile::KeyInput;
use eps_store::{ApplyRequest, Fence, KeyInputs, Store};

const MAPPING: &str = "[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"etcd-wins\"\n";

/// A migrated store with one mapping, term 1 claimed, and `/a = old` in the
/// mirror at revision 5 of the first timeline.
async fn store_with_one_key() -> anyhow::Result<(
    Store,
    eps_harness::TestDatabase,
    Fence,
    tokio_postgres::Client,
)> {
    let (store, db) = common::store_with(MAPPING).await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    common::insert_as_service(&admin, "/a", "old", 5).await?;
    Ok((store, db, fence, admin))
}

/// A resync's reading of `key` at `revision` on the new timeline.
fn resynced(key: &str, value: &str, revision: i64) -> Vec<KeyInputs> {
    vec![KeyInputs {
        key: key.as_bytes().to_vec(),
        inputs: vec![KeyInput::Observed {
            state: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                meta: KeyMeta {
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                    lease: 0,
                },
            }),
            revision,
            origin: Origin::Resync,
        }],
    }]
}

async fn timeline_resync(
    store: &Store,
    fence: &Fence,
    keys: &[KeyInputs],
) -> anyhow::Result<eps_store::ApplyReport> {
    let mut request = ApplyRequest::new(fence, keys, Instant::now());
    request.record_rollbacks = true;
    Ok(store.apply(&request).await?)
}

async fn timeline_conflicts(admin: &tokio_postgres::Client) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(admin
        .query(
            "SELECT pg_value FROM etcd_sync.conflicts WHERE reason = 'timeline-change' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get::<_, Option<Vec<u8>>>(0).unwrap_or_default())
        .collect())
}

/// A resync interrupted after it wrote a key, and run again once etcd has
/// changed that key, must not take its own earlier write for a value of
/// PostgreSQL's that the new timeline rolls back.
#[tokio::test]
async fn a_retried_timeline_resync_records_each_rollback_once() -> anyhow::Result<()> {
    let (store, _db, fence, admin) = store_with_one_key().await?;
    store
        .begin_timeline(&fence, 7, &serde_json::json!({"reason": "test"}))
        .await?;
    let first = timeline_resync(&store, &fence, &resynced("/a", "restored", 3)).await?;
    assert_eq!(first.rolled_back, 1);
    let again = timeline_resync(&store, &fence, &resynced("/a", "changed since", 4)).await?;
    assert_eq!(again.rolled_back, 0, "etcd's own value is no rollback");
    assert_eq!(timeline_conflicts(&admin).await?, vec![b"old".to_vec()]);
    Ok(())
}

/// A key whose row a user's open transaction holds during the timeline
/// resync is deferred; when it is applied later (by the watcher, which
/// records no rollbacks of its own) the old value it replaces is still
/// recorded.
#[tokio::test]
async fn a_rollback_deferred_behind_an_open_transaction_is_recorded() -> anyhow::Result<()> {
    let (store, db, fence, admin) = store_with_one_key().await?;
    store
        .begin_timeline(&fence, 7, &serde_json::json!({"reason": "test"}))
        .await?;
    let holder = db.client().await?;
    holder
        .batch_execute("BEGIN; SELECT * FROM etcd_sync.kv WHERE key = '/a' FOR UPDATE")
        .await?;
    let held = timeline_resync(&store, &fence, &resynced("/a", "restored", 3)).await?;
    assert_eq!(held.deferred_keys, 1);
    holder.batch_execute("COMMIT").await?;

    // The watcher's next batch drains it.
    let later = resynced("/a", "restored", 3);
    let drained = store
        .apply(&ApplyRequest::new(&fence, &later, Instant::now()))
        .await?;
    assert_eq!(drained.drained_keys, 1);
    assert_eq!(drained.rolled_back, 1);
    assert_eq!(timeline_conflicts(&admin).await?, vec![b"old".to_vec()]);
    Ok(())
}

/// A change queued in PostgreSQL when the new timeline is followed is
/// settled by the mapping's policy; the conflict says why it arose.
#[tokio::test]
async fn a_queued_change_settled_on_a_new_timeline_says_so() -> anyhow::Result<()> {
    let (store, _db, fence, admin) = store_with_one_key().await?;
    admin
        .execute(
            "UPDATE etcd_sync.kv SET value = 'from sql' WHERE key = '/a'",
            &[],
        )
        .await?;
    store
        .begin_timeline(&fence, 7, &serde_json::json!({"reason": "test"}))
        .await?;
    timeline_resync(&store, &fence, &resynced("/a", "restored", 3)).await?;
    assert_eq!(
        timeline_conflicts(&admin).await?,
        vec![b"from sql".to_vec()]
    );
    Ok(())
}

/// An operator's answer to a held timeline: the first one stands (a second
/// operator's other answer is refused, not swapped in under the leader),
/// and `pg` makes every rollback of the new timeline — also one deferred
/// behind a user's transaction and recorded after the resync — a request
/// to put the value back.
#[tokio::test]
async fn the_first_answer_to_a_held_timeline_stands_and_pg_requests_every_rollback()
-> anyhow::Result<()> {
    let (store, db, fence, admin) = store_with_one_key().await?;
    assert!(
        store.decide_timeline(Side::Pg).await?.is_none(),
        "nothing held"
    );
    let evidence = serde_json::json!({"reason": "test"});
    assert!(store.hold_timeline(&fence, &evidence).await?);
    assert!(!store.hold_timeline(&fence, &evidence).await?, "held once");
    let (_, first) = store.decide_timeline(Side::Pg).await?.expect("held");
    assert_eq!(first, Side::Pg);
    let (_, second) = store.decide_timeline(Side::Etcd).await?.expect("held");
    assert_eq!(second, Side::Pg, "the first answer stands");
    store.begin_timeline(&fence, 7, &evidence).await?;
    let state = store.state().await?;
    assert!(state.timeline_hold.is_none() && state.timeline_decision.is_none());

    let holder = db.client().await?;
    holder
        .batch_execute("BEGIN; SELECT * FROM etcd_sync.kv WHERE key = '/a' FOR UPDATE")
        .await?;
    let held = timeline_resync(&store, &fence, &resynced("/a", "restored", 3)).await?;
    assert_eq!(held.deferred_keys, 1);
    holder.batch_execute("COMMIT").await?;
    let later = resynced("/a", "restored", 3);
    let drained = store
        .apply(&ApplyRequest::new(&fence, &later, Instant::now()))
        .await?;
    assert_eq!(drained.rolled_back, 1);
    let requested: i64 = admin
        .query_one(
            "SELECT count(*) FROM etcd_sync.conflicts \
             WHERE reason = 'timeline-change' AND requested_take = 'pg'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(requested, 1, "the deferred rollback is a request too");
    Ok(())
}
