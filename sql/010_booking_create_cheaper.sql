-- bookings.create with less work for PostgreSQL per booking.
--
-- 1. users keeps room on its pages (fillfactor 70). Every booking, top-up,
--    refund and payout updates a balance; on a full page the new row
--    version goes to another page, so the update also inserts an entry
--    into every index of users and the table grows. With room on the page
--    the update is HOT: no index is touched. Pages written before this
--    setting keep no room until their rows are next moved.
--
-- 2. A batch (booking_create_batch) locks all its bookers' rows and all its
--    hour locks before its first booking, so booking_create takes p_locked:
--    the batch says they are held, and the call does not take them again
--    (each lock has a cost; a row lock writes WAL). Called alone it takes
--    them itself.
--
-- 3. The batch locks its bookers' rows one by one, by primary key. A plan
--    of "id = ANY (bookers)" is made once per connection and kept; made
--    while users is small (a fresh database) it reads every row of the
--    table, however much the table grows afterwards.
--
-- 4. A batch whose calls all go through is written a table at a time
--    (booking_create_all, below), and the busy rows of new bookings come
--    from one statement trigger (booking_busy_insert): what a statement
--    costs whatever its rows is paid once per batch, not per booking.

ALTER TABLE users SET (fillfactor = 70);

-- A new parameter makes a new function: the old one goes first, so that a
-- call with six arguments has one function to go to.
DROP FUNCTION booking_create(uuid, uuid, timestamptz, timestamptz, text, bytea);

CREATE FUNCTION booking_create(p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz,
                               p_key text, p_hash bytea, p_locked boolean DEFAULT false)
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
  -- The booker's wallet row (already locked when p_locked: the batch locks
  -- all its bookers first, in id order). NO KEY UPDATE, not UPDATE: foreign-key checks
  -- (KEY SHARE) on it must not wait. The host's row is only read: nothing of
  -- the host's changes here, and overlaps are kept apart by the hour locks
  -- below, so bookings of one host at other hours do not wait for this one.
  IF p_locked THEN
    SELECT u.kyc_status, u.balance INTO v_booker_kyc, v_balance FROM users u WHERE u.id = p_booker;
  ELSE
    SELECT u.kyc_status, u.balance INTO v_booker_kyc, v_balance FROM users u WHERE u.id = p_booker FOR NO KEY UPDATE;
  END IF;
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
  IF NOT p_locked THEN
    PERFORM booking_lock_hours(ARRAY[p_booker], ARRAY[p_host], ARRAY[p_start], ARRAY[p_end]);
  END IF;
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

-- The busy rows of new bookings, once per statement instead of once per
-- row: a batch (booking_create_all) inserts all its bookings in one
-- statement, and one insert of their busy rows follows. Updates keep the
-- row trigger of sql/008 (a trigger with a column list can have no
-- transition table). Rows go in user id order, as the row trigger's do.
CREATE FUNCTION booking_busy_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO booking_busy (booking_id, user_id, role, during)
  SELECT n.id, party.uid, party.role, tstzrange(n.start_at, n.end_at, '[)')
  FROM inserted AS n
  CROSS JOIN LATERAL (VALUES (n.user_id, 'booker'), (n.host_id, 'host')) AS party(uid, role)
  WHERE n.status IN ('pending', 'confirmed')
  ORDER BY party.uid, n.start_at;
  RETURN NULL;
END
$$;

DROP TRIGGER trg_bookings_busy ON bookings;
CREATE TRIGGER trg_bookings_busy
  AFTER UPDATE OF status, user_id, host_id, start_at, end_at ON bookings
  FOR EACH ROW EXECUTE FUNCTION booking_busy_sync();
CREATE TRIGGER trg_bookings_busy_insert
  AFTER INSERT ON bookings REFERENCING NEW TABLE AS inserted
  FOR EACH STATEMENT EXECUTE FUNCTION booking_busy_insert();

