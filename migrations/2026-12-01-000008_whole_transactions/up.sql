-- A PostgreSQL transaction is the unit of propagation to etcd, also in a
-- conflict: the policy settles it whole (see docs/design.md, D11).

-- A change dropped because another change of its transaction lost a
-- conflict (`dropped_by`: that conflict's id). The key's mirror row still
-- shows the dropped value; the conflict arbiter reads etcd's state of the
-- key and puts it back, consuming the row. Until then the poller leaves
-- the key alone.
ALTER TABLE @schema@.outbox ADD COLUMN dropped_by bigint;
CREATE INDEX outbox_dropped ON @schema@.outbox (dropped_by) WHERE dropped_by IS NOT NULL;

-- Whether the transaction's first change of the key created it (the row did
-- not exist before the transaction): if the transaction deletes it again,
-- it changed nothing. Not the same as base 0, which also means "an earlier
-- change of the row has not reached etcd yet".
ALTER TABLE @schema@.outbox ADD COLUMN created boolean NOT NULL DEFAULT false;

-- Keys the poller leaves out (parked or dropped changes), found fast.
CREATE INDEX outbox_held_keys ON @schema@.outbox (mirror_table, key)
    WHERE conflict_id IS NOT NULL OR dropped_by IS NOT NULL;

-- Parked changes are found by their conflict (a resolution releases or
-- drops every change of the parked transactions).
CREATE INDEX outbox_conflict ON @schema@.outbox (conflict_id) WHERE conflict_id IS NOT NULL;

-- The PostgreSQL transaction a conflict's or a dead letter's change came
-- from (`pg_current_xact_id()` as a number; NULL: unknown). The conflicts
-- of one transaction's keys, and its dead letters, share it.
ALTER TABLE @schema@.conflicts ADD COLUMN pg_xact bigint;
CREATE INDEX conflicts_pg_xact ON @schema@.conflicts (pg_xact) WHERE pg_xact IS NOT NULL;
ALTER TABLE @schema@.dead_letters ADD COLUMN pg_xact bigint;
CREATE INDEX dead_letters_pg_xact ON @schema@.dead_letters (pg_xact) WHERE pg_xact IS NOT NULL;

-- The trigger below finds the transaction's earlier change of a key.
DROP INDEX @schema@.outbox_xact;
CREATE INDEX outbox_xact_key ON @schema@.outbox (xact, mirror_table, key);

-- Queues one change of a key. A key changed again in the same transaction
-- updates that transaction's change instead: etcd takes a key once per
-- txn, and no other session ever saw the value in between. The change
-- keeps its first base (the state etcd had when the transaction first
-- changed the key) and takes the final op, value and time; a key the
-- transaction created (`p_created`: an INSERT, or the new key of a rename)
-- and deleted again leaves no change at all. Returns the new row's id, or
-- NULL when an earlier change was updated or removed.
CREATE FUNCTION @schema@.outbox_queue(p_table text, p_key bytea, p_op text, p_value bytea, p_base bigint,
                                      p_created boolean)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
DECLARE
    queued bigint;
BEGIN
    IF p_op = 'delete' THEN
        DELETE FROM @schema@.outbox o
        WHERE o.xact = pg_catalog.pg_current_xact_id() AND o.mirror_table = p_table AND o.key = p_key
          AND o.created
        RETURNING o.id INTO queued;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE @schema@.outbox o SET op = p_op, value = p_value, created_at = pg_catalog.clock_timestamp()
    WHERE o.xact = pg_catalog.pg_current_xact_id() AND o.mirror_table = p_table AND o.key = p_key
    RETURNING o.id INTO queued;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision, created)
    VALUES (p_table, p_key, p_op, p_value, p_base, p_created)
    RETURNING id INTO queued;
    RETURN queued;
END
$$;
REVOKE ALL ON FUNCTION @schema@.outbox_queue(text, bytea, text, bytea, bigint, boolean) FROM PUBLIC;

