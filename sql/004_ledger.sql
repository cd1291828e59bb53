-- Bookings and money. The seed's UNIQUE (host_id, start_at) only
-- stopped identical starts, not overlaps, and a failed or cancelled booking
-- held its slot forever. It is replaced by a rule over active bookings only,
-- and overlap is made impossible by an exclusion constraint on booking_busy.

CREATE EXTENSION IF NOT EXISTS btree_gist;

ALTER TABLE bookings DROP CONSTRAINT uq_host_start;
CREATE UNIQUE INDEX uq_bookings_host_start_active ON bookings (host_id, start_at)
  WHERE status IN ('pending', 'confirmed');

ALTER TABLE bookings
  ADD CONSTRAINT chk_bookings_status CHECK (status IN ('pending', 'confirmed', 'completed', 'failed', 'cancelled')),
  ADD CONSTRAINT chk_bookings_amount CHECK (amount > 0),
  ADD CONSTRAINT chk_bookings_not_self CHECK (user_id <> host_id),
  ADD CONSTRAINT fk_bookings_booker FOREIGN KEY (user_id) REFERENCES users(id),
  ADD CONSTRAINT fk_bookings_host FOREIGN KEY (host_id) REFERENCES users(id),
  -- sha256 of the canonical request, to tell a replay from a reused key
  ADD COLUMN request_hash BYTEA;

-- bookings.list pages by (start_at desc, id) for each role; settlement scans
-- confirmed bookings by end_at.
CREATE INDEX idx_bookings_booker_start ON bookings (user_id, start_at DESC, id DESC);
CREATE INDEX idx_bookings_host_start ON bookings (host_id, start_at DESC, id DESC);
CREATE INDEX idx_bookings_confirmed_end ON bookings (end_at) WHERE status = 'confirmed';

-- One row per party of each active booking. No user may be in two active
-- bookings that overlap, as host or as booker; the constraint's GiST index
-- also serves availability and the "free for the whole range" search.
CREATE TABLE booking_busy (
  booking_id UUID NOT NULL REFERENCES bookings(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES users(id),
  role VARCHAR(6) NOT NULL CHECK (role IN ('booker', 'host')),
  during TSTZRANGE NOT NULL,  -- half-open [start_at, end_at)
  PRIMARY KEY (booking_id, user_id),
  CONSTRAINT ex_booking_busy_no_overlap EXCLUDE USING gist (user_id WITH =, during WITH &&)
);

ALTER TABLE payments
  ADD CONSTRAINT chk_payments_type CHECK (type IN ('deduct', 'refund', 'payout')),
  ADD CONSTRAINT chk_payments_status CHECK (status IN ('pending', 'completed', 'failed')),
  ADD CONSTRAINT fk_payments_booking FOREIGN KEY (booking_id) REFERENCES bookings(id),
  ADD CONSTRAINT fk_payments_user FOREIGN KEY (user_id) REFERENCES users(id);

ALTER TABLE transactions
  ADD CONSTRAINT chk_transactions_type CHECK (type IN ('topup', 'booking_payment', 'booking_refund', 'booking_payout')),
  ADD CONSTRAINT fk_transactions_user FOREIGN KEY (user_id) REFERENCES users(id);
-- wallet.transactions: newest first, keyset on (created_at, id)
CREATE INDEX idx_transactions_user_created ON transactions (user_id, created_at DESC, id DESC);

-- Top-ups through the (sandbox) payment provider, idempotent by key. Keys are
-- global: the same key from another user is a conflict, not a new top-up.
CREATE TABLE topups (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id),
  amount DECIMAL(12,2) NOT NULL CHECK (amount > 0),
  idempotency_key VARCHAR(255) NOT NULL UNIQUE,
  request_hash BYTEA NOT NULL,
  provider VARCHAR(20) NOT NULL DEFAULT 'sandbox',
  status VARCHAR(20) NOT NULL DEFAULT 'completed' CHECK (status IN ('pending', 'completed', 'failed')),
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_topups_user ON topups(user_id);
