-- A PostgreSQL transaction reaches etcd in one txn: the poller sends a
-- transaction's changes only when it sees all of them, which it counts by
-- the transaction that wrote them.
CREATE INDEX outbox_xact ON @schema@.outbox (xact);
