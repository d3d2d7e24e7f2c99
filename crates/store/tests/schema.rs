//! The schema against a real PostgreSQL: migrations, triggers, the text view,
//! value_at and the fenced apply transaction.
#![allow(clippy::type_complexity, clippy::unwrap_used)] // test tables and setup

mod common;

use std::time::Instant;

use common::{store_for, store_with};
use eps_core::model::{EtcdEvent, KeyMeta, Op, PrevKv};
use eps_core::reconcile::KeyInput;
use eps_store::{ApplyRequest, Fence, KeyInputs, StoreError};

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
}

fn put(key: &str, value: &[u8], revision: i64, prev: Option<(i64, &[u8])>) -> KeyInput {
    KeyInput::Event(EtcdEvent {
        op: Op::Put,
        key: key.as_bytes().to_vec(),
        revision,
        value: value.to_vec(),
        meta: KeyMeta {
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
        },
        prev: prev.map(|(r, v)| PrevKv {
            value: v.to_vec(),
            mod_revision: r,
        }),
    })
}

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_again_as_a_no_op() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    let first = store.migrate().await?;
    let all: Vec<String> = eps_store::migrate::versions().map(String::from).collect();
    assert_eq!(first.applied, all);
    assert_eq!(first.mirror_tables, vec!["kv"]);
    let second = store.migrate().await?;
    assert!(
        second.applied.is_empty(),
        "second run applies nothing: {second:?}"
    );
    let client = db.client().await?;
    for table in [
        "kv",
        "history",
        "outbox",
        "conflicts",
        "dead_letters",
        "sync_events",
        "sync_state",
    ] {
        let n = count(
            &client,
            &format!("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'etcd_sync' AND table_name = '{table}'"),
        )
        .await;
        assert_eq!(n, 1, "table {table}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM information_schema.views WHERE table_schema = 'etcd_sync' AND table_name = 'kv_text'").await, 1);
    Ok(())
}

#[tokio::test]
async fn three_replicas_migrating_at_once_do_not_race() -> anyhow::Result<()> {
    let (store, _db) = store_with("").await?;
    let (a, b, c) = tokio::join!(store.migrate(), store.migrate(), store.migrate());
    let applied: usize = [a?, b?, c?].iter().map(|r| r.applied.len()).sum();
    assert_eq!(
        applied,
        eps_store::migrate::versions().count(),
        "exactly one replica applies the migrations"
    );
    Ok(())
}

#[tokio::test]
async fn user_writes_fill_the_outbox_and_service_writes_do_not() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .execute(
            "INSERT INTO kv (key, value) VALUES ('\\x6b31'::bytea, 'v1')",
            &[],
        )
        .await?;
    client
        .execute("UPDATE kv SET value = 'v2' WHERE key = 'k1'", &[])
        .await?;
    client
        .execute("UPDATE kv SET value = 'v2' WHERE key = 'k1'", &[])
        .await?; // no change
    client.execute("INSERT INTO kv (key, value) VALUES ('k2', 'x') ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", &[]).await?;
    client
        .execute("DELETE FROM kv WHERE key = 'k2'", &[])
        .await?;
    let rows = client
        .query(
            "SELECT key, op, value, base_revision FROM outbox ORDER BY id",
            &[],
        )
        .await?;
    let seen: Vec<(Vec<u8>, String, Option<Vec<u8>>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        seen,
        vec![
            (b"k1".to_vec(), "put".into(), Some(b"v1".to_vec()), 0),
            (b"k1".to_vec(), "put".into(), Some(b"v2".to_vec()), 0),
            (b"k2".to_vec(), "put".into(), Some(b"x".to_vec()), 0),
            (b"k2".to_vec(), "delete".into(), None, 0),
        ],
        "an UPDATE that changes nothing is not propagated"
    );

    // The service's own writes (the flag set by the fence) are invisible to
    // the outbox.
    client.batch_execute("DELETE FROM outbox").await?;
    client
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO kv (key, value, mod_revision) VALUES ('svc', 'x', 7); \
             UPDATE kv SET value = 'y' WHERE key = 'svc'; DELETE FROM kv WHERE key = 'svc'; COMMIT;",
        )
        .await?;
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    Ok(())
}

