-- A delivery round reads the first due rows of one Spot in the order it
-- sends them. With the order's tie-breaker in the index that read stops
-- after the batch; without it, every due row of the Spot was sorted for
-- each round (seconds per round with millions queued behind one large
-- transaction, while the hand-off competed for the same disk and CPU).
CREATE INDEX IF NOT EXISTS property_outbox_due_order_idx
    ON hubspot_sync.property_outbox (spot_id, next_attempt_at, version);
DROP INDEX IF EXISTS hubspot_sync.property_outbox_due_idx;
CREATE INDEX IF NOT EXISTS activity_outbox_due_order_idx
    ON hubspot_sync.activity_outbox (spot_id, next_attempt_at, occurred_at);
DROP INDEX IF EXISTS hubspot_sync.activity_outbox_due_idx;

-- A row a delivery round has taken (read to send). A hand-off that changes
-- the same member again gives only a taken row a new version; one not yet
-- taken is left as it is, since its round will read the member's values
-- after that hand-off. Taken unless said otherwise: rows queued before this
-- migration, or by a binary from before it (a rollback), may be in a round
-- of that binary, so they always get a new version. Only the hand-off,
-- which knows better, queues a row as not taken.
ALTER TABLE hubspot_sync.property_outbox
    ADD COLUMN IF NOT EXISTS taken boolean NOT NULL DEFAULT true;
