//! Interleavings of users' transactions with the service's own, forced
//! deterministically with row locks held by a test session: each must end
//! with the stores agreeing or with the difference still queued (an outbox
//! row, a conflict), never silently different.
#![allow(clippy::unwrap_used)] // test setup

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eps_core::model::{EtcdEvent, KeyMeta, Op};
use eps_core::reconcile::KeyInput;
use eps_store::{ApplyRequest, Fence, KeyInputs, Store};

/// A migrated store (see [`common::store_with`]).
async fn store_with(toml_extra: &str) -> anyhow::Result<(Store, eps_harness::TestDatabase)> {
    let (store, db) = common::store_with(toml_extra).await?;
    store.migrate().await?;
    Ok((store, db))
}

fn created(key: &str, value: &str, revision: i64) -> KeyInputs {
    common::put_event(key, value, revision, revision, 1)
}

fn whole_table() -> eps_store::mirror::PageRequest<'static> {
    eps_store::mirror::PageRequest {
        start: b"",
        end: None,
        after: None,
        rows: 100,
        bytes: 1 << 20,
    }
}

/// Waits until a session of the service waits for a lock.
async fn wait_until_blocked(admin: &tokio_postgres::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'etcd-pg-sync' AND wait_event_type = 'Lock' \
                   AND datname = current_database()",
                &[],
            )
            .await?
            .get(0);
        if waiting > 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the apply never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The apply locks its keys' rows, then reads their outbox rows. A key that
/// was absent when the rows were locked and that a user inserts before the
/// outbox is read must not be planned with that insert: etcd winning would
/// consume it while the mirror keeps the user's row (insert-if-absent), and
/// etcd would keep its own value forever. The apply is held between the two
/// statements by a lock on a deferred input it reads there.
#[tokio::test]
async fn a_row_inserted_between_the_lock_and_the_outbox_read_is_not_consumed_unseen()
-> anyhow::Result<()> {
    let (store, db) =
        store_with("[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"etcd-wins\"\n")
            .await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    common::insert_as_service(&admin, "/a", "a0", 3).await?;
    // /a's row is held once, so an input of it is deferred ...
    let holder = db.client().await?;
    holder
        .batch_execute("BEGIN; SELECT * FROM etcd_sync.kv WHERE key = '/a' FOR UPDATE")
        .await?;
    let first = vec![created("/a", "a1", 10)];
    let report = store
        .apply(&ApplyRequest::new(&fence, &first, Instant::now()))
        .await?;
    assert_eq!(report.deferred_keys, 1);
    holder.batch_execute("COMMIT").await?;
    // ... and that deferred input is held now: the next apply waits for it
    // after locking the rows and before reading the outbox.
    holder
        .batch_execute("BEGIN; SELECT * FROM etcd_sync.deferred_inputs FOR UPDATE")
        .await?;
    let apply = tokio::spawn({
        let store = store.clone();
        let fence = fence.clone();
        async move {
            let keys = vec![created("/a", "a2", 20), created("/k", "from-etcd", 20)];
            let request = ApplyRequest::new(&fence, &keys, Instant::now());
            store.apply(&request).await
        }
    });
    wait_until_blocked(&admin).await?;
    let user = db.client().await?;
    user.execute(
        "INSERT INTO etcd_sync.kv (key, value) VALUES ('/k', 'from-user')",
        &[],
    )
    .await?;
    holder.batch_execute("COMMIT").await?;
    apply.await??;

    let mirror: Vec<u8> = admin
        .query_one("SELECT value FROM etcd_sync.kv WHERE key = '/k'", &[])
        .await?
        .get(0);
    let queued: i64 = admin
        .query_one(
            "SELECT count(*) FROM etcd_sync.outbox WHERE key = '/k'",
            &[],
        )
        .await?
        .get(0);
    assert!(
        mirror == b"from-etcd" || queued == 1,
        "PostgreSQL keeps {:?}, etcd has \"from-etcd\", and nothing is queued",
        String::from_utf8_lossy(&mirror)
    );
    Ok(())
}

