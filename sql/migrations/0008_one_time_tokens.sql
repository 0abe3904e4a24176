-- The settings page's one-time links are recorded like OAuth states: a
-- nonce accepted once, before it expires. One table for both, by purpose.
ALTER TABLE hubspot_sync.oauth_states RENAME TO one_time_tokens;
ALTER TABLE hubspot_sync.one_time_tokens
    ADD COLUMN IF NOT EXISTS purpose text NOT NULL DEFAULT 'oauth_state';