/// newest-wins compares the time of a user's write, not of the start of its
/// transaction: a transaction open for a second before its UPDATE wrote a
/// second later than it began.
#[tokio::test]
async fn a_users_change_is_timed_when_written_not_when_its_transaction_began() -> anyhow::Result<()>
{
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute("INSERT INTO kv (key, value) VALUES ('k', 'v0')")
        .await?;
    client
        .batch_execute(
            "BEGIN; CREATE TEMP TABLE began ON COMMIT DROP AS SELECT now() AS at; \
             SELECT pg_sleep(1); UPDATE kv SET value = 'v1' WHERE key = 'k'; \
             CREATE TEMP TABLE written AS SELECT \
                 (SELECT extract(epoch FROM created_at - b.at) FROM outbox ORDER BY id DESC LIMIT 1) AS outbox, \
                 (SELECT extract(epoch FROM updated_at - b.at) FROM kv WHERE key = 'k') AS row \
             FROM began b; COMMIT;",
        )
        .await?;
    let row = client
        .query_one("SELECT outbox::float8, row::float8 FROM written", &[])
        .await?;
    let (outbox, mirror_row): (f64, f64) = (row.get(0), row.get(1));
    assert!(outbox >= 0.9, "outbox created_at {outbox} s after BEGIN");
    assert!(
        mirror_row >= 0.9,
        "row updated_at {mirror_row} s after BEGIN"
    );
    Ok(())
}

#[tokio::test]
async fn user_updates_keep_the_etcd_metadata_as_base() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO kv (key, value, create_revision, mod_revision, version, origin) VALUES ('k', 'etcd', 3, 9, 2, 'etcd'); COMMIT;",
        )
        .await?;
    // A user trying to change the metadata does not move the compare base.
    client
        .execute(
            "UPDATE kv SET value = 'mine', mod_revision = 1000 WHERE key = 'k'",
            &[],
        )
        .await?;
    let row = client
        .query_one("SELECT mod_revision, origin FROM kv WHERE key = 'k'", &[])
        .await?;
    assert_eq!(row.get::<_, i64>(0), 9);
    assert_eq!(row.get::<_, String>(1), "pg");
    let base: i64 = client
        .query_one("SELECT base_revision FROM outbox", &[])
        .await?
        .get(0);
    assert_eq!(base, 9);
    // Renaming a key is a delete of the old key and a put of the new one.
    client
        .execute("UPDATE kv SET key = 'k-renamed' WHERE key = 'k'", &[])
        .await?;
    let rows = client
        .query("SELECT key, op, base_revision FROM outbox ORDER BY id", &[])
        .await?;
    let ops: Vec<(Vec<u8>, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(ops[1], (b"k".to_vec(), "delete".into(), 9));
    assert_eq!(ops[2], (b"k-renamed".to_vec(), "put".into(), 0));
    Ok(())
}

#[tokio::test]
async fn a_role_with_only_mirror_table_grants_can_write() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let admin = db.client().await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE app_writer_{db} LOGIN; \
             GRANT USAGE ON SCHEMA etcd_sync TO app_writer_{db}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON etcd_sync.kv, etcd_sync.kv_text TO app_writer_{db};",
            db = db.name
        ))
        .await?;
    let writer = eps_harness::postgres::connect(
        &db.url()
            .replace("postgres@", &format!("app_writer_{}@", db.name)),
    )
    .await?;
    writer
        .execute(
            "INSERT INTO etcd_sync.kv_text (key, value) VALUES ('/w', 'by a writer')",
            &[],
        )
        .await?;
    writer
        .execute(
            "UPDATE etcd_sync.kv SET value = 'again' WHERE key = '/w'",
            &[],
        )
        .await?;
    assert!(
        writer
            .query("SELECT * FROM etcd_sync.outbox", &[])
            .await
            .is_err(),
        "the writer cannot read the outbox"
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM etcd_sync.outbox").await,
        2
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_and_values_round_trip_through_apply() -> anyhow::Result<()> {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    assert!(store.claim_term(1, "n1", 1).await?);
    let client = db.client().await?;
    let fence = Fence {
        term: 1,
        node: "n1".into(),
    };
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 48,
        ..RunnerConfig::default()
    });
    let revision = std::sync::atomic::AtomicI64::new(1);
    let strategy = proptest::collection::vec(
        (
            proptest::collection::vec(any::<u8>(), 1..40),
            proptest::collection::vec(any::<u8>(), 0..300),
        ),
        1..20,
    );
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner.run(&strategy, |pairs| {
            handle.block_on(async {
                let mut keys = Vec::new();
                // One input per key, as the watcher groups them.
                let expected: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
                    pairs.into_iter().collect();
                for (key, value) in expected.clone() {
                    let r = revision.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    keys.push(KeyInputs {
                        key: key.clone(),
                        inputs: vec![KeyInput::Event(EtcdEvent {
                            op: Op::Put,
                            key,
                            revision: r,
                            value,
                            meta: KeyMeta {
                                create_revision: r,
                                mod_revision: r,
                                version: 1,
                                lease: 0,
                            },
                            prev: None,
                        })],
                    });
                }
                let request = ApplyRequest {
                    fence: &fence,
                    checkpoint: None,
                    catchup_range: None,
                    observed_at: Instant::now(),
                    trace_id: None,
                    keys: &keys,
                    record_history: true,
                    repair: None,
                    echo_traces: None,
                    audit_batch: false,
                    defer_held: true,
                    record_rollbacks: false,
                };
                store
                    .apply(&request)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (key, value) in &expected {
                    let row = client
                        .query_one("SELECT value FROM etcd_sync.kv WHERE key = $1", &[key])
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&row.get::<_, Vec<u8>>(0), value);
                }
                Ok(())
            })
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[tokio::test]
async fn the_text_view_reads_and_writes_utf8_data() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .execute(
            "INSERT INTO kv_text (key, value) VALUES ('/app/greeting', 'héllo')",
            &[],
        )
        .await?;
    client
        .execute(
            "UPDATE kv_text SET value = 'hallo' WHERE key = '/app/greeting'",
            &[],
        )
        .await?;
    let raw: Vec<u8> = client
        .query_one("SELECT value FROM kv WHERE key = '/app/greeting'", &[])
        .await?
        .get(0);
    assert_eq!(raw, b"hallo");
    // Binary data shows as NULL in the text view, without failing the query.
    client
        .execute(
            "INSERT INTO kv (key, value) VALUES ('\\x00ff'::bytea, '\\xfffe00'::bytea)",
            &[],
        )
        .await?;
    let rows = client
        .query(
            "SELECT key, value FROM kv_text ORDER BY key NULLS FIRST",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, Option<String>>(0), None);
    assert_eq!(rows[0].get::<_, Option<String>>(1), None);
    client
        .execute("DELETE FROM kv_text WHERE key = '/app/greeting'", &[])
        .await?;
    assert_eq!(count(&client, "SELECT count(*) FROM kv").await, 1);
    let ops = count(&client, "SELECT count(*) FROM outbox").await;
    assert_eq!(
        ops, 4,
        "insert, update, binary insert and delete all reach the outbox"
    );
    Ok(())
}

