//! The schema's privilege boundary, tried as an attacker would: every test
//! logs in as a role with ordinary rights (table privileges on the mirror,
//! or only `USAGE` on the schema) against a schema applied by `migrate`, and
//! attempts one known way to escalate, to reach etcd without a grant, or to
//! make the two stores differ silently. See SECURITY.md for the threat model.
#![allow(clippy::unwrap_used)] // test setup

mod common;

use eps_harness::{Postgres, TestDatabase};
use eps_store::Store;
use tokio_postgres::Client;

/// A migrated database and the superuser client that set it up.
struct Setup {
    db: TestDatabase,
    admin: Client,
}

/// Migrates as `owner` (`None`: the superuser `postgres`, as the compose
/// demo does).
async fn migrated(owner: Option<&str>) -> anyhow::Result<Setup> {
    let db = Postgres::fresh_database().await?;
    let admin = db.client().await?;
    let url = match owner {
        None => db.url(),
        Some(role) => {
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {} TO {role};",
                    db.name
                ))
                .await?;
            role_url(&db, role)
        }
    };
    store_for(&url).await?.migrate().await?;
    Ok(Setup { db, admin })
}

async fn store_for(url: &str) -> anyhow::Result<Store> {
    common::store_for(url, "").await
}

fn role_url(db: &TestDatabase, role: &str) -> String {
    db.url().replace("postgres@", &format!("{role}@"))
}

/// A role as README's security section grants it: table privileges on the
/// mirror and its text view, nothing else.
async fn app_writer(setup: &Setup) -> anyhow::Result<(String, Client)> {
    let role = format!("app_writer_{}", setup.db.name);
    setup
        .admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT USAGE ON SCHEMA etcd_sync TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON etcd_sync.kv, etcd_sync.kv_text TO {role};"
        ))
        .await?;
    let client = eps_harness::postgres::connect(&role_url(&setup.db, &role)).await?;
    Ok((role, client))
}

