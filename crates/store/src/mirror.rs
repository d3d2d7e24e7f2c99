//! Reading mirror tables in key order (resync, verify).

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bytea};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::ident::Ident;

use crate::error::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct MirrorRow {
    #[diesel(sql_type = Bytea)]
    pub key: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    pub value: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    pub mod_revision: i64,
    /// The etcd lease the key is attached to (0: none).
    #[diesel(sql_type = BigInt)]
    pub lease: i64,
    /// `etcd` or `pg`: which side wrote the row last.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub origin: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Rows of `table` with `start <= key < end` (no end: unbounded) and
/// `key > after` (when given), in byte order, at most `limit`.
pub async fn page(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    start: &[u8],
    end: Option<&[u8]>,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<MirrorRow>, StoreError> {
    let rows = diesel::sql_query(format!(
        "SELECT key, value, mod_revision, lease, origin, updated_at FROM {}.{} \
         WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) AND ($3::bytea IS NULL OR key > $3) \
         ORDER BY key LIMIT $4",
        schema.quoted(),
        table.quoted()
    ))
    .bind::<Bytea, _>(start)
    .bind::<diesel::sql_types::Nullable<Bytea>, _>(end)
    .bind::<diesel::sql_types::Nullable<Bytea>, _>(after)
    .bind::<BigInt, _>(limit as i64)
    .load(conn)
    .await?;
    Ok(rows)
}

/// A page of mirror rows and the snapshot it was read at.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    pub rows: Vec<MirrorRow>,
    /// `pg_current_snapshot()` of the read, as text: the outbox rows whose
    /// transactions it sees (`outbox.xact`) are exactly those the rows
    /// reflect.
    pub snapshot: String,
}

#[derive(QueryableByName)]
struct SnapshotText {
    #[diesel(sql_type = diesel::sql_types::Text)]
    snapshot: String,
}

/// [`page`], together with the snapshot it saw.
pub async fn page_at_snapshot(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    start: &[u8],
    end: Option<&[u8]>,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<SnapshotPage, StoreError> {
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, StoreError, _>(async |conn| {
            let snapshot: SnapshotText =
                diesel::sql_query("SELECT pg_current_snapshot()::text AS snapshot")
                    .get_result(conn)
                    .await?;
            let rows = page(conn, schema, table, start, end, after, limit).await?;
            Ok(SnapshotPage {
                rows,
                snapshot: snapshot.snapshot,
            })
        })
        .await
}
