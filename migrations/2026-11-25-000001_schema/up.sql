-- The service's schema. The migration runner creates the schema named by
-- `postgres.schema` and sets `search_path` to it before applying this file,
-- so every name below lands there. Functions pin that search_path
-- (`SET search_path FROM CURRENT`) so triggers work whatever the session's is.

-- One row: the fencing term of the current leader and the durable checkpoint
-- of the etcd → PostgreSQL apply, written in the same transaction as the data.
CREATE TABLE sync_state (
    id               smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    term             bigint NOT NULL DEFAULT 0,
    leader_node      text,
    leader_since     timestamptz,
    applied_revision bigint NOT NULL DEFAULT 0,
    applied_at       timestamptz
);
INSERT INTO sync_state (id) VALUES (1);

-- One row per etcd revision per key, kept after etcd compacts.
CREATE TABLE history (
    key             bytea NOT NULL,
    revision        bigint NOT NULL,
    op              text NOT NULL CHECK (op IN ('put', 'delete')),
    value           bytea,
    prev_value      bytea,
    create_revision bigint NOT NULL,
    version         bigint NOT NULL,
    lease           bigint NOT NULL,
    -- etcd: written in etcd; pg: written in PostgreSQL and propagated;
    -- snapshot: read by the initial sync; resync: read after a compaction
    -- gap (the revisions in between are unknown).
    origin          text NOT NULL CHECK (origin IN ('etcd', 'pg', 'snapshot', 'resync')),
    term            bigint NOT NULL,
    trace_id        text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, revision)
);
CREATE INDEX history_revision_idx ON history (revision);

-- The value of a key as of a revision (NULL: absent), also for revisions etcd
-- has compacted away.
CREATE FUNCTION value_at(p_key bytea, p_revision bigint) RETURNS bytea
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT CASE WHEN h.op = 'put' THEN h.value END
    FROM history h
    WHERE h.key = p_key AND h.revision <= p_revision
    ORDER BY h.revision DESC
    LIMIT 1
$$;

-- Changes written with SQL to a mirror table, waiting to be applied to etcd.
-- Per key, ids follow commit order: the row lock on the mirror row (or its
-- unique index entry) serializes writers of one key.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    mirror_table  text NOT NULL,
    key           bytea NOT NULL,
    op            text NOT NULL CHECK (op IN ('put', 'delete')),
    value         bytea,
    -- The etcd mod revision the row had when written (0: key did not exist).
    base_revision bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    -- Set while parked behind a pending `manual` conflict.
    conflict_id   bigint
);
CREATE INDEX outbox_key_idx ON outbox (mirror_table, key, id);

CREATE TABLE conflicts (
    id               bigserial PRIMARY KEY,
    mirror_table     text NOT NULL,
    key              bytea NOT NULL,
    etcd_value       bytea,          -- NULL: deleted in etcd
    etcd_revision    bigint NOT NULL,
    etcd_observed_at timestamptz NOT NULL,
    pg_value         bytea,          -- NULL: deleted in PostgreSQL
    -- Earlier local changes of the key dropped with it (oldest first; NULL
    -- entries: deletes), so no acknowledged write vanishes unrecorded.
    pg_superseded    bytea[] NOT NULL DEFAULT '{}',
    pg_revision      bigint NOT NULL, -- the etcd revision the PostgreSQL change was based on
    pg_changed_at    timestamptz NOT NULL,
    policy           text NOT NULL,
    winner           text CHECK (winner IN ('etcd', 'pg')),
    status           text NOT NULL CHECK (status IN ('pending', 'resolved')),
    -- An operator's `conflicts resolve`, carried out by the leader.
    requested_take   text CHECK (requested_take IN ('etcd', 'pg')),
    resolved_by      text,
    detected_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolved_at      timestamptz,
    node             text NOT NULL,
    term             bigint NOT NULL,
    trace_id         text
);
CREATE UNIQUE INDEX conflicts_one_pending_per_key ON conflicts (mirror_table, key) WHERE status = 'pending';

CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    direction     text NOT NULL CHECK (direction IN ('pg-to-etcd', 'etcd-to-pg')),
    mirror_table  text,
    key           bytea NOT NULL,
    op            text NOT NULL CHECK (op IN ('put', 'delete')),
    value         bytea,
    base_revision bigint,
    outbox_id     bigint,
    reason        text NOT NULL,
    kind          text NOT NULL,
    attempts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    node          text NOT NULL,
    term          bigint NOT NULL,
    trace_id      text,
    retried_at    timestamptz
);

