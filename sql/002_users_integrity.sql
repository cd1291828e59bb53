-- A wallet can never go below zero, whatever the code does: the database
-- refuses it. kyc_status and the price range are closed sets in the protocol.
ALTER TABLE users
  ADD CONSTRAINT chk_users_balance_nonnegative CHECK (balance >= 0),
  ADD CONSTRAINT chk_users_kyc_status CHECK (kyc_status IN ('pending', 'verified', 'rejected')),
  ADD CONSTRAINT chk_users_price_range CHECK (price_per_hour IS NULL OR price_per_hour BETWEEN 1.00 AND 10000.00);

-- hosts.search walks bookable hosts in (price, id) order for keyset pages;
-- the partial index holds exactly the rows the search may return.
CREATE INDEX idx_users_bookable_price_id ON users (price_per_hour, id)
  WHERE price_per_hour IS NOT NULL AND kyc_status = 'verified';
