//! Conflicts recorded by the apply transaction, read back from the tables.
#![allow(clippy::unwrap_used)] // test setup

mod common;

use std::time::Instant;

use eps_store::{ApplyRequest, KeyInputs};

/// etcd's change of `key` (created at revision 3) to `value` at `revision`.
fn changed(key: &str, value: &str, revision: i64) -> KeyInputs {
    common::put_event(key, value, revision, 3, 2)
}

/// A conflict row as the test reads it back.
#[derive(Debug, PartialEq)]
struct Recorded {
    key: String,
    etcd_value: Option<String>,
    etcd_revision: i64,
    pg_value: Option<String>,
    pg_superseded: Vec<String>,
    pg_revision: i64,
    winner: Option<String>,
    status: String,
    resolved_by: Option<String>,
    resolved: bool,
    node: String,
    term: i64,
    no_reason: bool,
}

/// The conflicts a policy settles in one batch are written together: each
/// row must carry its own key's values, superseded changes and revision.
#[tokio::test]
async fn the_conflicts_settled_in_one_batch_each_keep_their_own_sides() -> anyhow::Result<()> {
    let (store, db) =
        common::store_with("[[mappings]]\nprefix = \"/\"\ntable = \"kv\"\npolicy = \"pg-wins\"\n")
            .await?;
    store.migrate().await?;
    let fence = common::term_one(&store).await?;
    let admin = db.client().await?;
    for key in ["/a", "/b", "/c"] {
        common::insert_as_service(&admin, key, "v0", 3).await?;
    }
    // Local changes based on revision 3: two of /a (the first superseded),
    // a delete of /b; /c is left alone.
    for statement in [
        "UPDATE etcd_sync.kv SET value = 'a1' WHERE key = '/a'",
        "UPDATE etcd_sync.kv SET value = 'a2' WHERE key = '/a'",
        "DELETE FROM etcd_sync.kv WHERE key = '/b'",
    ] {
        // Each its own transaction.
        admin.batch_execute(statement).await?;
    }
    let keys = vec![
        changed("/a", "ea", 10),
        changed("/b", "eb", 11),
        changed("/c", "ec", 12),
    ];
    let mut request = ApplyRequest::new(&fence, &keys, Instant::now());
    request.checkpoint = Some(12);
    let report = store.apply(&request).await?;
    assert_eq!(report.conflicts.len(), 2, "{report:?}");

    let rows = admin
        .query(
            "SELECT convert_from(key, 'UTF8'), convert_from(etcd_value, 'UTF8'), etcd_revision, \
                    convert_from(pg_value, 'UTF8'), \
                    ARRAY(SELECT convert_from(v, 'UTF8') FROM unnest(pg_superseded) AS v), \
                    pg_revision, winner, status, resolved_by, resolved_at IS NOT NULL, node, term, \
                    reason IS NULL \
             FROM etcd_sync.conflicts ORDER BY key",
            &[],
        )
        .await?;
    let found: Vec<Recorded> = rows
        .iter()
        .map(|r| Recorded {
            key: r.get(0),
            etcd_value: r.get(1),
            etcd_revision: r.get(2),
            pg_value: r.get(3),
            pg_superseded: r.get(4),
            pg_revision: r.get(5),
            winner: r.get(6),
            status: r.get(7),
            resolved_by: r.get(8),
            resolved: r.get(9),
            node: r.get(10),
            term: r.get(11),
            no_reason: r.get(12),
        })
        .collect();
    let settled =
        |key: &str, etcd: &str, revision: i64, pg: Option<&str>, superseded: &[&str]| Recorded {
            key: key.into(),
            etcd_value: Some(etcd.into()),
            etcd_revision: revision,
            pg_value: pg.map(Into::into),
            pg_superseded: superseded.iter().map(|s| s.to_string()).collect(),
            pg_revision: 3,
            winner: Some("pg".into()),
            status: "resolved".into(),
            resolved_by: Some("policy".into()),
            resolved: true,
            node: "n1".into(),
            term: 1,
            no_reason: true,
        };
    assert_eq!(
        found,
        vec![
            settled("/a", "ea", 10, Some("a2"), &["a1"]),
            settled("/b", "eb", 11, None, &[]),
        ]
    );
    let ids: Vec<i64> = report.conflicts.iter().map(|c| c.id).collect();
    let stored: Vec<i64> = admin
        .query("SELECT id FROM etcd_sync.conflicts ORDER BY key", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, stored, "the report names the rows written");
    let audited: Vec<(String, i64)> = admin
        .query(
            "SELECT kind, (detail->>'conflict_id')::int8 FROM etcd_sync.sync_events \
             WHERE kind IN ('conflict', 'resolution') ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        audited,
        vec![
            ("conflict".to_string(), ids[0]),
            ("resolution".to_string(), ids[0]),
            ("conflict".to_string(), ids[1]),
            ("resolution".to_string(), ids[1]),
        ],
        "each conflict audited, in order"
    );
    Ok(())
}
