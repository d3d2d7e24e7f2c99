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
    /// Which side wrote the row last.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub origin: eps_core::policy::Side,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Which rows to read: `start <= key < end` (no end: unbounded) and
/// `key > after` (when given), in byte order, at most `rows` of them and
/// about `bytes` of keys and values (a page holds at least one row, and
/// stops after the row that reaches the budget).
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    pub start: &'a [u8],
    pub end: Option<&'a [u8]>,
    pub after: Option<&'a [u8]>,
    pub rows: usize,
    pub bytes: usize,
}

/// A page of a mirror table.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub rows: Vec<MirrorRow>,
    /// Rows past the page may exist (the row or byte budget ended it).
    pub more: bool,
}

#[derive(QueryableByName)]
struct PagedRow {
    #[diesel(sql_type = Bytea)]
    key: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    value: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    mod_revision: i64,
    #[diesel(sql_type = BigInt)]
    lease: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    origin: eps_core::policy::Side,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    updated_at: chrono::DateTime<chrono::Utc>,
    /// Rows the page read before the byte budget cut it.
    #[diesel(sql_type = BigInt)]
    fetched: i64,
}

/// One page of `table` (see [`PageRequest`]). Sizes come from
/// `octet_length`, which does not read TOASTed values: only the rows
/// returned are read in full.
pub async fn page(
    conn: &mut AsyncPgConnection,
    schema: &Ident,
    table: &Ident,
    request: PageRequest<'_>,
) -> Result<Page, StoreError> {
    let rows: Vec<PagedRow> = diesel::sql_query(format!(
        "SELECT key, value, mod_revision, lease, origin, updated_at, fetched FROM ( \
             SELECT *, count(*) OVER () AS fetched, \
                    sum(octet_length(key) + octet_length(value)) OVER (ORDER BY key ROWS UNBOUNDED PRECEDING) \
                        - (octet_length(key) + octet_length(value)) AS before \
             FROM (SELECT key, value, mod_revision, lease, origin, updated_at FROM {} \
                   WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) AND ($3::bytea IS NULL OR key > $3) \
                   ORDER BY key LIMIT $4) AS limited \
         ) AS sized WHERE before < $5 ORDER BY key",
        schema.qualify(table)
    ))
    .bind::<Bytea, _>(request.start)
    .bind::<diesel::sql_types::Nullable<Bytea>, _>(request.end)
    .bind::<diesel::sql_types::Nullable<Bytea>, _>(request.after)
    .bind::<BigInt, _>(request.rows as i64)
    .bind::<BigInt, _>(request.bytes as i64)
    .load(conn)
    .await?;
    let fetched = <[_]>::first(&rows).map_or(0, |r| r.fetched as usize);
    let more = fetched == request.rows || rows.len() < fetched;
    let rows = rows
        .into_iter()
        .map(|r| MirrorRow {
            key: r.key,
            value: r.value,
            mod_revision: r.mod_revision,
            lease: r.lease,
            origin: r.origin,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Page { rows, more })
}

/// A page of mirror rows and the snapshot it was read at.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    pub rows: Vec<MirrorRow>,
    /// Rows past the page may exist.
    pub more: bool,
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
    request: PageRequest<'_>,
) -> Result<SnapshotPage, StoreError> {
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, StoreError, _>(async |conn| {
            let snapshot: SnapshotText =
                diesel::sql_query("SELECT pg_current_snapshot()::text AS snapshot")
                    .get_result(conn)
                    .await?;
            let page = page(conn, schema, table, request).await?;
            Ok(SnapshotPage {
                rows: page.rows,
                more: page.more,
                snapshot: snapshot.snapshot,
            })
        })
        .await
}
