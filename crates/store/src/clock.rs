//! The revision clock: when each etcd revision was made, on PostgreSQL's
//! clock (see `docs/clocks.md`). Every replica records samples — etcd's
//! revision read linearizably between two readings of PostgreSQL's clock —
//! and a conflict asks for the window of the revision it involves.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Nullable, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::policy::ChangeWindow;

use crate::error::StoreError;

/// How many samples on each side of a revision a window is computed from:
/// any sample is valid evidence, the nearest are the tightest.
const NEAREST: i64 = 8;

/// PostgreSQL's clock and the mirror's timeline now: the start of a
/// sample.
pub async fn sample_start(
    conn: &mut AsyncPgConnection,
) -> Result<(chrono::DateTime<chrono::Utc>, i32), StoreError> {
    #[derive(QueryableByName)]
    struct Start {
        #[diesel(sql_type = Timestamptz)]
        now: chrono::DateTime<chrono::Utc>,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeline: i32,
    }
    let start: Start =
        diesel::sql_query("SELECT clock_timestamp() AS now, timeline FROM sync_state WHERE id = 1")
            .get_result(conn)
            .await?;
    Ok((start.now, start.timeline))
}

/// Records that etcd (cluster `cluster_id`) was at `revision` at some
/// moment between `read_started` and now — only while the mirror still
/// follows `timeline` (read at `read_started`: a sample taken across the
/// start of a new timeline may have read the old etcd) and etcd's cluster
/// id is the one it follows (a replaced etcd's revisions mean other
/// changes). Returns false when it was not recorded.
pub async fn record_sample(
    conn: &mut AsyncPgConnection,
    cluster_id: i64,
    revision: i64,
    started: (chrono::DateTime<chrono::Utc>, i32),
) -> Result<bool, StoreError> {
    let (read_started, timeline) = started;
    if revision <= 0 {
        // An answer without a header says nothing.
        return Ok(false);
    }
    let recorded = diesel::sql_query(
        "INSERT INTO revision_clock AS c (timeline, revision, read_started, read_finished) \
         SELECT s.timeline, $2, $3, clock_timestamp() FROM sync_state s \
         WHERE s.id = 1 AND s.timeline = $4 \
           AND (s.etcd_cluster_id IS NULL OR s.etcd_cluster_id = $1) \
         ON CONFLICT (timeline, revision) DO UPDATE SET \
             read_started = greatest(c.read_started, EXCLUDED.read_started), \
             read_finished = least(c.read_finished, EXCLUDED.read_finished)",
    )
    .bind::<BigInt, _>(cluster_id)
    .bind::<BigInt, _>(revision)
    .bind::<Timestamptz, _>(read_started)
    .bind::<diesel::sql_types::Integer, _>(timeline)
    .execute(conn)
    .await?;
    Ok(recorded > 0)
}

#[derive(QueryableByName)]
struct WindowRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    after_us: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    by_us: Option<i64>,
}

/// For each span `(first, last)` of revisions, when the change was made:
/// after the latest sample that saw a revision below `first`, and by the
/// earliest sample that saw `last` or later (`None` where no sample tells),
/// in microseconds on PostgreSQL's clock, on the current timeline.
pub async fn windows(
    conn: &mut AsyncPgConnection,
    spans: &[(i64, i64)],
) -> Result<Vec<(Option<i64>, Option<i64>)>, StoreError> {
    if spans.is_empty() {
        return Ok(Vec::new());
    }
    let (firsts, lasts): (Vec<i64>, Vec<i64>) = spans.iter().copied().unzip();
    let rows: Vec<WindowRow> = diesel::sql_query(format!(
        "WITH t AS (SELECT timeline FROM sync_state WHERE id = 1) \
         SELECT \
           (SELECT (extract(epoch FROM max(b.read_started)) * 1000000)::int8 FROM ( \
               SELECT c.read_started FROM revision_clock c, t \
               WHERE c.timeline = t.timeline AND c.revision < q.first \
               ORDER BY c.revision DESC LIMIT {NEAREST}) b) AS after_us, \
           (SELECT (extract(epoch FROM min(a.read_finished)) * 1000000)::int8 FROM ( \
               SELECT c.read_finished FROM revision_clock c, t \
               WHERE c.timeline = t.timeline AND c.revision >= q.last \
               ORDER BY c.revision LIMIT {NEAREST}) a) AS by_us \
         FROM unnest($1::int8[], $2::int8[]) WITH ORDINALITY AS q(first, last, i) \
         ORDER BY q.i"
    ))
    .bind::<Array<BigInt>, _>(&firsts)
    .bind::<Array<BigInt>, _>(&lasts)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.after_us, r.by_us)).collect())
}

/// The window of a change made at a revision in `span`, seen by the
/// service at `observed_at_us` (which bounds it when no sample does).
pub fn window_of(clock: (Option<i64>, Option<i64>), observed_at_us: i64) -> ChangeWindow {
    let (after_us, by_us) = clock;
    ChangeWindow {
        after_us,
        by_us: by_us.map_or(observed_at_us, |by| by.min(observed_at_us)),
    }
}

/// How long a transaction's commit stamp is kept (see the migration).
pub const COMMIT_STAMPS_KEPT_SECS: i64 = 15 * 60;

/// Deletes commit stamps older than [`COMMIT_STAMPS_KEPT_SECS`] of
/// transactions with no change queued any more (a queued one's stamp orders
/// it among the others); returns how many.
pub async fn forget_old_commits(conn: &mut AsyncPgConnection) -> Result<usize, StoreError> {
    Ok(diesel::sql_query(
        "DELETE FROM xact_commits c WHERE committed_at < clock_timestamp() - make_interval(secs => $1) \
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.xact = c.xact)",
    )
    .bind::<diesel::sql_types::Double, _>(COMMIT_STAMPS_KEPT_SECS as f64)
    .execute(conn)
    .await?)
}

/// Deletes samples older than `days` (0: none), a chunk per statement.
pub(crate) const PURGE: &str = "DELETE FROM revision_clock WHERE (timeline, revision) IN ( \
     SELECT timeline, revision FROM revision_clock \
     WHERE read_finished < now() - make_interval(days => $1) LIMIT $2)";
