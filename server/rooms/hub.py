"""Which local sockets follow which channel, and publishing to channels.

Channels: ``u:<user id>`` for events about a user, ``c:<conversation id>``
for a chat room. Local sockets follow channels; the process subscribes on a
channel's first local follower (``server/rooms/subscriber.py``) and
unsubscribes after its last. A published payload is a 24-byte envelope (the
user to skip or zeros, then the chat message's or user event's ``seq``, or
zero, big-endian)
followed by the already-encoded event frame, so receiving processes forward
bytes as they are.

Sockets in a chat room follow it through a ``Membership`` that drops what the
socket already has (by seq). Messages that live delivery lost are fetched
back from PostgreSQL (``server/rooms/repair.py``): for every room after its
subscription is made again, and for a room whose seq hole stays open.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Hashable, Iterable

import redis.exceptions

from server.outbox import Outbox, RedisUnavailable
from server.redis_cluster import is_cluster
from server.rooms.follower import Follower
from server.rooms.membership import Membership
from server.rooms.repair import Backfill, Repairs
from server.rooms.sharded import ShardedSubscriber
from server.rooms.subscriber import Subscriber

log = logging.getLogger("hangout.rooms")

NO_ONE = bytes(16)
ENVELOPE = 24  # skip user (16) + seq (8)
PLAIN_ENVELOPE = NO_ONE + bytes(8)  # nobody skipped, no seq
RESEND_RETRY_S = 1.0  # unsent publishes, when Redis answered with an error


class Hub:
    def __init__(self, redis_url: str, outbox: Outbox, backfill: Backfill) -> None:
        self.outbox = outbox
        # channel -> its local followers; a room member maps to its Membership
        self._followers: dict[str, dict[Follower, Membership | None]] = {}
        # follower -> the channels it follows: the name alone while it is one
        # (most sockets follow only their user's), a set from the second on
        self._channels_of: dict[Follower, str | set[str]] = {}
        self._stale: set[str] = set()  # subscriptions that may have missed messages
        kind = ShardedSubscriber if is_cluster(redis_url) else Subscriber
        self.subscriber = kind(
            redis_url, self._followers.keys, self._deliver, self._subscription_confirmed, self._link_lost
        )
        self.connected = self.subscriber.connected  # set while linked to Redis
        self._repairs = Repairs(backfill, self._members)
        self._watch_gap = self._repairs.watch_gap
        # Publishes that failed, published again once the outbox sends again:
        # key -> (seq, channel, envelope). A conversation's key is its channel,
        # which keeps only its newest message; ``publish_kept`` keys each frame.
        self._unsent: dict[Hashable, tuple[int, str, bytes]] = {}
        self._resend: asyncio.Task | None = None
        self.resent = 0  # publishes sent again after failing (tests)
        outbox.on_open.append(self._resend_unsent)

    async def start(self) -> None:
        await self.subscriber.start()

    async def stop(self) -> None:
        if self._resend is not None:
            self._resend.cancel()
            await asyncio.gather(self._resend, return_exceptions=True)
        await self.subscriber.stop()
        await self._repairs.stop()

    # ---- naming ----------------------------------------------------------

    @staticmethod
    def user_channel(user_id: uuid.UUID) -> str:
        return f"u:{user_id}"

    @staticmethod
    def conversation_channel(conversation_id: uuid.UUID) -> str:
        return f"c:{conversation_id}"

    # ---- local registry --------------------------------------------------

    def follow(self, follower: Follower, channel: str) -> asyncio.Future | None:
        """Add a follower. Returns a future that resolves once Redis has
        confirmed the subscription (None when it already was in effect, or
        Redis is down: it is made on reconnect)."""
        return self._add(follower, channel, None)

    def join(self, follower: Follower, channel: str, user_id: uuid.UUID) -> tuple[Membership, asyncio.Future | None]:
        """Make ``follower`` a member of a room, holding its events until the
        join's read is done (``Membership.end_join`` then ``release``)."""
        followers = self._followers.get(channel)
        member = followers.get(follower) if followers is not None else None
        if member is None or not member.current:
            member = Membership(follower, channel, user_id)
        member.begin_join()
        return member, self._add(follower, channel, member)

    def _add(self, follower: Follower, channel: str, member: Membership | None) -> asyncio.Future | None:
        chans = self._channels_of.get(follower)
        if chans is None:
            self._channels_of[follower] = channel
        elif isinstance(chans, set):
            chans.add(channel)
        elif chans != channel:
            self._channels_of[follower] = {chans, channel}
        followers = self._followers.get(channel)
        if followers is not None:
            followers[follower] = member
            return self.subscriber.pending(channel)
        self._followers[channel] = {follower: member}
        subscribed = self.subscriber.subscribe(channel)
        if subscribed is None:
            self._stale.add(channel)  # subscribed, then repaired, on reconnect
        return subscribed

    def membership(self, follower: Follower, channel: str) -> Membership | None:
        followers = self._followers.get(channel)
        member = followers.get(follower) if followers is not None else None
        return member if member is not None and member.current else None

    def release(self, member: Membership, held: list[tuple[int, bytes]]) -> None:
        """Give a member the events held during its join (after its reply)."""
        if not self._is_entry(member):
            return  # left (or the socket closed) meanwhile
        for seq, frame in held:
            member.offer(seq, frame)
        self._watch_gap(member)

    def mark_stale(self, channel: str) -> None:
        """The subscription of ``channel`` may have missed messages: repair
        the room from PostgreSQL once it is confirmed."""
        if self.subscriber.confirmed(channel):
            self._repairs.schedule(channel, 0)  # confirmed meanwhile
        else:
            self._stale.add(channel)

    def unfollow(self, follower: Follower, channel: str) -> None:
        chans = self._channels_of.get(follower)
        if chans == channel:
            del self._channels_of[follower]
        elif isinstance(chans, set):
            chans.discard(channel)
            if len(chans) == 1:
                self._channels_of[follower] = chans.pop()
        followers = self._followers.get(channel)
        if followers is None:
            return
        followers.pop(follower, None)
        if not followers:
            del self._followers[channel]
            self._stale.discard(channel)
            self._repairs.cancel(channel)
            self.subscriber.unsubscribe(channel)

    def drop(self, member: Membership) -> None:
        """Unfollow ``member``'s room, unless the socket's entry there is by
        now another membership (the socket was re-bound and joined again)."""
        if self._is_entry(member):
            self.unfollow(member.follower, member.channel)

    def _is_entry(self, member: Membership) -> bool:
        """``member`` is still its socket's entry in its room."""
        return self._followers.get(member.channel, {}).get(member.follower) is member

    def _channels(self, follower: Follower) -> list[str]:
        chans = self._channels_of.get(follower)
        if chans is None:
            return []
        return [chans] if isinstance(chans, str) else list(chans)

    def unfollow_all(self, follower: Follower) -> None:
        for channel in self._channels(follower):
            self.unfollow(follower, channel)

    def followers(self, channel: str) -> list[Follower]:
        """The local followers of ``channel``, in a list of their own."""
        return list(self._followers.get(channel, ()))

    def _members(self, channel: str) -> list[Membership]:
        """The room's members that can be given messages now."""
        return [m for m in self._followers.get(channel, {}).values()
                if m is not None and m.live and m.current and not m.paused]

    def resume(self, follower: Follower) -> None:
        """``follower`` authenticated again after its token expired: each of
        its rooms gives it, from PostgreSQL, what it missed while paused."""
        for channel in self._channels(follower):
            member = self._followers.get(channel, {}).get(follower)
            if member is not None and member.done is not None:
                self._repairs.schedule(channel, 0)

    # ---- from the subscriber ---------------------------------------------

    def _deliver(self, channel: str, payload: bytes) -> None:
        followers = self._followers.get(channel)
        if not followers:
            return
        skip = payload[:16]
        seq = int.from_bytes(payload[16:ENVELOPE], "big")
        frame = payload[ENVELOPE:]
        skip_user = None if skip == NO_ONE else uuid.UUID(bytes=skip)
        for f, member in list(followers.items()):
            if skip_user is not None and f.user_id == skip_user:
                continue
            try:
                if member is None:
                    if seq:  # a durable user event (server/events.py)
                        f.send_numbered(seq, frame)
                    else:
                        f.send_event(frame)
                elif not member.current:
                    # The socket was bound to another user since it joined.
                    self.unfollow(f, channel)
                else:
                    member.offer(seq, frame)
                    if member.ahead:
                        self._watch_gap(member)
            except Exception:
                log.exception("delivery on %s failed", channel)

    def _subscription_confirmed(self, channel: str) -> None:
        if channel not in self._stale:
            return
        self._stale.discard(channel)
        self._repairs.schedule(channel, 0)
        # Followers that are not rooms catch up in their own way.
        for follower in list(self._followers.get(channel, ())):
            resubscribed = getattr(follower, "resubscribed", None)
            if resubscribed is not None:
                try:
                    resubscribed()
                except Exception:  # never let it drop the link (and be called again)
                    log.exception("resubscribed() of a follower of %s failed", channel)

    def _link_lost(self, channels: Iterable[str] | None = None) -> None:
        # Whatever was published while we are away is fetched back later
        # (on a cluster, only the channels of the master whose link was lost).
        self._stale.update(self._followers if channels is None else channels)

    # ---- publishing ------------------------------------------------------

    async def publish(self, channel: str, frame: bytes, skip_user: uuid.UUID | None = None, seq: int = 0) -> bool:
        """Publish after commit. Never raises: with Redis down the change is
        already durable and clients recover it from PostgreSQL."""
        envelope = (skip_user.bytes if skip_user is not None else NO_ONE) + seq.to_bytes(8, "big") + frame
        sent = await self._publish([(channel, envelope)])
        if not sent and seq:
            # Nobody may send another message to show the gap: publish the
            # newest one again when Redis is back. Followers that missed the
            # ones before it see the gap and fetch them (``Repairs.watch_gap``).
            self._keep_unsent(channel, seq, channel, envelope)
        return sent

    async def publish_kept(self, channel: str, frame: bytes) -> None:
        """Publish news that PostgreSQL cannot give back to the followers
        (``server/sessions.py``): if it fails, it is sent again once Redis
        takes publishes again, for as long as this process runs."""
        envelope = PLAIN_ENVELOPE + frame
        if not await self._publish([(channel, envelope)]):
            self._keep_unsent((channel, frame), 0, channel, envelope)
            self._resend_unsent()

    def _keep_unsent(self, key: Hashable, seq: int, channel: str, envelope: bytes) -> None:
        kept = self._unsent.get(key)
        if kept is None or seq > kept[0]:
            self._unsent[key] = (seq, channel, envelope)

    async def publish_numbered(self, items: "list[tuple[str, int, bytes]]") -> bool:
        """Publish several ``(channel, seq, frame)`` of durable user events,
        in order, in one pipeline. Never raises; what fails is published by
        the relay (server/relay.py)."""
        return await self._publish([(channel, NO_ONE + seq.to_bytes(8, "big") + frame) for channel, seq, frame in items])

    async def _publish(self, envelopes: "list[tuple[str, bytes]]") -> bool:
        # Through the process's outbox: publishes of concurrent calls, and a
        # call's write position queued just before, share one round trip.
        failed: BaseException | None
        try:
            replies = await self.outbox.submit([("PUBLISH", ch, env) for ch, env in envelopes])
            failed = next((r for r in replies if isinstance(r, Exception)), None)
        except RedisUnavailable:
            return False  # logged once when Redis stopped answering (server/outbox.py)
        except (redis.exceptions.RedisError, OSError) as exc:
            failed = exc
        if failed is not None:
            log.warning("publish to %s failed: %r", envelopes[0][0], failed)
            return False
        return True

    def _resend_unsent(self) -> None:
        if self._unsent and (self._resend is None or self._resend.done()):
            self._resend = asyncio.get_running_loop().create_task(self._publish_unsent(), name="rooms-resend")

    async def _publish_unsent(self) -> None:
        """Until all is sent: while the outbox is closed, ``on_open`` calls
        this again when it opens; a failure with it open (an error reply) is
        tried again a moment later."""
        while self._unsent and self.outbox.available:
            unsent, self._unsent = self._unsent, {}
            if await self._publish([(channel, envelope) for _, channel, envelope in unsent.values()]):
                self.resent += len(unsent)
                continue
            for key, (seq, channel, envelope) in unsent.items():
                self._keep_unsent(key, seq, channel, envelope)
            await asyncio.sleep(RESEND_RETRY_S)

    async def resend_done(self) -> None:
        """Seam for tests: returns once the publishes being sent again
        (``publish_kept``, or a room's newest message) have gone, or that
        attempt ended with the outbox closed again."""
        task = self._resend
        if task is not None:
            await asyncio.shield(task)
