-- Drops the service's own tables and functions. Mirror tables hold user data
-- and are left in place (their triggers go with the functions).
DROP FUNCTION IF EXISTS ensure_mirror_table(text);
DROP FUNCTION IF EXISTS mirror_text_write() CASCADE;
DROP FUNCTION IF EXISTS mirror_after_write() CASCADE;
DROP FUNCTION IF EXISTS mirror_before_write() CASCADE;
DROP FUNCTION IF EXISTS utf8_or_null(bytea) CASCADE;
DROP FUNCTION IF EXISTS value_at(bytea, bigint);
DROP TABLE IF EXISTS sync_events;
DROP TABLE IF EXISTS dead_letters;
DROP TABLE IF EXISTS conflicts;
DROP TABLE IF EXISTS outbox;
DROP TABLE IF EXISTS history;
DROP TABLE IF EXISTS sync_state;
