-- bookings.create, committed, in one round trip, and the WAL position that
-- read-your-writes needs for the two parties.
--
-- After a write the server records the primary's WAL insert position for
-- the users it touched; a replica may serve their reads once it has
-- replayed that far. The position has to be read after the commit; as a
-- separate statement it would cost a second round trip, with a wait for a
-- free pool connection in front of it. A procedure may commit
-- (when CALLed outside a transaction block), so this one runs
-- booking_create (sql/006), commits, and only then reads the position.
--
-- An overlap raises from booking_create, before the commit, and
-- rolls everything back. Called inside a transaction block, the COMMIT
-- fails with invalid_transaction_termination: server/db/bookings.py never
-- does that.
CREATE PROCEDURE booking_create_committed(
  p_booker uuid, p_host uuid, p_start timestamptz, p_end timestamptz, p_key text, p_hash bytea,
  INOUT outcome text DEFAULT NULL, INOUT id uuid DEFAULT NULL, INOUT user_id uuid DEFAULT NULL,
  INOUT host_id uuid DEFAULT NULL, INOUT start_at timestamptz DEFAULT NULL, INOUT end_at timestamptz DEFAULT NULL,
  INOUT status text DEFAULT NULL, INOUT amount numeric DEFAULT NULL, INOUT created_at timestamptz DEFAULT NULL,
  INOUT updated_at timestamptz DEFAULT NULL, INOUT conversation_id uuid DEFAULT NULL,
  INOUT balance numeric DEFAULT NULL, INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
  SELECT r.outcome, r.id, r.user_id, r.host_id, r.start_at, r.end_at, r.status, r.amount,
         r.created_at, r.updated_at, r.conversation_id, r.balance
  INTO outcome, id, user_id, host_id, start_at, end_at, status, amount,
       created_at, updated_at, conversation_id, balance
  FROM booking_create(p_booker, p_host, p_start, p_end, p_key, p_hash) AS r;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
