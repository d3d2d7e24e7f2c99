//! diesel table definitions of the service's fixed tables. Connections run
//! with `search_path` set to the configured schema, so these unqualified
//! names resolve there. Mirror tables have configured names and are reached
//! through validated, quoted identifiers instead. The ledgers (`conflicts`,
//! `dead_letters`) have more columns than diesel's default table size and are
//! queried with `sql_query`.

diesel::table! {
    sync_state (id) {
        id -> SmallInt,
        term -> BigInt,
        leader_node -> Nullable<Text>,
        leader_since -> Nullable<Timestamptz>,
        applied_revision -> BigInt,
        applied_at -> Nullable<Timestamptz>,
        timeline -> Integer,
        etcd_cluster_id -> Nullable<BigInt>,
        timeline_resync -> Bool,
        timeline_mark -> Nullable<Text>,
        timeline_mark_pending -> Nullable<Text>,
        timeline_hold -> Nullable<Jsonb>,
        timeline_decision -> Nullable<Text>,
        timeline_take_pg -> Bool,
    }
}

diesel::table! {
    outbox (id) {
        id -> BigInt,
        mirror_table -> Text,
        key -> Bytea,
        op -> Text,
        value -> Nullable<Bytea>,
        base_revision -> BigInt,
        created_at -> Timestamptz,
        attempts -> Integer,
        last_error -> Nullable<Text>,
        conflict_id -> Nullable<BigInt>,
    }
}

diesel::table! {
    sync_events (id) {
        id -> BigInt,
        at -> Timestamptz,
        kind -> Text,
        node -> Text,
        term -> BigInt,
        trace_id -> Nullable<Text>,
        detail -> Jsonb,
    }
}

diesel::table! {
    history (key, revision) {
        key -> Bytea,
        revision -> BigInt,
        op -> Text,
        value -> Nullable<Bytea>,
        prev_value -> Nullable<Bytea>,
        create_revision -> BigInt,
        version -> BigInt,
        lease -> BigInt,
        origin -> Text,
        term -> BigInt,
        trace_id -> Nullable<Text>,
        recorded_at -> Timestamptz,
    }
}