async fn outbox_rows(admin: &Client) -> anyhow::Result<Vec<(Vec<u8>, String, Option<Vec<u8>>)>> {
    Ok(admin
        .query(
            "SELECT key, op, value FROM etcd_sync.outbox ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

async fn is_superuser(admin: &Client, role: &str) -> anyhow::Result<bool> {
    Ok(admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .get(0))
}

/// The exploit: a temp table named like the outbox, with a trigger of the
/// attacker's that runs whatever the outbox insert's rights allow.
fn hijack_outbox_sql(payload: &str) -> String {
    format!(
        "CREATE TEMP TABLE outbox (id bigserial, mirror_table text, key bytea, op text, \
                                   value bytea, base_revision bigint, conflict_id bigint); \
         GRANT ALL ON pg_temp.outbox TO PUBLIC; GRANT ALL ON SEQUENCE pg_temp.outbox_id_seq TO PUBLIC; \
         CREATE FUNCTION pg_temp.payload() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN {payload}; RETURN NEW; END $$; \
         CREATE TRIGGER payload BEFORE INSERT ON pg_temp.outbox \
             FOR EACH ROW EXECUTE FUNCTION pg_temp.payload(); \
         INSERT INTO etcd_sync.kv (key, value) VALUES ('/hijack', 'v');"
    )
}

#[tokio::test]
async fn a_temp_table_named_outbox_cannot_hijack_the_trigger_of_a_superuser_owned_schema()
-> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let (role, writer) = app_writer(&setup).await?;
    // Whatever happens to the payload, the user's write must land in the
    // real outbox and the role must stay what it was.
    let _ = writer
        .batch_execute(&hijack_outbox_sql(&format!("ALTER ROLE {role} SUPERUSER")))
        .await;
    assert!(
        !is_superuser(&setup.admin, &role).await?,
        "the application role became superuser through the outbox trigger"
    );
    assert_eq!(
        outbox_rows(&setup.admin).await?,
        vec![(b"/hijack".to_vec(), "put".into(), Some(b"v".to_vec()))],
        "the user's write reaches the service's outbox, not the attacker's"
    );
    Ok(())
}

#[tokio::test]
async fn a_temp_table_named_outbox_cannot_borrow_the_service_roles_rights() -> anyhow::Result<()> {
    let owner = "eps_owner_hijack";
    let setup = migrated(Some(owner)).await?;
    let (_, writer) = app_writer(&setup).await?;
    let _ = writer
        .batch_execute(&hijack_outbox_sql(
            "UPDATE etcd_sync.sync_state SET term = 424242, leader_node = 'attacker'",
        ))
        .await;
    let term: i64 = setup
        .admin
        .query_one("SELECT term FROM etcd_sync.sync_state", &[])
        .await?
        .get(0);
    assert_eq!(term, 0, "the attacker moved the fencing term");
    assert_eq!(outbox_rows(&setup.admin).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_role_with_only_schema_usage_cannot_attach_the_outbox_trigger() -> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let role = format!("usage_only_{}", setup.db.name);
    setup
        .admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA etcd_sync TO {role};"
        ))
        .await?;
    let attacker = eps_harness::postgres::connect(&role_url(&setup.db, &role)).await?;
    attacker
        .batch_execute("CREATE TEMP TABLE kv (key bytea, value bytea, mod_revision bigint)")
        .await?;
    let attached = attacker
        .batch_execute(
            "CREATE TRIGGER steal AFTER INSERT ON pg_temp.kv \
             FOR EACH ROW EXECUTE FUNCTION etcd_sync.mirror_after_write()",
        )
        .await;
    let error = attached.expect_err("attaching the service's trigger function must be refused");
    assert!(
        error.to_string().contains("permission denied")
            || format!("{error:?}").contains("permission denied"),
        "unexpected error: {error:?}"
    );

    // Even a role granted EXECUTE by mistake gets no outbox row for a table
    // that is not one of the service's mirror tables.
    setup
        .admin
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION etcd_sync.mirror_after_write() TO {role}"
        ))
        .await?;
    attacker
        .batch_execute(
            "CREATE TRIGGER steal AFTER INSERT ON pg_temp.kv \
             FOR EACH ROW EXECUTE FUNCTION etcd_sync.mirror_after_write()",
        )
        .await?;
    let inserted = attacker
        .batch_execute("INSERT INTO pg_temp.kv VALUES ('/stolen', 'v', 0)")
        .await;
    let error = inserted.expect_err("the trigger must refuse a foreign table");
    assert!(
        format!("{error:?}").contains("not a mirror table"),
        "unexpected error: {error:?}"
    );
    assert!(outbox_rows(&setup.admin).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_applying_flag_of_the_service_cannot_be_forged_by_an_application_role()
-> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let (_, writer) = app_writer(&setup).await?;
    // An etcd-owned row, as the watcher writes it.
    setup
        .admin
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('/k', 'etcd', 5, 9, 2, 'etcd'); COMMIT;",
        )
        .await?;
    assert!(outbox_rows(&setup.admin).await?.is_empty());
    // Three transactions (one transaction's insert and delete of a key
    // would be no change at all).
    writer
        .batch_execute(
            "SET etcd_sync.applying = 'on'; \
             UPDATE etcd_sync.kv SET value = 'forged', mod_revision = 1000000 WHERE key = '/k';",
        )
        .await?;
    writer
        .batch_execute(
            "INSERT INTO etcd_sync.kv (key, value, mod_revision) VALUES ('/new', 'x', 77);",
        )
        .await?;
    writer
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             DELETE FROM etcd_sync.kv WHERE key = '/new'; COMMIT;",
        )
        .await?;
    assert_eq!(
        outbox_rows(&setup.admin).await?,
        vec![
            (b"/k".to_vec(), "put".into(), Some(b"forged".to_vec())),
            (b"/new".to_vec(), "put".into(), Some(b"x".to_vec())),
            (b"/new".to_vec(), "delete".into(), None),
        ],
        "every write of the application role reaches the outbox"
    );
    let (mod_revision, origin): (i64, String) = setup
        .admin
        .query_one(
            "SELECT mod_revision, origin FROM etcd_sync.kv WHERE key = '/k'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!(
        (mod_revision, origin.as_str()),
        (9, "pg"),
        "the row keeps the etcd revision it is based on"
    );
    Ok(())
}