/// `restore-etcd` reads a page of mirror rows, writes them to the new etcd
/// at `revision`, then marks them restored. A user change committed between
/// the read and the mark is not in etcd: it must stay queued, on top of the
/// restored revision, instead of being consumed with the restored ones.
#[tokio::test]
async fn a_change_committed_during_restore_stays_queued_on_the_restored_revision()
-> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let fence = Fence {
        term: 1,
        node: "restore-etcd@n1".into(),
    };
    let admin = db.client().await?;
    admin
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('/a', 'old-cluster', 7, 9, 2, 'etcd'); COMMIT; \
             UPDATE etcd_sync.kv SET value = 'queued-before' WHERE key = '/a';",
        )
        .await?;
    let table = eps_core::ident::Ident::parse("kv").unwrap();
    let page = store.mirror_page_at_snapshot(&table, whole_table()).await?;
    assert_eq!(page.rows[0].value, b"queued-before");
    // ... the page is written to the new etcd at revision 2, and meanwhile:
    admin
        .batch_execute("UPDATE etcd_sync.kv SET value = 'during-restore' WHERE key = '/a'")
        .await?;
    let restored: Vec<(&[u8], i64, i64)> = page
        .rows
        .iter()
        .map(|r| (r.key.as_slice(), r.mod_revision, 0))
        .collect();
    let consumed = store
        .mark_restored(&fence, &table, &restored, 2, &page.snapshot)
        .await?;
    assert_eq!(consumed, 1, "the change the restored value holds");
    let queued: Vec<(Vec<u8>, i64)> = admin
        .query(
            "SELECT value, base_revision FROM etcd_sync.outbox ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        queued,
        vec![(b"during-restore".to_vec(), 2)],
        "the later change waits for etcd, based on the restored revision"
    );
    Ok(())
}

fn deleted(key: &str, revision: i64, prev: (i64, &str)) -> KeyInputs {
    KeyInputs {
        key: key.as_bytes().to_vec(),
        inputs: vec![KeyInput::Event(EtcdEvent {
            op: Op::Delete,
            key: key.as_bytes().to_vec(),
            revision,
            value: Vec::new(),
            meta: KeyMeta::default(),
            prev: Some(eps_core::model::PrevKv {
                value: prev.1.as_bytes().to_vec(),
                mod_revision: prev.0,
            }),
        })],
    }
}

/// `verify --repair` found `/k` missing in PostgreSQL at etcd revision 10
/// and repairs it from etcd's state read then. Meanwhile etcd deleted the
/// key (revision 11) and the watcher applied that: the repair must not
/// bring the old value back into PostgreSQL.
#[tokio::test]
async fn a_repair_from_etcd_does_not_resurrect_a_key_deleted_since_the_diff() -> anyhow::Result<()>
{
    let (store, db) = store_with("").await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let fence = Fence {
        term: 1,
        node: "verify@n1".into(),
    };
    let admin = db.client().await?;
    // The diff saw etcd's /k = v at revision 8 and no row.
    let etcd_state = eps_core::model::KeyValue {
        key: b"/k".to_vec(),
        value: b"v".to_vec(),
        meta: KeyMeta {
            create_revision: 8,
            mod_revision: 8,
            version: 1,
            lease: 0,
        },
    };
    // The watcher applies the put at 8 and the delete at 11.
    for keys in [
        vec![created("/k", "v", 8)],
        vec![deleted("/k", 11, (8, "v"))],
    ] {
        store
            .apply(&ApplyRequest::new(&fence, &keys, Instant::now()))
            .await?;
    }
    let seen = HashMap::from([(b"/k".to_vec(), None)]);
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    let keys = [KeyInputs {
        key: b"/k".to_vec(),
        inputs: vec![KeyInput::Observed {
            state: Some(etcd_state),
            revision: 10,
            origin: eps_core::model::Origin::Resync,
        }],
    }];
    let mut request = ApplyRequest::new(&fence, &keys, Instant::now());
    request.repair = Some(eps_store::Repair {
        revision: 10,
        since,
        seen: &seen,
    });
    let report = store.apply(&request).await?;
    assert_eq!(report.repair_skipped, vec![b"/k".to_vec()]);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM etcd_sync.kv WHERE key = '/k'", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0, "etcd no longer has /k; PostgreSQL must not either");
    Ok(())
}

