"""Channel registry and the process's single Redis pub/sub connection.

Channels: ``u:<user id>`` for events about a user, ``c:<conversation id>``
for a chat room. Local sockets follow channels; the process subscribes on a
channel's first local follower and unsubscribes after its last. A published
payload is a 24-byte envelope (the user to skip or zeros, then the message
``seq`` or zero, big-endian) followed by the already-encoded event frame, so
receiving processes forward bytes as they are.

Sockets in a chat room follow it through a ``Membership`` that drops what the
socket already has (by seq). Messages that live delivery lost (Redis away,
a publish that failed after commit) are fetched back from PostgreSQL through
``backfill``: for every room after its subscription is made again, and for a
room whose seq hole stays open for ``GAP_GRACE_S``.

The subscriber speaks RESP directly over one asyncio stream: subscribing is
then a non-blocking write, and reconnecting (which re-subscribes every
channel) is entirely in our hands.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Awaitable, Callable, Hashable, Protocol

import hiredis
import redis.exceptions

from server.outbox import Outbox, RedisAddress, RedisUnavailable, pack
from server.rooms.membership import Membership

log = logging.getLogger("hangout.rooms")

NO_ONE = bytes(16)
ENVELOPE = 24  # skip user (16) + seq (8)
PLAIN_ENVELOPE = NO_ONE + bytes(8)  # nobody skipped, no seq
GAP_GRACE_S = 1.0  # a seq hole open this long is filled from PostgreSQL
REPAIR_PAGE = 200
REPAIR_RETRY_S = 1.0
RESEND_RETRY_S = 1.0  # unsent publishes, when Redis answered with an error
PING_INTERVAL_S = 5.0  # the subscriber pings Redis; silence for 3 intervals = dead link

# (channel, after_seq, limit) -> [(seq, encoded chat.message frame)] in seq order
Backfill = Callable[[str, int, int], Awaitable[list[tuple[int, bytes]]]]


class Follower(Protocol):
    user_id: uuid.UUID | None
    # The access token expired: the socket keeps its memberships, paused, and
    # gets nothing until it authenticates again (``Hub.resume``).
    events_suspended: bool

    def send_event(self, frame: bytes) -> None: ...

    # Optionally, ``resubscribed()``: called when the follower's channel is
    # subscribed again after the link to Redis was lost, so that a follower
    # that is not a room (``server/sessions.py``) can fetch what it missed.


def _cmd(*parts: bytes) -> bytes:
    return pack([parts])


class Hub:
    def __init__(self, redis_url: str, outbox: Outbox) -> None:
        address = RedisAddress(redis_url)  # pub/sub ignores the database
        self._host, self._port, self._auth = address.host, address.port, address.auth
        self.outbox = outbox
        # channel -> its local followers; a room member maps to its Membership
        self._followers: dict[str, dict[Follower, Membership | None]] = {}
        self._channels_of: dict[Follower, set[str]] = {}
        self._pending: dict[str, collections.deque[asyncio.Future]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.delivered = 0
        self.backfill: Backfill | None = None
        self._stale: set[str] = set()  # rooms to repair once subscribed again
        self._repairs: dict[str, asyncio.TimerHandle | asyncio.Task] = {}
        self._repair_again: set[str] = set()
        self.repaired = 0  # messages given from PostgreSQL, for tests and /readyz
        # Publishes that failed, published again once the outbox sends again:
        # key -> (seq, channel, envelope). A conversation's key is its channel,
        # which keeps only its newest message; ``publish_kept`` keys each frame.
        self._unsent: dict[Hashable, tuple[int, str, bytes]] = {}
        self._resend: asyncio.Task | None = None
        self.resent = 0  # publishes sent again after failing (tests)
        outbox.on_open.append(self._resend_unsent)

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
        self._channels_of.setdefault(follower, set()).add(channel)
        followers = self._followers.get(channel)
        if followers is not None:
            followers[follower] = member
            pending = self._pending.get(channel)
            return pending[-1] if pending else None
        self._followers[channel] = {follower: member}
        return self._send_subscribe(channel)

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
        if self._writer is not None and channel not in self._pending:
            self._schedule_repair(channel, 0)  # confirmed meanwhile
        else:
            self._stale.add(channel)

    def unfollow(self, follower: Follower, channel: str) -> None:
        chans = self._channels_of.get(follower)
        if chans is not None:
            chans.discard(channel)
            if not chans:
                del self._channels_of[follower]
        followers = self._followers.get(channel)
        if followers is None:
            return
        followers.pop(follower, None)
        if not followers:
            del self._followers[channel]
            self._stale.discard(channel)
            self._cancel_repair(channel)
            self._write(_cmd(b"UNSUBSCRIBE", channel.encode()))

    def drop(self, member: Membership) -> None:
        """Unfollow ``member``'s room, unless the socket's entry there is by
        now another membership (the socket was re-bound and joined again)."""
        if self._is_entry(member):
            self.unfollow(member.follower, member.channel)

    def _is_entry(self, member: Membership) -> bool:
        """``member`` is still its socket's entry in its room."""
        return self._followers.get(member.channel, {}).get(member.follower) is member

    def unfollow_all(self, follower: Follower) -> None:
        for channel in list(self._channels_of.get(follower, ())):
            self.unfollow(follower, channel)

    forget = unfollow_all

    def followers(self, channel: str) -> list[Follower]:
        """The local followers of ``channel``, in a list of their own."""
        return list(self._followers.get(channel, ()))

    def follows(self, follower: Follower, channel: str) -> bool:
        return channel in self._channels_of.get(follower, ())

    @property
    def channel_count(self) -> int:
        return len(self._followers)

    # ---- publishing ------------------------------------------------------

    async def publish(self, channel: str, frame: bytes, skip_user: uuid.UUID | None = None, seq: int = 0) -> bool:
        """Publish after commit. Never raises: with Redis down the change is
        already durable and clients recover it from PostgreSQL."""
        envelope = (skip_user.bytes if skip_user is not None else NO_ONE) + seq.to_bytes(8, "big") + frame
        sent = await self._publish([(channel, envelope)])
        if not sent and seq:
            # Nobody may send another message to show the gap: publish the
            # newest one again when Redis is back. Followers that missed the
            # ones before it see the gap and fetch them (``_watch_gap``).
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

    async def publish_many(self, items: "list[tuple[str, bytes]]") -> bool:
        """Publish several ``(channel, frame)`` (no skip, no seq), in order,
        in one pipeline. Never raises, like ``publish``."""
        return await self._publish([(channel, PLAIN_ENVELOPE + frame) for channel, frame in items])

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

    # ---- subscriber connection -------------------------------------------

    def _write(self, data: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(data)
        return True

    def _send_subscribe(self, channel: str) -> asyncio.Future | None:
        if self._writer is None:
            self._stale.add(channel)  # subscribed, then repaired, on reconnect
            return None
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, collections.deque()).append(fut)
        self._write(_cmd(b"SUBSCRIBE", channel.encode()))
        return fut

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

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rooms-subscriber")

    async def stop(self) -> None:
        if self._resend is not None:
            self._resend.cancel()
            await asyncio.gather(self._resend, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for channel in list(self._repairs):
            self._cancel_repair(channel)
        self._drop_connection()

    def _drop_connection(self) -> None:
        self.connected.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        # Whatever was published while we are away is fetched back later.
        self._stale.update(self._followers)
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(False)
        self._pending.clear()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), timeout=2.0
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("redis subscriber connect failed: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                log.warning("redis subscriber connection lost: %r", exc)
            except Exception:
                # Never let live delivery die silently: log and reconnect.
                log.exception("redis subscriber failed")
                await asyncio.sleep(backoff)
            finally:
                if self._writer is writer:
                    self._drop_connection()
                else:
                    writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._auth is not None:
            writer.write(pack([self._auth]))
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise ConnectionError(f"redis AUTH failed: {line!r}")
        self._writer = writer
        loop = asyncio.get_running_loop()
        channels = list(self._followers)
        for channel in channels:
            fut = loop.create_future()
            self._pending.setdefault(channel, collections.deque()).append(fut)
        for i in range(0, len(channels), 1000):
            writer.write(_cmd(b"SUBSCRIBE", *(c.encode() for c in channels[i : i + 1000])))
        self.connected.set()
        log.info("redis subscriber connected, %d channels", len(channels))
        self._last_rx = loop.time()
        pinger = asyncio.create_task(self._keepalive(writer), name="rooms-subscriber-ping")
        try:
            await self._read_pushes(reader)
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        """A Redis that vanished without closing the TCP connection would
        leave us subscribed to nothing, forever: ping it, and drop the link
        when it stays silent."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            if loop.time() - self._last_rx > 3 * PING_INTERVAL_S:
                log.warning("redis subscriber silent for %.0f s, reconnecting", loop.time() - self._last_rx)
                writer.transport.abort()
                return
            if not writer.is_closing():
                writer.write(_cmd(b"PING"))

    async def _read_pushes(self, reader: asyncio.StreamReader) -> None:
        # hiredis parses; reading RESP line by line in Python cost more than
        # delivering the messages (loadtests/bench_bookings.py).
        parser = hiredis.Reader()
        read = reader.read
        loop = asyncio.get_running_loop()
        while True:
            data = await read(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self._last_rx = loop.time()
            parser.feed(data)
            while (push := parser.gets()) is not False:
                if not isinstance(push, list):
                    if isinstance(push, hiredis.ReplyError):
                        log.error("redis subscriber error: %r", push)
                    continue
                kind = push[0]
                if kind == b"message":
                    self._deliver(push[1].decode(), push[2])
                elif kind == b"subscribe":
                    self._confirmed(push[1].decode())

    def _confirmed(self, channel: str) -> None:
        futs = self._pending.get(channel)
        if futs:
            fut = futs.popleft()
            if not fut.done():
                fut.set_result(True)
            if not futs:
                del self._pending[channel]
        if channel in self._stale and channel not in self._pending:
            self._stale.discard(channel)
            self._schedule_repair(channel, 0)
            # Followers that are not rooms catch up in their own way.
            for follower in list(self._followers.get(channel, ())):
                resubscribed = getattr(follower, "resubscribed", None)
                if resubscribed is not None:
                    try:
                        resubscribed()
                    except Exception:  # never let it drop the link (and be called again)
                        log.exception("resubscribed() of a follower of %s failed", channel)

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
        self.delivered += 1

    # ---- repair from PostgreSQL --------------------------------------------

    def _watch_gap(self, member: Membership) -> None:
        """A hole below ``member.ahead``: give the missing publish a moment,
        then fetch whatever is still missing."""
        if member.ahead and member.waiting_for is None and member.done is not None:
            member.waiting_for = member.done + 1
            if member.channel not in self._repairs:
                self._schedule_repair(member.channel, GAP_GRACE_S)

    def _schedule_repair(self, channel: str, delay: float) -> None:
        if self.backfill is None:
            return
        pending = self._repairs.get(channel)
        if pending is not None:
            if delay > 0:
                return  # a repair is due anyway
            if isinstance(pending, asyncio.Task):
                # It may have read before the subscription was confirmed:
                # read once more after it.
                self._repair_again.add(channel)
                return
            pending.cancel()  # a later repair (or retry) becomes an immediate one
            del self._repairs[channel]
        loop = asyncio.get_running_loop()
        if delay > 0:
            self._repairs[channel] = loop.call_later(delay, self._gap_due, channel)
        else:
            self._repairs[channel] = loop.create_task(self._repair(channel), name=f"rooms-repair-{channel}")

    def _cancel_repair(self, channel: str) -> None:
        self._repair_again.discard(channel)
        pending = self._repairs.pop(channel, None)
        if pending is not None:
            pending.cancel()

    def _gap_due(self, channel: str) -> None:
        self._repairs.pop(channel, None)
        members = self._members(channel)
        missing = False
        for m in members:
            if m.waiting_for is not None and m.done is not None and m.done < m.waiting_for:
                missing = True
            m.waiting_for = None
        if missing:
            self._schedule_repair(channel, 0)
        else:
            for m in members:  # holes that opened after the first one
                self._watch_gap(m)

    def _members(self, channel: str) -> list[Membership]:
        return [m for m in self._followers.get(channel, {}).values()
                if m is not None and m.live and m.current and not m.paused]

    def resume(self, follower: Follower) -> None:
        """``follower`` authenticated again after its token expired: each of
        its rooms gives it, from PostgreSQL, what it missed while paused."""
        for channel in self._channels_of.get(follower, ()):
            member = self._followers.get(channel, {}).get(follower)
            if member is not None and member.done is not None:
                self._schedule_repair(channel, 0)

    async def _repair(self, channel: str, attempt: int = 0) -> None:
        try:
            assert self.backfill is not None
            last_low = None
            while True:
                members = self._members(channel)
                if not members:
                    return
                low = min(m.done for m in members)  # type: ignore[type-var]
                if low == last_low:
                    return
                last_low = low
                batch = await self.backfill(channel, low, REPAIR_PAGE)  # type: ignore[arg-type]
                given = 0
                for seq, frame in batch:
                    for m in self._members(channel):
                        before = (m.done, len(m.ahead))
                        m.offer(seq, frame)
                        if (m.done, len(m.ahead)) != before:
                            given += 1
                if given:
                    self.repaired += given
                    log.info("repaired %s: %d messages given from PostgreSQL", channel, given)
                if len(batch) < REPAIR_PAGE:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("repair of %s failed (attempt %d): %r", channel, attempt + 1, exc)
            if attempt < 10:
                self._repairs.pop(channel, None)
                loop = asyncio.get_running_loop()
                self._repairs[channel] = loop.call_later(
                    REPAIR_RETRY_S, lambda: self._retry_repair(channel, attempt + 1)
                )
                return
        finally:
            if self._repairs.get(channel) is asyncio.current_task():
                del self._repairs[channel]
                if channel in self._repair_again:
                    self._repair_again.discard(channel)
                    self._schedule_repair(channel, 0)
                else:
                    # Holes that opened while we were reading are watched afresh.
                    for m in self._members(channel):
                        m.waiting_for = None
                        self._watch_gap(m)

    def _retry_repair(self, channel: str, attempt: int) -> None:
        self._repairs.pop(channel, None)
        if channel in self._followers:
            self._repairs[channel] = asyncio.get_running_loop().create_task(self._repair(channel, attempt))
