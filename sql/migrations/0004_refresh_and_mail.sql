-- When the current OAuth access token was issued: the refresh margin is a
-- third of its lifetime (at most 5 minutes), so a short-lived token is
-- refreshed once per lifetime, not on every call.
ALTER TABLE hubspot_sync.integrations ADD COLUMN IF NOT EXISTS token_issued_at timestamptz;

-- A failure e-mail the SMTP server refused for good is marked with the
-- reason and never retried, so it cannot hold back the notifications after it.
ALTER TABLE hubspot_sync.notifications ADD COLUMN IF NOT EXISTS rejected_at timestamptz;
ALTER TABLE hubspot_sync.notifications ADD COLUMN IF NOT EXISTS rejected_reason text;
