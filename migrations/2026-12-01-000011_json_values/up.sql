-- Values as JSON (`value_format = "json"` on a mapping): a generated
-- `value_json jsonb` column on the mirror table, shown by its text view,
-- with a GIN index on request (`json_index = true`); the history as JSON
-- through the `history_json` view.

-- The value as jsonb, NULL when it is not UTF-8 JSON. Immutable (a
-- generated column needs it): it depends on the bytes alone. Parallel
-- unsafe: its exception block starts a subtransaction, which a parallel
-- worker may not.
CREATE FUNCTION @schema@.json_or_null(p_value bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL UNSAFE SET search_path = @schema@, pg_temp AS $$
BEGIN
    RETURN pg_catalog.convert_from(p_value, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;
GRANT EXECUTE ON FUNCTION @schema@.json_or_null(bytea) TO PUBLIC;

-- Every history row with its value as JSON (NULL when not JSON).
CREATE VIEW @schema@.history_json AS
    SELECT h.*, @schema@.json_or_null(h.value) AS value_json FROM @schema@.history h;

-- Creates (idempotently) a mirror table, its constraints, triggers and
-- `<table>_text` view, and its JSON column as configured. Called by
-- `migrate` for every mapped table. (The one-argument form follows.)
DROP FUNCTION @schema@.ensure_mirror_table(text);
CREATE FUNCTION @schema@.ensure_mirror_table(p_table text, p_json boolean, p_json_index boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    relation oid;
    owner oid;
    user_write text;
    existed boolean;
    silenced text[];
    has_json boolean;
    json_column text := '';
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
    -- `value_format = "json"`: the value as jsonb (NULL when it is not
    -- JSON: etcd takes any bytes, and sync never stops over one), stored
    -- and indexed on request; shown by the text view too.
    has_json := EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = relation AND a.attname = 'value_json' AND NOT a.attisdropped);
    IF p_json AND NOT has_json THEN
        EXECUTE pg_catalog.format('ALTER TABLE %I.%I ADD COLUMN value_json jsonb '
                       'GENERATED ALWAYS AS (%I.json_or_null(value)) STORED', s, p_table, s);
    ELSIF NOT p_json AND has_json THEN
        -- The text view shows the column: it goes first (and is made
        -- again below, without it; grants on it must be given again).
        EXECUTE pg_catalog.format('DROP VIEW IF EXISTS %I.%I', s, p_table || '_text');
        EXECUTE pg_catalog.format('ALTER TABLE %I.%I DROP COLUMN value_json', s, p_table);
    END IF;
    IF p_json AND p_json_index THEN
        EXECUTE pg_catalog.format('CREATE INDEX IF NOT EXISTS %I ON %I.%I USING gin (value_json)',
                       p_table || '_value_json', s, p_table);
    ELSE
        EXECUTE pg_catalog.format('DROP INDEX IF EXISTS %I.%I', s, p_table || '_value_json');
    END IF;
    IF p_json THEN
        json_column := ', value_json';
    END IF;
    EXECUTE pg_catalog.format('CREATE OR REPLACE VIEW %I.%I AS SELECT %I.utf8_or_null(key) AS key, '
                   '%I.utf8_or_null(value) AS value, create_revision, mod_revision, version, lease, '
                   'updated_at, origin%s FROM %I.%I', s, p_table || '_text', s, s, json_column, s, p_table);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER etcd_sync_text INSTEAD OF INSERT OR UPDATE OR DELETE ON %I.%I '
                   'FOR EACH ROW EXECUTE FUNCTION %I.mirror_text_write(%L)', s, p_table || '_text', s, p_table);
END
$fn$;

-- The former signature, for a `migrate` of an older binary (a rollback of
-- the deployment): the table keeps the JSON column and index it has.
CREATE FUNCTION @schema@.ensure_mirror_table(p_table text) RETURNS void
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $$
DECLARE
    relation regclass := pg_catalog.to_regclass(pg_catalog.format('%I.%I', '@schema_name@', p_table));
BEGIN
    PERFORM @schema@.ensure_mirror_table(
        p_table,
        EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = relation AND a.attname = 'value_json' AND NOT a.attisdropped),
        EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = '@schema_name@' AND c.relname = p_table || '_value_json'));
END
$$;

REVOKE ALL ON FUNCTION @schema@.ensure_mirror_table(text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.ensure_mirror_table(text) FROM PUBLIC;
