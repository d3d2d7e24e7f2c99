-- etcd inputs of keys whose mirror row a user's transaction holds: they
-- wait here, in order, stored in the same transaction that moves the
-- checkpoint past them, and are applied as soon as the row is free. One
-- open transaction delays only the rows it holds.
CREATE TABLE @schema@.deferred_inputs (
    id              bigserial PRIMARY KEY,
    mirror_table    text NOT NULL,
    key             bytea NOT NULL,
    -- 'event': a watch event; 'observed': a state read by a resync or the
    -- arbiter at `revision` (`value` NULL: absent).
    kind            text NOT NULL CHECK (kind IN ('event', 'observed')),
    revision        bigint NOT NULL,
    op              text CHECK (op IN ('put', 'delete')),
    value           bytea,
    create_revision bigint NOT NULL DEFAULT 0,
    mod_revision    bigint NOT NULL DEFAULT 0,
    version         bigint NOT NULL DEFAULT 0,
    lease           bigint NOT NULL DEFAULT 0,
    prev_value      bytea,
    prev_revision   bigint,
    origin          text CHECK (origin IN ('etcd', 'pg', 'snapshot', 'resync')),
    -- When the service read it from etcd, microseconds on PostgreSQL's clock.
    observed_at_us  bigint NOT NULL,
    record_history  boolean NOT NULL DEFAULT true,
    deferred_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A `key-blocked` audit event was recorded for it.
    reported        boolean NOT NULL DEFAULT false
);
CREATE INDEX deferred_inputs_key_idx ON @schema@.deferred_inputs (mirror_table, key, id);
