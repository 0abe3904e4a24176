-- Settings markers are signed and versioned: the stream applies a marker only
-- when its MAC holds and its version is newer than the last one it applied.
ALTER TABLE hubspot_sync.integrations ADD COLUMN IF NOT EXISTS settings_version bigint NOT NULL DEFAULT 0;
ALTER TABLE hubspot_sync.stream_settings ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;

-- The activation (generation) of an integration: every connect and
-- disconnect moves it on, and every HubSpot call and every write that
-- delivery makes checks it, so a round of an older activation is fenced off.
ALTER TABLE hubspot_sync.integrations ADD COLUMN IF NOT EXISTS activation bigint NOT NULL DEFAULT 0;
UPDATE hubspot_sync.integrations SET activation = 1 WHERE connected_at IS NOT NULL AND activation = 0;

-- Record ids belong to one portal: the contact map is keyed by (Spot, portal).
ALTER TABLE hubspot_sync.contact_map ADD COLUMN IF NOT EXISTS portal_id bigint;
UPDATE hubspot_sync.contact_map c SET portal_id = i.portal_id
  FROM hubspot_sync.integrations i WHERE i.spot_id = c.spot_id AND c.portal_id IS NULL;
DELETE FROM hubspot_sync.contact_map WHERE portal_id IS NULL;
ALTER TABLE hubspot_sync.contact_map ALTER COLUMN portal_id SET NOT NULL;
ALTER TABLE hubspot_sync.contact_map DROP CONSTRAINT IF EXISTS contact_map_pkey;
ALTER TABLE hubspot_sync.contact_map ADD PRIMARY KEY (spot_id, portal_id, member_id);

-- The settings audit trail: who changed what, from what to what, and when.
CREATE TABLE IF NOT EXISTS hubspot_sync.integration_events (
    id          bigserial PRIMARY KEY,
    spot_id     bigint NOT NULL,
    kind        text NOT NULL,
    source      text NOT NULL,
    changes     jsonb NOT NULL DEFAULT '{}',
    detail      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS integration_events_spot_idx ON hubspot_sync.integration_events (spot_id, id);