#[tokio::test]
async fn apply_writes_mirror_history_and_checkpoint_under_the_term() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    assert!(store.claim_term(5, "n1", 100).await?);
    let fence = Fence {
        term: 5,
        node: "n1".into(),
    };
    let binary_value = vec![0u8, 0xff, 0xfe, 0x00, b'x'];
    let keys = vec![
        KeyInputs {
            key: b"a".to_vec(),
            inputs: vec![
                put("a", b"1", 10, None),
                put("a", b"2", 11, Some((10, b"1"))),
            ],
        },
        KeyInputs {
            key: b"b".to_vec(),
            inputs: vec![put("b", &binary_value, 11, None)],
        },
    ];
    let report = store
        .apply(&ApplyRequest {
            fence: &fence,
            checkpoint: Some(11),
            catchup_range: None,
            observed_at: Instant::now(),
            trace_id: Some("t1"),
            keys: &keys,
            record_history: true,
            repair: None,
            echo_traces: None,
            audit_batch: false,
            defer_held: true,
            record_rollbacks: false,
        })
        .await?;
    assert_eq!(report.history_rows, 3);
    assert_eq!(report.mirror_upserts, 2);
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    let value: Vec<u8> = client
        .query_one("SELECT value FROM kv WHERE key = 'b'", &[])
        .await?
        .get(0);
    assert_eq!(value, binary_value);
    assert_eq!(store.state().await?.applied_revision, 11);
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        0,
        "the service's writes are not echoed"
    );
    let at_10: Option<Vec<u8>> = client
        .query_one("SELECT value_at('a', 10)", &[])
        .await?
        .get(0);
    assert_eq!(at_10.as_deref(), Some(&b"1"[..]));
    let at_9: Option<Vec<u8>> = client
        .query_one("SELECT value_at('a', 9)", &[])
        .await?
        .get(0);
    assert_eq!(at_9, None);

    // Replaying the same batch changes nothing (idempotent by revision).
    let report = store
        .apply(&ApplyRequest {
            fence: &fence,
            checkpoint: Some(11),
            catchup_range: None,
            observed_at: Instant::now(),
            trace_id: None,
            keys: &keys,
            record_history: true,
            repair: None,
            echo_traces: None,
            audit_batch: false,
            defer_held: true,
            record_rollbacks: false,
        })
        .await?;
    assert_eq!(report.history_rows, 0);
    assert_eq!(report.mirror_upserts, 0);

    // A deposed leader's transaction is refused and writes nothing.
    assert!(store.claim_term(6, "n2", 100).await?);
    let stale = ApplyRequest {
        fence: &fence,
        checkpoint: Some(12),
        catchup_range: None,
        observed_at: Instant::now(),
        trace_id: None,
        keys: &[KeyInputs {
            key: b"c".to_vec(),
            inputs: vec![put("c", b"x", 12, None)],
        }],
        record_history: true,
        repair: None,
        echo_traces: None,
        audit_batch: false,
        defer_held: true,
        record_rollbacks: false,
    };
    match store.apply(&stale).await {
        Err(StoreError::Fenced { term: 5 }) => {}
        other => panic!("expected fenced, got {other:?}"),
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM kv WHERE key = 'c'").await,
        0
    );
    assert_eq!(store.state().await?.applied_revision, 11);
    assert!(
        !store.claim_term(6, "n3", 100).await?,
        "a term is claimed once"
    );
    assert!(
        store.claim_term(3, "n4", 4).await?,
        "a term from a replaced etcd (above its revision) is superseded"
    );
    Ok(())
}

