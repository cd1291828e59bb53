-- Chat needs a gap-free per-conversation sequence (assigned from
-- conversations.last_seq in the committing transaction), client-side
-- de-duplication, an inbox ordered by activity, and the foreign keys the
-- seed left out.
ALTER TABLE conversations
  ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN last_activity_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  ADD CONSTRAINT fk_conversations_booking FOREIGN KEY (booking_id) REFERENCES bookings(id),
  ADD CONSTRAINT fk_conversations_booker FOREIGN KEY (user_id) REFERENCES users(id),
  ADD CONSTRAINT fk_conversations_host FOREIGN KEY (host_id) REFERENCES users(id);
CREATE INDEX idx_conversations_booker_activity ON conversations (user_id, last_activity_at DESC, id DESC);
CREATE INDEX idx_conversations_host_activity ON conversations (host_id, last_activity_at DESC, id DESC);

ALTER TABLE messages
  ADD COLUMN seq BIGINT NOT NULL,
  ADD COLUMN client_msg_id UUID,
  ADD CONSTRAINT fk_messages_sender FOREIGN KEY (sender_id) REFERENCES users(id),
  ADD CONSTRAINT chk_messages_content_length CHECK (char_length(content) BETWEEN 1 AND 4000);
CREATE UNIQUE INDEX uq_messages_conversation_seq ON messages (conversation_id, seq);
CREATE UNIQUE INDEX uq_messages_client_msg ON messages (conversation_id, sender_id, client_msg_id)
  WHERE client_msg_id IS NOT NULL;
