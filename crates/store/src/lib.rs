//! The PostgreSQL side of etcd-pg-sync: schema and migrations, the fenced
//! apply transaction, the outbox, the ledgers (conflicts, dead letters) and
//! the audit trail.
//!
//! *Architecture invariant*: only this crate depends on diesel; it never sees
//! etcd-client types (etcd data arrives as `eps_core::model` values).

pub mod apply;
pub mod catchup;
pub mod clock;
pub mod connect;
pub mod deferred;
pub mod error;
pub mod events;
pub mod fence;
pub mod ledger;
pub mod migrate;
pub mod mirror;
pub mod notify;
pub mod outbox;
pub mod partitions;
pub mod preflight;
pub mod rollback;
pub mod schema;
pub mod state;
pub mod tls;
pub mod transactions;

use std::time::Duration;

use eps_core::config::Config;
use eps_core::ident::Ident;
use eps_core::mapping::MappingSet;

pub use apply::{ApplyReport, ApplyRequest, KeyInputs, Repair};
pub use connect::{Connector, Pool};
pub use error::StoreError;
pub use fence::Fence;
pub use outbox::{DeadLetterKind, OutboxRow, Refusal};
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
        let limits = connect::SessionLimits::for_lease_ttl(Duration::from_secs(
            config.cluster.lease_ttl_secs,
        ));
        let connector = Connector::new(&config.postgres, limits)?;
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

    /// A pooled connection, its failure typed (an unreachable server is
    /// [`StoreError::Unavailable`]).
    pub async fn connection(&self) -> Result<connect::PooledConnection<'_>, StoreError> {
        Ok(self.pool.get().await?)
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Applies the schema and creates the mirror tables. Idempotent.
    pub async fn migrate(&self) -> Result<migrate::MigrationReport, StoreError> {
        migrate::migrate(&self.connector, &self.mappings).await
    }

    /// Fails unless this role's writes are recognized as the service's own
    /// by the schema's triggers and every mapped table has its triggers
    /// (see [`migrate::check_service_role`]).
    pub async fn check_service_role(&self) -> Result<(), StoreError> {
        let tables: Vec<Ident> = self.mappings.iter().map(|m| m.table.clone()).collect();
        migrate::check_service_role(&self.connector, &tables).await
    }

    /// Opens one connection outside the pool: the typed error tells a
    /// refused password or certificate (permanent) from an unreachable
    /// server (retryable).
    pub async fn check_connection(&self) -> Result<(), StoreError> {
        self.connector.connect().await.map(|_| ())
    }

    /// The server, this role's rights and the connection headroom, read on
    /// a connection outside the pool (see [`preflight::facts`]).
    pub async fn preflight(&self) -> Result<preflight::PgFacts, StoreError> {
        let mut conn = self.connector.connect().await?;
        preflight::facts(&mut conn, self.connector.schema()).await
    }

    /// See [`rollback::plan`].
    pub async fn rollback_plan(
        &self,
        table: &Ident,
        range: (&[u8], Option<&[u8]>),
        revision: i64,
    ) -> Result<Vec<rollback::RollbackChange>, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::plan(&mut conn, self.connector.schema(), table, range, revision).await
    }

    /// See [`rollback::table_record`].
    pub async fn table_record(
        &self,
        table: &Ident,
    ) -> Result<Option<rollback::TableRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::table_record(&mut conn, table).await
    }

    /// See [`rollback::queued_in_range`].
    pub async fn queued_in_range(
        &self,
        table: &Ident,
        range: (&[u8], Option<&[u8]>),
    ) -> Result<i64, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::queued_in_range(&mut conn, table, range).await
    }

    /// See [`rollback::revision_at`].
    pub async fn revision_at(&self, at: chrono::DateTime<chrono::Utc>) -> Result<i64, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::revision_at(&mut conn, self.connector.schema(), at).await
    }

    /// See [`partitions::extend`].
    pub async fn extend_history(
        &self,
        fence: &Fence,
        period: std::time::Duration,
        at_least: i64,
        briefly: bool,
    ) -> Result<i32, StoreError> {
        let mut conn = self.pool.get().await?;
        partitions::extend(&mut conn, fence, period, at_least, briefly).await
    }

    /// See [`rollback::rewind`].
    pub async fn rewind(
        &self,
        fence: &Fence,
        ranges: &[rollback::RewindRange<'_>],
        revision: i64,
        set_aside: bool,
    ) -> Result<rollback::Rewound, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::rewind(
            &mut conn,
            self.connector.schema(),
            fence,
            ranges,
            revision,
            set_aside,
        )
        .await
    }

    /// See [`state::history_whole_from`].
    pub async fn history_whole_from(
        &self,
        fence: &Fence,
        tables: &[&str],
        revision: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::history_whole_from(&mut conn, fence, tables, revision).await
    }

    /// See [`rollback::apply`].
    pub async fn rollback_apply(
        &self,
        table: &Ident,
        changes: &[rollback::RollbackChange],
    ) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await?;
        rollback::apply(&mut conn, self.connector.schema(), table, changes).await
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

    pub async fn claim_term(
        &self,
        term: i64,
        node: &str,
        etcd_revision: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        state::claim_term(&mut conn, term, node, etcd_revision).await
    }

    /// One apply transaction (see [`apply`]).
    pub async fn apply(&self, request: &ApplyRequest<'_>) -> Result<ApplyReport, StoreError> {
        let mut conn = self.pool.get().await?;
        apply::apply(&mut conn, self.connector.schema(), &self.mappings, request).await
    }

    /// Advances the checkpoint alone (a progress notification: nothing
    /// happened in the mapped ranges up to `revision`).
    pub async fn advance_checkpoint(&self, fence: &Fence, revision: i64) -> Result<(), StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Advance(revision))
                .await
                .map(|_| ())
        })
        .await
    }

    /// The ranges of a parallel catch-up left (see [`catchup`]).
    pub async fn catchup_ranges(&self) -> Result<catchup::Ranges, StoreError> {
        let mut conn = self.pool.get().await?;
        catchup::load(&mut conn).await
    }

    /// Starts a parallel catch-up (see [`catchup::begin`]).
    pub async fn begin_catchup(
        &self,
        fence: &Fence,
        from: i64,
        bounds: &[Vec<u8>],
    ) -> Result<catchup::Ranges, StoreError> {
        let mut conn = self.pool.get().await?;
        catchup::begin(&mut conn, fence, from, bounds).await
    }

    /// Moves a catch-up range's checkpoint alone (see [`catchup::advance`]).
    pub async fn advance_catchup_range(
        &self,
        fence: &Fence,
        start: &[u8],
        revision: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        catchup::advance(&mut conn, fence, start, revision).await
    }

    /// Sets the checkpoint to exactly `revision` (the end of a resync).
    pub async fn set_checkpoint(&self, fence: &Fence, revision: i64) -> Result<(), StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Set(revision))
                .await
                .map(|_| ())
        })
        .await
    }

    /// See [`state::unsynced_tables`].
    pub async fn unsynced_tables(&self, tables: &[&str]) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.get().await?;
        state::unsynced_tables(&mut conn, tables).await
    }

    /// See [`state::last_applied_change`].
    pub async fn last_applied_change(
        &self,
    ) -> Result<Option<(Vec<u8>, i64, Option<Vec<u8>>)>, StoreError> {
        let mut conn = self.pool.get().await?;
        state::last_applied_change(&mut conn).await
    }

    /// See [`state::record_cluster_id`].
    pub async fn record_cluster_id(
        &self,
        fence: &Fence,
        cluster_id: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::record_cluster_id(&mut conn, fence, cluster_id).await
    }

    /// See [`state::forget_timeline_mark`].
    pub async fn forget_timeline_mark(&self, fence: &Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::forget_timeline_mark(&mut conn, fence).await
    }

    /// See [`state::prepare_timeline_mark`].
    pub async fn prepare_timeline_mark(
        &self,
        fence: &Fence,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::prepare_timeline_mark(&mut conn, fence, token).await
    }

    /// See [`state::confirm_timeline_mark`].
    pub async fn confirm_timeline_mark(
        &self,
        fence: &Fence,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::confirm_timeline_mark(&mut conn, fence, token).await
    }

    /// See [`state::begin_timeline`]; every mapped table's metadata is
    /// forgotten.
    pub async fn begin_timeline(
        &self,
        fence: &Fence,
        cluster_id: i64,
        detail: &serde_json::Value,
    ) -> Result<i32, StoreError> {
        let tables: Vec<&Ident> = self.mappings.iter().map(|m| &m.table).collect();
        let one_way: Vec<&str> = self
            .mappings
            .iter()
            .filter(|m| !m.direction.etcd_to_pg())
            .map(|m| m.table.as_str())
            .collect();
        let mut conn = self.pool.get().await?;
        state::begin_timeline(
            &mut conn,
            self.connector.schema(),
            fence,
            &tables,
            &one_way,
            cluster_id,
            detail,
        )
        .await
    }

    /// See [`state::adopt_timeline`].
    pub async fn adopt_timeline(
        &self,
        fence: &Fence,
        cluster_id: i64,
        detail: &serde_json::Value,
    ) -> Result<i32, StoreError> {
        let mut conn = self.pool.get().await?;
        state::adopt_timeline(&mut conn, fence, cluster_id, detail).await
    }

    /// See [`state::table_relids`].
    pub async fn table_relids(&self, tables: &[&str]) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.pool.get().await?;
        state::table_relids(&mut conn, tables).await
    }

    /// See [`state::unsync_unmapped`].
    pub async fn unsync_unmapped(&self, fence: &Fence, tables: &[&str]) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::unsync_unmapped(&mut conn, fence, tables).await
    }

    /// See [`state::finish_resync`].
    pub async fn finish_resync(
        &self,
        fence: &Fence,
        revision: i64,
        relids: &[i64],
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        state::finish_resync(&mut conn, fence, revision, relids).await
    }

    /// Keys with inputs deferred for held rows (see [`deferred::keys`]).
    pub async fn deferred_keys(
        &self,
        after: Option<&deferred::DeferredKey>,
        limit: usize,
    ) -> Result<Vec<deferred::DeferredKey>, StoreError> {
        let mut conn = self.pool.get().await?;
        deferred::keys(&mut conn, after, limit).await
    }

    /// Drops deferred inputs (see [`deferred::discard`]), fenced.
    pub async fn discard_deferred(
        &self,
        fence: &Fence,
        tables: &[&str],
    ) -> Result<usize, StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            deferred::discard(conn, tables).await
        })
        .await
    }

    /// Drops the deferred inputs of a key no mapping covers any more, fenced.
    pub async fn discard_deferred_key(
        &self,
        fence: &Fence,
        table: &str,
        key: &[u8],
    ) -> Result<usize, StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            deferred::discard_key(conn, table, key).await
        })
        .await
    }

    /// See [`deferred::report_blocked`].
    pub async fn report_blocked_keys(
        &self,
        fence: &Fence,
        after: Duration,
    ) -> Result<Vec<deferred::BlockedReport>, StoreError> {
        let mut conn = self.pool.get().await?;
        deferred::report_blocked(&mut conn, self.connector.schema(), fence, after).await
    }

    /// PostgreSQL's clock now.
    pub async fn clock(&self) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Now {
            #[diesel(sql_type = diesel::sql_types::Timestamptz)]
            now: chrono::DateTime<chrono::Utc>,
        }
        let mut conn = self.pool.get().await?;
        let now: Now = diesel::sql_query("SELECT clock_timestamp() AS now")
            .get_result(&mut conn)
            .await?;
        Ok(now.now)
    }

    /// Moves the checkpoint back to `revision` if it is past it.
    pub async fn lower_checkpoint(&self, fence: &Fence, revision: i64) -> Result<(), StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::AtMost(revision))
                .await
                .map(|_| ())
        })
        .await
    }

    /// Records an audit event in its own (fenced) transaction.
    pub async fn record_event(
        &self,
        fence: &Fence,
        kind: eps_core::audit::AuditKind,
        trace_id: Option<&str>,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        use diesel_async::AsyncConnection;
        let mut conn = self.pool.get().await?;
        conn.transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            events::record(conn, fence, kind, trace_id, detail).await
        })
        .await
    }

    /// See [`outbox::pending`].
    pub async fn pending_outbox(
        &self,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::pending(&mut conn, limit, max_bytes).await
    }

    /// See [`outbox::mark_sent`].
    pub async fn mark_sent(&self, fence: &Fence, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::mark_sent(&mut conn, fence, ids).await
    }

    /// See [`outbox::unmark_sent`].
    pub async fn unmark_sent(&self, fence: &Fence, ids: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::unmark_sent(&mut conn, fence, ids).await
    }

    pub async fn consume_outbox(&self, fence: &Fence, ids: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::consume(&mut conn, fence, ids).await
    }

    pub async fn record_attempt(
        &self,
        fence: &Fence,
        id: i64,
        error: &str,
    ) -> Result<i32, StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::record_attempt(&mut conn, fence, id, error).await
    }

    pub async fn dead_letter(
        &self,
        fence: &Fence,
        refused: &[outbox::Refusal<'_>],
        landed: &[i64],
        trace_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await?;
        outbox::dead_letter(&mut conn, fence, refused, landed, trace_id).await
    }

    /// See [`transactions::dropped_keys`].
    pub async fn dropped_keys(
        &self,
        after: Option<&transactions::DroppedKey>,
        limit: usize,
    ) -> Result<Vec<transactions::DroppedKey>, StoreError> {
        let mut conn = self.pool.get().await?;
        transactions::dropped_keys(&mut conn, after, limit).await
    }

    /// A page of a mirror table in key order (resync, verify).
    pub async fn mirror_page(
        &self,
        table: &Ident,
        request: mirror::PageRequest<'_>,
    ) -> Result<mirror::Page, StoreError> {
        let mut conn = self.pool.get().await?;
        mirror::page(&mut conn, self.connector.schema(), table, request).await
    }

    /// A page of a mirror table and the snapshot it was read at (see
    /// [`mirror::page_at_snapshot`]).
    pub async fn mirror_page_at_snapshot(
        &self,
        table: &Ident,
        request: mirror::PageRequest<'_>,
    ) -> Result<mirror::SnapshotPage, StoreError> {
        let mut conn = self.pool.get().await?;
        mirror::page_at_snapshot(&mut conn, self.connector.schema(), table, request).await
    }

    /// See [`ledger::request_timeline_resolutions`].
    pub async fn request_timeline_resolutions(
        &self,
        side: eps_core::policy::Side,
    ) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::request_timeline_resolutions(&mut conn, side).await
    }

    /// See [`state::release_timeline_hold`].
    pub async fn release_timeline_hold(
        &self,
        fence: &Fence,
        detail: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        state::release_timeline_hold(&mut conn, fence, detail).await
    }

    /// Holds a new etcd timeline for an operator (see [`state::hold_timeline`]).
    pub async fn hold_timeline(
        &self,
        fence: &Fence,
        detail: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        state::hold_timeline(&mut conn, fence, detail).await
    }

    /// Records an operator's answer to a held timeline (see
    /// [`state::decide_timeline`]).
    pub async fn decide_timeline(
        &self,
        side: eps_core::policy::Side,
    ) -> Result<Option<(serde_json::Value, eps_core::policy::Side)>, StoreError> {
        let mut conn = self.pool.get().await?;
        state::decide_timeline(&mut conn, side).await
    }

    /// See [`ledger::resolved_by_operator`].
    pub async fn resolved_by_operator(&self, ids: &[i64]) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::resolved_by_operator(&mut conn, ids).await
    }

    pub async fn requested_resolutions(&self) -> Result<Vec<ledger::ConflictRow>, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::requested_resolutions(&mut conn).await
    }

    pub async fn execute_resolution(
        &self,
        fence: &Fence,
        conflict: &ledger::ConflictRow,
        take: eps_core::policy::Side,
        etcd_now: Option<&eps_core::model::KeyValue>,
    ) -> Result<ledger::Resolution, StoreError> {
        let pg_to_etcd = self
            .mappings
            .iter()
            .any(|m| m.table.as_str() == conflict.mirror_table && m.direction.pg_to_etcd());
        let mut conn = self.pool.get().await?;
        ledger::execute_resolution(
            &mut conn,
            self.connector.schema(),
            fence,
            conflict,
            take,
            etcd_now,
            pg_to_etcd,
        )
        .await
    }

    /// See [`ledger::enqueue_change`].
    pub async fn enqueue_change(
        &self,
        fence: &Fence,
        table: &Ident,
        key: &[u8],
        value: Option<&[u8]>,
        etcd_now: Option<&eps_core::model::KeyValue>,
        seen: Option<&mirror::MirrorRow>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::enqueue_change(
            &mut conn,
            self.connector.schema(),
            fence,
            table,
            key,
            value,
            etcd_now,
            seen,
        )
        .await
    }

    /// See [`ledger::adopt_etcd_meta`].
    pub async fn adopt_etcd_meta(
        &self,
        fence: &Fence,
        table: &Ident,
        etcd_now: &eps_core::model::KeyValue,
        seen: &mirror::MirrorRow,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::adopt_etcd_meta(
            &mut conn,
            self.connector.schema(),
            fence,
            table,
            etcd_now,
            seen,
        )
        .await
    }

    /// See [`ledger::mark_restored`].
    pub async fn mark_restored(
        &self,
        fence: &Fence,
        table: &Ident,
        restored: &[(&[u8], i64, i64)],
        revision: i64,
        snapshot: &str,
    ) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::mark_restored(
            &mut conn,
            self.connector.schema(),
            fence,
            table,
            restored,
            revision,
            snapshot,
        )
        .await
    }

    /// Rows in a mirror table (for progress).
    pub async fn mirror_rows(&self, table: &Ident) -> Result<i64, StoreError> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.pool.get().await?;
        let rows: Vec<Count> = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM {}",
            self.schema().qualify(table)
        ))
        .load(&mut conn)
        .await?;
        Ok(rows.into_iter().next().map_or(0, |c| c.n))
    }

    pub async fn has_pending(&self, table: &str, key: &[u8]) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::has_pending(&mut conn, table, key).await
    }

    /// See [`ledger::changed_after`].
    pub async fn changed_after(&self, key: &[u8], revision: i64) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::changed_after(&mut conn, key, revision).await
    }

    pub async fn recorded_at(
        &self,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::recorded_at(&mut conn, key, revision).await
    }

    /// Retention (see [`ledger::purge`]).
    pub async fn purge(
        &self,
        fence: &Fence,
        events_days: u32,
        history_days: u32,
        clock_days: u32,
    ) -> Result<(usize, usize, usize), StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::purge(&mut conn, fence, events_days, history_days, clock_days).await
    }

    /// See [`clock::forget_old_commits`].
    pub async fn forget_old_commits(&self) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await?;
        clock::forget_old_commits(&mut conn).await
    }

    /// The start of a revision clock sample (see [`clock::sample_start`]).
    pub async fn clock_sample_start(
        &self,
    ) -> Result<(chrono::DateTime<chrono::Utc>, i32), StoreError> {
        let mut conn = self.pool.get().await?;
        clock::sample_start(&mut conn).await
    }

    /// Records a revision clock sample (see [`clock::record_sample`]).
    pub async fn record_clock_sample(
        &self,
        cluster_id: u64,
        revision: i64,
        started: (chrono::DateTime<chrono::Utc>, i32),
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        // Stored as PostgreSQL's bigint: the same 64 bits.
        clock::record_sample(&mut conn, cluster_id as i64, revision, started).await
    }

    /// When an etcd change at a revision in `span` (first, last) was made,
    /// as far as the revision clock tells; it existed at `observed_at` at
    /// the latest.
    pub async fn change_window(
        &self,
        span: (i64, i64),
        observed_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<eps_core::policy::ChangeWindow, StoreError> {
        let mut conn = self.pool.get().await?;
        let clock = clock::windows(&mut conn, &[span]).await?;
        let clock = clock.into_iter().next().unwrap_or((None, None));
        Ok(clock::window_of(clock, observed_at.timestamp_micros()))
    }

    pub async fn counts(&self) -> Result<ledger::Counts, StoreError> {
        let mut conn = self.pool.get().await?;
        ledger::counts(&mut conn).await
    }
}
