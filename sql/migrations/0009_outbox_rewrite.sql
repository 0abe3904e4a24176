-- A row queued by `reconcile --fix`: its delivery writes every value, not
-- only those the contact map says differ. A flag on the row, not a reset of
-- the contact map, so a delivery round already in flight for the member
-- cannot restore what the fix cleared: the flag leaves only with the row.
ALTER TABLE hubspot_sync.property_outbox
    ADD COLUMN IF NOT EXISTS rewrite boolean NOT NULL DEFAULT false;
