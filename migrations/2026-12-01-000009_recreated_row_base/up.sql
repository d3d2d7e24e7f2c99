-- A key deleted and created again in one statement (a writable CTE that
-- deletes and inserts it, or a key shift `UPDATE ... SET key = ...` over
-- several rows): the row triggers of a statement run at its end, so when
-- the new row was written the transaction's change of the key (based on
-- the state etcd had, see `outbox_queue`) was not queued yet, and the row
-- kept mod revision 0. A later change of it then compared against
-- "absent" and conflicted with the service's own write. The row is now
-- corrected as its change is queued.

CREATE OR REPLACE FUNCTION @schema@.mirror_after_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
DECLARE
    mirror text;
    first_id bigint;
    created_id bigint;
    base bigint;
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
        created_id := first_id;
    ELSIF NEW.key IS DISTINCT FROM OLD.key THEN
        first_id := @schema@.outbox_queue(mirror, OLD.key, 'delete', NULL, OLD.mod_revision, false);
        created_id := @schema@.outbox_queue(mirror, NEW.key, 'put', NEW.value, 0, true);
    ELSIF NEW.value IS DISTINCT FROM OLD.value THEN
        first_id := @schema@.outbox_queue(mirror, NEW.key, 'put', NEW.value, OLD.mod_revision, false);
    ELSE
        RETURN NULL;  -- an UPDATE that changes nothing is not propagated
    END IF;
    -- A row created where this transaction's change of the key is based on
    -- an earlier state (the key was deleted first) takes that base as its
    -- mod revision. `mirror_before_write` does so when the deletion came in
    -- an earlier statement; when it came in this one (a writable CTE, a
    -- key shift), its change was queued only now, after the row was
    -- written, so the row is corrected here (`mirror_before_write` lets
    -- exactly this update through, and it queues nothing).
    IF TG_OP <> 'DELETE' AND created_id IS NULL
       AND (TG_OP = 'INSERT' OR NEW.key IS DISTINCT FROM OLD.key) AND NEW.mod_revision = 0 THEN
        SELECT o.base_revision INTO base FROM @schema@.outbox o
        WHERE o.xact = pg_catalog.pg_current_xact_id() AND o.mirror_table = mirror AND o.key = NEW.key
          AND o.op = 'put';
        IF base <> 0 THEN
            EXECUTE pg_catalog.format('UPDATE %I.%I SET mod_revision = $1 WHERE key = $2 AND mod_revision = 0',
                                      TG_TABLE_SCHEMA, TG_TABLE_NAME)
            USING base, NEW.key;
        END IF;
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
    ELSIF OLD.mod_revision = 0 AND NEW.mod_revision <> 0 AND NEW.value IS NOT DISTINCT FROM OLD.value
          AND EXISTS (SELECT 1 FROM @schema@.outbox o
                      WHERE o.xact = pg_catalog.pg_current_xact_id() AND o.mirror_table = mirror
                        AND o.key = NEW.key AND o.op = 'put' AND o.base_revision = NEW.mod_revision) THEN
        -- The correction `mirror_after_write` makes of a row this
        -- transaction re-created in one statement: the base of the
        -- transaction's change of the key, and nothing else.
        NEW.create_revision := OLD.create_revision;
        NEW.version := OLD.version;
        NEW.lease := OLD.lease;
        NEW.origin := OLD.origin;
        NEW.updated_at := OLD.updated_at;
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
