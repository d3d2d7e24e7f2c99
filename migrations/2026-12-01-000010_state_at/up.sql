-- The state of a mapping at any revision, or at any time, from the
-- history: what etcd's own `Range` at that revision returned, also after
-- etcd compacted it away.

-- Each mirror table's key range (its mapping's prefix), set by `migrate`:
-- `prefix_end` NULL means no upper bound (an empty prefix, or one of only
-- 0xff bytes). NULL `prefix` until a migrate with this schema ran.
ALTER TABLE @schema@.mirror_tables ADD COLUMN prefix bytea;
ALTER TABLE @schema@.mirror_tables ADD COLUMN prefix_end bytea;

-- The keys of `p_table`'s mapping and their values as of `p_revision` on
-- the current timeline (deleted keys absent), with the revision of their
-- last change: each key's newest history row at or below the revision, in
-- one pass over the primary key (key, timeline, revision).
--
-- The history starts at the mapping's first sync (a `snapshot` row per key
-- at the snapshot's revision): before that, it knows nothing. Across a
-- compaction gap, rows marked `resync` are the best knowledge: the state
-- read at the revision after the gap, for keys that changed inside it.
CREATE FUNCTION @schema@.state_at(p_table text, p_revision bigint)
RETURNS TABLE (key bytea, value bytea, mod_revision bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
    SELECT last.key, last.value, last.revision
    FROM (
        SELECT DISTINCT ON (h.key) h.key, h.op, h.value, h.revision
        FROM @schema@.history h
        JOIN @schema@.mirror_tables m ON m.name = p_table
        WHERE h.timeline = (SELECT s.timeline FROM @schema@.sync_state s WHERE s.id = 1)
          AND h.key >= m.prefix AND (m.prefix_end IS NULL OR h.key < m.prefix_end)
          AND h.revision <= p_revision
        ORDER BY h.key, h.revision DESC
    ) AS last
    WHERE last.op = 'put'
    ORDER BY last.key
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
