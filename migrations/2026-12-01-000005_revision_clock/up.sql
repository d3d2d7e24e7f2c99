-- The revision clock: when each etcd revision was made, on PostgreSQL's
-- clock. Every replica (leader and standbys) samples etcd's revision about
-- once a second with a linearizable read bracketed by two readings of
-- PostgreSQL's clock: `read_started` before the read was sent, and
-- `read_finished` after its answer came back. So revision `revision`
-- existed by `read_finished`, and no later revision existed yet at
-- `read_started`. A revision r was therefore made after the latest
-- `read_started` of a sample below r, and by the earliest `read_finished`
-- of a sample at or above r: a window about a second wide while any
-- replica runs, as wide as the outage while none does.
CREATE TABLE @schema@.revision_clock (
    timeline      integer NOT NULL,
    revision      bigint NOT NULL,
    read_started  timestamptz NOT NULL,
    read_finished timestamptz NOT NULL,
    PRIMARY KEY (timeline, revision)
);

-- Both sides' change times of a conflict: PostgreSQL's write time was
-- recorded already (`pg_changed_at`); the etcd change's time is the window
-- the revision clock gives for its revision: made after
-- `etcd_changed_after` (NULL: no sample before it, unknown) and by
-- `etcd_changed_by`. `newest_wins_tie`: PostgreSQL's write fell inside
-- that window, so newest-wins could not tell which came first and the
-- configured tie rule (`sync.newest_wins_tie`) decided.
ALTER TABLE @schema@.conflicts
    ADD COLUMN etcd_changed_after timestamptz,
    ADD COLUMN etcd_changed_by timestamptz,
    ADD COLUMN decided_by_tie boolean NOT NULL DEFAULT false,
    -- When the PostgreSQL side's transaction committed (at the latest): its
    -- write took effect between `pg_changed_at` and this.
    ADD COLUMN pg_committed_by timestamptz;

-- When each transaction that queued changes committed. A change written at
-- t takes effect at its commit, maybe much later (a transaction left open):
-- newest-wins may call etcd's change newer only if it was made after the
-- commit. A deferred trigger stamps the transaction once, at commit time
-- (deferred triggers run as the transaction commits; `clock_timestamp()`
-- then is the commit's time, to within the commit's own work). The leader
-- deletes stamps older than 15 minutes; a change queued longer than that
-- is known to have committed only by the time it is read (a looser bound:
-- more ties, never a wrong order). Unlogged: a stamp costs no WAL
-- (pgbench, one-row UPDATEs of a mirror table at saturation: about 8% of
-- the throughput unlogged, 11-16% logged), and stamps lost in a crash or a
-- failover to a standby only loosen the bound the same way.
CREATE UNLOGGED TABLE @schema@.xact_commits (
    xact         xid8 PRIMARY KEY,
    committed_at timestamptz NOT NULL
);
CREATE INDEX xact_commits_committed_at ON @schema@.xact_commits (committed_at);

CREATE FUNCTION @schema@.outbox_stamp_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @schema@, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('etcd_sync.commit_stamped', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_catalog.set_config('etcd_sync.commit_stamped', 'on', true);
        INSERT INTO @schema@.xact_commits (xact, committed_at)
        VALUES (pg_catalog.pg_current_xact_id(), pg_catalog.clock_timestamp())
        ON CONFLICT (xact) DO UPDATE SET committed_at = EXCLUDED.committed_at;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION @schema@.outbox_stamp_commit() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER outbox_commit_time AFTER INSERT ON @schema@.outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION @schema@.outbox_stamp_commit();

-- A user's write records when it was made, not when its transaction began
-- (`clock_timestamp()`, as the outbox's `created_at`): newest-wins compares
-- it with the revision clock, and a transaction left open for a minute
-- before its UPDATE did not write a minute earlier.
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
REVOKE ALL ON FUNCTION @schema@.mirror_before_write() FROM PUBLIC;
