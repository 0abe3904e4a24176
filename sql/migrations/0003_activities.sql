-- Timeline activities (SPEC §3, §4.5): one row per event until HubSpot has it.
-- The event id is deterministic, so a replayed change can never queue it twice.

CREATE TABLE IF NOT EXISTS hubspot_sync.activity_outbox (
    event_id         text PRIMARY KEY,
    spot_id          bigint NOT NULL,
    member_id        bigint NOT NULL,
    activity         text NOT NULL,
    occurred_at      timestamptz NOT NULL,
    spot_name        text NOT NULL,
    title            text NOT NULL,
    url              text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS activity_outbox_due_idx ON hubspot_sync.activity_outbox (spot_id, next_attempt_at);
