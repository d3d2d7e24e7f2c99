-- The history, partitioned by ranges of (timeline, revision): retention
-- drops whole partitions (keeping each key's newest row) instead of
-- deleting rows one by one. The partition key is in the primary key
-- (key, timeline, revision), so a change is still recorded exactly once
-- (`ON CONFLICT DO NOTHING`), and `value_at`/`state_at` still find a key's
-- row at or below a revision through one index probe per partition.
--
-- Layout: the history as it was becomes the first partition (from MINVALUE
-- to the newest revision recorded); the leader makes the next ones ahead
-- of the sync (`extend_history_partitions`), each about
-- `sync.history_partition_days` of changes at the rate the revision clock
-- measures; a default partition catches what no range takes (a new
-- timeline, a burst past the partitions made ahead) until the next
-- extension moves it out. The upgrade reads the existing history once
-- (to attach it) while holding it locked.

LOCK TABLE @schema@.history IN ACCESS EXCLUSIVE MODE;
-- A user's view on the history would follow the renamed table (the first
-- partition) and never see a new row: refuse, saying which.
DO $$
DECLARE
    dependents text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT r.ev_class::regclass::text, ', ') INTO dependents
    FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    WHERE d.refobjid IN ('@schema@.history'::regclass, '@schema@.history_json'::regclass)
      AND r.ev_class NOT IN ('@schema@.history'::regclass, '@schema@.history_json'::regclass);
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'views depend on the history (%): drop them, migrate (the history becomes partitioned), and create them again', dependents;
    END IF;
