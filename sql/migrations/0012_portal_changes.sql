-- A portal changes under the sidecar: HubSpot users merge contacts, delete
-- them, and delete people for privacy (README, "Merges, deletions and
-- privacy deletions").

-- The contact a member was mapped to before HubSpot deleted or merged it.
-- HubSpot announces a privacy deletion and the plain deletion that comes
-- with it in no particular order: whichever comes second still finds the
-- member (and its e-mail) here; a restore finds whom to look up again.
ALTER TABLE hubspot_sync.contact_map ADD COLUMN IF NOT EXISTS former_contact_id text;
-- Webhooks and merge following find members by record id on a portal.
CREATE INDEX IF NOT EXISTS contact_map_contact_idx
    ON hubspot_sync.contact_map (portal_id, contact_id) WHERE contact_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS contact_map_former_contact_idx
    ON hubspot_sync.contact_map (portal_id, former_contact_id) WHERE former_contact_id IS NOT NULL;

-- HubSpot webhook events, stored before the answer so that a crash after it
-- loses nothing; applied afterwards, oldest occurrence first. HubSpot
-- retries a batch and may repeat an event: the key makes a repeat a no-op.
-- Applied events are kept two days (HubSpot retries for one) and pruned.
CREATE TABLE IF NOT EXISTS hubspot_sync.webhook_events (
    id           bigserial PRIMARY KEY,
    dedup_key    text NOT NULL UNIQUE,
    portal_id    bigint NOT NULL,
    kind         text NOT NULL,
    object_id    text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    event        jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz
);
CREATE INDEX IF NOT EXISTS webhook_events_pending_idx
    ON hubspot_sync.webhook_events (occurred_at, id) WHERE applied_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_events_applied_idx
    ON hubspot_sync.webhook_events (applied_at) WHERE applied_at IS NOT NULL;

-- E-mails the sidecar never creates a contact for, never looks up and never
-- sends an event to on a portal: people deleted there for privacy. HubSpot
-- blocks them for its UI and imports only, not for the API, and leaves
-- honouring the deletion to integrations. An operator lifts one (audited)
-- when the person consents again.
CREATE TABLE IF NOT EXISTS hubspot_sync.suppressions (
    portal_id   bigint NOT NULL,
    email       text NOT NULL,
    contact_id  text,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (portal_id, email)
);

-- Members whose contact was merged into a contact another member of the
-- same Spot already writes: reported, never fought over. The member keeps
-- no contact until an operator sorts the records out in HubSpot (or the
-- member's e-mail changes); a row whose member has a contact again is stale.
CREATE TABLE IF NOT EXISTS hubspot_sync.contact_conflicts (
    spot_id         bigint NOT NULL,
    portal_id       bigint NOT NULL,
    member_id       bigint NOT NULL,
    contact_id      text NOT NULL,
    kept_member_id  bigint NOT NULL,
    detected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (spot_id, portal_id, member_id)
);
