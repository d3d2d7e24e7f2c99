-- The privilege boundary of the schema (SECURITY.md). The migration runner
-- substitutes `@schema@` with the quoted name of `postgres.schema` and
-- `@schema_name@` with the bare name (for string literals).
--
-- Every function below names its objects with the schema, pins
-- `search_path` to the schema followed by `pg_temp` (so a temporary table
-- of the caller's can never stand in for one of the service's: PostgreSQL
-- searches `pg_temp` first unless it is listed), and is not executable by
-- PUBLIC. The service's own writes are recognized by the transaction flag
-- `etcd_sync.applying` *and* the session's role: only a session of the
-- role that owns the trigger functions (the role that ran `migrate`) may
-- skip the outbox. Any other role setting the flag is treated as a user.

-- The mirror tables `migrate` created: the triggers act for these only.
-- `synced` is false for a table created (or created again, after a DROP)
-- while the checkpoint may already be past etcd's keys under its prefix:
-- the leader then fills it from etcd at the checkpoint before going on.
-- `trigger_owner` is the role whose sessions the triggers' WHEN clauses
-- let skip them, fixed when `migrate` made them.
CREATE TABLE @schema@.mirror_tables (
    name          text PRIMARY KEY,
    relid         oid NOT NULL UNIQUE,
    synced        boolean NOT NULL DEFAULT false,
    trigger_owner oid
);

-- A user's write keeps the row's etcd metadata (it is the compare base of the
-- etcd txn). SECURITY DEFINER so that `current_user` is the owner of this
-- function, the one role whose sessions may skip the outbox.
CREATE OR REPLACE FUNCTION @schema@.mirror_before_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('etcd_sync.applying', true) = 'on'
       AND pg_catalog.pg_has_role(session_user, current_user, 'MEMBER') THEN
        RETURN NEW;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @schema@.mirror_tables m WHERE m.relid = TG_RELID) THEN
        RAISE EXCEPTION '% is not a mirror table of schema %', TG_RELID::regclass, '@schema_name@'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'INSERT' OR NEW.key IS DISTINCT FROM OLD.key THEN
        NEW.create_revision := 0;
        NEW.mod_revision := 0;
        NEW.version := 0;
        NEW.lease := 0;
        NEW.origin := 'pg';
        NEW.updated_at := pg_catalog.now();
    ELSE
        NEW.create_revision := OLD.create_revision;
        NEW.mod_revision := OLD.mod_revision;
        NEW.version := OLD.version;
        NEW.lease := OLD.lease;
        IF NEW.value IS DISTINCT FROM OLD.value THEN
            NEW.origin := 'pg';
            NEW.updated_at := pg_catalog.now();
        ELSE
            NEW.origin := OLD.origin;
            NEW.updated_at := OLD.updated_at;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- Every user change becomes outbox rows, and a NOTIFY on `<schema>_outbox`
-- when the poller may be idle: if an older change (not parked) is still
-- waiting, the poller is busy with it and will see this one too (it wakes
-- on each echo and polls as a fallback). NOTIFY serializes commits, so
-- sending it only then keeps the commit rate up under load.
-- SECURITY DEFINER: writers need privileges on the mirror table only, not
-- on the service's outbox.
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
    SELECT m.name INTO mirror FROM @schema@.mirror_tables m WHERE m.relid = TG_RELID;
    IF mirror IS NULL THEN
        RAISE EXCEPTION '% is not a mirror table of schema %', TG_RELID::regclass, '@schema_name@'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision)
        VALUES (mirror, OLD.key, 'delete', NULL, OLD.mod_revision)
        RETURNING id INTO first_id;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision)
        VALUES (mirror, NEW.key, 'put', NEW.value, 0)
        RETURNING id INTO first_id;
    ELSIF NEW.key IS DISTINCT FROM OLD.key THEN
        INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision)
        VALUES (mirror, OLD.key, 'delete', NULL, OLD.mod_revision)
        RETURNING id INTO first_id;
        INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision)
        VALUES (mirror, NEW.key, 'put', NEW.value, 0);
    ELSIF NEW.value IS DISTINCT FROM OLD.value THEN
        INSERT INTO @schema@.outbox (mirror_table, key, op, value, base_revision)
        VALUES (mirror, NEW.key, 'put', NEW.value, OLD.mod_revision)
        RETURNING id INTO first_id;
    ELSE
        RETURN NULL;  -- an UPDATE that changes nothing is not propagated
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @schema@.outbox o WHERE o.id < first_id AND o.conflict_id IS NULL) THEN
        PERFORM pg_catalog.pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- TRUNCATE fires no row trigger, so it would empty PostgreSQL and leave
