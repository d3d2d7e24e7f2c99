//! Schema migrations: the SQL files under `migrations/`, run by diesel's
//! migration harness, then one mirror table (with triggers and text view)
//! per mapping. Serialized across replicas by an advisory lock, so three
//! replicas starting at once migrate once.
//!
//! The files may name the service's schema as `@schema@` (quoted identifier)
//! and `@schema_name@` (bare name, inside string literals): functions that
//! run with the owner's rights qualify every object they touch, whatever
//! `search_path` the caller has.

use diesel::backend::Backend;
use diesel::connection::BoxableConnection;
use diesel::migration::{
    Migration, MigrationMetadata, MigrationName, MigrationSource, MigrationVersion,
};
use diesel::pg::Pg;
use diesel::sql_types::{Bool, Text};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::MigrationHarness;
use eps_core::ident::Ident;
use eps_core::mapping::{MappingSet, ValueFormat};

use crate::connect::Connector;
use crate::error::StoreError;

/// One migration: diesel's version (the directory name's date and number
/// without dashes), its name, and its SQL.
struct SqlFile {
    version: &'static str,
    name: &'static str,
    up: &'static str,
}

/// Every migration, oldest first. A new directory under `migrations/` is
/// added here (a test checks that none is missing).
const MIGRATIONS: &[SqlFile] = &[
    SqlFile {
        version: "20261125000001",
        name: "2026-11-25-000001_schema",
        up: include_str!("../../../migrations/2026-11-25-000001_schema/up.sql"),
    },
    SqlFile {
        version: "20261201000001",
        name: "2026-12-01-000001_privileges",
        up: include_str!("../../../migrations/2026-12-01-000001_privileges/up.sql"),
    },
    SqlFile {
        version: "20261201000002",
        name: "2026-12-01-000002_outbox_transactions",
        up: include_str!("../../../migrations/2026-12-01-000002_outbox_transactions/up.sql"),
    },
    SqlFile {
        version: "20261201000003",
        name: "2026-12-01-000003_deferred_inputs",
        up: include_str!("../../../migrations/2026-12-01-000003_deferred_inputs/up.sql"),
    },
    SqlFile {
        version: "20261201000004",
        name: "2026-12-01-000004_timelines",
        up: include_str!("../../../migrations/2026-12-01-000004_timelines/up.sql"),
    },
    SqlFile {
        version: "20261201000005",
        name: "2026-12-01-000005_revision_clock",
        up: include_str!("../../../migrations/2026-12-01-000005_revision_clock/up.sql"),
    },
    SqlFile {
        version: "20261201000006",
        name: "2026-12-01-000006_timeline_pause",
        up: include_str!("../../../migrations/2026-12-01-000006_timeline_pause/up.sql"),
    },
    SqlFile {
        version: "20261201000007",
        name: "2026-12-01-000007_transactions",
        up: include_str!("../../../migrations/2026-12-01-000007_transactions/up.sql"),
    },
    SqlFile {
        version: "20261201000008",
        name: "2026-12-01-000008_whole_transactions",
        up: include_str!("../../../migrations/2026-12-01-000008_whole_transactions/up.sql"),
    },
    SqlFile {
        version: "20261201000009",
        name: "2026-12-01-000009_recreated_row_base",
        up: include_str!("../../../migrations/2026-12-01-000009_recreated_row_base/up.sql"),
    },
    SqlFile {
        version: "20261201000010",
        name: "2026-12-01-000010_state_at",
        up: include_str!("../../../migrations/2026-12-01-000010_state_at/up.sql"),
    },
    SqlFile {
        version: "20261201000011",
        name: "2026-12-01-000011_json_values",
        up: include_str!("../../../migrations/2026-12-01-000011_json_values/up.sql"),
    },
    SqlFile {
        version: "20261201000012",
        name: "2026-12-01-000012_history_partitions",
        up: include_str!("../../../migrations/2026-12-01-000012_history_partitions/up.sql"),
    },
    SqlFile {
        version: "20261201000013",
        name: "2026-12-01-000013_catchup_ranges",
        up: include_str!("../../../migrations/2026-12-01-000013_catchup_ranges/up.sql"),
    },
];