END
$$;
-- The view's grants (e.g. SELECT for analysts), kept for the view made
-- again below (the table's stay on it: see the end).
SELECT pg_catalog.set_config('etcd_sync.history_json_acl',
    coalesce((SELECT c.relacl::text FROM pg_catalog.pg_class c
              WHERE c.oid = '@schema@.history_json'::regclass), '{}'), true);
DROP VIEW @schema@.history_json;
ALTER TABLE @schema@.history RENAME TO history_tmin_rmin;
ALTER INDEX @schema@.history_pkey RENAME TO history_tmin_rmin_pkey;
ALTER INDEX @schema@.history_revision_idx RENAME TO history_tmin_rmin_revision_idx;
ALTER INDEX @schema@.history_recorded_at RENAME TO history_tmin_rmin_recorded_at_idx;
CREATE TABLE @schema@.history (LIKE @schema@.history_tmin_rmin INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (timeline, revision);
ALTER TABLE @schema@.history ADD PRIMARY KEY (key, timeline, revision);
CREATE INDEX history_revision_idx ON @schema@.history (revision);
CREATE INDEX history_recorded_at ON @schema@.history (timeline, recorded_at);

DO $$
DECLARE
    t integer;
    m bigint;
BEGIN
    SELECT s.timeline, s.applied_revision INTO t, m FROM @schema@.sync_state s WHERE s.id = 1;
    m := greatest(m, coalesce((SELECT max(h.revision) FROM @schema@.history_tmin_rmin h
                               WHERE h.timeline = t), 0));
    EXECUTE pg_catalog.format(
        'ALTER TABLE @schema@.history ATTACH PARTITION @schema@.history_tmin_rmin '
        'FOR VALUES FROM (MINVALUE, MINVALUE) TO (%s, %s)', t, m + 1);
END
$$;
CREATE TABLE @schema@.history_default PARTITION OF @schema@.history DEFAULT;

CREATE VIEW @schema@.history_json AS
    SELECT h.*, @schema@.json_or_null(h.value) AS value_json FROM @schema@.history h;
-- The grants of the history as it was (now its first partition's) and of
-- its JSON view, given again to the partitioned table and the new view.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT 'history' AS relation, a.grantee, a.privilege_type
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = '@schema@.history_tmin_rmin'::regclass AND a.grantee <> c.relowner
        UNION ALL
        SELECT 'history_json', a.grantee, a.privilege_type
        FROM pg_catalog.aclexplode(nullif(pg_catalog.current_setting('etcd_sync.history_json_acl'), '{}')::aclitem[]) a
        WHERE a.grantee <> (SELECT c.relowner FROM pg_catalog.pg_class c
                            WHERE c.oid = '@schema@.history_json'::regclass)
    LOOP
        EXECUTE pg_catalog.format('GRANT %s ON @schema@.%I TO %s', g.privilege_type, g.relation,
            CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;
END
$$;

-- The history's partitions and their bounds: from (inclusive) and to
-- (exclusive) as (timeline, revision), NULL where unbounded; the default
-- partition has none.
CREATE VIEW @schema@.history_partitions AS
    SELECT c.relname::text AS name,
           b.m IS NULL AS is_default,
           nullif(pg_catalog.btrim(b.m[1], ''''), 'MINVALUE')::integer AS from_timeline,
           nullif(pg_catalog.btrim(b.m[2], ''''), 'MINVALUE')::bigint AS from_revision,
           nullif(pg_catalog.btrim(b.m[3], ''''), 'MAXVALUE')::integer AS to_timeline,
           nullif(pg_catalog.btrim(b.m[4], ''''), 'MAXVALUE')::bigint AS to_revision,
           greatest(c.reltuples, 0)::bigint AS rows_estimate,
           pg_catalog.pg_total_relation_size(c.oid) AS bytes
    FROM pg_catalog.pg_inherits i
    JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_catalog.regexp_match(
        pg_catalog.pg_get_expr(c.relpartbound, c.oid),
        '^FOR VALUES FROM \(([^,]+), ([^)]+)\) TO \(([^,]+), ([^)]+)\)$') AS m) b
    WHERE i.inhparent = '@schema@.history'::regclass;

-- Makes the partition of `p_timeline` that follows its last one (or starts
-- it, from MINVALUE) and ends before revision `p_to`; nothing when one
-- already reaches that far. Returns how many it made (0 or 1).
CREATE FUNCTION @schema@.add_history_partition(p_timeline integer, p_to bigint) RETURNS integer
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    from_revision bigint;
BEGIN
    SELECT max(p.to_revision) INTO from_revision
    FROM @schema@.history_partitions p WHERE p.to_timeline = p_timeline;
    IF from_revision IS NOT NULL AND from_revision >= p_to THEN
        RETURN 0;
    END IF;
    EXECUTE pg_catalog.format(
        'CREATE TABLE %I.%I PARTITION OF %I.history FOR VALUES FROM (%s, %s) TO (%s, %s)',
        s, pg_catalog.format('history_t%s_r%s', p_timeline, coalesce(from_revision::text, 'min')),
        s, p_timeline, coalesce(from_revision::text, 'MINVALUE'), p_timeline, p_to);
    RETURN 1;
END
$fn$;

-- Keeps partitions ahead of the sync on the current timeline: when less
-- than half a partition is left above the newest revision known (the
-- checkpoint, the history, the revision clock, `p_at_least`), makes the
-- next one, sized for `p_period` of changes at the rate the revision clock
-- measured over the last week (at least `p_min_width` revisions). First
-- moves rows the default partition caught into partitions made for them.
-- Returns how many partitions it made.
CREATE FUNCTION @schema@.extend_history_partitions(
    p_period interval, p_at_least bigint DEFAULT 0, p_min_width bigint DEFAULT 1000000)
RETURNS integer
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    t integer;
    m bigint;
    width bigint;
    made integer := 0;
    caught record;
BEGIN
    SELECT st.timeline, st.applied_revision INTO t, m FROM @schema@.sync_state st WHERE st.id = 1;
    SELECT greatest(p_min_width,
                    coalesce(ceil((max(c.revision) - min(c.revision))
                                  / nullif(extract(epoch FROM max(c.read_finished) - min(c.read_finished)), 0)
                                  * extract(epoch FROM p_period))::bigint, 0))
    INTO width
    FROM @schema@.revision_clock c
    WHERE c.timeline = t AND c.read_finished > pg_catalog.now() - interval '7 days';
    IF EXISTS (SELECT 1 FROM @schema@.history_default) THEN
        -- The history is held (no row written, none read) while they
        -- move; the lock is taken before any work, so that a user's long
        -- query makes this wait (`lock_timeout`) and give up, not the sync.
        LOCK TABLE @schema@.history IN ACCESS EXCLUSIVE MODE;
        CREATE UNLOGGED TABLE @schema@.history_caught AS
            WITH moved AS (DELETE FROM @schema@.history_default RETURNING *) SELECT * FROM moved;
        FOR caught IN SELECT h.timeline, max(h.revision) AS newest
                      FROM @schema@.history_caught h GROUP BY h.timeline ORDER BY 1 LOOP
            made := made + @schema@.add_history_partition(caught.timeline,
                caught.newest + 1 + CASE WHEN caught.timeline = t THEN width ELSE 0 END);
        END LOOP;
        INSERT INTO @schema@.history SELECT * FROM @schema@.history_caught;
        DROP TABLE @schema@.history_caught;
    END IF;
    m := greatest(m, p_at_least,
                  coalesce((SELECT max(h.revision) FROM @schema@.history h WHERE h.timeline = t), 0),
                  coalesce((SELECT max(c.revision) FROM @schema@.revision_clock c WHERE c.timeline = t), 0));
    IF coalesce((SELECT max(p.to_revision) FROM @schema@.history_partitions p WHERE p.to_timeline = t), 0)
       - m < width / 2 THEN
        made := made + @schema@.add_history_partition(t, m + width);
    END IF;
    RETURN made;
END
$fn$;

-- History retention, in steps (separate transactions, so that the long
-- one holds no lock the sync waits for), driven by the leader with its
-- term:
--
-- 1. `begin_history_expiry(p_days)`: the oldest run of partitions whose
--    rows are all older than `p_days` days (partitions already reduced to
--    kept rows always qualify) and that the sync has passed; moves the
--    horizon `state_at` answers from past the run first.
-- 2. `create_history_keeping(p_term)` then `keep_history_rows(run,
--    p_term)`: fills `history_keeping_<term>` (not a partition yet; one
--    per term, so a deposed leader's cannot be taken for the current
--    one's) with each key's newest row in the run, and indexes it: with
--    them `state_at` answers every revision from the run's end on as
--    before, and every key keeps its newest row.
-- 3. (The leader waits until no snapshot older than step 2 is left: one
--    would see neither the dropped rows nor the kept copies.)
--    `finish_history_expiry(run, bounds, cutoff, p_term)`: with the
--    history held, adds the rows written into the run since step 1 (a
--    resync's row at an old revision), drops the run's partitions and
--    attaches the kept table in their place — work that grows with the
--    keys kept, not with the rows dropped.

-- Step 1. No row when nothing is to go.
CREATE FUNCTION @schema@.begin_history_expiry(p_days integer)
RETURNS TABLE (run text[], lo_timeline integer, lo_revision bigint,
               hi_timeline integer, hi_revision bigint, cutoff timestamptz)
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    t integer;
    applied bigint;
    p record;
    fresh boolean := false;
    newest timestamptz;
BEGIN
    IF p_days <= 0 THEN
        RETURN;
    END IF;
    cutoff := pg_catalog.now() - pg_catalog.make_interval(days => p_days);
    run := '{}';
    SELECT st.timeline, st.applied_revision INTO t, applied FROM @schema@.sync_state st WHERE st.id = 1;
    FOR p IN SELECT * FROM @schema@.history_partitions hp WHERE NOT hp.is_default
             ORDER BY hp.from_timeline NULLS FIRST, hp.from_revision NULLS FIRST LOOP
        -- A partition the sync may still write (not passed yet) ends the run.
        EXIT WHEN p.to_timeline IS NULL OR p.to_revision IS NULL OR p.to_timeline > t
                  OR (p.to_timeline = t AND p.to_revision > applied + 1);
        -- So does one with a row younger than the cutoff (the newest row
        -- of each timeline: one index probe each), but for kept rows:
        -- a late one (a new mapping's fill at old revisions) must not hold
        -- retention back.
        IF p.name NOT LIKE 'history\_kept\_%' THEN
            EXECUTE pg_catalog.format(
                'SELECT max(x.newest) FROM pg_catalog.generate_series(%s, %s) AS g(timeline), '
                'LATERAL (SELECT max(h.recorded_at) AS newest FROM %I.%I h WHERE h.timeline = g.timeline) x',
                coalesce(p.from_timeline, 1), p.to_timeline, s, p.name) INTO newest;
            EXIT WHEN newest >= cutoff;
            fresh := true;
        END IF;
        IF pg_catalog.cardinality(run) = 0 THEN
            lo_timeline := p.from_timeline;
            lo_revision := p.from_revision;
        END IF;
        run := run || p.name;
        hi_timeline := p.to_timeline;
        hi_revision := p.to_revision;
    END LOOP;
    -- A run of partitions already reduced to their keys' newest rows has
    -- nothing more to give.
    IF NOT fresh THEN
        RETURN;
    END IF;
    -- Below the run's last revision, a key's state may be gone.
    IF hi_timeline = t THEN
        UPDATE @schema@.sync_state st
        SET history_complete_from = greatest(st.history_complete_from, hi_revision - 1)
        WHERE st.id = 1;
    END IF;
    RETURN NEXT;
END
$fn$;

-- Step 2, first part: the empty table (a transaction of its own: it
-- holds a lock on the history only for its creation). Drops what an
-- earlier term, or an earlier try of this one, left.
CREATE FUNCTION @schema@.create_history_keeping(p_term bigint) RETURNS void
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    left_over text;
BEGIN
    FOR left_over IN SELECT c.relname FROM pg_catalog.pg_class c
                     WHERE c.relnamespace = '@schema@'::regnamespace AND c.relkind = 'r'
                       AND c.relname ~ '^history_keeping_[0-9]+$'
                       AND pg_catalog.substr(c.relname, 17)::bigint <= p_term LOOP
        EXECUTE pg_catalog.format('DROP TABLE %I.%I', s, left_over);
    END LOOP;
    EXECUTE pg_catalog.format(
        'CREATE TABLE %I.%I (LIKE %I.history INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
        s, 'history_keeping_' || p_term, s);
END
$fn$;

-- Step 2, second part. Reads the run's partitions (not the history: no
-- lock on it). Returns how many rows the run holds and how many it keeps.
CREATE FUNCTION @schema@.keep_history_rows(p_run text[], p_term bigint, OUT total bigint, OUT kept bigint)
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    keeping text := 'history_keeping_' || p_term;
    parts text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('SELECT * FROM %I.%I', s, n), ' UNION ALL ')
    INTO parts FROM pg_catalog.unnest(p_run) AS n;
    EXECUTE pg_catalog.format('SELECT count(*) FROM (%s) u', parts) INTO total;
    -- Each key's newest row, in the order of a backward scan of the
    -- partitions' primary keys (no sort of the run).
    EXECUTE pg_catalog.format(
        'INSERT INTO %I.%I SELECT DISTINCT ON (u.key) * FROM (%s) u '
        'ORDER BY u.key DESC, u.timeline DESC, u.revision DESC', s, keeping, parts);
    GET DIAGNOSTICS kept = ROW_COUNT;
    -- The history's indexes, built now rather than when it is attached.
    EXECUTE pg_catalog.format('ALTER TABLE %I.%I ADD CONSTRAINT %I PRIMARY KEY (key, timeline, revision)',
                              s, keeping, keeping || '_pkey');
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %I.%I (revision)', keeping || '_revision_idx', s, keeping);
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %I.%I (timeline, recorded_at)',
                              keeping || '_recorded_at_idx', s, keeping);
END
$fn$;

-- Step 3. Returns how many rows written since step 1 it kept besides.
CREATE FUNCTION @schema@.finish_history_expiry(
    p_run text[], p_lo_timeline integer, p_lo_revision bigint,
    p_hi_timeline integer, p_hi_revision bigint, p_cutoff timestamptz, p_term bigint)
RETURNS bigint
LANGUAGE plpgsql SET search_path = @schema@, pg_temp AS $fn$
DECLARE
    s text := '@schema_name@';
    keeping text := 'history_keeping_' || p_term;
    kept text := pg_catalog.format('history_kept_t%s_r%s', p_hi_timeline, p_hi_revision);
    part text;
    late bigint := 0;
    n bigint;
BEGIN
    -- The history is held (no row written, none read) until commit; the
    -- lock comes before any work, so a user's long query makes this give
    -- up (`lock_timeout`) rather than the sync wait.
    LOCK TABLE @schema@.history IN ACCESS EXCLUSIVE MODE;
    FOREACH part IN ARRAY p_run LOOP
        -- Rows written since step 1 (per timeline: an index probe each).
        EXECUTE pg_catalog.format(
            'INSERT INTO %I.%I SELECT x.* FROM pg_catalog.generate_series(%s, %s) AS g(timeline), '
            'LATERAL (SELECT h.* FROM %I.%I h WHERE h.timeline = g.timeline AND h.recorded_at >= $1) x '
            'ON CONFLICT DO NOTHING',
            s, keeping, coalesce(p_lo_timeline, 1), p_hi_timeline, s, part) USING p_cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
        late := late + n;
    END LOOP;
    FOREACH part IN ARRAY p_run LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %I.history DETACH PARTITION %I.%I', s, s, part);
        EXECUTE pg_catalog.format('DROP TABLE %I.%I', s, part);
    END LOOP;
    EXECUTE pg_catalog.format('ALTER TABLE %I.%I RENAME TO %I', s, keeping, kept);
    EXECUTE pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I', s, keeping || '_pkey', kept || '_pkey');
    EXECUTE pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I', s, keeping || '_revision_idx',
                              kept || '_revision_idx');
    EXECUTE pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I', s, keeping || '_recorded_at_idx',
                              kept || '_recorded_at_idx');
    -- Checks the kept rows against the bounds (a scan of them, not of
    -- what was dropped) and adopts their indexes.
    EXECUTE pg_catalog.format(
        'ALTER TABLE %I.history ATTACH PARTITION %I.%I FOR VALUES FROM (%s, %s) TO (%s, %s)',
        s, s, kept, coalesce(p_lo_timeline::text, 'MINVALUE'), coalesce(p_lo_revision::text, 'MINVALUE'),
        p_hi_timeline, p_hi_revision);
    RETURN late;
END
$fn$;

-- The history's readers, planned for the partitions they read: with the
-- timeline and revision known when the query is planned, partitions above
-- the revision (and the default one) drop out, and a key's newest row at
-- or below it comes from the newest partition that has one (an ordered
-- scan, not a merge of every partition). `force_custom_plan`: a cached
-- generic plan would know neither.
CREATE OR REPLACE FUNCTION @schema@.value_at(p_key bytea, p_revision bigint, p_timeline integer)
RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp
SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN (SELECT CASE WHEN h.op = 'put' THEN h.value END
            FROM @schema@.history h
            WHERE h.key = p_key AND h.timeline = p_timeline AND h.revision <= p_revision
            ORDER BY h.timeline DESC, h.revision DESC
            LIMIT 1);
END
$$;

CREATE OR REPLACE FUNCTION @schema@.value_at(p_key bytea, p_revision bigint) RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
BEGIN
    RETURN @schema@.value_at(p_key, p_revision,
                             (SELECT s.timeline FROM @schema@.sync_state s WHERE s.id = 1));
END
$$;

CREATE OR REPLACE FUNCTION @schema@.state_at(p_table text, p_revision bigint)
RETURNS TABLE (key bytea, value bytea, mod_revision bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = @schema@, pg_temp
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    m record;
    horizon bigint;
    current_timeline integer;
    bound bigint;
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
    -- The end of the partition holding the revision: the keys are looked
    -- for in the partitions up to it only. (Not "at or below the
    -- revision": within a partition that filter would make each step of
    -- the skip scan below walk past every later row.)
    SELECT min(p.to_revision) INTO bound FROM @schema@.history_partitions p
    WHERE p.to_timeline = current_timeline AND p.to_revision > p_revision;
    -- Key by key (a skip scan over the primary key of those partitions):
    -- the next key after the previous one, then its newest row at or below
    -- the revision (from the newest partition that has one).
    RETURN QUERY
    WITH RECURSIVE keys(k) AS (
        (SELECT h.key FROM @schema@.history h
         WHERE h.key >= m.prefix AND (m.prefix_end IS NULL OR h.key < m.prefix_end)
           AND h.timeline = current_timeline AND (bound IS NULL OR h.revision < bound)
         ORDER BY h.key LIMIT 1)
        UNION ALL
        SELECT (SELECT h.key FROM @schema@.history h
                WHERE h.key > keys.k AND (m.prefix_end IS NULL OR h.key < m.prefix_end)
                  AND h.timeline = current_timeline AND (bound IS NULL OR h.revision < bound)
                ORDER BY h.key LIMIT 1)
        FROM keys WHERE keys.k IS NOT NULL
    )
    SELECT last.key, last.value, last.revision
    FROM keys
    CROSS JOIN LATERAL (
        SELECT h.key, h.op, h.value, h.revision FROM @schema@.history h
        WHERE h.key = keys.k AND h.timeline = current_timeline AND h.revision <= p_revision
        ORDER BY h.timeline DESC, h.revision DESC LIMIT 1
    ) AS last
    WHERE keys.k IS NOT NULL AND last.op = 'put'
    ORDER BY last.key;
END
$$;

REVOKE ALL ON FUNCTION @schema@.add_history_partition(integer, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.extend_history_partitions(interval, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.begin_history_expiry(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.create_history_keeping(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.keep_history_rows(text[], bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.finish_history_expiry(text[], integer, bigint, integer, bigint, timestamptz, bigint) FROM PUBLIC;

SELECT @schema@.extend_history_partitions(interval '30 days');
