//! `sync_state`: the leader's term and the durable checkpoint.

use diesel::{ExpressionMethods, OptionalExtension, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::error::StoreError;
use crate::schema::sync_state;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    pub term: i64,
    pub leader_node: Option<String>,
    pub applied_revision: i64,
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn read(conn: &mut AsyncPgConnection) -> Result<SyncState, StoreError> {
    type Row = (
        i64,
        Option<String>,
        i64,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let row: Option<Row> = sync_state::table
        .filter(sync_state::id.eq(1))
        .select((
            sync_state::term,
            sync_state::leader_node,
            sync_state::applied_revision,
            sync_state::applied_at,
        ))
        .first(conn)
        .await
        .optional()?;
    let (term, leader_node, applied_revision, applied_at) = row.ok_or_else(|| {
        StoreError::Invalid("sync_state is empty: run `etcd-pg-sync migrate`".into())
    })?;
    Ok(SyncState {
        term,
        leader_node,
        applied_revision,
        applied_at,
    })
}

/// Makes `term` the current one if it is newer than the stored term. Waits
/// for the old leader's open transactions (they hold the row lock); returns
/// false when a newer term is already stored.
///
/// A stored term above `etcd_revision` (etcd's current revision) cannot come
/// from this etcd — terms are create revisions — but from one that was
/// replaced (restored from backup, rebuilt with `restore-etcd`); it is
/// superseded too. Its leaders cannot write here: the equality check fails.
pub async fn claim_term(
    conn: &mut AsyncPgConnection,
    term: i64,
    node: &str,
    etcd_revision: i64,
) -> Result<bool, StoreError> {
    use diesel::BoolExpressionMethods;
    let superseded = sync_state::term
        .lt(term)
        .or(sync_state::term.gt(etcd_revision));
    let updated = diesel::update(
        sync_state::table
            .filter(sync_state::id.eq(1))
            .filter(superseded),
    )
    .set((
        sync_state::term.eq(term),
        sync_state::leader_node.eq(node),
        sync_state::leader_since.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .await?;
    Ok(updated == 1)
}

#[derive(diesel::QueryableByName)]
struct TableName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// Which of `tables` were created since the mirror last matched etcd (new
/// mappings, tables dropped and created again): see `mirror_tables.synced`.
pub async fn unsynced_tables(
    conn: &mut AsyncPgConnection,
    tables: &[&str],
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<TableName> = diesel::sql_query(
        "SELECT name FROM mirror_tables WHERE NOT synced AND name = ANY($1) ORDER BY name",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

#[derive(diesel::QueryableByName)]
struct Relid {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    relid: i64,
}

/// The relations of `tables` as registered now: a resync marks in sync
/// the relations it walked, not whatever carries their names when it ends
/// (a table dropped and created again meanwhile is a new one).
pub async fn table_relids(
    conn: &mut AsyncPgConnection,
    tables: &[&str],
) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<Relid> =
        diesel::sql_query("SELECT relid::int8 AS relid FROM mirror_tables WHERE name = ANY($1)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
            .load(conn)
            .await?;
    Ok(rows.into_iter().map(|r| r.relid).collect())
}

/// Tables registered but not among `tables` (the mapped ones) are not kept
/// in sync by this leader: a mapping removed, or made `pg-to-etcd`. If it
/// comes back, its table is filled from etcd again.
pub async fn unsync_unmapped(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    tables: &[&str],
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Keep).await?;
        diesel::sql_query(
            "UPDATE mirror_tables SET synced = false WHERE synced AND name <> ALL($1)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(tables)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// Ends a resync: the checkpoint becomes exactly `revision` and the
/// relations walked at it (`relids`) are marked in sync, in one fenced
/// transaction.
pub async fn finish_resync(
    conn: &mut AsyncPgConnection,
    fence: &crate::Fence,
    revision: i64,
    relids: &[i64],
) -> Result<(), StoreError> {
    use diesel_async::AsyncConnection;
    conn.transaction::<_, StoreError, _>(async |conn| {
        crate::fence::enter(conn, fence, crate::fence::Checkpoint::Set(revision)).await?;
        diesel::sql_query("UPDATE mirror_tables SET synced = true WHERE relid::int8 = ANY($1)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(relids)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}
