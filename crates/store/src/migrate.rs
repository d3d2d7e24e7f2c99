//! Schema migrations: the embedded diesel migrations under `migrations/`,
//! then one mirror table (with triggers and text view) per mapping.
//! Serialized across replicas by an advisory lock (STYLE 12).

use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use eps_core::ident::Ident;

use crate::connect::Connector;
use crate::error::StoreError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// What `migrate` did.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub mirror_tables: Vec<String>,
}

/// Applies pending migrations and ensures the mirror tables. Idempotent.
pub async fn migrate(
    connector: &Connector,
    tables: &[Ident],
) -> Result<MigrationReport, StoreError> {
    let schema = connector.schema().clone();
    let mut conn = connector.connect().await?;
    let lock_key = format!("etcd-pg-sync migrate {schema}");
    diesel::sql_query("SELECT pg_advisory_lock(hashtext($1))")
        .bind::<diesel::sql_types::Text, _>(&lock_key)
        .execute(&mut conn)
        .await?;
    conn.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema_q}; SET search_path TO {schema_q}",
        schema_q = schema.quoted()
    ))
    .await?;

    // diesel's migration harness is synchronous: run it on a blocking thread
    // through the async connection wrapper (DEPENDENCIES pitfall 2).
    let (conn, applied) = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> =
            AsyncConnectionWrapper::from(conn);
        let applied = wrapper
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| StoreError::Migration(e.to_string()));
        (wrapper.into_inner(), applied)
    })
    .await
    .map_err(|e| StoreError::Migration(format!("migration task failed: {e}")))?;
    let mut conn = conn;
    let result = async {
        let applied = applied?;
        for table in tables {
            diesel::sql_query("SELECT ensure_mirror_table($1)")
                .bind::<diesel::sql_types::Text, _>(table.as_str())
                .execute(&mut conn)
                .await?;
        }
        Ok(MigrationReport {
            applied,
            mirror_tables: tables.iter().map(ToString::to_string).collect(),
        })
    }
    .await;
    let _ = diesel::sql_query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind::<diesel::sql_types::Text, _>(&lock_key)
        .execute(&mut conn)
        .await;
    result
}