/// Ways of writing the mirror besides INSERT/UPDATE/DELETE: COPY into the
/// table and into its text view reaches the outbox; an upsert that changes
/// nothing is no change.
#[tokio::test]
async fn copy_and_idempotent_upserts_reach_the_outbox_as_changes() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "COPY kv_text (key, value) FROM PROGRAM 'printf \"/copy/t1\\tone\\n/copy/t2\\ttwo\\n\"'; \
             COPY kv (key, value) FROM PROGRAM 'printf \"/copy/b1\\tbytes\\n\"'",
        )
        .await?;
    assert_eq!(count(&client, "SELECT count(*) FROM kv").await, 3);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 3);
    client
        .batch_execute(
            "INSERT INTO kv (key, value) VALUES ('/copy/t1', 'one') \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        3,
        "an upsert of the same value changes nothing"
    );
    client
        .batch_execute(
            "MERGE INTO kv USING (VALUES ('/copy/t1'::bytea, 'merged'::bytea), ('/copy/m1', 'new')) \
                 AS s(key, value) ON kv.key = s.key \
             WHEN MATCHED THEN UPDATE SET value = s.value \
             WHEN NOT MATCHED THEN INSERT (key, value) VALUES (s.key, s.value)",
        )
        .await?;
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 5);
    Ok(())
}

/// The echo of a user's change (etcd holding the value the user wrote)
/// gives the row etcd's metadata but keeps the time the user wrote it:
/// `newest-wins` in `verify --repair` compares that time, and the echo's
/// arrival (late after a failover) is not a write.
#[tokio::test]
async fn an_echo_keeps_the_time_the_user_wrote_the_value() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let client = db.client().await?;
    common::insert_as_service(&client, "k", "old", 5).await?;
    client
        .batch_execute("UPDATE etcd_sync.kv SET value = 'new' WHERE key = 'k'")
        .await?;
    let written: f64 = client
        .query_one(
            "SELECT extract(epoch FROM updated_at)::float8 FROM etcd_sync.kv WHERE key = 'k'",
            &[],
        )
        .await?
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let keys = [KeyInputs {
        key: b"k".to_vec(),
        inputs: vec![put("k", b"new", 9, Some((5, b"old")))],
    }];
    let report = store
        .apply(&ApplyRequest::new(&fence, &keys, Instant::now()))
        .await?;
    assert_eq!(report.echoes, 1);
    let row = client
        .query_one(
            "SELECT extract(epoch FROM updated_at)::float8, mod_revision, origin \
             FROM etcd_sync.kv WHERE key = 'k'",
            &[],
        )
        .await?;
    let (after, mod_revision, origin): (f64, i64, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(mod_revision, 9);
    assert_eq!(origin, "pg");
    assert!(
        (after - written).abs() < 0.001,
        "updated_at moved from {written} to {after}"
    );
    Ok(())
}

