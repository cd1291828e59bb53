-- bookings.create: "start in the future" is checked after the idempotency
-- key, here, instead of with the other time rules in the params model.
--
-- A retry must get the original outcome (PROTOCOL: the booking as it is
-- now, even if since cancelled). Checked before the key, a retry sent once
-- the start had passed (a booking for 11:00 made at 10:59:59, its answer
-- lost, retried at 11:00:01) was invalid_params, and the client could not
-- learn that it had booked and paid. The database's clock decides, the same
-- for every server process. New outcome: start_passed (server/handlers/bookings.py
-- maps it to invalid_params naming start_at). The rest of booking_create is
-- sql/006's, unchanged.

CREATE OR REPLACE FUNCTION booking_create(p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz,
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

  -- Only a new booking must start in the future (sql/008).
  IF p_start <= now() THEN
    outcome := 'start_passed'; RETURN NEXT; RETURN;
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
