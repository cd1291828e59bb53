-- bookings.create: "start in the future" is checked after the idempotency
-- key, here, instead of with the other time rules in the params model.
--
-- A retry must get the original outcome (PROTOCOL: the booking as it is
-- now, even if since cancelled). Checked before the key, a retry sent once
-- the start had passed (a booking for 11:00 made at 10:59:59, its answer
-- lost, retried at 11:00:01) was invalid_params, and the client could not
-- learn that it had booked and paid. The database's clock decides, the same
-- for every server process.
--
-- sql/006's booking_create becomes booking_create_ahead, unchanged, and
-- booking_create (what sql/007 calls) puts the check in front of it. A
-- start that has passed can only be a replay: it answers from
-- booking_replay, without the wallet locks (the booking it finds is
-- committed), or with the new outcome start_passed, which
-- server/handlers/bookings.py answers as invalid_params naming start_at.
-- A start in the future costs nothing more than before.

ALTER FUNCTION booking_create(uuid, uuid, timestamptz, timestamptz, text, bytea) RENAME TO booking_create_ahead;

CREATE FUNCTION booking_create(p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz,
                               p_key text, p_hash bytea)
RETURNS TABLE (outcome text, id uuid, user_id uuid, host_id uuid, start_at timestamptz, end_at timestamptz,
               status text, amount numeric, created_at timestamptz, updated_at timestamptz,
               conversation_id uuid, balance numeric)
LANGUAGE plpgsql AS $$
BEGIN
  IF p_start > now() THEN
    RETURN QUERY SELECT * FROM booking_create_ahead(p_booker, p_host, p_start, p_end, p_key, p_hash);
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM booking_replay(p_key, p_booker, p_hash);
  IF NOT FOUND THEN
    outcome := 'start_passed';
    RETURN NEXT;
  END IF;
END
$$;