/// A key written several times in one transaction queues one change: its
/// final state, based on what etcd had when the transaction began (etcd
/// takes a key once per txn, and no other session saw the values between).
#[tokio::test]
async fn a_key_written_several_times_in_a_transaction_queues_its_final_state_once()
-> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('k', 'etcd', 3, 9, 2, 'etcd'), ('gone', 'etcd', 4, 4, 1, 'etcd'); COMMIT;",
        )
        .await?;
    let outbox = async || -> anyhow::Result<Vec<(String, String, Option<Vec<u8>>, i64)>> {
        let rows = client
            .query(
                "SELECT convert_from(key, 'UTF8'), op, value, base_revision FROM outbox ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    };
    client
        .batch_execute(
            "BEGIN; \
             UPDATE kv SET value = 'one' WHERE key = 'k'; \
             UPDATE kv SET value = 'two' WHERE key = 'k'; \
             SAVEPOINT s; UPDATE kv SET value = 'rolled back' WHERE key = 'k'; ROLLBACK TO SAVEPOINT s; \
             INSERT INTO kv (key, value) VALUES ('new', 'a'); \
             UPDATE kv SET value = 'b' WHERE key = 'new'; \
             DELETE FROM kv WHERE key = 'gone'; \
             INSERT INTO kv (key, value) VALUES ('gone', 'again'); \
             INSERT INTO kv (key, value) VALUES ('fleeting', 'x'); \
             DELETE FROM kv WHERE key = 'fleeting'; \
             COMMIT;",
        )
        .await?;
    assert_eq!(
        outbox().await?,
        vec![
            ("k".into(), "put".into(), Some(b"two".to_vec()), 9),
            ("new".into(), "put".into(), Some(b"b".to_vec()), 0),
            ("gone".into(), "put".into(), Some(b"again".to_vec()), 4),
        ]
    );
    // The re-created row is based on what its change replaces in etcd: a
    // later change of it compares against that revision too.
    let base: i64 = client
        .query_one("SELECT mod_revision FROM kv WHERE key = 'gone'", &[])
        .await?
        .get(0);
    assert_eq!(base, 4);
    // Across transactions, every committed change stays its own.
    client
        .execute("UPDATE kv SET value = 'three' WHERE key = 'k'", &[])
        .await?;
    assert_eq!(outbox().await?.len(), 4);
    // A row created by an earlier transaction whose change is still queued
    // (mod revision 0), updated then deleted by a later one: the delete is
    // a change (base 0 does not mean this transaction created it).
    client
        .execute("INSERT INTO kv (key, value) VALUES ('pending', 'a')", &[])
        .await?;
    client
        .batch_execute(
            "BEGIN; UPDATE kv SET value = 'b' WHERE key = 'pending'; \
             DELETE FROM kv WHERE key = 'pending'; COMMIT;",
        )
        .await?;
    let pending: Vec<(String, String)> = outbox()
        .await?
        .into_iter()
        .filter(|(k, ..)| k == "pending")
        .map(|(k, op, ..)| (k, op))
        .collect();
    assert_eq!(
        pending,
        vec![
            ("pending".into(), "put".into()),
            ("pending".into(), "delete".into())
        ]
    );
    client
        .execute("DELETE FROM outbox WHERE key = 'pending'", &[])
        .await?;
    // A rolled-back transaction leaves no trace.
    client
        .batch_execute("BEGIN; UPDATE kv SET value = 'never' WHERE key = 'k'; DELETE FROM kv WHERE key = 'new'; ROLLBACK;")
        .await?;
    assert_eq!(outbox().await?.len(), 4);
    Ok(())
}

/// One statement that deletes a key and creates it again (a writable CTE,
/// or a key shift): its row triggers run at the end of the statement, after
/// the new row was written. The new row still takes the base of the
/// transaction's one change of the key, or a later change of it would
/// compare against "absent" and conflict with the service's own write.
#[tokio::test]
async fn a_key_deleted_and_created_again_in_one_statement_keeps_the_base() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('cte', 'etcd', 5, 7, 1, 'etcd'), ('s1', 'etcd', 6, 8, 1, 'etcd'), \
                    ('s2', 'etcd', 6, 9, 1, 'etcd'); COMMIT;",
        )
        .await?;
    client
        .batch_execute(
            "WITH gone AS (DELETE FROM kv WHERE key = 'cte' RETURNING key) \
             INSERT INTO kv (key, value) SELECT key, 'again' FROM gone; \
             WITH moved AS (UPDATE kv SET key = 's3' WHERE key = 's2' RETURNING 1) \
             UPDATE kv SET key = 's2' WHERE key = 's1' AND EXISTS (SELECT 1 FROM moved);",
        )
        .await?;
    let rows: Vec<(String, i64, String)> = client
        .query(
            "SELECT convert_from(key, 'UTF8'), mod_revision, origin FROM kv ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("cte".into(), 7, "pg".into()),
            ("s2".into(), 9, "pg".into()),
            ("s3".into(), 0, "pg".into()),
        ]
    );
    let queued: Vec<(String, String, i64)> = client
        .query(
            "SELECT convert_from(key, 'UTF8'), op, base_revision FROM outbox ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        queued,
        vec![
            ("cte".into(), "put".into(), 7),
            ("s1".into(), "delete".into(), 8),
            ("s2".into(), "put".into(), 9),
            ("s3".into(), "put".into(), 0),
        ]
    );
    // Fixing the base was no change of its own.
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 4);
    Ok(())
}