#[tokio::test]
async fn writes_through_the_text_view_cannot_be_redirected_to_a_temp_table() -> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let (_, writer) = app_writer(&setup).await?;
    writer
        .batch_execute(
            "CREATE TEMP TABLE kv (key bytea, value bytea); \
             INSERT INTO etcd_sync.kv_text (key, value) VALUES ('/text', 'hello');",
        )
        .await?;
    let mirrored: i64 = setup
        .admin
        .query_one("SELECT count(*) FROM etcd_sync.kv WHERE key = '/text'", &[])
        .await?
        .get(0);
    assert_eq!(mirrored, 1, "the text view wrote somewhere else");
    assert_eq!(outbox_rows(&setup.admin).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn every_function_pins_its_search_path_and_only_the_text_helper_is_public()
-> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let rows = setup
        .admin
        .query(
            "SELECT p.proname, p.prosecdef, coalesce(array_to_string(p.proconfig, ','), ''), \
                    has_function_privilege('public', p.oid, 'EXECUTE') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'etcd_sync' ORDER BY 1",
            &[],
        )
        .await?;
    assert!(rows.len() >= 6, "functions found: {}", rows.len());
    for row in rows {
        let (name, definer, config, public): (String, bool, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        // The public functions are pure helpers of the text view and the
        // JSON column (their readers must be able to call them); they touch
        // no table.
        let helper = name == "utf8_or_null" || name == "json_or_null";
        assert_eq!(public, helper, "{name}: EXECUTE for PUBLIC");
        if definer || !helper {
            // (The history's readers also plan each query for the
            // partitions it reads.)
            let config = config
                .strip_suffix(",plan_cache_mode=force_custom_plan")
                .unwrap_or(&config);
            assert!(
                config == "search_path=etcd_sync, pg_temp"
                    || config == "search_path=\"etcd_sync\", pg_temp",
                "{name}: search_path must be the schema, then pg_temp: {config:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn truncate_of_a_mirror_table_is_refused_with_the_alternative() -> anyhow::Result<()> {
    let setup = migrated(None).await?;
    setup
        .admin
        .batch_execute("INSERT INTO etcd_sync.kv (key, value) VALUES ('/a', '1'), ('/b', '2')")
        .await?;
    let error = setup
        .admin
        .batch_execute("TRUNCATE etcd_sync.kv")
        .await
        .expect_err("TRUNCATE must be refused, even for the owner");
    let message = format!("{error:?}");
    assert!(
        message.contains("DELETE FROM"),
        "the error names the alternative: {message}"
    );
    let rows: i64 = setup
        .admin
        .query_one("SELECT count(*) FROM etcd_sync.kv", &[])
        .await?
        .get(0);
    assert_eq!(rows, 2);
    Ok(())
}

#[tokio::test]
async fn mirror_metadata_out_of_range_is_refused() -> anyhow::Result<()> {
    let setup = migrated(None).await?;
    for (what, values) in [
        ("negative revision", "-1, -1, 1"),
        ("created after modified", "9, 5, 1"),
        ("negative version", "5, 9, -1"),
    ] {
        let result = setup
            .admin
            .batch_execute(&format!(
                "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
                 INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version) \
                 VALUES ('/m', 'x', {values}); COMMIT;"
            ))
            .await;
        let _ = setup.admin.batch_execute("ROLLBACK").await;
        assert!(result.is_err(), "{what} accepted");
    }
    Ok(())
}

#[tokio::test]
async fn least_privilege_owner_migrates_and_its_writes_skip_the_outbox() -> anyhow::Result<()> {
    let owner = "eps_owner_least";
    let setup = migrated(Some(owner)).await?;
    let superuser: bool = setup
        .admin
        .query_one(
            "SELECT rolsuper FROM pg_roles r JOIN pg_namespace n ON n.nspowner = r.oid \
             WHERE n.nspname = 'etcd_sync'",
            &[],
        )
        .await?
        .get(0);
    assert!(!superuser);
    let service = eps_harness::postgres::connect(&role_url(&setup.db, owner)).await?;
    service
        .batch_execute(
            "BEGIN; SELECT set_config('etcd_sync.applying', 'on', true); \
             INSERT INTO etcd_sync.kv (key, value, create_revision, mod_revision, version, origin) \
             VALUES ('/svc', 'x', 3, 3, 1, 'etcd'); COMMIT;",
        )
        .await?;
    assert!(
        outbox_rows(&setup.admin).await?.is_empty(),
        "the service's own write was queued for etcd"
    );
    let (_, writer) = app_writer(&setup).await?;
    writer
        .batch_execute("UPDATE etcd_sync.kv SET value = 'y' WHERE key = '/svc'")
        .await?;
    assert_eq!(outbox_rows(&setup.admin).await?.len(), 1);
    // A second run of migrate by the same role is a no-op.
    store_for(&role_url(&setup.db, owner))
        .await?
        .migrate()
        .await?;
    Ok(())
}

#[tokio::test]
async fn migrate_refuses_a_schema_owned_by_another_role() -> anyhow::Result<()> {
    let db = Postgres::fresh_database().await?;
    let admin = db.client().await?;
    let squatter = format!("squatter_{}", db.name);
    let owner = format!("owner_{}", db.name);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {squatter} LOGIN; CREATE ROLE {owner} LOGIN; \
             GRANT CREATE ON DATABASE {db} TO {squatter}, {owner}; \
             SET ROLE {squatter}; CREATE SCHEMA etcd_sync; \
             GRANT USAGE, CREATE ON SCHEMA etcd_sync TO {owner}; RESET ROLE;",
            db = db.name
        ))
        .await?;
    let result = store_for(&role_url(&db, &owner)).await?.migrate().await;
    let error = result.expect_err("a schema owned by another role must be refused");
    assert!(
        error.to_string().contains("owned by"),
        "the error names the owner: {error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_schema_migrated_by_an_older_version_gets_the_same_protection() -> anyhow::Result<()> {
    let db = Postgres::fresh_database().await?;
    let admin = db.client().await?;
    // The schema as the first release left it, with a mirror table and a
    // pending change.
    let first = include_str!("../../../migrations/2026-11-25-000001_schema/up.sql");
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA etcd_sync; SET search_path TO etcd_sync; {first} \
             SELECT ensure_mirror_table('kv'); \
             CREATE TABLE __diesel_schema_migrations (version varchar(50) PRIMARY KEY, \
                                                      run_on timestamp NOT NULL DEFAULT now()); \
             INSERT INTO __diesel_schema_migrations (version) VALUES ('20261125000001'); \
             INSERT INTO kv (key, value) VALUES ('/old', 'v'); RESET search_path;"
        ))
        .await?;
    let report = store_for(&db.url()).await?.migrate().await?;
    let after_first: Vec<String> = eps_store::migrate::versions()
        .skip(1)
        .map(String::from)
        .collect();
    assert_eq!(report.applied, after_first);
    let setup = Setup { db, admin };
    let (role, writer) = app_writer(&setup).await?;
    let _ = writer
        .batch_execute(&hijack_outbox_sql(&format!("ALTER ROLE {role} SUPERUSER")))
        .await;
    assert!(!is_superuser(&setup.admin, &role).await?);
    assert!(
        setup
            .admin
            .batch_execute("TRUNCATE etcd_sync.kv")
            .await
            .is_err()
    );
    let keys: Vec<Vec<u8>> = outbox_rows(&setup.admin)
        .await?
        .into_iter()
        .map(|(key, _, _)| key)
        .collect();
    assert_eq!(keys, vec![b"/old".to_vec(), b"/hijack".to_vec()]);
    Ok(())
}

