//! Metric names (README "Observability": all start with `etcd_pg_sync_`) and the named
//! events that log and count together (docs/design.md D9). Labels take values from
//! fixed sets: never a key or an error text.

pub const IS_LEADER: &str = "etcd_pg_sync_is_leader";
pub const TERM: &str = "etcd_pg_sync_term";
pub const APPLIED_REVISION: &str = "etcd_pg_sync_applied_revision";
pub const ETCD_REVISION: &str = "etcd_pg_sync_etcd_revision";
pub const CHANGES_TOTAL: &str = "etcd_pg_sync_changes_total";
pub const APPLY_LATENCY_SECONDS: &str = "etcd_pg_sync_apply_latency_seconds";
pub const BATCH_SIZE: &str = "etcd_pg_sync_batch_size";
pub const CONFLICTS_TOTAL: &str = "etcd_pg_sync_conflicts_total";
pub const CONFLICTS_PENDING: &str = "etcd_pg_sync_conflicts_pending";
pub const RETRIES_TOTAL: &str = "etcd_pg_sync_retries_total";
pub const DEAD_LETTERS: &str = "etcd_pg_sync_dead_letters";
pub const DEAD_LETTERS_TOTAL: &str = "etcd_pg_sync_dead_letters_total";
pub const COMPACTION_RECOVERIES_TOTAL: &str = "etcd_pg_sync_compaction_recoveries_total";
pub const OUTBOX_DEPTH: &str = "etcd_pg_sync_outbox_depth";
pub const ACTOR_RESTARTS: &str = "etcd_pg_sync_actor_restarts_total";
pub const WATCH_LAG_REVISIONS: &str = "etcd_pg_sync_watch_lag_revisions";
pub const WATCH_LAG_SECONDS: &str = "etcd_pg_sync_watch_lag_seconds";
pub const PG_POOL_CONNECTIONS: &str = "etcd_pg_sync_pg_pool_connections";
pub const PG_POOL_MAX: &str = "etcd_pg_sync_pg_pool_max_connections";
pub const SNAPSHOT_KEYS_TOTAL: &str = "etcd_pg_sync_snapshot_keys_total";
pub const LEADER_CHANGES_TOTAL: &str = "etcd_pg_sync_leader_changes_total";
pub const DRIFTED_KEYS: &str = "etcd_pg_sync_drifted_keys";
pub const UP: &str = "etcd_pg_sync_store_up";
pub const KEYS_BLOCKED: &str = "etcd_pg_sync_keys_blocked";
pub const CLOCK_SAMPLES_TOTAL: &str = "etcd_pg_sync_revision_clock_samples_total";
pub const TIMELINE_PAUSED: &str = "etcd_pg_sync_timeline_paused";
pub const TRANSACTION_SPLITS_TOTAL: &str = "etcd_pg_sync_transaction_splits_total";
pub const BUILD_INFO: &str = "etcd_pg_sync_build_info";
// The process metrics keep Prometheus' conventional names.
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";

/// Describes every metric once (help texts in the exposition).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        IS_LEADER,
        "1 on the replica that leads the cluster, 0 on standbys"
    );
    describe_gauge!(
        TERM,
        "fencing term of the current leadership (create revision of the leader key)"
    );
    describe_gauge!(
        APPLIED_REVISION,
        "etcd revision applied to PostgreSQL (the durable checkpoint)"
    );
    describe_gauge!(ETCD_REVISION, "etcd's current revision");
    describe_counter!(CHANGES_TOTAL, "changes applied, by direction and op");
    describe_histogram!(
        APPLY_LATENCY_SECONDS,
        Unit::Seconds,
        "time from a change being seen to it being committed on the other side"
    );
    describe_histogram!(
        BATCH_SIZE,
        "changes per batch (PostgreSQL transaction or etcd txn)"
    );
    describe_counter!(
        CONFLICTS_TOTAL,
        "conflicts detected, by policy and winner (pending for manual)"
    );
    describe_gauge!(CONFLICTS_PENDING, "conflicts waiting for an operator");
    describe_counter!(RETRIES_TOTAL, "retried operations, by kind");
    describe_gauge!(DEAD_LETTERS, "dead letters not yet retried");
    describe_gauge!(
        KEYS_BLOCKED,
        "keys whose etcd changes wait because a user's open transaction holds their mirror row"
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "changes moved to the dead-letter list, by kind"
    );
    describe_counter!(
        COMPACTION_RECOVERIES_TOTAL,
        "resyncs after the watch's revision was compacted"
    );
    describe_gauge!(
        OUTBOX_DEPTH,
        "PostgreSQL changes waiting to be applied to etcd"
    );
    describe_counter!(ACTOR_RESTARTS, "actor restarts, by actor");
    describe_gauge!(WATCH_LAG_REVISIONS, "etcd revision minus applied revision");
    describe_gauge!(
        WATCH_LAG_SECONDS,
        "seconds since the applied revision was last behind etcd's"
    );
    describe_gauge!(PG_POOL_CONNECTIONS, "PostgreSQL pool connections, by state");
    describe_gauge!(PG_POOL_MAX, "PostgreSQL pool size");
    describe_counter!(SNAPSHOT_KEYS_TOTAL, "keys read by snapshots and resyncs");
    describe_counter!(LEADER_CHANGES_TOTAL, "times this replica became leader");
    describe_gauge!(
        DRIFTED_KEYS,
        "keys that differed in the last anti-entropy check"
    );
    describe_gauge!(UP, "1 when the store answers, by store");
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version and git revision of the binary"
    );
    describe_gauge!(PROCESS_RESIDENT_MEMORY, "resident memory of the process");
    describe_gauge!(
        PROCESS_CPU_SECONDS,
        "CPU time of the process so far, user and system, in seconds"
    );
    describe_gauge!(PROCESS_OPEN_FDS, "open file descriptors of the process");
    describe_gauge!(
        TIMELINE_PAUSED,
        "1 while sync is paused on a restored or replaced etcd, waiting for `etcd-pg-sync timeline resume`"
    );
    describe_counter!(
        TRANSACTION_SPLITS_TOTAL,
        "PostgreSQL transactions that reached etcd in more than one txn (audit transaction-split)"
    );
    describe_counter!(
        CLOCK_SAMPLES_TOTAL,
        "revision clock samples of this replica, by result (recorded, other-cluster, failed)"
    );
}

