-- The state of a mapping at any revision, or at any time, from the
-- history: what etcd's own `Range` at that revision returned, also after
-- etcd compacted it away.

-- Each mirror table's key range (its mapping's prefix), set by `migrate`:
-- `prefix_end` NULL means no upper bound (an empty prefix, or one of only
-- 0xff bytes). NULL `prefix` until a migrate with this schema ran.
ALTER TABLE @schema@.mirror_tables ADD COLUMN prefix bytea;
ALTER TABLE @schema@.mirror_tables ADD COLUMN prefix_end bytea;
-- The revision from which the history knows the table's whole range on the
-- current timeline: the revision its first sync (snapshot, fill, or the
-- resync onto a new timeline) read etcd at. Snapshot rows carry each key's
-- own mod revision, so before this a key changed after R and before the
-- sync looks absent at R. NULL: not known (not synced yet on this
-- timeline).
ALTER TABLE @schema@.mirror_tables ADD COLUMN history_from bigint;
-- History retention deletes old rows (keeping every key's newest): below
-- this revision a key's state may be gone.
ALTER TABLE @schema@.sync_state ADD COLUMN history_complete_from bigint NOT NULL DEFAULT 0;
-- `revision_at` looks up the newest change recorded by a time.
CREATE INDEX history_recorded_at ON @schema@.history (timeline, recorded_at);

-- The keys of `p_table`'s mapping and their values as of `p_revision` on
-- the current timeline (deleted keys absent), with the revision of their
-- last change: each key's newest history row at or below the revision,
-- found through the primary key (key, timeline, revision).
-- Refuses (SQLSTATE 22023) a revision the history cannot answer for
-- exactly: before the table's first sync on this timeline, or before
-- history retention's horizon. Across a compaction gap, rows marked
-- `resync` are the best knowledge: the state read at the revision after
-- the gap, for keys that changed inside it. SECURITY DEFINER: who may
-- execute it reads the history of every mapping, as with SELECT on
-- `history`.
CREATE FUNCTION @schema@.state_at(p_table text, p_revision bigint)
RETURNS TABLE (key bytea, value bytea, mod_revision bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
#variable_conflict use_column
DECLARE
    m record;
    horizon bigint;
    current_timeline integer;
BEGIN
    SELECT t.prefix, t.prefix_end, t.history_from INTO m
    FROM @schema@.mirror_tables t WHERE t.name = p_table;
    IF NOT FOUND OR m.prefix IS NULL THEN
        RAISE EXCEPTION 'no mirror table % with a known key range (run migrate)', p_table
            USING ERRCODE = 'undefined_table';
    END IF;
    SELECT s.timeline, s.history_complete_from INTO current_timeline, horizon
    FROM @schema@.sync_state s WHERE s.id = 1;
    IF m.history_from IS NULL THEN
        RAISE EXCEPTION 'the history of % on this etcd timeline starts at its first sync, which has not finished', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_revision < greatest(m.history_from, horizon) THEN
        RAISE EXCEPTION 'revision % is before what the history of % knows whole (from revision %)',
                        p_revision, p_table, greatest(m.history_from, horizon)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Key by key through the primary key (a skip scan): the next key
    -- after the previous one, then its newest row at or below the
    -- revision. Two index probes per key, however long each key's history.
    RETURN QUERY
    WITH RECURSIVE keys(k) AS (
        (SELECT h.key FROM @schema@.history h
         WHERE h.key >= m.prefix AND (m.prefix_end IS NULL OR h.key < m.prefix_end)
           AND h.timeline = current_timeline
         ORDER BY h.key LIMIT 1)
        UNION ALL
        SELECT (SELECT h.key FROM @schema@.history h
                WHERE h.key > keys.k AND (m.prefix_end IS NULL OR h.key < m.prefix_end)
                  AND h.timeline = current_timeline
                ORDER BY h.key LIMIT 1)
        FROM keys WHERE keys.k IS NOT NULL
    )
    SELECT last.key, last.value, last.revision
    FROM keys
    CROSS JOIN LATERAL (
        SELECT h.key, h.op, h.value, h.revision FROM @schema@.history h
        WHERE h.key = keys.k AND h.timeline = current_timeline AND h.revision <= p_revision
        ORDER BY h.revision DESC LIMIT 1
    ) AS last
    WHERE keys.k IS NOT NULL AND last.op = 'put'
    ORDER BY last.key;
END
$$;

-- The newest etcd revision known to exist by `p_at` on the current
-- timeline: a revision-clock sample read by then, or a change the mirror
-- recorded by then (0 when neither). A revision made shortly before `p_at`
-- and seen only later may be missing: the clock samples about once a
-- second while a replica runs.
CREATE FUNCTION @schema@.revision_at(p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
    SELECT greatest(
        coalesce((SELECT max(c.revision) FROM @schema@.revision_clock c
                  WHERE c.timeline = s.timeline AND c.read_finished <= p_at), 0),
        coalesce((SELECT max(h.revision) FROM @schema@.history h
                  WHERE h.timeline = s.timeline AND h.recorded_at <= p_at), 0))
    FROM @schema@.sync_state s WHERE s.id = 1
$$;

-- `state_at` as of a time (see `revision_at`).
CREATE FUNCTION @schema@.state_at_time(p_table text, p_at timestamptz)
RETURNS TABLE (key bytea, value bytea, mod_revision bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
    SELECT * FROM @schema@.state_at(p_table, @schema@.revision_at(p_at))
$$;

REVOKE ALL ON FUNCTION @schema@.state_at(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.revision_at(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.state_at_time(text, timestamptz) FROM PUBLIC;
