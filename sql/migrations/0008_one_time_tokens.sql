-- The settings page's one-time links are recorded like OAuth states: a
-- nonce accepted once, before it expires. One table for both, by purpose.
ALTER TABLE hubspot_sync.oauth_states RENAME TO one_time_tokens;
ALTER TABLE hubspot_sync.one_time_tokens
    ADD COLUMN IF NOT EXISTS purpose text NOT NULL DEFAULT 'oauth_state';
-- A binary from before this migration (a rollback, or the old leader while
-- the new one starts) still writes OAuth states under the old name.
CREATE OR REPLACE VIEW hubspot_sync.oauth_states AS
    SELECT nonce, spot_id, expires_at, used_at
      FROM hubspot_sync.one_time_tokens WHERE purpose = 'oauth_state';
