"""Load shapes for the locust run, chosen with ``LOADTEST_SHAPE``.

    LOADTEST_SHAPE=ramp  make loadtest   # users in steps up to LOADTEST_USERS, then down
    LOADTEST_SHAPE=storm make loadtest   # LOADTEST_USERS online, then every socket drops at once

Without ``LOADTEST_SHAPE`` locust runs its flat load (``-u``, ``-r``, ``-t``).

``ramp``: ``LOADTEST_RAMP_STEPS`` (5) steps of ``LOADTEST_RAMP_STEP_S`` (30) s,
each adding a fifth (1/steps) of ``LOADTEST_USERS`` at ``LOADTEST_RATE`` users
a second, then the same steps down. Where latency bends as the users grow is
the process's knee; the per-step figures are in the CSV history
(``locust_stats_history.csv``).

``storm``: ``LOADTEST_USERS`` users start at ``LOADTEST_RATE`` a second and
settle; ``LOADTEST_STORM_AT_S`` (60) s after the start every user's socket is
dropped at the same moment, as when a load balancer or a server host goes
away, and each user at once reconnects with its access token (refreshing it
when about to expire), resumes its user events with ``events.resume`` and
re-joins its rooms with ``since_seq``. The time from the drop to a user being
back is reported as ``storm: back`` (request type ``event``); a user that could
not come back is a failure under the same name. ``LOADTEST_STORMS`` (1) storms
run ``LOADTEST_STORM_EVERY_S`` (60) s apart, and the run ends
``LOADTEST_STORM_HOLD_S`` (60) s after the last. With locust worker processes
the master sends the drop to every worker (a custom message), so all the
sockets of the run drop together.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import gevent
from locust import LoadTestShape

STORM_MESSAGE = "hangout_storm"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


class RampShape(LoadTestShape):
    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.peak = int(_env("LOADTEST_USERS", "500"))
        self.rate = float(_env("LOADTEST_RATE", "25"))
        self.steps = max(1, int(_env("LOADTEST_RAMP_STEPS", "5")))
        self.step_s = float(_env("LOADTEST_RAMP_STEP_S", "30"))

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // self.step_s)
        if step >= 2 * self.steps:
            return None
        # Up steps 1..steps, then back down to one step's worth.
        level = step + 1 if step < self.steps else 2 * self.steps - step
        return max(1, self.peak * level // self.steps), self.rate


class StormShape(LoadTestShape):
    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.users = int(_env("LOADTEST_USERS", "500"))
        self.rate = float(_env("LOADTEST_RATE", "25"))
        self.first = float(_env("LOADTEST_STORM_AT_S", "60"))
        self.storms = max(1, int(_env("LOADTEST_STORMS", "1")))
        self.every = float(_env("LOADTEST_STORM_EVERY_S", "60"))
        self.hold = float(_env("LOADTEST_STORM_HOLD_S", "60"))
        self.sent = 0

    def tick(self) -> tuple[int, float] | None:
        now = self.get_run_time()
        if self.sent < self.storms and now >= self.first + self.sent * self.every:
            self.sent += 1
            # Local runner: the listener runs here; master: every worker gets it.
            self.runner.send_message(STORM_MESSAGE, {"at": time.time()})
        if now >= self.first + (self.storms - 1) * self.every + self.hold:
            return None
        return self.users, self.rate


SHAPES: dict[str, type[LoadTestShape]] = {"ramp": RampShape, "storm": StormShape}


def chosen(name: str) -> type[LoadTestShape] | None:
    """The concrete shape class for ``name`` (None for the flat load): made
    here so that the locustfile holds exactly one shape class, the one chosen."""
    if not name:
        return None
    if name not in SHAPES:
        raise SystemExit(f"LOADTEST_SHAPE must be one of {', '.join(SHAPES)} (or empty), not {name!r}")
    base = SHAPES[name]
    return type(base.__name__.replace("Shape", "") + "Load", (base,), {"__module__": __name__})


def storm_listener(reconnect: Callable[[Any, float], None]) -> Callable[..., None]:
    """A custom-message listener that drops and reopens every running user's
    socket at once, each in its own greenlet (``reconnect(user, started)``)."""

    def on_storm(environment: Any, msg: Any, **_kw: Any) -> None:
        started = float(msg.data["at"])
        runner = environment.runner
        users = [g.args[0] for g in list(runner.user_greenlets) if g.args]
        for user in users:
            gevent.spawn(reconnect, user, started)

    return on_storm
