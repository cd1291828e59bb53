"""Dispatching a socket's frames: each request checked, run as a call, answered.

A frame that is not a request, or holds more values or levels than
``MAX_FRAME_VALUES`` / ``MAX_FRAME_DEPTH`` (refused before it is decoded), is
answered ``bad_frame`` (too many close the socket with 1008). A call's auth
and params are checked as its frame arrives, and only then is it a task:
the task holds the params model, never the decoded frame, so what calls in
flight hold is bounded by the models. Each call is a task owned by the
socket's ``Dispatcher``, cancelled and awaited when the socket ends. Results
and errors become frames in ``_call`` and ``_refuse`` alone. Each call is
timed and counted by method and outcome (server/metrics.py), and runs with
its call id, method and user in the logging context (server/logs.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any

import asyncpg
import redis.exceptions
from aiohttp import WSCloseCode
from pydantic import BaseModel, ValidationError

from protocol.codec import DecodeError, OverLimits, decode
from protocol.errors import ErrorCode, RpcError
from server import cursors
from server.binding import AuthBinding
from server.db.errors import DatabaseUnavailable
from server.frames import error_frame, result_frame
from server.logs import CALL, CallContext, new_call_id
from server.metrics import UNKNOWN_METHOD, observe_call
from server.outbox import CLUSTER_DOWN
from server.rpc import METHODS, Call, Method
from server.services import Services
from server.transport import Transport

log = logging.getLogger("hangout.socket")

MAX_UINT64 = 2**64 - 1

# A dependency that did not answer: the call fails ``unavailable`` (retry).
UNAVAILABLE_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    *CLUSTER_DOWN,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or "params"
        reason = err["msg"]
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        errors.append({"field": field, "reason": reason})
    return errors


def _holds_nul(value: Any) -> bool:
    # Iterative: a frame may nest values ~1000 deep, past Python's recursion limit.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


@functools.cache
def _wire_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias or name for name, f in model.model_fields.items())


def nul_errors(model: type[BaseModel], raw: dict[Any, Any], named: set[str]) -> list[dict[str, str]]:
    """Known params holding a NUL character: PostgreSQL text cannot store
    one, so letting it through would fail later as an internal error."""
    known = _wire_names(model)
    return [
        {"field": key, "reason": "must not contain NUL characters"}
        for key, value in raw.items()
        if key in known and key not in named and _holds_nul(value)
    ]


class Dispatcher:
    __slots__ = ("services", "_transport", "_binding", "_config", "_calls", "bad_frames", "draining")

    def __init__(self, services: Services, transport: Transport, binding: AuthBinding) -> None:
        self.services = services
        self._transport = transport
        self._binding = binding
        self._config = services.config
        # The calls in flight; made for the first, dropped with the last (an
        # idle socket holds no set).
        self._calls: set[asyncio.Task] | None = None
        self.bad_frames = 0
        self.draining = False  # shutting down: no new calls

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls) if self._calls is not None else 0

    async def wait_calls(self, timeout: float) -> None:
        """Until the calls in flight finish, at most ``timeout`` seconds."""
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=timeout)

    async def cancel_calls(self) -> None:
        calls = list(self._calls or ())
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)

    def _call_done(self, task: asyncio.Task) -> None:
        calls = self._calls
        if calls is not None:
            calls.discard(task)
            if not calls:
                self._calls = None

    # ---- frames in -------------------------------------------------------

    def on_frame(self, data: bytes) -> None:
        if self._transport.closing:
            return
        config = self._config
        try:
            frame = decode(data, config.max_frame_values, config.max_frame_depth)
        except OverLimits as exc:
            return self._bad_frame(None, str(exc))
        except DecodeError:
            return self._bad_frame(None, "not a single MessagePack value")
        if not isinstance(frame, dict):
            return self._bad_frame(None, "frame is not a map")
        req_id = frame.get("id")
        if type(req_id) is not int or not 0 <= req_id <= MAX_UINT64:
            return self._bad_frame(None, "missing or unusable id")
        name = frame.get("method")
        if type(name) is not str:
            return self._bad_frame(req_id, "missing or unusable method")
        started = time.perf_counter()
        if self.draining:
            # Shutting down: tell the client to retry elsewhere rather than
            # leave the call unanswered.
            return self._refuse(req_id, name, RpcError(ErrorCode.UNAVAILABLE, "server shutting down, retry"), started)
        if self.calls_in_flight >= config.max_in_flight:
            return self._refuse(req_id, name, RpcError(ErrorCode.TOO_MANY_REQUESTS), started)
        try:
            method, params = self._checked(name, frame.get("params", {}))
        except Exception as exc:
            return self._refuse(req_id, name, self._error(name, exc, new_call_id()), started)
        del frame  # from here the call holds its params model alone
        # The caller is who the socket was bound to when its auth was checked.
        task = asyncio.create_task(self._call(req_id, method, params, self._binding.user_id, started))
        if self._calls is None:
            self._calls = set()
        self._calls.add(task)
        task.add_done_callback(self._call_done)

    def _bad_frame(self, req_id: int | None, reason: str) -> None:
        self.bad_frames += 1
        if self.bad_frames >= self._config.max_bad_frames:
            # Frames that came in the same read as this one must not run.
            self._transport.close_soon(WSCloseCode.POLICY_VIOLATION, "too many bad frames")
            return
        self._transport.send_reply(error_frame(req_id, RpcError(ErrorCode.BAD_FRAME, reason)))

    # ---- calls -----------------------------------------------------------

    def _checked(self, name: str, raw_params: Any) -> tuple[Method, BaseModel]:
        """The method and its validated params, or the ``RpcError`` that answers the call."""
        method = METHODS.get(name)
        if method is None:
            raise RpcError(ErrorCode.UNKNOWN_METHOD, f"no method named {name[:100]!r}")
        spec = method.spec
        if spec.auth:
            self._binding.require_auth()
        if not isinstance(raw_params, dict):
            raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [{"field": "params", "reason": "must be a map"}]})
        errors: list[dict[str, str]] = []
        params = None
        try:
            params = spec.params.model_validate(raw_params)
        except ValidationError as exc:
            errors = validation_errors(exc)
        named = {e["field"] for e in errors}
        errors += [e for e in spec.params.raw_errors(raw_params) if e["field"] not in named]
        errors += nul_errors(spec.params, raw_params, {e["field"] for e in errors})
        # A cursor is checked with the server's key, so beside the model's own rules.
        named = {e["field"] for e in errors}
        errors += [e for e in cursors.errors(self.services.config, name, spec.params, raw_params, params)
                   if e["field"] not in named]
        if errors or params is None:
            raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": errors})
        return method, params

    def _refuse(self, req_id: int, name: str, err: RpcError, started: float) -> None:
        """Answer a call that never ran."""
        self._transport.send_reply(error_frame(req_id, err))
        observe_call(name if name in METHODS else UNKNOWN_METHOD, err.code.value, started)

    async def _call(self, req_id: int, method: Method, params: BaseModel, caller: uuid.UUID | None,
                    started: float) -> None:
        name = method.spec.name
        # The task's own context: every line logged for the call, by this
        # task or one it starts, carries these.
        call_id = new_call_id()
        CALL.set(CallContext(call_id, name, str(caller) if caller is not None else None))
        outcome = "ok"
        try:
            # The call's write positions go to Redis in the pipeline of its
            # events, and the reply waits for them (read-your-writes).
            async with self.services.db.recording_writes():
                result = await method.handler(Call(self.services, self._binding, caller), params)
            frame = result_frame(req_id, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = self._error(name, exc, call_id)
            frame, outcome = error_frame(req_id, err), err.code.value
        self._transport.send_reply(frame)
        observe_call(name, outcome, started)

    def _error(self, name: str, exc: Exception, ref: str) -> RpcError:
        """What answers a call that failed with ``exc``. An unexpected
        failure is logged with ``ref`` (the call's id), which the reply
        carries, so a client's report leads to the log lines of its call."""
        if isinstance(exc, RpcError):
            return exc
        if isinstance(exc, DatabaseUnavailable):
            return RpcError(ErrorCode.UNAVAILABLE, str(exc) or None)
        if isinstance(exc, UNAVAILABLE_ERRORS):
            log.warning("call %s unavailable: %r", name, exc)
            return RpcError(ErrorCode.UNAVAILABLE)
        log.error("internal error in %s ref=%s", name[:100], ref, exc_info=exc, extra={"ref": ref})
        return RpcError(ErrorCode.INTERNAL, data={"ref": ref})