/// `verify --repair` under `pg-wins` found `/k` only in PostgreSQL and
/// queues the row's value for etcd. Meanwhile the user deleted the row: the
/// repair must not write the old value back (into both stores).
#[tokio::test]
async fn a_repair_from_postgres_does_not_resurrect_a_row_deleted_since_the_diff()
-> anyhow::Result<()> {
    let (store, db) =
        store_with("[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"pg-wins\"\n").await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let fence = Fence {
        term: 1,
        node: "verify@n1".into(),
    };
    let admin = db.client().await?;
    admin
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('/k', 'drifted', 4, 4, 1, 'pg'); COMMIT;",
        )
        .await?;
    let table = eps_core::ident::Ident::parse("kv").unwrap();
    let seen = store
        .mirror_page(&table, whole_table())
        .await?
        .rows
        .pop()
        .unwrap();
    // The user deletes the row after the diff read it.
    admin
        .batch_execute("DELETE FROM etcd_sync.kv WHERE key = '/k'")
        .await?;
    let queued = store
        .enqueue_change(&fence, &table, b"/k", Some(b"drifted"), None, Some(&seen))
        .await?;
    assert!(!queued, "the row changed since the diff: not repaired");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM etcd_sync.kv WHERE key = '/k'", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0, "the deleted row came back");
    let outbox: Vec<String> = admin
        .query("SELECT op FROM etcd_sync.outbox ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        outbox,
        vec!["delete"],
        "only the user's delete goes to etcd"
    );
    Ok(())
}

/// A user's transaction deletes a row the apply is about to update with the
/// echo of that user's own earlier change. The apply does not wait for it:
/// the echo is deferred, and applied once the transaction committed. The
/// delete was made on top of that change: it must be rebased onto the
/// echo's revision, and the row must not come back.
#[tokio::test]
async fn a_row_deleted_while_the_apply_waits_for_its_lock_stays_deleted() -> anyhow::Result<()> {
    let (store, db) =
        store_with("[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"etcd-wins\"\n")
            .await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let admin = db.client().await?;
    admin
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('/k', 'v0', 10, 10, 1, 'etcd'); COMMIT; \
             UPDATE etcd_sync.kv SET value = 'a' WHERE key = '/k';",
        )
        .await?;
    let holder = db.client().await?;
    holder
        .batch_execute("BEGIN; DELETE FROM etcd_sync.kv WHERE key = '/k'")
        .await?;
    let fence = Fence {
        term: 1,
        node: "n1".into(),
    };
    // The echo of the user's update to 'a'.
    let keys = vec![KeyInputs {
        key: b"/k".to_vec(),
        inputs: vec![KeyInput::Event(EtcdEvent {
            op: Op::Put,
            key: b"/k".to_vec(),
            revision: 20,
            value: b"a".to_vec(),
            meta: KeyMeta {
                create_revision: 10,
                mod_revision: 20,
                version: 2,
                lease: 0,
            },
            prev: Some(eps_core::model::PrevKv {
                value: b"v0".to_vec(),
                mod_revision: 10,
            }),
        })],
    }];
    let held = store
        .apply(&ApplyRequest::new(&fence, &keys, Instant::now()))
        .await?;
    assert_eq!(held.deferred_keys, 1, "the held row is not waited for");
    holder.batch_execute("COMMIT").await?;
    // The watcher's retry of the key's deferred inputs.
    let retry = vec![KeyInputs {
        key: b"/k".to_vec(),
        inputs: Vec::new(),
    }];
    let drained = store
        .apply(&ApplyRequest::new(&fence, &retry, Instant::now()))
        .await?;
    assert_eq!(drained.drained_keys, 1);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM etcd_sync.kv WHERE key = '/k'", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0, "the user's delete was undone in PostgreSQL");
    let queued: Vec<(String, i64)> = admin
        .query(
            "SELECT op, base_revision FROM etcd_sync.outbox ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        queued,
        vec![("delete".to_string(), 20)],
        "the delete goes to etcd on top of the echoed revision"
    );
    Ok(())
}

