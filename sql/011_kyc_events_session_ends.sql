-- KYC webhook events already applied, by the provider's event id: a delivery
-- whose id is here changes nothing. Only signed requests add rows, and the
-- cleanup job (server/cleanup.py) deletes ids older than its retention.
CREATE TABLE kyc_events (
  event_id VARCHAR(255) PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  status VARCHAR(20) NOT NULL,
  applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_kyc_events_applied ON kyc_events(applied_at);

-- A refresh-token family (a session) ends SESSION_MAX_AGE_S after the login
-- or registration that began it, fixed then, however often it is refreshed.
-- The server always sets it; families begun before this column existed, and
-- any made by hand, end 90 days (the default) after they began.
ALTER TABLE refresh_token_families ADD COLUMN ends_at TIMESTAMPTZ;
UPDATE refresh_token_families SET ends_at = created_at + interval '90 days';
ALTER TABLE refresh_token_families
  ALTER COLUMN ends_at SET NOT NULL,
  ALTER COLUMN ends_at SET DEFAULT now() + interval '90 days';

-- What the cleanup job looks for: ended families, and unused tokens past
-- their expiry.
CREATE INDEX idx_refresh_families_ends ON refresh_token_families(ends_at);
CREATE INDEX idx_refresh_families_revoked ON refresh_token_families(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX idx_refresh_tokens_unused_expiry ON refresh_tokens(expires_at) WHERE used_at IS NULL;
