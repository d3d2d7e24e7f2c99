//! The history's partitions (migration 000012): ranges of (timeline,
//! revision) made ahead of the sync by the leader, and retention that
//! replaces a run of old partitions by their keys' newest rows.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Double, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::error::StoreError;
use crate::fence::{self, Fence};

/// How long partition DDL waits for a lock (a user's long query on the
/// history) before it gives up until the next round; meanwhile history
/// writes may wait behind it.
const DDL_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Makes the next partition of the current timeline when less than half a
/// partition is left above the newest revision known (at least
/// `at_least`), sized for `period` of changes at the measured rate; moves
/// rows the default partition caught into partitions made for them.
/// Returns how many partitions it made.
pub async fn extend(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    period: std::time::Duration,
    at_least: i64,
) -> Result<i32, StoreError> {
    #[derive(QueryableByName)]
    struct Made {
        #[diesel(sql_type = Integer)]
        made: i32,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        conn.batch_execute(DDL_LOCK_TIMEOUT).await?;
        let made: Made = diesel::sql_query(
            "SELECT extend_history_partitions(make_interval(secs => $1), $2) AS made",
        )
        .bind::<Double, _>(period.as_secs_f64())
        .bind::<BigInt, _>(at_least)
        .get_result(conn)
        .await?;
        Ok(made.made)
    })
    .await
}

#[derive(QueryableByName)]
struct Expiry {
    #[diesel(sql_type = Array<Text>)]
    run: Vec<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    lo_timeline: Option<i32>,
    #[diesel(sql_type = Nullable<BigInt>)]
    lo_revision: Option<i64>,
    #[diesel(sql_type = Integer)]
    hi_timeline: i32,
    #[diesel(sql_type = BigInt)]
    hi_revision: i64,
    #[diesel(sql_type = Timestamptz)]
    cutoff: chrono::DateTime<chrono::Utc>,
}

/// History retention: the oldest run of partitions whose rows are all older
/// than `days` is replaced by one holding each key's newest row among them
/// (see migration 000012). Three transactions: the horizon `state_at`
/// answers from moves first; the copy of the kept rows, the long part,
/// holds no lock the sync waits for; the swap holds history writes off
/// briefly. Returns how many rows went.
pub async fn expire(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    days: u32,
) -> Result<u64, StoreError> {
    if days == 0 {
        return Ok(0);
    }
    let plan: Option<Expiry> = conn
        .transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            let found: Vec<Expiry> = diesel::sql_query("SELECT * FROM begin_history_expiry($1)")
                .bind::<Integer, _>(days as i32)
                .load(conn)
                .await?;
            Ok(found.into_iter().next())
        })
        .await?;
    let Some(plan) = plan else {
        return Ok(0);
    };
    // A standalone table, not yet part of the history: a deposed leader
    // that gets this far changes nothing anyone reads.
    let total: Count = diesel::sql_query("SELECT keep_history_rows($1) AS n")
        .bind::<Array<Text>, _>(&plan.run)
        .get_result(conn)
        .await?;
    let kept = conn
        .transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            conn.batch_execute(DDL_LOCK_TIMEOUT).await?;
            let kept: Count =
                diesel::sql_query("SELECT finish_history_expiry($1, $2, $3, $4, $5, $6) AS n")
                    .bind::<Array<Text>, _>(&plan.run)
                    .bind::<Nullable<Integer>, _>(plan.lo_timeline)
                    .bind::<Nullable<BigInt>, _>(plan.lo_revision)
                    .bind::<Integer, _>(plan.hi_timeline)
                    .bind::<BigInt, _>(plan.hi_revision)
                    .bind::<Timestamptz, _>(plan.cutoff)
                    .get_result(conn)
                    .await?;
            Ok(kept.n)
        })
        .await?;
    Ok((total.n - kept).max(0) as u64)
}