/// `verify --repair` (PostgreSQL wins) found `/k` only in etcd and deletes
/// it there, while a user's transaction is inserting `/k`. The user's row
/// commits after the repair looked: it must not be queued behind the
/// repair's delete (which would then delete the user's newer row in both
/// stores).
#[tokio::test]
async fn a_repair_of_an_absent_row_waits_for_a_users_insert_of_it() -> anyhow::Result<()> {
    let (store, db) =
        store_with("[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"pg-wins\"\n").await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let admin = db.client().await?;
    let user = db.client().await?;
    user.batch_execute("BEGIN; INSERT INTO etcd_sync.kv (key, value) VALUES ('/k', 'c')")
        .await?;
    let repair = tokio::spawn({
        let store = store.clone();
        async move {
            let fence = Fence {
                term: 1,
                node: "verify@n1".into(),
            };
            let table = eps_core::ident::Ident::parse("kv").unwrap();
            let etcd_now = eps_core::model::KeyValue {
                key: b"/k".to_vec(),
                value: b"only in etcd".to_vec(),
                meta: KeyMeta {
                    create_revision: 15,
                    mod_revision: 15,
                    version: 1,
                    lease: 0,
                },
            };
            store
                .enqueue_change(&fence, &table, b"/k", None, Some(&etcd_now), None)
                .await
        }
    });
    // The repair either waits for the user's insert or does not queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    user.batch_execute("COMMIT").await?;
    let queued = repair.await??;
    assert!(!queued, "the row exists now: not the one the diff saw");
    let ops: Vec<String> = admin
        .query("SELECT op FROM etcd_sync.outbox ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ops, vec!["put"], "only the user's insert goes to etcd");
    Ok(())
}

/// Held rows: the watcher's batches defer the key's inputs, the arbiter's
/// applies skip it; once the row is free the deferred inputs go in order,
/// each into the history.
#[tokio::test]
async fn held_rows_are_deferred_or_skipped_and_applied_in_order() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    common::insert_as_service(&admin, "/h", "v0", 3).await?;
    let holder = db.client().await?;
    holder
        .batch_execute("BEGIN; UPDATE etcd_sync.kv SET value = 'held' WHERE key = '/h'")
        .await?;
    let keys = vec![created("/h", "e10", 10)];
    let mut arbiter = ApplyRequest::new(&fence, &keys, Instant::now());
    arbiter.defer_held = false;
    arbiter.record_history = false;
    let report = store.apply(&arbiter).await?;
    assert_eq!(report.held_skipped, vec![b"/h".to_vec()]);
    assert_eq!(report.deferred_keys, 0);
    let report = store
        .apply(&ApplyRequest::new(&fence, &keys, Instant::now()))
        .await?;
    assert_eq!(report.deferred_keys, 1);
    let later = vec![created("/h", "e20", 20)];
    store
        .apply(&ApplyRequest::new(&fence, &later, Instant::now()))
        .await?;
    assert_eq!(
        deferred_revisions(&admin).await?,
        vec![10, 20],
        "in order, behind each other"
    );
    // Released, they are applied by the next apply of the key.
    holder.batch_execute("ROLLBACK").await?;
    let drain = vec![KeyInputs {
        key: b"/h".to_vec(),
        inputs: Vec::new(),
    }];
    let report = store
        .apply(&ApplyRequest::new(&fence, &drain, Instant::now()))
        .await?;
    assert_eq!(report.drained_keys, 1);
    assert!(deferred_revisions(&admin).await?.is_empty());
    let value: Vec<u8> = admin
        .query_one("SELECT value FROM etcd_sync.kv WHERE key = '/h'", &[])
        .await?
        .get(0);
    assert_eq!(value, b"e20");
    let recorded: i64 = admin
        .query_one(
            "SELECT count(*) FROM etcd_sync.history WHERE key = '/h' AND revision IN (10, 20)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(recorded, 2, "both deferred changes are in the history");
    Ok(())
}

async fn deferred_revisions(client: &tokio_postgres::Client) -> anyhow::Result<Vec<i64>> {
    Ok(client
        .query(
            "SELECT revision FROM etcd_sync.deferred_inputs ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect())
}

/// A mark that finds one of its rows in an apply's hands waits behind the
/// applies, as every fenced transaction does; a new leader's term claim
/// must wait for it: were the claim to commit first, the deposed leader's
/// mark would commit after it, a write of the old term inside the new one.
/// The mark is held mid-transaction by a test session's lock on its outbox
/// row.
#[tokio::test]
async fn a_term_claim_waits_for_a_mark_of_the_old_term_in_flight() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    let id = common::queued_insert(&admin, "/m").await?;
    let holder = db.client().await?;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM etcd_sync.outbox WHERE id = {id} FOR UPDATE"
        ))
        .await?;
    let store = std::sync::Arc::new(store);
    let mark = tokio::spawn({
        let store = store.clone();
        async move { store.mark_sent(&fence, &[id]).await }
    });
    wait_until_blocked(&admin).await?;
    let claim = claim_that_waits(&store).await;
    holder.batch_execute("COMMIT").await?;
    assert_eq!(mark.await??, vec![id], "the mark of term 1 commits first");
    assert!(claim.await??, "then term 2 is claimed");
    Ok(())
}