/// `value_format = "json"`: the mirror table and its text view show each
/// value as `value_json` (NULL when it is not JSON: written from SQL or
/// etcd, such a value is kept and synced, never refused), indexed on
/// request; the history as JSON through `history_json`; back to `bytes`,
/// the column goes.
#[tokio::test]
async fn json_values_are_queryable_and_never_block_a_write() -> anyhow::Result<()> {
    let json = "[[mappings]]\nprefix = \"/j/\"\ntable = \"kv_j\"\nvalue_format = \"json\"\njson_index = true\n";
    let (store, db) = store_with(json).await?;
    store.migrate().await?;
    store.migrate().await?; // again: a no-op
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "INSERT INTO kv_j_text (key, value) VALUES \
               ('/j/flag', '{\"enabled\": true, \"rollout\": 20}'), \
               ('/j/list', '[1, 2, 3]'), \
               ('/j/not-json', 'plain text {');",
        )
        .await?;
    let enabled: Vec<String> = client
        .query(
            "SELECT key FROM kv_j_text WHERE value_json @> '{\"enabled\": true}' ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(enabled, vec!["/j/flag".to_owned()]);
    let not_json: Option<String> = client
        .query_one(
            "SELECT value_json::text FROM kv_j WHERE key = '/j/not-json'::bytea",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(not_json, None, "kept, as NULL JSON");
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        3,
        "every value, JSON or not, goes to etcd"
    );
    let index: i64 = count(
        &client,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'kv_j_value_json' \
           AND indexdef LIKE '%USING gin%'",
    )
    .await;
    assert_eq!(index, 1);
    client
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO history (key, revision, op, value, create_revision, version, lease, origin, term) \
             VALUES ('/j/flag', 5, 'put', '{\"enabled\": false}', 5, 1, 0, 'etcd', 1); COMMIT;",
        )
        .await?;
    let old: String = client
        .query_one(
            "SELECT value_json::text FROM history_json WHERE key = '/j/flag'::bytea AND revision = 5",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&old)?,
        serde_json::json!({"enabled": false})
    );

    // Back to bytes: the column and its index go; the rows stay.
    let bytes_again = store_for(
        &db.url(),
        "[[mappings]]\nprefix = \"/j/\"\ntable = \"kv_j\"\n",
    )
    .await?;
    bytes_again.migrate().await?;
    let columns = count(
        &client,
        "SELECT count(*) FROM information_schema.columns WHERE table_name IN ('kv_j', 'kv_j_text') \
           AND column_name = 'value_json'",
    )
    .await;
    assert_eq!(columns, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM kv_j_text").await, 3);
    Ok(())
}

/// A mirror table keeps the prefix it was made for: `migrate` refuses a
/// configuration that maps another prefix to it.
#[tokio::test]
async fn a_mirror_table_keeps_its_prefix() -> anyhow::Result<()> {
    let (store, db) = store_with("[[mappings]]\nprefix = \"/old/\"\ntable = \"kv_p\"\n").await?;
    store.migrate().await?;
    let moved = store_for(
        &db.url(),
        "[[mappings]]\nprefix = \"/new/\"\ntable = \"kv_p\"\n",
    )
    .await?;
    let refused = moved.migrate().await;
    assert!(
        matches!(&refused, Err(StoreError::Migration(m)) if m.contains("kv_p") && m.contains("/new/")),
        "{refused:?}"
    );
    // The same prefix again is fine.
    store.migrate().await?;
    Ok(())
}

/// Replaces the history partitions made ahead of timeline 1 (empty) by
/// ones ending at `ends`: retention drops whole partitions, so a test of it
/// needs partitions as small as its rows.
async fn partition_history(client: &tokio_postgres::Client, ends: &[i64]) -> anyhow::Result<()> {
    for row in client
        .query(
            "SELECT name FROM etcd_sync.history_partitions WHERE from_timeline = 1",
            &[],
        )
        .await?
    {
        let name: String = row.get(0);
        client
            .batch_execute(&format!("DROP TABLE etcd_sync.{name}"))
            .await?;
    }
    for end in ends {
        client
            .execute("SELECT etcd_sync.add_history_partition(1, $1)", &[end])
            .await?;
    }
    Ok(())
}

