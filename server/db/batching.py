"""Merging calls that overlap in time into one request: look-ups of one
kind into one query (``Batcher``), calls of one write into one transaction
(``WriteBatcher``)."""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine, NamedTuple

import asyncpg

from server.db.errors import DatabaseUnavailable
from server.db.pool import PRIMARY_DEADLINE_S, Acquire

log = logging.getLogger("hangout.db")

Query = Callable[..., Awaitable[Any]]


class Merging(abc.ABC):
    """What the batchers below share: requests gathered in one loop turn go
    at the end of it if fewer than ``max_running`` are running, else as soon
    as one of them ends. So at low load a call waits for nothing, and the
    busier the process, the more calls a request serves. A subclass says
    what is waiting (``_waiting``) and starts requests (``_send``, with
    ``_start``)."""

    def __init__(self, max_running: int) -> None:
        self.max_running = self.limit = max_running
        self.running: dict[asyncio.Task, frozenset] = {}  # each with the locks it holds
        self.scheduled = False

    def _wake(self) -> None:
        """Something was added to what is waiting."""
        if not self.scheduled and len(self.running) < self.max_running:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    @abc.abstractmethod
    def _waiting(self) -> bool:
        """Whether a call waits to be sent."""

    @abc.abstractmethod
    def _send(self) -> None:
        """Start requests for what waits, as many as may run (``_start``)."""

    def _start(self, request: Coroutine[Any, Any, None], locks: frozenset = frozenset()) -> None:
        task = asyncio.create_task(request)
        self.running[task] = locks
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.running.pop(task, None)
        if self._waiting() and not self.scheduled:
            self._send()

    def hold(self) -> None:
        """Send nothing until ``release``: calls only gather. A test seam
        (``test.hold_merged_writes``), to make a batch of chosen calls."""
        self.max_running = 0

    def release(self) -> None:
        """End ``hold``: what gathered meanwhile goes, in as few requests as
        the batcher's bounds allow."""
        self.max_running = self.limit
        if self._waiting():
            self._wake()

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)


class Batcher(Merging):
    """Merges concurrent single-key look-ups of one kind into one request
    (see ``Merging``). ``fetch(keys, required)`` answers ``{key: value}``;
    ``required`` is the strictest read-your-writes position among the
    batch's callers (-1 for "the primary"), which is never less safe than
    reading for each alone.
    """

    def __init__(self, fetch: Callable[[list[Any], int], Awaitable[dict]], max_running: int) -> None:
        super().__init__(max_running)
        self.fetch = fetch
        self.keys: list[Any] = []
        self.waiters: list[asyncio.Future] = []
        self.required = 0

    async def get(self, key: Any, required: int = 0) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.keys.append(key)
        self.waiters.append(fut)
        self.required = -1 if required < 0 or self.required < 0 else max(self.required, required)
        self._wake()
        return await fut

    def _waiting(self) -> bool:
        return bool(self.keys)

    def _send(self) -> None:
        self.scheduled = False
        if not self.keys:
            return
        keys, waiters, required = self.keys, self.waiters, self.required
        self.keys, self.waiters, self.required = [], [], 0
        self._start(self._run(keys, waiters, required))

    async def _run(self, keys: list[Any], waiters: list[asyncio.Future], required: int) -> None:
        try:
            found = await self.fetch(list(dict.fromkeys(keys)), required)
        except BaseException as exc:
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else DatabaseUnavailable())
            if not isinstance(exc, Exception):
                raise
        else:
            for key, fut in zip(keys, waiters):
                if not fut.done():  # a caller whose socket closed meanwhile
                    fut.set_result(found.get(key))


class BatchFailed(Exception):
    """A merged batch of writes failed in the database; nothing of it
    committed, and each caller makes its own call alone."""


class MergedWrite(NamedTuple):
    """A write whose calls ``Database.write_merged`` merges: ``query(conn,
    *args)`` makes one call alone, ``query_many(conn, [args, ...])`` several
    in one transaction and answers ``Committed([result, ...], position)``.
    At most ``running`` of its batches are in the database at once (per
    process); calls that come meanwhile wait and go together."""

    query: Query
    query_many: Query
    running: int = 2


class WriteBatcher(Merging):
    """Merges concurrent calls of one write (``Database.write_merged``; see
    ``Merging``), at most ``MAX_BATCH`` a batch, on connections from
    ``acquire_primary(deadline=...)``. A call that shares a lock with a
    running batch waits for the batch after it. A batch of one runs the
    single ``query``; a batch of more, ``query_many``, which answers
    ``Committed([result, ...], position)``."""

    # Bounds how long one batch holds its locks, and how long its calls wait
    # for the slowest of them: what a batch costs beyond its calls is spread
    # over fewer of them, for a lower p99 at the same throughput.
    MAX_BATCH = 20
    # And how many locks one batch takes: PostgreSQL's lock table is shared,
    # max_locks_per_transaction (64) per connection; a 12-hour booking takes
    # 24 hour locks. (One call more than this still goes, alone.)
    MAX_LOCKS = 256

    def __init__(self, acquire_primary: Callable[..., Acquire], write: MergedWrite) -> None:
        super().__init__(write.running)
        self.acquire_primary = acquire_primary
        self.query = write.query
        # Replaceable: a test seam (``test.fail_merged_writes``) puts in one
        # that fails in the database, as a deadlock would.
        self.query_many = write.query_many
        self.waiting: list[tuple[tuple, frozenset, asyncio.Future]] = []
        # Batches of two calls or more, the calls in them, and those that
        # failed (their calls were then made alone): /readyz shows them.
        self.batches = self.calls = self.failed = 0

    def submit(self, args: tuple, locks: frozenset) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((args, locks, fut))
        self._wake()
        return fut

    def _waiting(self) -> bool:
        return bool(self.waiting)

    def _send(self) -> None:
        self.scheduled = False
        while self.waiting and len(self.running) < self.max_running:
            busy = frozenset().union(*self.running.values())
            batch, rest, locks = [], [], 0
            for item in self.waiting:
                if item[2].done():  # its caller is gone
                    continue
                fits = not batch or (len(batch) < self.MAX_BATCH and locks + len(item[1]) <= self.MAX_LOCKS)
                if fits and not (item[1] & busy):
                    batch.append(item)
                    locks += len(item[1])
                else:
                    rest.append(item)
            self.waiting = rest
            if not batch:
                return
            self._start(self._run(batch), frozenset().union(*(item[1] for item in batch)))

    async def _run(self, batch: list[tuple[tuple, frozenset, asyncio.Future]]) -> None:
        try:
            async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
                if len(batch) == 1:
                    results, lsn = [await self.query(conn, *batch[0][0])], None
                else:
                    self.batches += 1
                    self.calls += len(batch)
                    committed = await self.query_many(conn, [item[0] for item in batch])
                    results, lsn = committed.value, committed.wal_lsn
        except BaseException as exc:
            if len(batch) > 1 and isinstance(exc, asyncpg.PostgresError):
                self.failed += 1
                log.warning("a batch of %d merged writes failed, making each alone: %r", len(batch), exc)
                exc = BatchFailed()
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else DatabaseUnavailable())
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, _, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result((result, lsn))