/// A mark runs alongside an apply that moves the checkpoint (which holds
/// the `sync_state` row from its first statement to its commit): the
/// poller's next txn must not wait for the watcher's batch. A term claim
/// still waits for a mark in flight, fenced with the weakest lock; here a
/// test session holds the locks of both.
#[tokio::test]
async fn marks_run_alongside_applies_and_a_term_claim_still_waits_for_them() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    let id = common::queued_insert(&admin, "/m").await?;
    let apply = db.client().await?;
    apply
        .batch_execute(
            "BEGIN; UPDATE etcd_sync.sync_state SET applied_revision = applied_revision WHERE id = 1",
        )
        .await?;
    let marked = tokio::time::timeout(Duration::from_secs(5), store.mark_sent(&fence, &[id]))
        .await
        .map_err(|_| anyhow::anyhow!("the mark waited for the apply"))??;
    assert_eq!(marked, vec![id]);
    apply.batch_execute("COMMIT").await?;

    let mark = db.client().await?;
    mark.batch_execute("BEGIN; SELECT 1 FROM etcd_sync.sync_state WHERE id = 1 FOR KEY SHARE")
        .await?;
    let store = std::sync::Arc::new(store);
    let claim = claim_that_waits(&store).await;
    mark.batch_execute("COMMIT").await?;
    assert!(claim.await??);
    Ok(())
}

/// Claims term 2 for `n2` in the background; half a second on, the claim
/// must still be waiting (for a mark of term 1 in flight).
async fn claim_that_waits(
    store: &std::sync::Arc<Store>,
) -> tokio::task::JoinHandle<Result<bool, eps_store::StoreError>> {
    let claim = tokio::spawn({
        let store = store.clone();
        async move { store.claim_term(2, "n2", 100).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !claim.is_finished(),
        "the term was claimed while a mark of term 1 was in flight"
    );
    claim
}
