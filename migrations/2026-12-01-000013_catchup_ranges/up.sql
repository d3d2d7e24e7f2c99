-- Parallel catch-up (`sync.catchup_streams`): the keyspace split into
-- ranges, each replayed by its own watch with its own checkpoint. For a key
-- in a range, every change up to the range's `applied_revision` is applied
-- (the global checkpoint in `sync_state` waits for the slowest range); a
-- watch that replays from the global checkpoint skips those changes. A
-- range's row goes when the global checkpoint passes it, and every row
-- goes when the checkpoint is set anew (a resync, `restore-etcd`, a new
-- timeline).
CREATE TABLE @schema@.catchup_ranges (
    range_start      bytea PRIMARY KEY,
    -- NULL: to the end of the keyspace.
    range_end        bytea,
    applied_revision bigint NOT NULL
);
