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
/// Returns how many partitions it made. `briefly`: gives up after 5 s
/// (before a resync, which must not wait on a big move out of the default
/// partition; the housekeeping does that later).
pub async fn extend(
    conn: &mut AsyncPgConnection,
    fence: &Fence,
    period: std::time::Duration,
    at_least: i64,
    briefly: bool,
) -> Result<i32, StoreError> {
    #[derive(QueryableByName)]
    struct Made {
        #[diesel(sql_type = Integer)]
        made: i32,
    }
    conn.transaction::<_, StoreError, _>(async |conn| {
        fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
        conn.batch_execute(DDL_LOCK_TIMEOUT).await?;
        if briefly {
            conn.batch_execute("SET LOCAL statement_timeout = '5s'")
                .await?;
        }
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
/// (see migration 000012). The horizon `state_at` answers from moves
/// first; the copy of the kept rows, the long part, holds no lock the sync
/// waits for; the swap holds the history for work that grows with the rows
/// kept. Returns how many rows went.
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
    // A table of this term's, not part of the history yet: what a deposed
    // leader gets this far with changes nothing anyone reads.
    diesel::sql_query("SELECT create_history_keeping($1)")
        .bind::<BigInt, _>(fence.term)
        .execute(conn)
        .await?;
    #[derive(QueryableByName)]
    struct Kept {
        #[diesel(sql_type = BigInt)]
        total: i64,
        #[diesel(sql_type = BigInt)]
        kept: i64,
        #[diesel(sql_type = Text)]
        xid: String,
    }
    let kept: Kept = conn
        .transaction::<_, StoreError, _>(async |conn| {
            Ok(diesel::sql_query(
                "SELECT k.total, k.kept, (pg_current_xact_id()::text::int8 % 4294967296)::text AS xid \
                 FROM keep_history_rows($1, $2) k",
            )
            .bind::<Array<Text>, _>(&plan.run)
            .bind::<BigInt, _>(fence.term)
            .get_result(conn)
            .await?)
        })
        .await?;
    // A snapshot taken before the kept rows were committed would see
    // neither them nor, after the swap, the rows they replace.
    if !older_snapshots_gone(conn, &kept.xid).await? {
        tracing::info!("history retention waits for older snapshots; tried again next round");
        return Ok(0);
    }
    let late = conn
        .transaction::<_, StoreError, _>(async |conn| {
            fence::enter(conn, fence, fence::Checkpoint::Keep).await?;
            conn.batch_execute(DDL_LOCK_TIMEOUT).await?;
            let late: Count =
                diesel::sql_query("SELECT finish_history_expiry($1, $2, $3, $4, $5, $6, $7) AS n")
                    .bind::<Array<Text>, _>(&plan.run)
                    .bind::<Nullable<Integer>, _>(plan.lo_timeline)
                    .bind::<Nullable<BigInt>, _>(plan.lo_revision)
                    .bind::<Integer, _>(plan.hi_timeline)
                    .bind::<BigInt, _>(plan.hi_revision)
                    .bind::<Timestamptz, _>(plan.cutoff)
                    .bind::<BigInt, _>(fence.term)
                    .get_result(conn)
                    .await?;
            Ok(late.n)
        })
        .await?;
    Ok((kept.total - kept.kept - late).max(0) as u64)
}

/// Waits (up to 30 s) until no client session holds a snapshot that may
/// predate transaction `xid`'s commit, as `CREATE INDEX CONCURRENTLY` does.
async fn older_snapshots_gone(conn: &mut AsyncPgConnection, xid: &str) -> Result<bool, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let older: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' \
               AND backend_xmin IS NOT NULL AND age(backend_xmin) >= age($1::xid)",
        )
        .bind::<Text, _>(xid)
        .get_result(conn)
        .await?;
        if older.n == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
