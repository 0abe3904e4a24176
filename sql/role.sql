-- Least-privilege role for hubspot-sidecar (run by the DBA as a superuser).
-- The password is set separately and never stored in this file:
--   \password hubspot_sidecar
--
-- REPLICATION lets it create and read its logical slot; SELECT on the
-- published tables (plus the few it reads for titles and names) lets it
-- compute properties; it owns schema hubspot_sync, where its state lives.

-- The file can be run again (e.g. after an upgrade adds statements): the role
-- is created only when missing, and every other statement is idempotent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hubspot_sidecar') THEN
        CREATE ROLE hubspot_sidecar WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

GRANT CONNECT ON DATABASE meltingspot TO hubspot_sidecar;  -- adjust the database name
GRANT USAGE ON SCHEMA public TO hubspot_sidecar;
GRANT SELECT ON
    public.spots, public.custom_roles, public.members, public.groups, public.group_members,
    public.tags, public.member_tags, public.lives, public.live_registrations, public.replay_views,
    public.topics, public.topic_votes, public.documents, public.document_opens,
    public.courses, public.course_progress
    TO hubspot_sidecar;

CREATE SCHEMA IF NOT EXISTS hubspot_sync AUTHORIZATION hubspot_sidecar;

-- pg_logical_emit_message is executable by PUBLIC by default: any role that can
-- connect could write arbitrarily large messages into the WAL that the sidecar's
-- stream must read (one of a few hundred MB can exhaust its memory). Only the
-- sidecar needs it, for its settings markers. The loop covers every overload the
-- server has (17 adds a flush argument; a REVOKE naming a missing signature
-- fails). Function privileges are per database: run this in the MeltingSpot one.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.proname = 'pg_logical_emit_message'
                AND p.pronamespace = 'pg_catalog'::regnamespace
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO hubspot_sidecar', f);
    END LOOP;
END
$$;
