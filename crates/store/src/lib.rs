//! The PostgreSQL side of etcd-pg-sync: schema and migrations, the fenced
//! apply transaction, the outbox, the ledgers (conflicts, dead letters) and
//! the audit trail.
//!
//! *Architecture invariant*: only this crate depends on diesel; it never sees
//! etcd-client types (etcd data arrives as `eps_core::model` values).

pub mod apply;
pub mod connect;
pub mod error;
pub mod events;
pub mod fence;
pub mod migrate;
pub mod schema;
pub mod state;

use std::time::Duration;

use eps_core::config::Config;
use eps_core::ident::Ident;
use eps_core::mapping::MappingSet;

pub use apply::{ApplyReport, ApplyRequest, KeyInputs};
pub use connect::{Connector, Pool};
pub use error::StoreError;
pub use fence::Fence;
pub use state::SyncState;

/// A handle on the service's PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    connector: Connector,
    mappings: MappingSet,
}

impl Store {
    /// Builds the pool; connections open lazily (the first query tells
    /// whether PostgreSQL is reachable).
    pub async fn new(config: &Config) -> Result<Store, StoreError> {
        let connector = Connector::new(&config.postgres)?;
        let pool = connector
            .pool(
                config.postgres.pool_size,
                Duration::from_millis(config.postgres.connect_timeout_ms),
            )
            .await?;
        let mappings = config
            .validated_mappings()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(Store {
            pool,
            connector,
            mappings,
        })
    }

    pub fn schema(&self) -> &Ident {
        self.connector.schema()
    }

    pub fn mappings(&self) -> &MappingSet {
        &self.mappings
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Applies the schema and creates the mirror tables. Idempotent.
    pub async fn migrate(&self) -> Result<migrate::MigrationReport, StoreError> {
        let tables: Vec<Ident> = self.mappings.iter().map(|m| m.table.clone()).collect();
        migrate::migrate(&self.connector, &tables).await
    }

    /// True when a connection can be had and answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        use diesel_async::RunQueryDsl;
        let mut conn = self.pool.get().await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    pub async fn state(&self) -> Result<SyncState, StoreError> {
        let mut conn = self.pool.get().await?;
        state::read(&mut conn).await
    }

    pub async fn claim_term(&self, term: i64, node: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        state::claim_term(&mut conn, term, node).await
    }

    /// One apply transaction (see [`apply`]).
    pub async fn apply(&self, request: &ApplyRequest<'_>) -> Result<ApplyReport, StoreError> {
        let mut conn = self.pool.get().await?;
        apply::apply(&mut conn, self.connector.schema(), &self.mappings, request).await
    }
}
