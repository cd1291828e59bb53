-- chat.send for one or several calls, committed in one round trip, with
-- the WAL position that read-your-writes needs (as sql/007 and sql/009 do
-- for bookings.create).
--
-- Under load the server (Database.write_merged) merges the chat.send calls
-- that wait at the same moment into one call of this procedure; a call on
-- its own comes with arrays of one. The round trip, the commit and reading
-- the write position are then paid once per batch, not once per message.
--
-- Each call is the statement of server/db/chat.py (_SEND): bump the
-- conversation's last_seq and the sender's sent count, insert the message
-- with that seq; nothing when the sender is not a party, or when this
-- sender already stored a message with this client_msg_id here (that
-- message is then answered, with stored_now false). Calls come back in
-- their order; calls of one conversation get their seqs in that order.
--
-- Locks: every conversation row of the batch is locked first, in id order,
-- at the strength the UPDATE takes. Batches of other processes lock in the
-- same order, so two never wait for each other in a circle. And once a row
-- is locked, every earlier send to it has committed, so the look-up of a
-- client_msg_id sees it: two sends with one client_msg_id never both insert
-- (within a batch, the second sees the first's row). Any error rolls the
-- whole batch back; the server then makes each of its calls alone.
-- Called inside a transaction block, the COMMIT fails with
-- invalid_transaction_termination: server/db/chat.py never does that.
CREATE PROCEDURE chat_send_batch(
  p_conversation uuid[], p_sender uuid[], p_content text[], p_client_msg_id uuid[],
  INOUT m_id uuid[] DEFAULT NULL, INOUT m_seq bigint[] DEFAULT NULL,
  INOUT m_content text[] DEFAULT NULL, INOUT m_created_at timestamptz[] DEFAULT NULL,
  INOUT m_client_msg_id uuid[] DEFAULT NULL, INOUT stored_now boolean[] DEFAULT NULL,
  INOUT wal_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  n int := coalesce(array_length(p_conversation, 1), 0);
  v_id uuid;
  v_seq bigint;
  v_content text;
  v_created_at timestamptz;
  v_client_msg_id uuid;
  v_new boolean;
BEGIN
  m_id := '{}'; m_seq := '{}'; m_content := '{}'; m_created_at := '{}'; m_client_msg_id := '{}';
  stored_now := '{}';
  PERFORM 1 FROM conversations c WHERE c.id = ANY (p_conversation) ORDER BY c.id FOR NO KEY UPDATE;
  FOR i IN 1 .. n LOOP
    v_new := true;
    WITH bumped AS (
      UPDATE conversations c
         SET last_seq = c.last_seq + 1, last_activity_at = greatest(c.last_activity_at, now()),
             booker_sent = c.booker_sent + (c.user_id = p_sender[i])::int,
             host_sent = c.host_sent + (c.host_id = p_sender[i])::int
       WHERE c.id = p_conversation[i] AND (c.user_id = p_sender[i] OR c.host_id = p_sender[i])
         AND (p_client_msg_id[i] IS NULL OR NOT EXISTS (
               SELECT 1 FROM messages x
                WHERE x.conversation_id = p_conversation[i] AND x.sender_id = p_sender[i]
                  AND x.client_msg_id = p_client_msg_id[i]))
      RETURNING c.id, c.last_seq
    )
    INSERT INTO messages (conversation_id, sender_id, content, seq, client_msg_id)
    SELECT b.id, p_sender[i], p_content[i], b.last_seq, p_client_msg_id[i] FROM bumped b
    RETURNING messages.id, messages.seq, messages.content, messages.created_at, messages.client_msg_id
      INTO v_id, v_seq, v_content, v_created_at, v_client_msg_id;
    IF NOT FOUND THEN
      v_new := false;
      IF p_client_msg_id[i] IS NOT NULL THEN
        SELECT x.id, x.seq, x.content, x.created_at, x.client_msg_id
          INTO v_id, v_seq, v_content, v_created_at, v_client_msg_id
          FROM messages x
         WHERE x.conversation_id = p_conversation[i] AND x.sender_id = p_sender[i]
           AND x.client_msg_id = p_client_msg_id[i];
      END IF;
    END IF;
    m_id := m_id || v_id;
    m_seq := m_seq || v_seq;
    m_content := m_content || v_content;
    m_created_at := m_created_at || v_created_at;
    m_client_msg_id := m_client_msg_id || v_client_msg_id;
    stored_now := stored_now || v_new;
  END LOOP;
  COMMIT;
  wal_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
