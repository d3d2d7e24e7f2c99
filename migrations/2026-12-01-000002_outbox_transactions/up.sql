-- The transaction that wrote each outbox row. The apply transaction plans a
-- key that had no mirror row when it locked its keys only with the changes
-- committed before that moment (`pg_visible_in_snapshot`): a row a user
-- creates afterwards is left to the outbox and the compare. Rows written
-- before this migration have none and count as committed long ago.
ALTER TABLE @schema@.outbox ADD COLUMN xact xid8;
ALTER TABLE @schema@.outbox ALTER COLUMN xact SET DEFAULT pg_catalog.pg_current_xact_id();

-- Whether the leader may have sent the change to etcd, marked before the
-- etcd txn. When a resync finds etcd holding the value of a queued change,
-- only a sent one can have landed: an unsent one with an equal value may be
-- behind a sent change etcd has yet to show. Rows queued before this
-- migration may have been sent.
ALTER TABLE @schema@.outbox ADD COLUMN sent boolean NOT NULL DEFAULT true;
ALTER TABLE @schema@.outbox ALTER COLUMN sent SET DEFAULT false;
