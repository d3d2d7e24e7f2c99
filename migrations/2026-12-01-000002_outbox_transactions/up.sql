-- The transaction that wrote each outbox row. The apply transaction plans a
-- key that had no mirror row when it locked its keys only with the changes
-- committed before that moment (`pg_visible_in_snapshot`): a row a user
-- creates afterwards is left to the outbox and the compare. Rows written
-- before this migration have none and count as committed long ago.
ALTER TABLE @schema@.outbox ADD COLUMN xact xid8;
ALTER TABLE @schema@.outbox ALTER COLUMN xact SET DEFAULT pg_catalog.pg_current_xact_id();