/// A mapping of `/r/` synced from revision 1 and applied up to `applied`,
/// its history partitioned to end at 150, 250 and 400, holding `rows`
/// (`(key, revision, value, days ago)`, puts). For the retention tests.
async fn retention_setup(
    applied: i64,
    rows: &[(&str, i64, &str, i32)],
) -> anyhow::Result<(eps_store::Store, Fence, tokio_postgres::Client)> {
    let (store, db) = store_with("[[mappings]]\nprefix = \"/r/\"\ntable = \"kv_r\"\n").await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    partition_history(&client, &[150, 250, 400]).await?;
    client
        .execute(
            "UPDATE mirror_tables SET synced = true, history_from = 1 WHERE name = 'kv_r'",
            &[],
        )
        .await?;
    client
        .execute("UPDATE sync_state SET applied_revision = $1", &[&applied])
        .await?;
    for (key, revision, value, days) in rows {
        client
            .execute(
                "INSERT INTO history (key, revision, op, value, create_revision, version, lease, origin, term, recorded_at) \
                 VALUES (convert_to($1, 'UTF8'), $2, 'put', convert_to($3, 'UTF8'), $2, 1, 0, 'etcd', 1, \
                         now() - make_interval(days => $4))",
                &[key, revision, value, days],
            )
            .await?;
    }
    Ok((store, fence, client))
}

/// The values `state_at('kv_r', revision)` returns, in key order.
async fn values_at(
    client: &tokio_postgres::Client,
    revision: i64,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT convert_from(value, 'UTF8') FROM state_at('kv_r', $1)",
            &[&revision],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect())
}

/// History retention deletes old rows (keeping every key's newest): below
/// the newest revision it deleted from, a key's state may be gone, and
/// `state_at` refuses those revisions rather than answer wrongly.
#[tokio::test]
async fn state_at_refuses_revisions_history_retention_forgot() -> anyhow::Result<()> {
    // Synced at revision 1; /r/a changed at 5 and 100 (both long ago),
    // /r/b at 200 (recently).
    let (store, fence, client) = retention_setup(
        200,
        &[
            ("/r/a", 5, "five", 40),
            ("/r/a", 100, "hundred", 35),
            ("/r/b", 200, "b", 0),
        ],
    )
    .await?;
    let at = async |revision: i64| values_at(&client, revision).await;
    assert_eq!(at(50).await?, vec!["five".to_owned()]);
    store.purge(&fence, 0, 30, 0).await?;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM history WHERE key = '/r/a'::bytea"
        )
        .await,
        1,
        "the newest row of /r/a is kept"
    );
    // At 50, /r/a held "five", now forgotten: refused, not "absent".
    let refused = at(50).await;
    assert!(
        refused.as_ref().is_err_and(|e| e
            .as_db_error()
            .is_some_and(|d| d.message().contains("before what the history"))),
        "{refused:?}"
    );
    assert_eq!(at(250).await?, vec!["hundred".to_owned(), "b".to_owned()]);
    Ok(())
}

/// History retention may forget a row only when a newer row of its key is
/// forgotten too or below the revision `state_at` answers from: a key
/// changed long ago and again recently keeps its old value for the
/// revisions in between.
#[tokio::test]
async fn retention_keeps_the_state_of_every_revision_it_answers_for() -> anyhow::Result<()> {
    // /r/a: "old" at 10, long ago, "new" at 300, today; /r/b: at 100, long
    // ago. Retention can drop the partitions below 250.
    let (store, fence, client) = retention_setup(
        300,
        &[
            ("/r/a", 10, "old", 40),
            ("/r/b", 100, "b", 35),
            ("/r/a", 300, "new", 0),
        ],
    )
    .await?;
    let at = async |revision: i64| values_at(&client, revision).await;
    assert_eq!(at(250).await?, vec!["old".to_owned(), "b".to_owned()]);
    let (_, gone, _) = store.purge(&fence, 0, 30, 0).await?;
    assert_eq!(
        gone, 0,
        "each key's newest row of the dropped partitions stays"
    );
    assert_eq!(
        at(250).await?,
        vec!["old".to_owned(), "b".to_owned()],
        "a revision state_at still answers for keeps its answer"
    );
    assert_eq!(at(300).await?, vec!["new".to_owned(), "b".to_owned()]);
    let partitions: Vec<String> = client
        .query(
            "SELECT name FROM history_partitions WHERE NOT is_default \
             ORDER BY from_timeline NULLS FIRST, from_revision NULLS FIRST",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        partitions,
        ["history_kept_t1_r250", "history_t1_r250"],
        "the partitions below 250 were dropped, their rows kept in one"
    );
    // A second round has nothing to drop.
    assert_eq!(store.purge(&fence, 0, 30, 0).await?.1, 0);
    Ok(())
}