-- etcd as it was. It is refused, for every role; a DELETE reaches etcd.
CREATE FUNCTION @schema@.mirror_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of mirror table %.% is refused: it would not reach etcd',
            TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = pg_catalog.format('Delete the rows instead, which reaches etcd: DELETE FROM %I.%I '
                                       '(with WHERE key >= ... AND key < ... for a range).',
                                       TG_TABLE_SCHEMA, TG_TABLE_NAME);
END
$$;

-- Writes through the text view land in the mirror table (argument 0), with
-- the rights of the writer.
CREATE OR REPLACE FUNCTION @schema@.mirror_text_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $$
DECLARE
    mirror text := TG_ARGV[0];
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE pg_catalog.format('INSERT INTO %I.%I (key, value) VALUES ($1, $2)', TG_TABLE_SCHEMA, mirror)
            USING pg_catalog.convert_to(NEW.key, 'UTF8'), pg_catalog.convert_to(NEW.value, 'UTF8');
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE pg_catalog.format('UPDATE %I.%I SET key = $1, value = $2 WHERE key = $3', TG_TABLE_SCHEMA, mirror)
            USING pg_catalog.convert_to(NEW.key, 'UTF8'), pg_catalog.convert_to(NEW.value, 'UTF8'),
                  pg_catalog.convert_to(OLD.key, 'UTF8');
        RETURN NEW;
    ELSE
        EXECUTE pg_catalog.format('DELETE FROM %I.%I WHERE key = $1', TG_TABLE_SCHEMA, mirror)
            USING pg_catalog.convert_to(OLD.key, 'UTF8');
        RETURN OLD;
    END IF;
END
$$;

-- The value of a key as of a revision (NULL: absent), also for revisions etcd
-- has compacted away.
CREATE OR REPLACE FUNCTION @schema@.value_at(p_key bytea, p_revision bigint) RETURNS bytea
LANGUAGE sql STABLE SET search_path = @schema@, pg_temp AS $$
    SELECT CASE WHEN h.op = 'put' THEN h.value END
    FROM @schema@.history h
    WHERE h.key = p_key AND h.revision <= p_revision
    ORDER BY h.revision DESC
    LIMIT 1
$$;

