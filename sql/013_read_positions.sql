-- Read positions and unread counts. A conversation has exactly two parties,
-- so each party's state is a pair of columns on its row rather than a table
-- of its own: the row lock that numbers messages also serialises reads, and
-- the inbox gets every figure from the row it already reads.
--
-- Per party (booker_*, host_*):
--   *_read_seq    how far that party has read (only ever raised);
--   *_sent        how many messages that party has sent;
--   *_read_count  how many of the OTHER party's messages have a seq at or
--                 below this party's read_seq.
-- A party's unread count is then the other's *_sent minus its own
-- *_read_count: no message is counted on the inbox's path.
ALTER TABLE conversations
  ADD COLUMN booker_read_seq BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN host_read_seq BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN booker_sent BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN host_sent BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN booker_read_count BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN host_read_count BIGINT NOT NULL DEFAULT 0,
  ADD CONSTRAINT chk_conversations_read_seq CHECK (
    booker_read_seq BETWEEN 0 AND last_seq AND host_read_seq BETWEEN 0 AND last_seq),
  ADD CONSTRAINT chk_conversations_read_count CHECK (
    booker_read_count BETWEEN 0 AND host_sent AND host_read_count BETWEEN 0 AND booker_sent);

-- Messages stored before this migration count as sent; nobody has read them.
UPDATE conversations c
   SET booker_sent = s.booker_sent, host_sent = s.host_sent
  FROM (SELECT m.conversation_id,
               count(*) FILTER (WHERE m.sender_id = cv.user_id) AS booker_sent,
               count(*) FILTER (WHERE m.sender_id = cv.host_id) AS host_sent
          FROM messages m JOIN conversations cv ON cv.id = m.conversation_id
         GROUP BY m.conversation_id) s
 WHERE c.id = s.conversation_id;

-- Raise p_reader's read position in a conversation to p_seq. No row: the
-- reader is not a party (or there is no such conversation). Otherwise the
-- position as it now is, whether this call moved it, and the conversation's
-- last_seq; a p_seq past last_seq changes nothing (the caller refuses it).
--
-- The row is locked first, then the other party's messages in (old, p_seq]
-- are counted by a later statement: in READ COMMITTED each statement of a
-- volatile function takes a new snapshot, and every message up to the
-- locked row's last_seq committed before its sender let go of that lock,
-- so the count sees all of them and none is counted twice.
CREATE FUNCTION chat_read(p_conversation uuid, p_reader uuid, p_seq bigint)
RETURNS TABLE (read_seq bigint, moved boolean, last_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_booker boolean;
  v_old bigint;
  v_last bigint;
  v_counted bigint;
BEGIN
  -- A position only rises, so one already at p_seq needs no lock: devices
  -- that mark the same message read do not queue behind the senders.
  SELECT CASE WHEN c.user_id = p_reader THEN c.booker_read_seq ELSE c.host_read_seq END, c.last_seq
    INTO v_old, v_last
    FROM conversations c
   WHERE c.id = p_conversation AND (c.user_id = p_reader OR c.host_id = p_reader);
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF p_seq <= v_old THEN
    RETURN QUERY SELECT v_old, false, v_last;
    RETURN;
  END IF;
  SELECT c.user_id = p_reader, CASE WHEN c.user_id = p_reader THEN c.booker_read_seq ELSE c.host_read_seq END, c.last_seq
    INTO v_booker, v_old, v_last
    FROM conversations c
   WHERE c.id = p_conversation
     FOR UPDATE;
  IF p_seq > v_last OR p_seq <= v_old THEN
    RETURN QUERY SELECT v_old, false, v_last;
    RETURN;
  END IF;
  SELECT count(*) INTO v_counted
    FROM messages m
   WHERE m.conversation_id = p_conversation AND m.seq > v_old AND m.seq <= p_seq AND m.sender_id <> p_reader;
  IF v_booker THEN
    UPDATE conversations SET booker_read_seq = p_seq, booker_read_count = booker_read_count + v_counted
     WHERE id = p_conversation;
  ELSE
    UPDATE conversations SET host_read_seq = p_seq, host_read_count = host_read_count + v_counted
     WHERE id = p_conversation;
  END IF;
  RETURN QUERY SELECT p_seq, true, v_last;
END
$$;
