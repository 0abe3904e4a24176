-- The server the checkpoint belongs to: a checkpoint is only meaningful on
-- the server (system identifier) and timeline it was taken on. A restore
-- into another cluster or a failover without the slot is detected by these
-- and healed by a resync instead of silently skipping changes.
ALTER TABLE hubspot_sync.checkpoint ADD COLUMN IF NOT EXISTS system_identifier text;
ALTER TABLE hubspot_sync.checkpoint ADD COLUMN IF NOT EXISTS timeline integer;