-- A batch of bookings that all go through, written with one statement per
-- table instead of one per booking and table. Each statement costs
-- PostgreSQL something whatever its rows (starting the executor, reading
-- the table's CHECK constraints afresh, setting up its foreign-key
-- checks); here it is paid once per batch. Only for the common batch: every
-- call new (no key seen before, none twice), each booker once, every
-- booker and host verified, every host priced and not the booker, every
-- booker able to pay, nobody busy then and no two calls overlapping for
-- anyone. Anything else returns no row, and the batch goes call by call
-- through booking_create, which has an answer for each case. The caller
-- holds the bookers' rows and the hour locks (booking_create_batch), so
-- what is checked here stays true until the commit; a key written
-- meanwhile by a call outside the batch raises unique_violation, and the
-- server then makes each call alone.
--
-- Reads go by primary key or the busy index, one call at a time: a plan
-- that joins a whole array to a table is made once per connection, and
-- made while the table was small it scans all of it (see the top).
CREATE FUNCTION booking_create_all(p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[],
                                   p_key text[], p_hash bytea[])
RETURNS TABLE (id uuid[], amount numeric[], created_at timestamptz[], updated_at timestamptz[],
               conversation_id uuid[], balance numeric[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  n int := cardinality(p_booker);
  v_kyc text;
  v_balance numeric;
  v_host_kyc text;
  v_price numeric;
  v_amount numeric[] := '{}';
  v_id uuid[];
  v_created timestamptz[];
  v_updated timestamptz[];
  v_conversation uuid[];
  v_balances numeric[] := '{}';
BEGIN
  IF (SELECT count(DISTINCT b) FROM unnest(p_booker) AS b) <> n
     OR (SELECT count(DISTINCT k) FROM unnest(p_key) AS k) <> n THEN
    RETURN;
  END IF;
  -- No two calls of the batch overlap for anyone.
  IF EXISTS (
    SELECT 1
    FROM unnest(p_booker, p_host, p_start, p_end) WITH ORDINALITY AS x(booker, host, s, e, i)
    JOIN unnest(p_booker, p_host, p_start, p_end) WITH ORDINALITY AS y(booker, host, s, e, i)
      ON x.i < y.i AND (x.booker IN (y.booker, y.host) OR x.host IN (y.booker, y.host))
         AND x.s < y.e AND y.s < x.e) THEN
    RETURN;
  END IF;
  FOR i IN 1 .. n LOOP
    SELECT u.kyc_status, u.balance INTO v_kyc, v_balance FROM users u WHERE u.id = p_booker[i];
    SELECT u.kyc_status, u.price_per_hour INTO v_host_kyc, v_price FROM users u WHERE u.id = p_host[i];
    IF v_kyc IS DISTINCT FROM 'verified' OR v_host_kyc IS DISTINCT FROM 'verified' OR v_price IS NULL
       OR p_host[i] = p_booker[i] THEN
      RETURN;
    END IF;
    -- As booking_create: whole hours, the server's price.
    v_amount[i] := v_price * (extract(epoch FROM p_end[i] - p_start[i])::bigint / 3600);
    IF v_balance < v_amount[i] THEN
      RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM bookings b WHERE b.idempotency_key = p_key[i])
       OR EXISTS (SELECT 1 FROM booking_busy bb WHERE bb.user_id IN (p_booker[i], p_host[i])
                  AND bb.during && tstzrange(p_start[i], p_end[i], '[)')) THEN
      RETURN;
    END IF;
  END LOOP;

  -- In the order of the calls; the busy rows follow (booking_busy_sync).
  WITH made AS (
    INSERT INTO bookings AS b (user_id, host_id, start_at, end_at, idempotency_key, status, amount, request_hash)
    SELECT c.booker, c.host, c.s, c.e, c.k, 'confirmed', c.amount, c.h
    FROM unnest(p_booker, p_host, p_start, p_end, p_key, p_hash, v_amount) WITH ORDINALITY
      AS c(booker, host, s, e, k, h, amount, i)
    ORDER BY c.i
    RETURNING b.id, b.idempotency_key, b.amount, b.created_at, b.updated_at
  )
  SELECT array_agg(made.id ORDER BY c.i), array_agg(made.amount ORDER BY c.i),
         array_agg(made.created_at ORDER BY c.i), array_agg(made.updated_at ORDER BY c.i)
  INTO v_id, v_amount, v_created, v_updated
  FROM made JOIN unnest(p_key) WITH ORDINALITY AS c(k, i) ON c.k = made.idempotency_key;

  -- One booker per call: each row once, by primary key.
  FOR i IN 1 .. n LOOP
    UPDATE users u SET balance = u.balance - v_amount[i] WHERE u.id = p_booker[i]
    RETURNING u.balance INTO v_balance;
    v_balances[i] := v_balance;
  END LOOP;
  INSERT INTO payments (booking_id, user_id, amount, type, status, idempotency_key)
  SELECT c.id, c.booker, c.amount, 'deduct', 'completed', 'deduct:' || c.id
  FROM unnest(v_id, p_booker, v_amount) AS c(id, booker, amount);
  INSERT INTO transactions (user_id, amount, type, reference_id)
  SELECT c.booker, -c.amount, 'booking_payment', c.id
  FROM unnest(v_id, p_booker, v_amount) AS c(id, booker, amount);
  WITH made AS (
    INSERT INTO conversations AS cv (booking_id, user_id, host_id)
    SELECT c.id, c.booker, c.host FROM unnest(v_id, p_booker, p_host) WITH ORDINALITY AS c(id, booker, host, i)
    ORDER BY c.i
    RETURNING cv.id, cv.booking_id
  )
  SELECT array_agg(made.id ORDER BY c.i) INTO v_conversation
  FROM made JOIN unnest(v_id) WITH ORDINALITY AS c(id, i) ON c.id = made.booking_id;

  RETURN QUERY SELECT v_id, v_amount, v_created, v_updated, v_conversation, v_balances;
END
$$;

CREATE OR REPLACE PROCEDURE booking_create_batch(
  p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[], p_key text[], p_hash bytea[],
  INOUT outcome text[] DEFAULT NULL, INOUT id uuid[] DEFAULT NULL, INOUT user_id uuid[] DEFAULT NULL,
  INOUT host_id uuid[] DEFAULT NULL, INOUT start_at timestamptz[] DEFAULT NULL,
  INOUT end_at timestamptz[] DEFAULT NULL, INOUT status text[] DEFAULT NULL, INOUT amount numeric[] DEFAULT NULL,
  INOUT created_at timestamptz[] DEFAULT NULL, INOUT updated_at timestamptz[] DEFAULT NULL,
  INOUT conversation_id uuid[] DEFAULT NULL, INOUT balance numeric[] DEFAULT NULL, INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  v_booker uuid;
  n int;
BEGIN
  -- By primary key, one at a time, in id order (see the top of this file).
  FOR v_booker IN SELECT DISTINCT b FROM unnest(p_booker) AS b ORDER BY 1 LOOP
    PERFORM 1 FROM users u WHERE u.id = v_booker FOR NO KEY UPDATE;
  END LOOP;
  PERFORM booking_lock_hours(p_booker, p_host, p_start, p_end);
  SELECT * INTO r FROM booking_create_all(p_booker, p_host, p_start, p_end, p_key, p_hash);
  IF r.id IS NOT NULL THEN
    n := cardinality(p_booker);
    outcome := array_fill('created'::text, ARRAY[n]); id := r.id; user_id := p_booker; host_id := p_host;
    start_at := p_start; end_at := p_end; status := array_fill('confirmed'::text, ARRAY[n]);
    amount := r.amount; created_at := r.created_at; updated_at := r.updated_at;
    conversation_id := r.conversation_id; balance := r.balance;
  ELSE
    FOR i IN 1 .. cardinality(p_booker) LOOP
      SELECT * INTO r FROM booking_create(p_booker[i], p_host[i], p_start[i], p_end[i], p_key[i], p_hash[i],
                                          p_locked => true);
      outcome[i] := r.outcome; id[i] := r.id; user_id[i] := r.user_id; host_id[i] := r.host_id;
      start_at[i] := r.start_at; end_at[i] := r.end_at; status[i] := r.status; amount[i] := r.amount;
      created_at[i] := r.created_at; updated_at[i] := r.updated_at;
      conversation_id[i] := r.conversation_id; balance[i] := r.balance;
    END LOOP;
  END IF;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
