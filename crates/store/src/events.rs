//! The audit trail (`sync_events`).

use diesel::ExpressionMethods;
use diesel::sql_types::{Array, BigInt, Jsonb, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::audit::AuditKind;

use crate::error::StoreError;
use crate::fence::Fence;
use crate::schema::sync_events;

/// Appends one audit event inside the caller's transaction.
pub async fn record(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    kind: AuditKind,
    trace_id: Option<&str>,
    detail: &serde_json::Value,
) -> Result<(), StoreError> {
    diesel::insert_into(sync_events::table)
        .values((
            sync_events::kind.eq(kind.as_str()),
            sync_events::node.eq(&fence.node),
            sync_events::term.eq(fence.term),
            sync_events::trace_id.eq(trace_id),
            sync_events::detail.eq(detail),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends many audit events in one statement (arrays of kinds and
/// details, so the statement is the same whatever their number and is
/// prepared once). Takes the connection shared so the insert can be
/// pipelined with the caller's other statements.
pub async fn record_many(
    conn: &AsyncPgConnection,
    fence: &Fence,
    trace_id: Option<&str>,
    events: &[(AuditKind, serde_json::Value)],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = events.iter().map(|(kind, _)| kind.as_str()).collect();
    let details: Vec<&serde_json::Value> = events.iter().map(|(_, detail)| detail).collect();
    diesel::sql_query(
        "INSERT INTO sync_events (kind, node, term, trace_id, detail) \
         SELECT e.kind, $3, $4, $5, e.detail FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS e(kind, detail, n) \
         ORDER BY e.n",
    )
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<Jsonb>, _>(&details)
    .bind::<Text, _>(&fence.node)
    .bind::<BigInt, _>(fence.term)
    .bind::<Nullable<Text>, _>(trace_id)
    .execute(&mut &*conn)
    .await?;
    Ok(())
}