-- The audit trail: batches, conflicts, resolutions, dead letters, retry
-- exhaustion, leadership changes, compaction recoveries, verify runs.
CREATE TABLE sync_events (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind     text NOT NULL,
    node     text NOT NULL,
    term     bigint NOT NULL DEFAULT 0,
    trace_id text,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX sync_events_kind_at_idx ON sync_events (kind, at);
CREATE INDEX sync_events_at_idx ON sync_events (at);

-- Text for humans: NULL where the bytes are not valid UTF-8 (or hold NUL).
CREATE FUNCTION utf8_or_null(b bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN convert_from(b, 'UTF8');
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- A user's write keeps the row's etcd metadata (it is the compare base of the
-- etcd txn); the service's own writes set `etcd_sync.applying` and pass.
CREATE FUNCTION mirror_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('etcd_sync.applying', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' OR NEW.key IS DISTINCT FROM OLD.key THEN
        NEW.create_revision := 0;
        NEW.mod_revision := 0;
        NEW.version := 0;
        NEW.lease := 0;
        NEW.origin := 'pg';
        NEW.updated_at := now();
    ELSE
        NEW.create_revision := OLD.create_revision;
        NEW.mod_revision := OLD.mod_revision;
        NEW.version := OLD.version;
        NEW.lease := OLD.lease;
        IF NEW.value IS DISTINCT FROM OLD.value THEN
            NEW.origin := 'pg';
            NEW.updated_at := now();
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
CREATE FUNCTION mirror_after_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    first_id bigint;
BEGIN
    IF current_setting('etcd_sync.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO outbox (mirror_table, key, op, value, base_revision)
        VALUES (TG_TABLE_NAME, OLD.key, 'delete', NULL, OLD.mod_revision)
        RETURNING id INTO first_id;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO outbox (mirror_table, key, op, value, base_revision)
        VALUES (TG_TABLE_NAME, NEW.key, 'put', NEW.value, 0)
        RETURNING id INTO first_id;
    ELSIF NEW.key IS DISTINCT FROM OLD.key THEN
        INSERT INTO outbox (mirror_table, key, op, value, base_revision)
        VALUES (TG_TABLE_NAME, OLD.key, 'delete', NULL, OLD.mod_revision)
        RETURNING id INTO first_id;
        INSERT INTO outbox (mirror_table, key, op, value, base_revision)
        VALUES (TG_TABLE_NAME, NEW.key, 'put', NEW.value, 0);
    ELSIF NEW.value IS DISTINCT FROM OLD.value THEN
        INSERT INTO outbox (mirror_table, key, op, value, base_revision)
        VALUES (TG_TABLE_NAME, NEW.key, 'put', NEW.value, OLD.mod_revision)
        RETURNING id INTO first_id;
    ELSE
        RETURN NULL;  -- an UPDATE that changes nothing is not propagated
    END IF;
    IF NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id < first_id AND o.conflict_id IS NULL) THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- Writes through the text view land in the mirror table (argument 0).
CREATE FUNCTION mirror_text_write() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    mirror text := TG_ARGV[0];
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('INSERT INTO %I (key, value) VALUES ($1, $2)', mirror)
            USING convert_to(NEW.key, 'UTF8'), convert_to(NEW.value, 'UTF8');
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE format('UPDATE %I SET key = $1, value = $2 WHERE key = $3', mirror)
            USING convert_to(NEW.key, 'UTF8'), convert_to(NEW.value, 'UTF8'), convert_to(OLD.key, 'UTF8');
        RETURN NEW;
    ELSE
        EXECUTE format('DELETE FROM %I WHERE key = $1', mirror)
            USING convert_to(OLD.key, 'UTF8');
        RETURN OLD;
    END IF;
END
$$;

-- Creates (idempotently) a mirror table, its triggers and its `<table>_text`
-- view. Called by `migrate` for every configured mapping.
CREATE FUNCTION ensure_mirror_table(p_table text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    s text := current_schema();
BEGIN
    IF p_table !~ '^[a-z_][a-z0-9_]{0,57}$' THEN
        RAISE EXCEPTION 'invalid mirror table name %', p_table;
    END IF;
    EXECUTE format($sql$
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
    EXECUTE format('CREATE OR REPLACE TRIGGER etcd_sync_before BEFORE INSERT OR UPDATE ON %I.%I '
                   'FOR EACH ROW EXECUTE FUNCTION %I.mirror_before_write()', s, p_table, s);
    EXECUTE format('CREATE OR REPLACE TRIGGER etcd_sync_after AFTER INSERT OR UPDATE OR DELETE ON %I.%I '
                   'FOR EACH ROW EXECUTE FUNCTION %I.mirror_after_write()', s, p_table, s);
    EXECUTE format('CREATE OR REPLACE VIEW %I.%I AS SELECT %I.utf8_or_null(key) AS key, '
                   '%I.utf8_or_null(value) AS value, create_revision, mod_revision, version, lease, '
                   'updated_at, origin FROM %I.%I', s, p_table || '_text', s, s, s, p_table);
    EXECUTE format('CREATE OR REPLACE TRIGGER etcd_sync_text INSTEAD OF INSERT OR UPDATE OR DELETE ON %I.%I '
                   'FOR EACH ROW EXECUTE FUNCTION %I.mirror_text_write(%L)', s, p_table || '_text', s, p_table);
END
$fn$;