-- Text for humans: NULL where the bytes are not valid UTF-8 (or hold NUL).
-- Executable by PUBLIC on purpose: readers of a text view call it with their
-- own rights, and it reads nothing.
CREATE OR REPLACE FUNCTION @schema@.utf8_or_null(b bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN pg_catalog.convert_from(b, 'UTF8');
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- Creates (idempotently) a mirror table, registers it, and gives it its
-- constraints, triggers and `<table>_text` view. Called by `migrate` for
-- every configured mapping.
CREATE OR REPLACE FUNCTION @schema@.ensure_mirror_table(p_table text) RETURNS void
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    relation oid;
    owner oid;
    user_write text;
    existed boolean;
    silenced text[];
BEGIN
    IF p_table !~ '^[a-z_][a-z0-9_]{0,57}$' THEN
        RAISE EXCEPTION 'invalid mirror table name %', p_table;
    END IF;
    existed := pg_catalog.to_regclass(pg_catalog.format('%I.%I', s, p_table)) IS NOT NULL;
    EXECUTE pg_catalog.format($sql$
        CREATE TABLE IF NOT EXISTS %I.%I (
            key             bytea PRIMARY KEY,
            value           bytea NOT NULL,
            create_revision bigint NOT NULL DEFAULT 0,
            mod_revision    bigint NOT NULL DEFAULT 0,
            version         bigint NOT NULL DEFAULT 0,
            lease           bigint NOT NULL DEFAULT 0,
            updated_at      timestamptz NOT NULL DEFAULT now(),
            origin          text NOT NULL DEFAULT 'pg' CHECK (origin IN ('etcd', 'pg'))
        )$sql$, s, p_table);
    relation := pg_catalog.format('%I.%I', s, p_table)::regclass;
    INSERT INTO @schema@.mirror_tables AS m (name, relid, synced) VALUES (p_table, relation, false)
    ON CONFLICT (name) DO UPDATE SET relid = EXCLUDED.relid,
                                     synced = m.synced AND m.relid = EXCLUDED.relid;
    -- Metadata is etcd's (or 0 while a change of PostgreSQL's is pending):
    -- never negative, never created after it was modified.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                   WHERE c.conrelid = relation AND c.conname = 'etcd_sync_metadata') THEN
        EXECUTE pg_catalog.format(
            'ALTER TABLE %I.%I ADD CONSTRAINT etcd_sync_metadata CHECK (create_revision >= 0 '
            'AND mod_revision >= create_revision AND version >= 0 AND lease >= 0)', s, p_table);
    END IF;
    -- Row triggers found disabled or dropped are restored below, but what
    -- was written meanwhile never reached the outbox: say so, in the audit
    -- trail too, so that an operator runs `verify`.
    IF existed THEN
        SELECT pg_catalog.array_agg(t.name ORDER BY t.name) INTO silenced
        FROM (VALUES ('etcd_sync_before'), ('etcd_sync_after')) AS t(name)
        LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = relation AND g.tgname = t.name
        WHERE g.oid IS NULL OR g.tgenabled NOT IN ('O', 'A');
        IF silenced IS NOT NULL THEN
            RAISE WARNING 'mirror table %.%: triggers % were disabled or missing and are restored; '
                          'changes made meanwhile did not reach etcd: run `etcd-pg-sync verify`',
                          s, p_table, silenced;
            INSERT INTO @schema@.sync_events (kind, node, detail)
            VALUES ('triggers-restored', 'migrate',
                    pg_catalog.jsonb_build_object('table', p_table, 'triggers', silenced));
        END IF;
    END IF;
    -- The row triggers do not even fire for the service's own writes (the
    -- same test as inside the functions, with the owner fixed when the
    -- trigger is made; `migrate` remakes it): bulk applies pay nothing.
    owner := (SELECT p.proowner FROM pg_catalog.pg_proc p
              WHERE p.oid = pg_catalog.format('%I.mirror_after_write()', s)::regprocedure);
    UPDATE @schema@.mirror_tables SET trigger_owner = owner WHERE relid = relation;
    user_write := pg_catalog.format(
        'pg_catalog.current_setting(%L, true) IS DISTINCT FROM %L '
        'OR NOT pg_catalog.pg_has_role(session_user, %s::oid, %L)',
        'etcd_sync.applying', 'on', owner, 'MEMBER');
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER etcd_sync_before BEFORE INSERT OR UPDATE ON %I.%I '
                   'FOR EACH ROW WHEN (%s) EXECUTE FUNCTION %I.mirror_before_write()', s, p_table, user_write, s);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER etcd_sync_after AFTER INSERT OR UPDATE OR DELETE ON %I.%I '
                   'FOR EACH ROW WHEN (%s) EXECUTE FUNCTION %I.mirror_after_write()', s, p_table, user_write, s);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER etcd_sync_truncate BEFORE TRUNCATE ON %I.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %I.mirror_refuse_truncate()', s, p_table, s);
    EXECUTE pg_catalog.format('CREATE OR REPLACE VIEW %I.%I AS SELECT %I.utf8_or_null(key) AS key, '
                   '%I.utf8_or_null(value) AS value, create_revision, mod_revision, version, lease, '
                   'updated_at, origin FROM %I.%I', s, p_table || '_text', s, s, s, p_table);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER etcd_sync_text INSTEAD OF INSERT OR UPDATE OR DELETE ON %I.%I '
                   'FOR EACH ROW EXECUTE FUNCTION %I.mirror_text_write(%L)', s, p_table || '_text', s, p_table);
END
$fn$;

REVOKE ALL ON FUNCTION @schema@.mirror_before_write() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.mirror_after_write() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.mirror_refuse_truncate() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.mirror_text_write() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.value_at(bytea, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.ensure_mirror_table(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @schema@.utf8_or_null(bytea) TO PUBLIC;

-- Mirror tables created before this migration get the registry entry, the
-- constraint and the TRUNCATE trigger.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.relname
             FROM pg_catalog.pg_trigger g
             JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE g.tgname = 'etcd_sync_after' AND n.nspname = '@schema_name@'
    LOOP
        PERFORM @schema@.ensure_mirror_table(t.relname);
    END LOOP;
    -- They were kept in sync before this migration.
    UPDATE @schema@.mirror_tables SET synced = true;
END
$$;
