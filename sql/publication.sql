-- Publication for hubspot-sidecar (run by the DBA, who owns it).
--
-- It covers exactly the tables whose changes alter a member's HubSpot
-- properties or produce a timeline activity. Titles of lives, topics,
-- documents and courses, and Spot names, are looked up when needed, so those
-- tables are not published.
--
-- Replica identity: every published table has a primary key, which is the
-- default replica identity, so UPDATE and DELETE keep working for the
-- application and deletes carry the key the sidecar needs (for
-- group_members and member_tags the key is both columns, so a delete names
-- the member). members, live_registrations and course_progress use FULL so
-- that an update tells whether members.status, attended_at, started_at or
-- completed_at *became* what triggers an activity. FULL writes the old row
-- into the WAL on every UPDATE of those tables (the price of exact
-- activities; members' bio is the largest column).

CREATE PUBLICATION hubspot_sidecar FOR TABLE
    public.members,
    public.custom_roles,
    public.groups,
    public.group_members,
    public.tags,
    public.member_tags,
    public.live_registrations,
    public.replay_views,
    public.topics,
    public.topic_votes,
    public.document_opens,
    public.course_progress
    WITH (publish = 'insert, update, delete, truncate');

ALTER TABLE public.members            REPLICA IDENTITY FULL;
ALTER TABLE public.custom_roles       REPLICA IDENTITY DEFAULT;
ALTER TABLE public.groups             REPLICA IDENTITY DEFAULT;
ALTER TABLE public.group_members      REPLICA IDENTITY DEFAULT;
ALTER TABLE public.tags               REPLICA IDENTITY DEFAULT;
ALTER TABLE public.member_tags        REPLICA IDENTITY DEFAULT;
ALTER TABLE public.live_registrations REPLICA IDENTITY FULL;
ALTER TABLE public.replay_views       REPLICA IDENTITY DEFAULT;
ALTER TABLE public.topics             REPLICA IDENTITY DEFAULT;
ALTER TABLE public.topic_votes        REPLICA IDENTITY DEFAULT;
ALTER TABLE public.document_opens     REPLICA IDENTITY DEFAULT;
ALTER TABLE public.course_progress    REPLICA IDENTITY FULL;
