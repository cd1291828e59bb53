-- bookings.create in one round trip. The booking, its busy rows, the debit,
-- the deduct payment, the ledger line and the conversation commit together,
-- in one round trip where separate statements from the application would
-- take eight per booking.
-- server/db/bookings.py calls booking_create and maps its outcome.
--
-- Lock order, shared with bookings.cancel and settlement so that they never
-- deadlock: booking row, then wallet rows (users) in id order, then
-- booking_busy rows. bookings.create has no booking row yet: it starts by
-- locking both parties' wallet rows in id order. That serialises one
-- booker's concurrent calls (calls racing with one key find the winner's
-- booking instead of making a second), and it is needed for overlaps: an
-- exclusion constraint is checked after the new row is already in the
-- index, so two overlapping bookings sharing a person, inserted at the same
-- moment, would each wait for the other's row (a deadlock, which
-- tests/test_ledger.py provokes). With the shared person's row locked first, the
-- second waits until the first commits, then meets a committed row and gets
-- a clean exclusion violation. Bookings that share nobody still run side by
-- side.
--
-- Outcomes (column "outcome"):
--   created           a confirmed booking was made now
--   failed            the balance was short: stored as failed, nothing moved
--   replayed          the key was used before by this booker with these params
--   failed_replayed   ... and that booking had failed
--   conflict          the key belongs to another user or other params
--   kyc_required, host_not_bookable, not_found, booker_unknown: refused, nothing stored
-- An overlap raises exclusion_violation (booking_busy) or unique_violation
-- (uq_bookings_host_start_active) and rolls everything back.

-- What a key already made, judged against the new request.
CREATE FUNCTION booking_replay(p_key text, p_booker uuid, p_hash bytea)
RETURNS TABLE (outcome text, id uuid, user_id uuid, host_id uuid, start_at timestamptz, end_at timestamptz,
               status text, amount numeric, created_at timestamptz, updated_at timestamptz,
               conversation_id uuid, balance numeric)
-- STABLE: a plain SELECT, so it is inlined into booking_create's cached
-- statement; a VOLATILE function would be planned again on every call.
LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN b.user_id <> p_booker OR b.request_hash IS DISTINCT FROM p_hash THEN 'conflict'
              WHEN b.status = 'failed' THEN 'failed_replayed'
              ELSE 'replayed' END,
         b.id, b.user_id, b.host_id, b.start_at, b.end_at, b.status::text, b.amount,
         b.created_at, b.updated_at, c.id, u.balance
  FROM bookings b
  LEFT JOIN conversations c ON c.booking_id = b.id
  LEFT JOIN users u ON u.id = p_booker
  WHERE b.idempotency_key = p_key
$$;

CREATE FUNCTION booking_create(p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz,
                               p_key text, p_hash bytea)
RETURNS TABLE (outcome text, id uuid, user_id uuid, host_id uuid, start_at timestamptz, end_at timestamptz,
               status text, amount numeric, created_at timestamptz, updated_at timestamptz,
               conversation_id uuid, balance numeric)
LANGUAGE plpgsql AS $$
-- The result columns share names with table columns; in queries the column wins.
#variable_conflict use_column
DECLARE
  v_booker_kyc text;
  v_balance numeric;
  v_host_kyc text;
  v_price numeric;
  v_amount numeric;
  v_booking bookings%ROWTYPE;
  v_conversation uuid;
  v_party record;