/// The versions of every migration this build knows, oldest first.
pub fn versions() -> impl Iterator<Item = &'static str> {
    MIGRATIONS.iter().map(|m| m.version)
}

/// The migrations with the schema's name substituted.
struct SchemaMigrations {
    schema: Ident,
}

struct SchemaMigration {
    file: &'static SqlFile,
    sql: String,
}

impl MigrationSource<Pg> for SchemaMigrations {
    fn migrations(&self) -> diesel::migration::Result<Vec<Box<dyn Migration<Pg>>>> {
        Ok(MIGRATIONS
            .iter()
            .map(|file| {
                let sql = file
                    .up
                    .replace("@schema_name@", self.schema.as_str())
                    .replace("@schema@", &self.schema.quoted());
                Box::new(SchemaMigration { file, sql }) as Box<dyn Migration<Pg>>
            })
            .collect())
    }
}

impl<DB: Backend> Migration<DB> for SchemaMigration {
    fn run(&self, conn: &mut dyn BoxableConnection<DB>) -> diesel::migration::Result<()> {
        conn.batch_execute(&self.sql)
            .map_err(|e| format!("migration {}: {e}", self.file.name).into())
    }

    fn revert(&self, _conn: &mut dyn BoxableConnection<DB>) -> diesel::migration::Result<()> {
        Err(format!("migration {} cannot be reverted", self.file.name).into())
    }

    fn metadata(&self) -> &dyn MigrationMetadata {
        self
    }

    fn name(&self) -> &dyn MigrationName {
        self
    }
}

impl MigrationMetadata for SchemaMigration {}

impl MigrationName for SchemaMigration {
    fn version(&self) -> MigrationVersion<'_> {
        MigrationVersion::from(self.file.version)
    }
}

impl std::fmt::Display for SchemaMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file.name)
    }
}

/// What `migrate` did.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub mirror_tables: Vec<String>,
}

/// Applies pending migrations and ensures the mirror tables. Idempotent.
pub async fn migrate(
    connector: &Connector,
    mappings: &MappingSet,
) -> Result<MigrationReport, StoreError> {
    let tables: Vec<&Ident> = mappings.iter().map(|m| &m.table).collect();
    let schema = connector.schema().clone();
    // A dedicated connection: the advisory lock is its session's, released
    // when the connection closes on whichever path leaves this function.
    let mut conn = connector.connect().await?;
    diesel::sql_query("SELECT pg_advisory_lock(hashtext($1))")
        .bind::<Text, _>(format!("etcd-pg-sync migrate {schema}"))
        .execute(&mut conn)
        .await?;
    // Created first, then checked: a schema someone else slipped in between
    // is refused as well. `pg_temp` last: the migration's own statements
    // never see a temporary table in place of one of the service's.
    conn.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema_q}; SET search_path TO {schema_q}, pg_temp",
        schema_q = schema.quoted()
    ))
    .await?;
    check_schema_owner(&mut conn, &schema).await?;

    // diesel's migration harness is synchronous: run it on a blocking thread
    // through the async connection wrapper (`block_in_place` would panic on
    // the actix system thread).
    let source = SchemaMigrations {
        schema: schema.clone(),
    };
    let (mut conn, applied) = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> =
            AsyncConnectionWrapper::from(conn);
        let applied = wrapper
            .run_pending_migrations(source)
            .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| StoreError::Migration(e.to_string()));
        (wrapper.into_inner(), applied)
    })
    .await
    .map_err(|e| StoreError::Migration(format!("migration task failed: {e}")))?;
    let applied = applied?;
    check_prefixes(&mut conn, mappings).await?;
    for mapping in mappings.iter() {
        diesel::sql_query(format!(
            "SELECT {}.ensure_mirror_table($1, $2, $3)",
            schema.quoted()
        ))
        .bind::<Text, _>(mapping.table.as_str())
        .bind::<Bool, _>(mapping.value_format == ValueFormat::Json)
        .bind::<Bool, _>(mapping.json_index)
        .execute(&mut conn)
        .await?;
        // The table's key range, for `state_at`. A table synced before its
        // first sync's revision was recorded (by a migrate with this
        // schema, which records the range too): the newest revision its
        // snapshot rows carry is the closest known bound. Later, an unknown
        // start means a new timeline not whole yet, and stays unknown.
        diesel::sql_query(
            "UPDATE mirror_tables m SET prefix = $2, prefix_end = $3, \
                 history_from = CASE WHEN m.prefix IS NOT NULL THEN m.history_from \
                     ELSE coalesce(m.history_from, CASE WHEN m.synced THEN \
                         (SELECT coalesce(max(h.revision), 0) FROM history h, sync_state s \
                          WHERE s.id = 1 AND h.timeline = s.timeline AND h.origin = 'snapshot' \
                            AND h.key >= $2 AND ($3::bytea IS NULL OR h.key < $3)) END) END \
             WHERE m.name = $1",
        )
        .bind::<Text, _>(mapping.table.as_str())
        .bind::<diesel::sql_types::Bytea, _>(&mapping.prefix)
        .bind::<diesel::sql_types::Nullable<diesel::sql_types::Bytea>, _>(mapping.range_end())
        .execute(&mut conn)
        .await?;
    }
    Ok(MigrationReport {
        applied,
        mirror_tables: tables.iter().map(ToString::to_string).collect(),
    })
}

