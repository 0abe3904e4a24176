-- Least-privilege role for hubspot-sidecar (run by the DBA as a superuser).
-- The password is set separately and never stored in this file:
--   \password hubspot_sidecar
--
-- REPLICATION lets it create and read its logical slot; SELECT on the
-- published tables (plus the few it reads for titles and names) lets it
-- compute properties; it owns schema hubspot_sync, where its state lives.

CREATE ROLE hubspot_sidecar WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;

GRANT CONNECT ON DATABASE meltingspot TO hubspot_sidecar;  -- adjust the database name
GRANT USAGE ON SCHEMA public TO hubspot_sidecar;
GRANT SELECT ON
    public.spots, public.custom_roles, public.members, public.groups, public.group_members,
    public.tags, public.member_tags, public.lives, public.live_registrations, public.replay_views,
    public.topics, public.topic_votes, public.documents, public.document_opens,
    public.courses, public.course_progress
    TO hubspot_sidecar;

CREATE SCHEMA IF NOT EXISTS hubspot_sync AUTHORIZATION hubspot_sidecar;

