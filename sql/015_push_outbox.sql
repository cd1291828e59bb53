-- The push hook's outbox (server/push.py): one row per POST still owed to
-- PUSH_WEBHOOK_URL for a user who had no socket when an event was for them.
-- A row commits with what it reports (a chat message is stored with its
-- push; a booking event's push is written in the transaction that marks the
-- event published), so neither a dead process nor a webhook that is down
-- loses it. Every attempt of a row sends its id, so the receiver can drop
-- repeats. No foreign key to users, as user_events has none: inserting here
-- must not wait on a users row that a booking holds.
CREATE TABLE push_outbox (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL,
  event text NOT NULL,
  -- The event's data as stored; the body's data is this read through the
  -- event's model, so times and money are written as on the wire.
  data jsonb NOT NULL,
  -- When the event happened: the body's created_at.
  created_at timestamptz NOT NULL,
  -- Retries go on for at least an hour from here.
  queued_at timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 0,
  -- When a process may next claim the row: the backoff after a failure, or
  -- a lease while a POST is under way (a process that dies mid-POST leaves
  -- the row to be claimed again when the lease runs out).
  next_at timestamptz NOT NULL DEFAULT now(),
  last_error text,
  -- Set when retries gave up; such rows stay for operators, then the
  -- cleanup job deletes them.
  failed_at timestamptz
);
CREATE INDEX idx_push_outbox_due ON push_outbox (next_at) WHERE failed_at IS NULL;
CREATE INDEX idx_push_outbox_failed ON push_outbox (failed_at) WHERE failed_at IS NOT NULL;
