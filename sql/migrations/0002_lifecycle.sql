-- Integration lifecycle (SPEC §4): OAuth, stream-ordered settings, backfill,
-- contact creation, failed incidents.

ALTER TABLE hubspot_sync.integrations
    ADD COLUMN IF NOT EXISTS failed_at        timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_after   bigint,
    ADD COLUMN IF NOT EXISTS backfill_done_at timestamptz;

-- One row per issued OAuth state: a state is accepted once, before it expires.
CREATE TABLE IF NOT EXISTS hubspot_sync.oauth_states (
    nonce       text PRIMARY KEY,
    spot_id     bigint NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- The settings as the replication stream has seen them, in commit order.
-- Written in the hand-off transaction, so after a restart they match the
-- checkpoint the stream resumes from.
CREATE TABLE IF NOT EXISTS hubspot_sync.stream_settings (
    spot_id          bigint PRIMARY KEY,
    status           text NOT NULL,
    create_contacts  boolean NOT NULL,
    activities       jsonb NOT NULL,
    lsn              pg_lsn NOT NULL
);

-- Set when the member was inserted while contact creation was on (stream order).
ALTER TABLE hubspot_sync.property_outbox
    ADD COLUMN IF NOT EXISTS create_contact boolean NOT NULL DEFAULT false;