#[tokio::test]
async fn a_service_role_that_does_not_own_the_triggers_is_refused_at_start() -> anyhow::Result<()> {
    let owner = "eps_owner_start";
    let setup = migrated(Some(owner)).await?;
    store_for(&role_url(&setup.db, owner))
        .await?
        .check_service_role()
        .await?;
    let (role, _) = app_writer(&setup).await?;
    let error = store_for(&role_url(&setup.db, &role))
        .await?
        .check_service_role()
        .await
        .expect_err("a role that does not own the trigger functions must be refused");
    assert!(error.to_string().contains(owner), "{error}");
    let fresh = Postgres::fresh_database().await?;
    let error = store_for(&fresh.url())
        .await?
        .check_service_role()
        .await
        .expect_err("an unmigrated schema must be refused");
    assert!(error.to_string().contains("not migrated"), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_disabled_trigger_is_refused_at_start_and_restored_by_migrate_with_an_event()
-> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let store = store_for(&setup.db.url()).await?;
    store.check_service_role().await?;
    setup
        .admin
        .batch_execute("ALTER TABLE etcd_sync.kv DISABLE TRIGGER etcd_sync_after")
        .await?;
    let error = store
        .check_service_role()
        .await
        .expect_err("a disabled outbox trigger must stop the service");
    assert!(
        error.to_string().contains("etcd_sync_after disabled"),
        "{error}"
    );
    store.migrate().await?;
    store.check_service_role().await?;
    let events: Vec<serde_json::Value> = setup
        .admin
        .query(
            "SELECT detail::text FROM etcd_sync.sync_events WHERE kind = 'triggers-restored'",
            &[],
        )
        .await?
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    assert_eq!(
        events,
        vec![serde_json::json!({"table": "kv", "triggers": ["etcd_sync_after"]})]
    );
    Ok(())
}

#[tokio::test]
async fn a_replica_only_trigger_or_a_changed_owner_is_refused_at_start() -> anyhow::Result<()> {
    let setup = migrated(None).await?;
    let store = store_for(&setup.db.url()).await?;
    setup
        .admin
        .batch_execute("ALTER TABLE etcd_sync.kv ENABLE REPLICA TRIGGER etcd_sync_after")
        .await?;
    let error = store
        .check_service_role()
        .await
        .expect_err("replica-only trigger");
    assert!(error.to_string().contains("disabled"), "{error}");
    store.migrate().await?;
    store.check_service_role().await?;
    // The trigger functions change owner behind the service's back: the
    // triggers' WHEN clauses still name the old one.
    let other = format!("other_owner_{}", setup.db.name);
    setup
        .admin
        .batch_execute(&format!(
            "CREATE ROLE {other} SUPERUSER; \
             ALTER FUNCTION etcd_sync.mirror_after_write() OWNER TO {other}"
        ))
        .await?;
    let error = store.check_service_role().await.expect_err("stale owner");
    assert!(
        error.to_string().contains("run migrate") || error.to_string().contains("belong to"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_schema_owned_by_a_group_role_is_refused() -> anyhow::Result<()> {
    let db = Postgres::fresh_database().await?;
    let admin = db.client().await?;
    let group = format!("group_{}", db.name);
    let member = format!("member_{}", db.name);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {group}; CREATE ROLE {member} LOGIN IN ROLE {group}; \
             GRANT CREATE ON DATABASE {db} TO {group}; \
             CREATE SCHEMA etcd_sync AUTHORIZATION {group};",
            db = db.name
        ))
        .await?;
    let error = store_for(&role_url(&db, &member))
        .await?
        .migrate()
        .await
        .expect_err("every member of the group could replace the functions");
    assert!(error.to_string().contains("owned by"), "{error}");
    Ok(())
}