#[derive(diesel::QueryableByName)]
struct SchemaOwner {
    /// The schema's owner, if the schema exists.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    owner: Option<String>,
    #[diesel(sql_type = Bool)]
    ours: bool,
    #[diesel(sql_type = Bool)]
    superuser: bool,
}

/// Refuses a schema that belongs to another role than the migrating one
/// (a superuser may migrate any): whoever owns the schema — and every
/// member of an owning group role — can replace any object in it, the
/// service's trigger functions included. Warns when the service's objects
/// would be owned by a superuser (SECURITY.md).
async fn check_schema_owner(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
) -> Result<(), StoreError> {
    let found: SchemaOwner = diesel::sql_query(
        "SELECT n.nspowner::regrole::text AS owner, \
                coalesce(n.nspowner = r.oid OR r.rolsuper, true) AS ours, \
                r.rolsuper AS superuser \
         FROM pg_roles r LEFT JOIN pg_namespace n ON n.nspname = $1 \
         WHERE r.rolname = current_user",
    )
    .bind::<Text, _>(schema.as_str())
    .get_result(conn)
    .await?;
    if !found.ours {
        return Err(StoreError::Migration(format!(
            "schema {schema} is owned by {owner}, not by the service's role: whoever owns the \
             schema can replace the service's functions; drop the schema, or ALTER SCHEMA \
             {schema} OWNER TO the service's role",
            schema = schema.as_str(),
            owner = found.owner.as_deref().unwrap_or("another role"),
        )));
    }
    if found.superuser {
        tracing::warn!(
            schema = schema.as_str(),
            "migrating as a superuser: the trigger functions run with their owner's rights; \
             let a dedicated role own the schema (SECURITY.md)"
        );
    }
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct RecordedPrefix {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    prefix: Vec<u8>,
}

/// A mirror table keeps the prefix it was made for: under another one its
/// rows outside the new range would stay, never compared, and a user's
/// edit of one would go nowhere. A new prefix needs a new table name.
async fn check_prefixes(
    conn: &mut AsyncPgConnection,
    mappings: &MappingSet,
) -> Result<(), StoreError> {
    let recorded: Vec<RecordedPrefix> =
        diesel::sql_query("SELECT name, prefix FROM mirror_tables WHERE prefix IS NOT NULL")
            .load(conn)
            .await?;
    for mapping in mappings.iter() {
        if let Some(found) = recorded
            .iter()
            .find(|r| r.name == mapping.table.as_str() && r.prefix != mapping.prefix)
        {
            return Err(StoreError::Migration(format!(
                "mirror table {} holds the keys under {:?}, and the configuration now maps {:?} to it: \
                 map the new prefix to a new table (the old one can then be dropped)",
                found.name,
                String::from_utf8_lossy(&found.prefix),
                String::from_utf8_lossy(&mapping.prefix),
            )));
        }
    }
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct FunctionOwner {
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = Bool)]
    ours: bool,
}

