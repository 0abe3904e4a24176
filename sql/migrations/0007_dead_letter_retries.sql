-- An operator can retry a dead letter (the admin API): it is queued again and
-- marked, never deleted, so the record of what HubSpot refused stays.
ALTER TABLE hubspot_sync.dead_letters ADD COLUMN IF NOT EXISTS retried_at timestamptz;
CREATE INDEX IF NOT EXISTS dead_letters_spot_id_idx ON hubspot_sync.dead_letters (spot_id, id);
