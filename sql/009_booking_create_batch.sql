-- bookings.create for several calls in one transaction and one round trip.
--
-- Under load, the server (Database.write_merged) merges the bookings.create
-- calls that wait at the same moment into one call of booking_create_batch;
-- a call on its own goes to booking_create_committed (sql/007). What a
-- booking costs the database beyond its rows (the round trip, waking a
-- backend, planning the CALL, the commit, reading the write position) is
-- then paid once per batch.
--
-- booking_create (sql/008) is redefined to answer an overlap with the
-- outcome 'slot_unavailable' instead of raising exclusion_violation: it
-- looks for busy rows of both parties before the insert, under locks of
-- their hours (booking_lock_hours). So one call's overlap rolls nothing else
-- back, and no call needs a subtransaction of its own. Subtransactions are
-- avoided on purpose: a row locked by the batch and then updated in a
-- subtransaction gets a MultiXact as its xmax, and every later look at that
-- row's versions has to read the MultiXact's members.
--
-- Locks, and their order, replacing sql/006's lock of both parties' wallet
-- rows. A booking locks the booker's wallet row (the balance), then a lock
-- per person and hour for both parties (what must not overlap); the host's
-- row is only read, so bookings of one host at other hours do not wait for
-- each other. A batch takes all its bookers' wallet rows in id order, then
-- all its hour locks in order, before any booking row: every transaction
-- takes wallet rows before hour locks, and each kind in order, so none waits
-- in a circle (bookings.cancel and settlement take no hour locks; they only
-- remove busy rows). Within the batch, a call sees what the calls before it
-- wrote: a second call with a key that an earlier one used is its replay, a
-- second booking of one slot is 'slot_unavailable', and a booker's balance
-- is what the calls before left.
--
-- Any error rolls the whole batch back (the server then makes each of its
-- calls alone, so that each gets its own answer). The arrays come back in
-- the order of the calls.

-- One transaction-level advisory lock per person and hour of each booking
-- [start, end) (bookings are whole hours), for both parties, taken in
-- (person, hour) order. Two bookings that could overlap share a lock;
-- bookings of one person at other hours do not. The person is hashed into
-- the first key: two people with one hash only wait for each other more.
CREATE FUNCTION booking_lock_hours(p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  k record;
BEGIN
  FOR k IN
    SELECT DISTINCT hashtext(who.person::text) AS person, hour
    FROM unnest(p_booker, p_host, p_start, p_end) AS c(booker, host, s, e)
    CROSS JOIN LATERAL (VALUES (c.booker), (c.host)) AS who(person)
    CROSS JOIN LATERAL generate_series(floor(extract(epoch FROM c.s) / 3600)::int,
                                       ceil(extract(epoch FROM c.e) / 3600)::int - 1) AS hour
    ORDER BY 1, 2
  LOOP
    PERFORM pg_advisory_xact_lock(k.person, k.hour);
  END LOOP;
END
$$;

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
BEGIN
  -- The booker's wallet row. NO KEY UPDATE, not UPDATE: foreign-key checks
  -- (KEY SHARE) on it must not wait. The host's row is only read: nothing of
  -- the host's changes here, and overlaps are kept apart by the hour locks
  -- below, so bookings of one host at other hours do not wait for this one.
  SELECT u.kyc_status, u.balance INTO v_booker_kyc, v_balance FROM users u WHERE u.id = p_booker FOR NO KEY UPDATE;
  SELECT u.kyc_status, u.price_per_hour INTO v_host_kyc, v_price FROM users u WHERE u.id = p_host;

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

  -- Every transaction that makes someone busy for an hour holds that
  -- person's lock of that hour first (booking_lock_hours): with both
  -- parties' hours locked, a busy row seen here is committed (or being
  -- removed), and none can appear before this commits. So the overlap is an
  -- answer, not an error, and a call in a batch (booking_create_batch) needs
  -- no subtransaction of its own. The exclusion constraint still holds
  -- whatever writes bookings.
  PERFORM booking_lock_hours(ARRAY[p_booker], ARRAY[p_host], ARRAY[p_start], ARRAY[p_end]);
  IF EXISTS (SELECT 1 FROM booking_busy bb WHERE bb.user_id IN (p_booker, p_host)
             AND bb.during && tstzrange(p_start, p_end, '[)')) THEN
    outcome := 'slot_unavailable'; RETURN NEXT; RETURN;
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

  -- The insert above made both parties busy for [start, end) (booking_busy_sync).

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

CREATE PROCEDURE booking_create_batch(
  p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[], p_key text[], p_hash bytea[],
  INOUT outcome text[] DEFAULT NULL, INOUT id uuid[] DEFAULT NULL, INOUT user_id uuid[] DEFAULT NULL,
  INOUT host_id uuid[] DEFAULT NULL, INOUT start_at timestamptz[] DEFAULT NULL,
  INOUT end_at timestamptz[] DEFAULT NULL, INOUT status text[] DEFAULT NULL, INOUT amount numeric[] DEFAULT NULL,
  INOUT created_at timestamptz[] DEFAULT NULL, INOUT updated_at timestamptz[] DEFAULT NULL,
  INOUT conversation_id uuid[] DEFAULT NULL, INOUT balance numeric[] DEFAULT NULL, INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  PERFORM 1 FROM users u WHERE u.id = ANY (p_booker) ORDER BY u.id FOR NO KEY UPDATE;
  PERFORM booking_lock_hours(p_booker, p_host, p_start, p_end);
  FOR i IN 1 .. cardinality(p_booker) LOOP
    SELECT * INTO r FROM booking_create(p_booker[i], p_host[i], p_start[i], p_end[i], p_key[i], p_hash[i]);
    outcome[i] := r.outcome; id[i] := r.id; user_id[i] := r.user_id; host_id[i] := r.host_id;
    start_at[i] := r.start_at; end_at[i] := r.end_at; status[i] := r.status; amount[i] := r.amount;
    created_at[i] := r.created_at; updated_at[i] := r.updated_at;
    conversation_id[i] := r.conversation_id; balance[i] := r.balance;
  END LOOP;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
