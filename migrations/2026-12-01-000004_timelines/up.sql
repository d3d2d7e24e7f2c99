-- etcd timelines. An etcd restored from a backup, or replaced, has a
-- history of its own: revision numbers the old one used mean other changes
-- there. Each such history is a timeline, numbered from 1; the service
-- detects a new one (cluster id, a revision gone back, or its last applied
-- change missing from the new etcd), follows it, and keeps the old one's
-- history apart.
ALTER TABLE @schema@.sync_state
    ADD COLUMN timeline integer NOT NULL DEFAULT 1,
    -- etcd's cluster id when it was last seen (NULL: not seen yet).
    ADD COLUMN etcd_cluster_id bigint,
    -- A resync onto a new timeline has started and not finished.
    ADD COLUMN timeline_resync boolean NOT NULL DEFAULT false,
    -- The timeline mark: a token the leader writes to etcd
    -- (`__etcd_pg_sync/<cluster>/timeline-mark`) as the mirror moves on.
    -- An etcd that does not hold it (nor the one being written) lost
    -- revisions the mirror applied: another timeline. NULL: none yet.
    ADD COLUMN timeline_mark text,
    -- A token recorded before it is written to etcd (a crash between the
    -- write and the confirmation leaves it there).
    ADD COLUMN timeline_mark_pending text;

-- An input deferred by a resync onto a new timeline still records the
-- PostgreSQL value it replaces as rolled back when it is applied.
ALTER TABLE @schema@.deferred_inputs ADD COLUMN record_rollbacks boolean NOT NULL DEFAULT false;

ALTER TABLE @schema@.history ADD COLUMN timeline integer NOT NULL DEFAULT 1;
ALTER TABLE @schema@.history DROP CONSTRAINT history_pkey;
ALTER TABLE @schema@.history ADD PRIMARY KEY (key, timeline, revision);

-- Why a conflict was recorded when it was not a conflict of two writes:
-- 'timeline-change' for a value PostgreSQL had that following a new etcd
-- timeline rolled back (re-applied with `conflicts resolve ... --take pg`).
ALTER TABLE @schema@.conflicts ADD COLUMN reason text;

-- The value of a key as of a revision (NULL: absent) on the current
-- timeline, also for revisions etcd has compacted away. SECURITY DEFINER
-- to read the current timeline: its callers need EXECUTE only.
CREATE OR REPLACE FUNCTION @schema@.value_at(p_key bytea, p_revision bigint) RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
    SELECT CASE WHEN h.op = 'put' THEN h.value END
    FROM @schema@.history h
    WHERE h.key = p_key AND h.revision <= p_revision
      AND h.timeline = (SELECT s.timeline FROM @schema@.sync_state s WHERE s.id = 1)
    ORDER BY h.revision DESC
    LIMIT 1
$$;

-- The same on a given timeline (an older one: before etcd was restored).
CREATE FUNCTION @schema@.value_at(p_key bytea, p_revision bigint, p_timeline integer) RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
    SELECT CASE WHEN h.op = 'put' THEN h.value END
    FROM @schema@.history h
    WHERE h.key = p_key AND h.revision <= p_revision AND h.timeline = p_timeline
    ORDER BY h.revision DESC
    LIMIT 1
$$;

REVOKE ALL ON FUNCTION @schema@.value_at(bytea, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.value_at(bytea, bigint, integer) FROM PUBLIC;
