-- Rotating refresh tokens. Every login starts a family; each refresh spends
-- one token and issues the next in the same family. A spent token shown again
-- means it was stolen, so the whole family is revoked. Only hashes are stored.
CREATE TABLE refresh_token_families (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  revoked_at TIMESTAMPTZ,
  revoked_reason VARCHAR(20)  -- logout | reuse
);
CREATE INDEX idx_refresh_families_user ON refresh_token_families(user_id);

CREATE TABLE refresh_tokens (
  token_hash BYTEA PRIMARY KEY,      -- sha256 of the opaque token
  family_id UUID NOT NULL REFERENCES refresh_token_families(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  expires_at TIMESTAMPTZ NOT NULL,
  used_at TIMESTAMPTZ
);
CREATE INDEX idx_refresh_tokens_family ON refresh_tokens(family_id);