/// Registers every series with its known label values at zero, so
/// dashboards and alerts see them before the first event.
pub fn init(policies: impl IntoIterator<Item = &'static str>) {
    for direction in [ETCD_TO_PG, PG_TO_ETCD] {
        for op in ["put", "delete"] {
            metrics::counter!(CHANGES_TOTAL, "direction" => direction, "op" => op).increment(0);
        }
        let _ = metrics::histogram!(APPLY_LATENCY_SECONDS, "direction" => direction);
        let _ = metrics::histogram!(BATCH_SIZE, "direction" => direction);
    }
    for policy in policies {
        for winner in ["etcd", "pg", "pending"] {
            metrics::counter!(CONFLICTS_TOTAL, "policy" => policy, "winner" => winner).increment(0);
        }
    }
    for result in ["recorded", "other-cluster", "failed"] {
        metrics::counter!(CLOCK_SAMPLES_TOTAL, "result" => result).increment(0);
    }
    for kind in ["change", "connection", "actor"] {
        metrics::counter!(RETRIES_TOTAL, "kind" => kind).increment(0);
    }
    for kind in [
        "too-large",
        "unmapped",
        "read-only-mapping",
        "invalid",
        "retries-exhausted",
    ] {
        metrics::counter!(DEAD_LETTERS_TOTAL, "kind" => kind).increment(0);
    }
    for actor in [
        "etcd_watcher",
        "pg_poller",
        "conflict_arbiter",
        "retrier",
        "compaction_recovery",
    ] {
        metrics::counter!(ACTOR_RESTARTS, "actor" => actor).increment(0);
    }
    metrics::counter!(COMPACTION_RECOVERIES_TOTAL).increment(0);
    metrics::counter!(TRANSACTION_SPLITS_TOTAL).increment(0);
    metrics::counter!(LEADER_CHANGES_TOTAL).increment(0);
    metrics::counter!(SNAPSHOT_KEYS_TOTAL).increment(0);
    metrics::gauge!(IS_LEADER).set(0.0);
    // From the start: a replica stuck before its first probe shows down.
    for store in ["etcd", "postgres"] {
        metrics::gauge!(UP, "store" => store).set(0.0);
    }
    for gauge in [
        APPLIED_REVISION,
        OUTBOX_DEPTH,
        DEAD_LETTERS,
        CONFLICTS_PENDING,
        WATCH_LAG_REVISIONS,
        WATCH_LAG_SECONDS,
        DRIFTED_KEYS,
        KEYS_BLOCKED,
        TIMELINE_PAUSED,
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
}

/// Counts the conflicts an apply recorded, by policy and winner
/// (`pending` while parked).
pub fn count_conflicts(conflicts: &[eps_store::apply::ConflictSummary]) {
    for conflict in conflicts {
        let winner = conflict.winner.map_or("pending", |w| w.as_str());
        metrics::counter!(CONFLICTS_TOTAL, "policy" => conflict.policy, "winner" => winner)
            .increment(1);
    }
}

/// Direction label values.
pub const ETCD_TO_PG: &str = "etcd_to_pg";
pub const PG_TO_ETCD: &str = "pg_to_etcd";
