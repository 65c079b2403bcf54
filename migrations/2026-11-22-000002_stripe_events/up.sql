-- Every Stripe event whose signature verified, with what the daemon did about it.
--
-- Why: an authentic event we cannot act on (unpaid, metadata missing, unknown region) must be
-- acknowledged with 2xx, or Stripe retries it for three days; but a paid order that did not
-- provision must stay visible to an operator. This table is where it stays, with its reason.
-- The primary key also de-duplicates deliveries of one event.
CREATE TABLE stripe_events (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- enqueued | duplicate | ignored | not_actionable
    outcome     text NOT NULL,
    reason      text,
    session_id  text,
    job_id      uuid REFERENCES provisioning_jobs (id) ON DELETE SET NULL
);
CREATE INDEX stripe_events_outcome_idx ON stripe_events (outcome, received_at DESC);