/// Checks that this session's role may mark its writes as the service's:
/// the trigger functions honour the mark only for members of their owner's
/// role (the role that ran `migrate`). Any other role's writes would all be
/// queued back to etcd as user changes (an echo loop), so it refuses to go
/// on. Then that every mapped table has its triggers, enabled.
pub async fn check_service_role(connector: &Connector, tables: &[Ident]) -> Result<(), StoreError> {
    let mut conn = connector.connect().await?;
    let found: Vec<FunctionOwner> = diesel::sql_query(
        "SELECT p.proowner::regrole::text AS owner, \
                pg_has_role(session_user, p.proowner, 'MEMBER') AS ours \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = 'mirror_after_write'",
    )
    .bind::<Text, _>(connector.schema().as_str())
    .load(&mut conn)
    .await?;
    match found.into_iter().next() {
        None => Err(StoreError::Migration(format!(
            "schema {} is not migrated: run `etcd-pg-sync migrate`",
            connector.schema().as_str()
        ))),
        Some(function) if !function.ours => Err(StoreError::Migration(format!(
            "the schema's trigger functions belong to {owner}, and this role is not a member of \
             it: its writes would be taken for users' writes; run the service as {owner} (or a \
             member of it), or run `etcd-pg-sync migrate` as the service's role",
            owner = function.owner
        ))),
        Some(_) => check_triggers(&mut conn, connector.schema(), tables).await,
    }
}

#[derive(diesel::QueryableByName)]
struct TriggerProblem {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    problem: String,
}

/// Every mapped table is a registered mirror table with its triggers
/// enabled: writes made while a trigger is disabled (or dropped) never
/// reach the outbox, so the service refuses to run over such a table.
async fn check_triggers(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    tables: &[Ident],
) -> Result<(), StoreError> {
    let names: Vec<&str> = tables.iter().map(Ident::as_str).collect();
    let problems: Vec<TriggerProblem> = diesel::sql_query(format!(
        "SELECT u.name AS table_name, \
                CASE WHEN m.relid IS NULL THEN 'is not a registered mirror table (run migrate)' \
                     WHEN m.trigger_owner IS DISTINCT FROM p.proowner \
                          THEN 'has triggers made for another owner of the schema (run migrate)' \
                     ELSE 'has its trigger ' || t.name || ' ' || \
                          CASE WHEN g.oid IS NULL THEN 'missing' ELSE 'disabled' END END AS problem \
         FROM unnest($1::text[]) AS u(name) \
         LEFT JOIN mirror_tables m ON m.name = u.name \
         LEFT JOIN pg_proc p ON p.oid = '{schema}.mirror_after_write()'::regprocedure \
         CROSS JOIN (VALUES ('etcd_sync_before'), ('etcd_sync_after'), ('etcd_sync_truncate')) AS t(name) \
         LEFT JOIN pg_trigger g ON g.tgrelid = m.relid AND g.tgname = t.name \
         WHERE m.relid IS NULL OR g.oid IS NULL OR g.tgenabled NOT IN ('O', 'A') \
            OR m.trigger_owner IS DISTINCT FROM p.proowner \
         ORDER BY 1, 2",
        schema = schema.quoted()
    ))
    .bind::<diesel::sql_types::Array<Text>, _>(&names)
    .load(conn)
    .await?;
    match problems.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(StoreError::Migration(format!(
            "mirror table {} {}: changes written while a trigger does not fire never reach \
             etcd; `etcd-pg-sync migrate` restores the triggers (ALTER TABLE ... ENABLE TRIGGER \
             ALL re-enables them), then `etcd-pg-sync verify --repair` finds what was missed",
            first.table_name, first.problem
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn every_migration_directory_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(listed, on_disk);
        for migration in MIGRATIONS {
            let date_and_number = migration.name.split('_').next().unwrap_or_default();
            assert_eq!(migration.version, date_and_number.replace('-', ""));
        }
    }
}
