-- Durable user events: each event about a user (user.updated,
-- wallet.updated, booking.*) is a row written in the transaction of the
-- change, numbered 1, 2, 3 … without gaps in that user's own sequence.
--
-- The counter is a table of its own rather than a column of users: a
-- booking numbers an event of its host, whose users row it never locks (so
-- that bookings of one host at other hours run side by side), and a host
-- may be booking someone else at that moment, holding their own row.
-- Counters are taken last in every transaction, in user id order, and
-- nothing is waited for after them but the commit, so they close no cycle
-- with the wallet rows and hour locks taken before them; they are held
-- only from there to the commit.
CREATE TABLE user_event_seqs (
  user_id uuid PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
  last_seq bigint NOT NULL
);

-- ``published``: some process is known to have published the event to
-- Redis. The relay (server/relay.py) publishes what stays unpublished.
CREATE TABLE user_events (
  user_id uuid NOT NULL,
  seq bigint NOT NULL,
  event text NOT NULL,
  data jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  published boolean NOT NULL DEFAULT false,
  PRIMARY KEY (user_id, seq)
);
CREATE INDEX idx_user_events_unpublished ON user_events (created_at) WHERE NOT published;
-- Retention deletes by age; rows arrive in nearly created_at order, which a
-- BRIN index covers for almost nothing per insert.
CREATE INDEX idx_user_events_created_brin ON user_events USING brin (created_at);

