-- booking_busy follows bookings by itself.
--
-- The exclusion constraint that makes overlapping bookings impossible is on
-- booking_busy (sql/004). Were its rows written only by the code that
-- creates, cancels and settles bookings (sql/006, server/db/bookings.py), a
-- booking written any other way (a fix by hand, a script, a future code
-- path) could be active without busy rows, and overlap another: the rule
-- would be the code's, not the database's, and the database must enforce
-- it.
--
-- booking_busy_sync keeps one row per party of every active booking (status
-- pending or confirmed), for [start_at, end_at), in the transaction that
-- writes the booking: it adds them when a booking is inserted active or
-- becomes active, moves them with its times or parties, and removes them
-- when it is cancelled, completed or failed. An overlap raises
-- exclusion_violation from the write to bookings itself.
--
-- Lock order (see server/db/bookings.py) stays as it is: the busy rows are
-- written by the statement that writes the booking, which each path makes
-- after locking the wallets.
--
-- booking_create (sql/006) is replaced by the same function without its own
-- insert into booking_busy.

CREATE FUNCTION booking_busy_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    IF (OLD.status IN ('pending', 'confirmed')) = (NEW.status IN ('pending', 'confirmed'))
       AND OLD.user_id = NEW.user_id AND OLD.host_id = NEW.host_id
       AND OLD.start_at = NEW.start_at AND OLD.end_at = NEW.end_at THEN
      RETURN NULL;
    END IF;
    DELETE FROM booking_busy WHERE booking_id = OLD.id;
  END IF;
  IF NEW.status IN ('pending', 'confirmed') THEN
    -- In user id order, so two bookings over the same people wait for each
    -- other in one direction only.
    INSERT INTO booking_busy (booking_id, user_id, role, during)
    SELECT NEW.id, party.uid, party.role, tstzrange(NEW.start_at, NEW.end_at, '[)')
    FROM (VALUES (NEW.user_id, 'booker'), (NEW.host_id, 'host')) AS party(uid, role)
    ORDER BY party.uid;
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER trg_bookings_busy
  AFTER INSERT OR UPDATE OF status, user_id, host_id, start_at, end_at ON bookings
  FOR EACH ROW EXECUTE FUNCTION booking_busy_sync();

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

  -- The insert above made both parties busy for [start, end)
  -- (booking_busy_sync); an overlap has raised exclusion_violation there.

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
