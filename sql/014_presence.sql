-- Presence (chat.presence, chat.join's presence): when each user was last
-- online, null while they are online or if they never were, and when their
-- presence last changed. Processes announce changes as they happen, and two
-- changes of one user may be written by two processes in either order: the
-- change time (from Redis's clock, increasing per user) lets the later one
-- win (server/db/presence.py).
ALTER TABLE users
  ADD COLUMN last_seen_at timestamptz,
  ADD COLUMN presence_changed_at timestamptz;