BEGIN
  -- Both parties' wallet rows, in id order. NO KEY UPDATE, not UPDATE:
  -- foreign-key checks (KEY SHARE) on these rows must not wait.
  FOR v_party IN
    SELECT u.id, u.kyc_status, u.balance, u.price_per_hour FROM users u
    WHERE u.id IN (p_booker, p_host) ORDER BY u.id FOR NO KEY UPDATE
  LOOP
    IF v_party.id = p_booker THEN
      v_booker_kyc := v_party.kyc_status;
      v_balance := v_party.balance;
    END IF;
    IF v_party.id = p_host THEN
      v_host_kyc := v_party.kyc_status;
      v_price := v_party.price_per_hour;
    END IF;
  END LOOP;

  -- A key seen before answers with what it made, whatever changed since.
  RETURN QUERY SELECT * FROM booking_replay(p_key, p_booker, p_hash);
  IF FOUND THEN
    RETURN;
  END IF;

  IF v_booker_kyc IS NULL THEN
    outcome := 'booker_unknown'; RETURN NEXT; RETURN;
  END IF;
  IF v_booker_kyc <> 'verified' THEN
    outcome := 'kyc_required'; RETURN NEXT; RETURN;
  END IF;
  IF v_host_kyc IS NULL THEN
    outcome := 'not_found'; RETURN NEXT; RETURN;
  END IF;
  IF p_host = p_booker OR v_host_kyc <> 'verified' OR v_price IS NULL THEN
    outcome := 'host_not_bookable'; RETURN NEXT; RETURN;
  END IF;

  -- The caller validated whole hours; the amount is the server's, never the client's.
  v_amount := v_price * (extract(epoch FROM p_end - p_start)::bigint / 3600);

  IF v_balance < v_amount THEN
    -- Stored as failed so that a replay gives the same answer; holds no slot.
    INSERT INTO bookings AS b (user_id, host_id, start_at, end_at, idempotency_key, status, amount, request_hash)
    VALUES (p_booker, p_host, p_start, p_end, p_key, 'failed', v_amount, p_hash)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING b.* INTO v_booking;
    IF NOT FOUND THEN  -- another user's call with this key committed first
      RETURN QUERY SELECT * FROM booking_replay(p_key, p_booker, p_hash);
      RETURN;
    END IF;
    INSERT INTO payments (booking_id, user_id, amount, type, status, idempotency_key)
    VALUES (v_booking.id, p_booker, v_amount, 'deduct', 'failed', 'deduct:' || v_booking.id);
    RETURN QUERY SELECT 'failed'::text, v_booking.id, v_booking.user_id, v_booking.host_id,
      v_booking.start_at, v_booking.end_at, v_booking.status::text, v_booking.amount,
      v_booking.created_at, v_booking.updated_at, NULL::uuid, v_balance;
    RETURN;
  END IF;

  -- Pending exists only inside this transaction: the row is written confirmed.
  INSERT INTO bookings AS b (user_id, host_id, start_at, end_at, idempotency_key, status, amount, request_hash)
  VALUES (p_booker, p_host, p_start, p_end, p_key, 'confirmed', v_amount, p_hash)
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING b.* INTO v_booking;
  IF NOT FOUND THEN
    RETURN QUERY SELECT * FROM booking_replay(p_key, p_booker, p_hash);
    RETURN;
  END IF;

  -- Both parties become busy for [start, end). Rows go in user id order, so
  -- two bookings over the same people wait for each other in one direction
  -- only; an overlap raises exclusion_violation.
  INSERT INTO booking_busy (booking_id, user_id, role, during)
  SELECT v_booking.id, party.uid, party.role, tstzrange(p_start, p_end, '[)')
  FROM (VALUES (p_booker, 'booker'), (p_host, 'host')) AS party(uid, role)
  ORDER BY party.uid;

  UPDATE users u SET balance = u.balance - v_amount WHERE u.id = p_booker
  RETURNING u.balance INTO v_balance;
  INSERT INTO payments (booking_id, user_id, amount, type, status, idempotency_key)
  VALUES (v_booking.id, p_booker, v_amount, 'deduct', 'completed', 'deduct:' || v_booking.id);
  INSERT INTO transactions (user_id, amount, type, reference_id)
  VALUES (p_booker, -v_amount, 'booking_payment', v_booking.id);
  INSERT INTO conversations AS c (booking_id, user_id, host_id)
  VALUES (v_booking.id, p_booker, p_host)
  RETURNING c.id INTO v_conversation;

  RETURN QUERY SELECT 'created'::text, v_booking.id, v_booking.user_id, v_booking.host_id,
    v_booking.start_at, v_booking.end_at, v_booking.status::text, v_booking.amount,
    v_booking.created_at, v_booking.updated_at, v_conversation, v_balance;
END
$$;
