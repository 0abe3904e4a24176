-- hubspot_sync: state owned by hubspot-sidecar. Applied at start (embedded in
-- the binary); kept here for DBAs who review or apply it by hand. The schema
-- itself comes from sql/role.sql (owned by the sidecar's role), or is created
-- by the sidecar when it may.

-- One row per Spot that was ever connected.
CREATE TABLE IF NOT EXISTS hubspot_sync.integrations (
    spot_id            bigint PRIMARY KEY,
    status             text NOT NULL DEFAULT 'inactive' CHECK (status IN ('inactive', 'active', 'failed')),
    portal_id          bigint,
    auth_kind          text CHECK (auth_kind IN ('oauth', 'token')),
    -- AES-256-GCM with SIDECAR_SECRET_KEY: nonce || ciphertext.
    access_token_enc   bytea,
    refresh_token_enc  bytea,
    token_expires_at   timestamptz,
    create_contacts    boolean NOT NULL DEFAULT false,
    activities         jsonb NOT NULL DEFAULT '{"members":false,"lives":false,"discussions":false,"collections":false,"courses":false}',
    initialized_at     timestamptz,
    last_error         text,
    last_success_at    timestamptz,
    failing_since      timestamptz,
    connected_at       timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- The LSN up to which every committed change has been handed off.
CREATE TABLE IF NOT EXISTS hubspot_sync.checkpoint (
    slot_name   text PRIMARY KEY,
    lsn         pg_lsn NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Members whose HubSpot properties must be recomputed and written. One row per
-- member: new changes bump `version`, so delivery deletes a row only if no
-- change arrived while it was writing (coalescing without losing updates).
CREATE SEQUENCE IF NOT EXISTS hubspot_sync.outbox_version;
CREATE TABLE IF NOT EXISTS hubspot_sync.property_outbox (
    spot_id          bigint NOT NULL,
    member_id        bigint NOT NULL,
    version          bigint NOT NULL DEFAULT nextval('hubspot_sync.outbox_version'),
    lsn              pg_lsn NOT NULL,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (spot_id, member_id)
);
CREATE INDEX IF NOT EXISTS property_outbox_due_idx ON hubspot_sync.property_outbox (spot_id, next_attempt_at);

-- Which HubSpot contact a member maps to, and what was last written to it.
CREATE TABLE IF NOT EXISTS hubspot_sync.contact_map (
    spot_id     bigint NOT NULL,
    member_id   bigint NOT NULL,
    email       text NOT NULL,
    contact_id  text,
    written     jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (spot_id, member_id)
);

CREATE TABLE IF NOT EXISTS hubspot_sync.dead_letters (
    id          bigserial PRIMARY KEY,
    spot_id     bigint NOT NULL,
    member_id   bigint,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dead_letters_spot_idx ON hubspot_sync.dead_letters (spot_id, created_at);

CREATE TABLE IF NOT EXISTS hubspot_sync.notifications (
    id            bigserial PRIMARY KEY,
    spot_id       bigint NOT NULL,
    member_id     bigint NOT NULL,
    channel       text NOT NULL CHECK (channel IN ('in_app', 'email')),
    kind          text NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);
