-- What a Spot's page shows of its backfill ("N of M members"), kept as the
-- backfill runs instead of counted over the Spot's members on every poll of
-- the page: the poll then costs the same for 10 members and for 1,000,000.
-- backfill_members: the Spot's members when its backfill started (all that
-- it queued, once it is done); backfill_queued: members queued so far.
ALTER TABLE hubspot_sync.integrations
    ADD COLUMN IF NOT EXISTS backfill_members bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS backfill_queued bigint NOT NULL DEFAULT 0;
UPDATE hubspot_sync.integrations i
   SET backfill_members = (SELECT count(*) FROM public.members m WHERE m.spot_id = i.spot_id),
       backfill_queued = (SELECT count(*) FROM public.members m
                           WHERE m.spot_id = i.spot_id
                             AND (i.backfill_done_at IS NOT NULL
                                  OR m.id <= COALESCE(i.backfill_after, 0)));