-- Store events (one per element of the arrays) and return their seqs in the
-- same order. A user's events are numbered in array order.
CREATE FUNCTION user_events_add(p_user uuid[], p_event text[], p_data jsonb[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
  v_seq bigint[];
BEGIN
  WITH counted AS (
    INSERT INTO user_event_seqs AS s (user_id, last_seq)
    SELECT u, count(*) FROM unnest(p_user) AS u GROUP BY u ORDER BY u
    ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + excluded.last_seq
    RETURNING s.user_id, s.last_seq
  ), numbered AS (
    SELECT e.i, e.u, e.ev, e.d,
           c.last_seq - count(*) OVER (PARTITION BY e.u) + row_number() OVER (PARTITION BY e.u ORDER BY e.i) AS seq
    FROM unnest(p_user, p_event, p_data) WITH ORDINALITY AS e(u, ev, d, i) JOIN counted c ON c.user_id = e.u
  ), stored AS (
    INSERT INTO user_events (user_id, seq, event, data) SELECT u, seq, ev, d FROM numbered RETURNING 1
  )
  SELECT array_agg(n.seq ORDER BY n.i) INTO v_seq FROM numbered n;
  RETURN v_seq;
END
$$;

-- A booking as the events carry it (protocol/models/bookings.py Booking).
CREATE FUNCTION booking_event_data(p_id uuid, p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz,
                                   p_status text, p_amount numeric, p_created timestamptz, p_updated timestamptz,
                                   p_conversation uuid) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('booking', jsonb_build_object(
    'id', p_id, 'user_id', p_booker, 'host_id', p_host, 'start_at', p_start, 'end_at', p_end,
    'status', p_status, 'amount', p_amount::text, 'created_at', p_created, 'updated_at', p_updated,
    'conversation_id', p_conversation))
$$;

-- The events of the bookings a call or a batch made: booking.created to
-- both parties, then wallet.updated to the booker. Returns, per element,
-- the booker's seq of booking.created (wallet.updated is the next) and the
-- host's, NULL where the outcome is not 'created'.
CREATE FUNCTION booking_created_events(
  p_outcome text[], p_id uuid[], p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[],
  p_status text[], p_amount numeric[], p_created timestamptz[], p_updated timestamptz[], p_conversation uuid[],
  p_balance numeric[], OUT booker_seq bigint[], OUT host_seq bigint[])
LANGUAGE plpgsql AS $$
DECLARE
  v_user uuid[] := '{}';
  v_event text[] := '{}';
  v_data jsonb[] := '{}';
  v_at int[] := '{}';
  v_data_one jsonb;
  v_seq bigint[];
  n int := cardinality(p_outcome);
BEGIN
  booker_seq := array_fill(NULL::bigint, ARRAY[n]);
  host_seq := array_fill(NULL::bigint, ARRAY[n]);
  FOR i IN 1 .. n LOOP
    IF p_outcome[i] = 'created' THEN
      v_data_one := booking_event_data(p_id[i], p_booker[i], p_host[i], p_start[i], p_end[i], p_status[i],
                                       p_amount[i], p_created[i], p_updated[i], p_conversation[i]);
      v_user := v_user || ARRAY[p_booker[i], p_host[i], p_booker[i]];
      v_event := v_event || ARRAY['booking.created', 'booking.created', 'wallet.updated'];
      v_data := v_data || ARRAY[v_data_one, v_data_one, jsonb_build_object('balance', p_balance[i]::text)];
      v_at := v_at || i;
    END IF;
  END LOOP;
  IF cardinality(v_at) = 0 THEN
    RETURN;
  END IF;
  v_seq := user_events_add(v_user, v_event, v_data);
  FOR k IN 1 .. cardinality(v_at) LOOP
    booker_seq[v_at[k]] := v_seq[3 * k - 2];
    host_seq[v_at[k]] := v_seq[3 * k - 1];
  END LOOP;
END
$$;

-- bookings.create alone (sql/007), now storing its events before the commit.
DROP PROCEDURE booking_create_committed;
CREATE PROCEDURE booking_create_committed(
  p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz, p_key text, p_hash bytea,
  INOUT outcome text DEFAULT NULL, INOUT id uuid DEFAULT NULL, INOUT user_id uuid DEFAULT NULL,
  INOUT host_id uuid DEFAULT NULL, INOUT start_at timestamptz DEFAULT NULL, INOUT end_at timestamptz DEFAULT NULL,
  INOUT status text DEFAULT NULL, INOUT amount numeric DEFAULT NULL, INOUT created_at timestamptz DEFAULT NULL,
  INOUT updated_at timestamptz DEFAULT NULL, INOUT conversation_id uuid DEFAULT NULL,
  INOUT balance numeric DEFAULT NULL, INOUT booker_seq bigint DEFAULT NULL, INOUT host_seq bigint DEFAULT NULL,
  INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  e record;
BEGIN
  SELECT r.outcome, r.id, r.user_id, r.host_id, r.start_at, r.end_at, r.status, r.amount,
         r.created_at, r.updated_at, r.conversation_id, r.balance
  INTO outcome, id, user_id, host_id, start_at, end_at, status, amount,
       created_at, updated_at, conversation_id, balance
  FROM booking_create(p_booker, p_host, p_start, p_end, p_key, p_hash) AS r;
  IF outcome = 'created' THEN
    SELECT * INTO e FROM booking_created_events(
      ARRAY[outcome], ARRAY[id], ARRAY[user_id], ARRAY[host_id], ARRAY[start_at], ARRAY[end_at], ARRAY[status],
      ARRAY[amount], ARRAY[created_at], ARRAY[updated_at], ARRAY[conversation_id], ARRAY[balance]);
    booker_seq := e.booker_seq[1];
    host_seq := e.host_seq[1];
  END IF;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- bookings.create merged (sql/009, sql/010), now storing the events of the
-- bookings it made before its commit, all in one call of user_events_add.
DROP PROCEDURE booking_create_batch;
CREATE PROCEDURE booking_create_batch(
  p_booker uuid[], p_host uuid[], p_start timestamptz[], p_end timestamptz[], p_key text[], p_hash bytea[],
  INOUT outcome text[] DEFAULT NULL, INOUT id uuid[] DEFAULT NULL, INOUT user_id uuid[] DEFAULT NULL,
  INOUT host_id uuid[] DEFAULT NULL, INOUT start_at timestamptz[] DEFAULT NULL,
  INOUT end_at timestamptz[] DEFAULT NULL, INOUT status text[] DEFAULT NULL, INOUT amount numeric[] DEFAULT NULL,
  INOUT created_at timestamptz[] DEFAULT NULL, INOUT updated_at timestamptz[] DEFAULT NULL,
  INOUT conversation_id uuid[] DEFAULT NULL, INOUT balance numeric[] DEFAULT NULL,
  INOUT booker_seq bigint[] DEFAULT NULL, INOUT host_seq bigint[] DEFAULT NULL, INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  v_booker uuid;
  n int;
BEGIN
  -- By primary key, one at a time, in id order (see sql/010).
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
  -- Last before the commit: the event counters (see the top of this file).
  SELECT * INTO r FROM booking_created_events(outcome, id, user_id, host_id, start_at, end_at, status, amount,
                                              created_at, updated_at, conversation_id, balance);
  booker_seq := r.booker_seq;
  host_seq := r.host_seq;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- The relay's place in the chat: conversations whose newest message was
-- sent up to ``upto`` have had it published again (server/relay.py). One
-- row per kind of relay; the process holding its lock is the one relaying.
CREATE TABLE relay_marks (
  name text PRIMARY KEY,
  upto timestamptz NOT NULL
);
INSERT INTO relay_marks (name, upto) VALUES ('chat', now());
CREATE INDEX idx_conversations_last_activity ON conversations (last_activity_at);
