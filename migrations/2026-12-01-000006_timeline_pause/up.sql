-- `sync.on_etcd_restore = "pause"`: a new etcd timeline detected is held
-- for an operator instead of followed. `timeline_hold` says what was
-- detected (NULL: nothing held); `timeline_decision` is the operator's
-- answer (`etcd-pg-sync timeline resume --take etcd|pg`), carried out and
-- cleared by the leader.
ALTER TABLE @schema@.sync_state
    ADD COLUMN timeline_hold jsonb,
    ADD COLUMN timeline_decision text CHECK (timeline_decision IN ('etcd', 'pg'));
