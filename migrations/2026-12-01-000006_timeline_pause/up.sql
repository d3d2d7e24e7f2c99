-- `sync.on_etcd_restore = "pause"`: a new etcd timeline detected is held
-- for an operator instead of followed. `timeline_hold` says what was
-- detected (NULL: nothing held); `timeline_decision` is the operator's
-- answer (`etcd-pg-sync timeline resume --take etcd|pg`, recorded once),
-- consumed by the leader when it begins the new timeline. With `pg`, the
-- timeline keeps `timeline_take_pg`: every value of PostgreSQL's its resync
-- rolls back — also one deferred behind a user's transaction and recorded
-- later — is recorded with a request to put it back (`requested_take`).
ALTER TABLE @schema@.sync_state
    ADD COLUMN timeline_hold jsonb,
    ADD COLUMN timeline_decision text CHECK (timeline_decision IN ('etcd', 'pg')),
    ADD COLUMN timeline_take_pg boolean NOT NULL DEFAULT false;
