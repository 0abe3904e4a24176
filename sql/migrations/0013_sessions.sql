-- Settings sessions belong to a person and can be ended (README, "The pages").

-- A session carries the epochs current when it started: bumping a Spot's
-- epoch ends every session of that Spot, bumping row 0 ends every session
-- of every Spot, without touching SIDECAR_SECRET_KEY. No row: epoch 0.
CREATE TABLE IF NOT EXISTS hubspot_sync.session_epochs (
    spot_id     bigint PRIMARY KEY,
    epoch       bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Who, when a person made the change: the member id of a settings session.
ALTER TABLE hubspot_sync.integration_events ADD COLUMN IF NOT EXISTS member_id bigint;