-- The mirror name of a table the triggers fire on; any other table is
-- refused (the triggers act for the mirror tables `migrate` made only).
CREATE FUNCTION @schema@.mirror_of(p_relid oid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
DECLARE
    mirror text;
BEGIN
    SELECT m.name INTO mirror FROM @schema@.mirror_tables m WHERE m.relid = p_relid;
    IF mirror IS NULL THEN
        RAISE EXCEPTION '% is not a mirror table of schema %', p_relid::regclass, '@schema_name@'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN mirror;
END
$$;
REVOKE ALL ON FUNCTION @schema@.mirror_of(oid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @schema@.mirror_after_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
DECLARE
    mirror text;
    first_id bigint;
BEGIN
    IF pg_catalog.current_setting('etcd_sync.applying', true) = 'on'
       AND pg_catalog.pg_has_role(session_user, current_user, 'MEMBER') THEN
        RETURN NULL;
    END IF;
    mirror := @schema@.mirror_of(TG_RELID);
    IF TG_OP = 'DELETE' THEN
        first_id := @schema@.outbox_queue(mirror, OLD.key, 'delete', NULL, OLD.mod_revision, false);
    ELSIF TG_OP = 'INSERT' THEN
        first_id := @schema@.outbox_queue(mirror, NEW.key, 'put', NEW.value, 0, true);
    ELSIF NEW.key IS DISTINCT FROM OLD.key THEN
        first_id := @schema@.outbox_queue(mirror, OLD.key, 'delete', NULL, OLD.mod_revision, false);
        PERFORM @schema@.outbox_queue(mirror, NEW.key, 'put', NEW.value, 0, true);
    ELSIF NEW.value IS DISTINCT FROM OLD.value THEN
        first_id := @schema@.outbox_queue(mirror, NEW.key, 'put', NEW.value, OLD.mod_revision, false);
    ELSE
        RETURN NULL;  -- an UPDATE that changes nothing is not propagated
    END IF;
    -- A NOTIFY only when the poller may be idle: no older change (not
    -- parked) is waiting. A change merged into an earlier one of this
    -- transaction was announced with it.
    IF first_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM @schema@.outbox o WHERE o.id < first_id
                       AND o.conflict_id IS NULL AND o.dropped_by IS NULL) THEN
        PERFORM pg_catalog.pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- The order in which transactions committed. A transaction that read what
-- another wrote committed after it, and must reach etcd after it; the
-- outbox ids (the order of writes) do not say so: a transaction may write
-- before it reads. The commit stamp (taken as the transaction commits,
-- see `outbox_stamp_commit`) draws a number from a sequence: a transaction
-- that saw another's writes draws a larger one. The poller sends
-- transactions in this order. Stamps of transactions still queued are
-- kept; a stamp lost with the unlogged table in a crash leaves that
-- transaction ordered by its first change.
CREATE SEQUENCE @schema@.xact_commit_seq;
ALTER TABLE @schema@.xact_commits ADD COLUMN seq bigint;

CREATE OR REPLACE FUNCTION @schema@.outbox_stamp_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('etcd_sync.commit_stamped', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_catalog.set_config('etcd_sync.commit_stamped', 'on', true);
        INSERT INTO @schema@.xact_commits (xact, committed_at, seq)
        VALUES (pg_catalog.pg_current_xact_id(), pg_catalog.clock_timestamp(),
                pg_catalog.nextval('@schema@.xact_commit_seq'))
        ON CONFLICT (xact) DO UPDATE SET committed_at = EXCLUDED.committed_at, seq = EXCLUDED.seq;
    END IF;
    RETURN NULL;
END
$$;

-- A row created by a transaction that deleted the key first (or renamed
-- another key to it) is based on the state etcd had when the transaction
-- first changed the key, as the transaction's one change of the key is
-- (see `outbox_queue`): its mod revision is that base, not 0, so a later
-- change of the row is based on what that change replaces in etcd.
CREATE OR REPLACE FUNCTION @schema@.mirror_before_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
DECLARE
    mirror text;
BEGIN
    IF pg_catalog.current_setting('etcd_sync.applying', true) = 'on'
       AND pg_catalog.pg_has_role(session_user, current_user, 'MEMBER') THEN
        RETURN NEW;
    END IF;
    mirror := @schema@.mirror_of(TG_RELID);
    IF TG_OP = 'INSERT' OR NEW.key IS DISTINCT FROM OLD.key THEN
        NEW.create_revision := 0;
        NEW.mod_revision := coalesce(
            (SELECT o.base_revision FROM @schema@.outbox o
             WHERE o.xact = pg_catalog.pg_current_xact_id() AND o.mirror_table = mirror AND o.key = NEW.key),
            0);
        NEW.version := 0;
        NEW.lease := 0;
        NEW.origin := 'pg';
        NEW.updated_at := pg_catalog.clock_timestamp();
    ELSE
        NEW.create_revision := OLD.create_revision;
        NEW.mod_revision := OLD.mod_revision;
        NEW.version := OLD.version;
        NEW.lease := OLD.lease;
        IF NEW.value IS DISTINCT FROM OLD.value THEN
            NEW.origin := 'pg';
            NEW.updated_at := pg_catalog.clock_timestamp();
        ELSE
            NEW.origin := OLD.origin;
            NEW.updated_at := OLD.updated_at;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