/// The leader makes history partitions ahead of the sync, and rows no
/// partition took (a new timeline's) are moved out of the default
/// partition into partitions made for them.
#[tokio::test]
async fn history_partitions_are_made_ahead_and_take_what_the_default_caught() -> anyhow::Result<()>
{
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    let bounds = async || -> anyhow::Result<Vec<(String, Option<i32>, Option<i64>, Option<i32>, Option<i64>)>> {
        Ok(client
            .query(
                "SELECT name, from_timeline, from_revision, to_timeline, to_revision FROM history_partitions \
                 WHERE NOT is_default ORDER BY from_timeline NULLS FIRST, from_revision NULLS FIRST",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    };
    // A fresh schema: the history as it was (empty), then a partition of a
    // million revisions (the least width) ahead.
    assert_eq!(
        bounds().await?,
        [
            ("history_tmin_rmin".to_owned(), None, None, Some(1), Some(1)),
            (
                "history_t1_r1".to_owned(),
                Some(1),
                Some(1),
                Some(1),
                Some(1_000_000)
            ),
        ]
    );
    let day = std::time::Duration::from_secs(86_400);
    assert_eq!(
        store.extend_history(&fence, day, 0, false).await?,
        0,
        "far enough ahead"
    );
    // etcd is at 900,000: less than half a partition is left.
    assert_eq!(store.extend_history(&fence, day, 900_000, false).await?, 1);
    assert_eq!(
        bounds().await?.last().cloned(),
        Some((
            "history_t1_r1000000".to_owned(),
            Some(1),
            Some(1_000_000),
            Some(1),
            Some(1_900_000)
        ))
    );
    // A new timeline's rows land in the default partition until the next
    // extension gives them one.
    client
        .batch_execute(
            "UPDATE sync_state SET timeline = 2, applied_revision = 7; \
             INSERT INTO history (key, revision, op, value, create_revision, version, lease, origin, term, timeline) VALUES \
               ('/t/a', 5, 'put', 'a', 5, 1, 0, 'etcd', 1, 2), ('/t/b', 7, 'put', 'b', 7, 1, 0, 'etcd', 1, 2);",
        )
        .await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM history_default").await,
        2
    );
    assert_eq!(store.extend_history(&fence, day, 0, false).await?, 1);
    assert_eq!(
        count(&client, "SELECT count(*) FROM history_default").await,
        0
    );
    assert_eq!(
        bounds().await?.last().cloned(),
        Some((
            "history_t2_rmin".to_owned(),
            Some(2),
            None,
            Some(2),
            Some(1_000_008)
        ))
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM history WHERE timeline = 2").await,
        2,
        "the caught rows moved, none lost"
    );
    Ok(())
}

/// A table whose history a new timeline has not made whole yet (after
/// `restore-etcd` adopted another etcd) is not taken for one whose history
/// predates the record of where it starts: `migrate` leaves it unknown, or
/// `state_at` would answer from the new etcd's revision 0.
#[tokio::test]
async fn migrate_does_not_guess_where_a_new_timelines_history_starts() -> anyhow::Result<()> {
    let (store, db) = store_with("[[mappings]]\nprefix = \"/h/\"\ntable = \"kv_h\"\n").await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let client = db.client().await?;
    client.batch_execute("SET search_path TO etcd_sync").await?;
    client
        .batch_execute(
            "UPDATE mirror_tables SET synced = true, history_from = 5 WHERE name = 'kv_h'; \
             UPDATE sync_state SET history_complete_from = 40;",
        )
        .await?;
    store
        .adopt_timeline(&fence, 77, &serde_json::json!({"reason": "test"}))
        .await?;
    store.migrate().await?;
    let (from, horizon): (Option<i64>, i64) = {
        let row = client
            .query_one(
                "SELECT m.history_from, s.history_complete_from FROM mirror_tables m, sync_state s \
                 WHERE m.name = 'kv_h'",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    assert_eq!(
        from, None,
        "not whole on the new timeline until a restore or resync says so"
    );
    assert_eq!(
        horizon, 0,
        "retention has forgotten nothing of the new timeline"
    );
    Ok(())
}

/// `mark_sent` returns only the changes it marked itself: a poller that
/// stops a round takes back those, never a mark an earlier round set for a
/// change whose outcome is unknown (it may have landed).
#[tokio::test]
async fn mark_sent_reports_only_its_own_marks() -> anyhow::Result<()> {
    let (store, db) = store_with("").await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let client = db.client().await?;
    client
        .batch_execute(
            "INSERT INTO etcd_sync.kv_text (key, value) VALUES ('/m/1', 'a'); \
             INSERT INTO etcd_sync.kv_text (key, value) VALUES ('/m/2', 'b'); \
             INSERT INTO etcd_sync.kv_text (key, value) VALUES ('/m/3', 'c');",
        )
        .await?;
    let ids: Vec<i64> = client
        .query("SELECT id FROM etcd_sync.outbox ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(store.mark_sent(&fence, &ids[..2]).await?, ids[..2].to_vec());
    let mut second = store.mark_sent(&fence, &ids[1..]).await?;
    second.sort();
    assert_eq!(
        second,
        vec![ids[2]],
        "the earlier round's mark is not this round's"
    );
    Ok(())
}
