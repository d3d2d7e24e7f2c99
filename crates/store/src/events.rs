//! The audit trail (`sync_events`).

use diesel::ExpressionMethods;
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

/// Appends many audit events in one statement per 10,000 (bind limit).
/// Takes the connection shared so the insert can be pipelined with the
/// caller's other statements.
pub async fn record_many(
    conn: &AsyncPgConnection,
    fence: &Fence,
    trace_id: Option<&str>,
    events: &[(AuditKind, serde_json::Value)],
) -> Result<(), StoreError> {
    for chunk in events.chunks(10_000) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(kind, detail)| {
                (
                    sync_events::kind.eq(kind.as_str()),
                    sync_events::node.eq(&fence.node),
                    sync_events::term.eq(fence.term),
                    sync_events::trace_id.eq(trace_id),
                    sync_events::detail.eq(detail),
                )
            })
            .collect();
        diesel::insert_into(sync_events::table)
            .values(rows)
            .execute(&mut &*conn)
            .await?;
    }
    Ok(())
}
