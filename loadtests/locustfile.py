"""Locust users speaking the hangout protocol over real WebSockets.

    python -m loadtests.seed_accounts --host http://127.0.0.1:8080   # once: fills the account pool
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless -u 500 -r 25 -t 60s

(or ``make loadtest``, which starts a local server; see loadtests/run_locust.py).

Every call is reported to locust as ``request_type="ws"`` named after its
method, with the time from sending the request to receiving its reply.
Business answers a real client expects (``slot_unavailable`` and
``insufficient_funds`` from ``bookings.create``) count as successes, under
their own names (``bookings.create (slot_unavailable)``); any other error
reply, a timeout or a lost socket is a failure. Pushed events
that a flow waits for are reported as ``request_type="event"``, timed from
the call that caused them to their arrival.

Most users start as the app does with a stored session: an account from the
pool (loadtests/accounts.py, filled by loadtests/seed_accounts.py), then
``auth.refresh`` and ``auth.authenticate``, then the inbox and its rooms. A
share (LOADTEST_SIGNUP_SHARE, 0.1) sign up instead: ``auth.register`` and
the signed KYC webhook (``KYC_WEBHOOK_SECRET``, the dev secret by default).
Two kinds of user:

- ``Host`` (1 in 4): sets a price, answers chat in the rooms of its bookings
  (marking what it received as read), checks its calendar and bookings.
- ``Booker`` (3 in 4): searches hosts (and looks a few up, pipelined), tops up
  the wallet, books and sometimes cancels, chats in booked rooms (marking
  what it received as read), drops the socket and resumes with
  ``since_seq``, refreshes tokens, logs out and in.

Both watch the other party's presence in the rooms they joined: the
``chat.presence`` events they receive are counted and logged at the end.

Services that a server does not offer (answered ``unknown_method``) are
probed once per process and their tasks skipped, so the file also runs
against a server with fewer services.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import functools
import json
import logging
import os
import random
import time
import uuid
from typing import Any, Callable

import gevent.lock
import requests
from locust import User, between, events, task
from locust.runners import WorkerRunner

from loadtests import accounts, shapes
from loadtests.accounts import PASSWORD, http_url_for, kyc_signature, ws_url_for
from loadtests.wsclient import CLOSED_BY_CLIENT, CallError, WsClient
from protocol.resume import Backoff, SeqWindow

log = logging.getLogger("loadtest")

UTC = dt.timezone.utc
SIGNUP_SHARE = float(os.environ.get("LOADTEST_SIGNUP_SHARE", "0.1"))

# Answers a real client expects and handles; never counted as failures.
BUSINESS_ANSWERS = ("slot_unavailable", "insufficient_funds")
resume_checks: collections.Counter[str] = collections.Counter()
# chat.presence events received in joined rooms, by state: the other
# party's app opening and closing (bookers reconnect and sign out and in).
presence_seen: collections.Counter[str] = collections.Counter()

MAX_JOINED_ROOMS = 4  # a phone shows a handful of live chats, not every past booking


# ---- which services the server has ------------------------------------------

_services: dict[str, bool] | None = None
_probe_lock = gevent.lock.Semaphore()
PROBES = {"wallet": "wallet.topup", "bookings": "bookings.create", "chat": "chat.send", "read_positions": "chat.read"}


def services(ws_url: str) -> dict[str, bool]:
    """Ask the server once per process which services exist: an unknown
    method is answered ``unknown_method`` before authentication is checked."""
    global _services
    with _probe_lock:
        if _services is None:
            probe = WsClient.connect(ws_url)
            try:
                found = {}
                for service, method in PROBES.items():
                    try:
                        probe.call(method, {}, timeout=10)
                        found[service] = True
                    except CallError as err:
                        found[service] = err.code != "unknown_method"
                _services = found
            finally:
                probe.close()
            missing = [s for s, ok in _services.items() if not ok]
            if missing:
                log.warning("server has no %s methods yet: those flows are skipped", ", ".join(missing))
    return _services


# ---- the account pool of this process -------------------------------------------


class Pool:
    """This process's share of the pooled accounts, and what changed in them."""

    def __init__(self, environment: Any, host: str) -> None:
        self.path = accounts.pool_path(host)
        index, parts = 0, 1
        runner = environment.runner
        opts = environment.parsed_options
        if isinstance(runner, WorkerRunner) and opts is not None and opts.processes:
            # --processes N: each worker process takes its own share.
            parts = opts.processes if opts.processes > 0 else (os.cpu_count() or 1)
            index = runner.worker_index % parts
        mine = [a for i, a in enumerate(accounts.load(self.path)) if i % parts == index]
        random.shuffle(mine)
        self.free: dict[str, list[dict]] = {"host": [], "booker": []}
        for a in mine:
            self.free.setdefault(a["kind"], []).append(a)
        self.changed: dict[str, dict] = {}
        self.gone: set[str] = set()

    def take(self, kind: str) -> dict | None:
        free = self.free.get(kind)
        return free.pop() if free else None

    def give_back(self, account: dict) -> None:
        self.changed[account["email"]] = account
        self.free.setdefault(account["kind"], []).append(account)

    def save(self) -> None:
        accounts.save(self.path, list(self.changed.values()))
        accounts.forget(self.path, self.gone)
        self.changed.clear()
        self.gone.clear()


_pool: Pool | None = None


def pool(environment: Any, host: str) -> Pool:
    global _pool
    if _pool is None:
        _pool = Pool(environment, host)
    return _pool


@events.quitting.add_listener
def _save_pool(environment: Any, **_kw: Any) -> None:
    if _pool is not None:
        _pool.save()
    if resume_checks:
        log.info("resume with since_seq: %s", dict(resume_checks))
    if presence_seen:
        log.info("chat.presence received: %s", dict(presence_seen))


# ---- helpers -----------------------------------------------------------------


def future_slot(max_hours: int = 3) -> tuple[dt.datetime, dt.datetime]:
    """A whole-hour range 2 to 80 days ahead: spread wide, so overlaps are as
    rare as they are between real people."""
    base = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = base + dt.timedelta(hours=random.randint(48, 80 * 24))
    return start, start + dt.timedelta(hours=random.randint(1, max_hours))


def _expires_in(token: str) -> float:
    """Seconds until a JWT's ``exp`` (read, not verified: the client's view)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - time.time()
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0


class Session:
    """One signed-in device: its socket, tokens and the rooms it follows."""

    def __init__(self, user: "HangoutUser") -> None:
        self.user = user
        self.ws: WsClient | None = None
        self.user_id: str | None = None
        self.email: str | None = None
        self.access_token: str | None = None
        self.refresh_token: str | None = None
        self.last_seq: dict[str, int] = {}  # joined conversation -> highest seq seen
        # Joined conversation -> the seqs taken, as the Python client keeps
        # them (protocol/resume.py): a resume starts below any hole, and a
        # message delivered twice is shown once.
        self.seen: dict[str, SeqWindow] = {}
        # Reconnecting after a failed attempt waits, as the app's client does.
        self.backoff = Backoff()
        self.retry_at = 0.0
        self.read_seq: dict[str, int] = {}  # joined conversation -> this user's read position
        self.sent_at: dict[str, float] = {}  # client_msg_id -> perf_counter at send
        self.event_seq = 0  # user events seen on earlier sockets: events.resume starts after it
        self.reconnecting = gevent.lock.Semaphore()  # one reopen at a time (a storm and a task)

    # reporting ---------------------------------------------------------------

    def report(self, name: str, ms: float, length: int, err: Exception | None, kind: str = "ws") -> None:
        self.user.environment.events.request.fire(
            request_type=kind, name=name, response_time=ms, response_length=length,
            exception=err, context={},
        )

    def _on_reply(self, method: str, ms: float, length: int, err: CallError | None) -> None:
        self.report(method, ms, length, err)

    def _on_event(self, name: str, data: Any) -> None:
        """Runs in the reader greenlet, as the frame arrives."""
        if name == "chat.message":
            msg = data["message"]
            conv = msg["conversation_id"]
            window = self.seen.get(conv)
            if window is not None and not window.take(msg["seq"]):
                return
            if conv in self.last_seq and msg["seq"] > self.last_seq[conv]:
                self.last_seq[conv] = msg["seq"]
            sent = self.sent_at.pop(msg.get("client_msg_id") or "", None)
            if sent is not None:
                self.report("chat.message (own, delivered)", (time.perf_counter() - sent) * 1000.0, 0, None, "event")
        elif name == "chat.presence":
            presence_seen["online" if data["online"] else "offline"] += 1

    # the socket ----------------------------------------------------------------

    def connect(self, token: str | None = None) -> WsClient:
        t0 = time.perf_counter()
        try:
            ws = WsClient.connect(self.user.ws_url, access_token=token, reporter=self._on_reply, on_event=self._on_event)
        except Exception as exc:
            self.report("connect", (time.perf_counter() - t0) * 1000.0, 0, exc)
            raise
        self.report("connect", (time.perf_counter() - t0) * 1000.0, 0, None)
        self.ws = ws
        return ws

    def call(self, method: str, params: dict | None = None, expected: tuple[str, ...] = ()) -> Any:
        assert self.ws is not None
        return self.ws.call(method, params, expected)

    def adopt(self, result: dict) -> None:
        self.user_id = result["user"]["id"]
        self.access_token = result["access_token"]
        self.refresh_token = result["refresh_token"]

    # flows -------------------------------------------------------------------------

    def sign_up(self, name: str, gender: str) -> dict:
        self.connect()
        self.email = f"lt-{uuid.uuid4().hex[:20]}@loadtest.example"
        result = self.call("auth.register", {"email": self.email, "password": PASSWORD, "name": name, "gender": gender})
        self.adopt(result)
        return result["user"]

    def sign_in(self, account: dict) -> dict | None:
        """The app opening with a stored session: refresh, then authenticate
        the socket. A spent or revoked refresh token falls back to the
        password; an account the deployment no longer has gives None."""
        self.connect()
        self.email = account["email"]
        try:
            tokens = self.call("auth.refresh", {"refresh_token": account["refresh_token"]},
                               expected=("invalid_credentials",))
            self.access_token, self.refresh_token = tokens["access_token"], tokens["refresh_token"]
            user = self.call("auth.authenticate", {"access_token": self.access_token})["user"]
        except CallError as err:
            if err.code != "invalid_credentials":
                raise
            try:
                result = self.call("auth.login", {"email": self.email, "password": PASSWORD},
                                   expected=("invalid_credentials",))
            except CallError as err2:
                if err2.code == "invalid_credentials":
                    return None
                raise
            self.adopt(result)
            user = result["user"]
        self.user_id = user["id"]
        return user

    def open_inbox(self) -> None:
        """Join the most recently active rooms, as the app's chat tab does."""
        if not self.user.has("chat"):
            return
        convs = self.call("chat.conversations", {"limit": MAX_JOINED_ROOMS})["conversations"]
        for conv in convs[:MAX_JOINED_ROOMS]:
            self.join(conv["id"])

    def verify_kyc(self) -> None:
        """The KYC provider's signed webhook, then the ``user.updated`` push."""
        body = json.dumps({"event_id": f"lt-{uuid.uuid4().hex}", "user_id": self.user_id, "status": "verified"}).encode()
        t0 = time.perf_counter()
        err: Exception | None = None
        try:
            r = self.user.http.post(self.user.http_url + "/webhooks/kyc", data=body, timeout=30,
                                    headers={"X-Signature": kyc_signature(body), "Content-Type": "application/json"})
            if r.status_code != 200:
                err = RuntimeError(f"kyc webhook answered {r.status_code}: {r.text[:200]}")
        except requests.RequestException as exc:
            err = exc
        self.report("/webhooks/kyc", (time.perf_counter() - t0) * 1000.0, 0, err, "http")
        if err is not None:
            raise err
        self.wait_event("user.updated", t0)

    def wait_event(self, name: str, since: float, timeout: float = 10.0) -> Any:
        ws = self.ws
        assert ws is not None
        try:
            data = ws.wait_event(name, timeout)
        except CallError as err:
            # A socket this user dropped itself (a storm, from another
            # greenlet) could not receive it: not the server's failure.
            if not (ws.closed and ws.close_reason == CLOSED_BY_CLIENT):
                self.report(name, (time.perf_counter() - since) * 1000.0, 0, err, "event")
            raise
        self.report(name, (time.perf_counter() - since) * 1000.0, 0, None, "event")
        return data

    def ensure_connected(self) -> None:
        """A socket the server closed (or the network lost) is reopened with
        the access token, as the app would on its next action."""
        if self.ws is None or self.ws.closed:
            with self.reconnecting:
                if self.ws is not None and not self.ws.closed:
                    return  # a storm's reopen got there first
                self._reopen_with_backoff()

    def _reopen_with_backoff(self) -> None:
        if time.monotonic() < self.retry_at:
            raise RuntimeError("reconnecting: waiting out the backoff")
        try:
            self.reopen()
        except Exception:
            self.retry_at = time.monotonic() + self.backoff.next()
            raise
        self.backoff.reset()

    def reopen(self) -> None:
        """A new socket, authenticated at the upgrade with the access token
        (refreshed first if it is about to expire), then every room resumed
        with since_seq."""
        if self.access_token and _expires_in(self.access_token) > 30:
            self.connect(self.access_token)
        else:
            self.connect()
            self.refresh()
        self.resume_rooms()

    def resume_events(self) -> None:
        """After a new socket: the user events missed while away, from the
        last seq seen (the app's badge and wallet catch up from these)."""
        if self.ws is None:
            return
        since = max(self.event_seq, self.ws.event_seq)
        for _page in range(20):  # 500 a page: far more than a locust user ever has
            got = self.call("events.resume", {"since_seq": since})
            if got["events"]:
                since = max(since, got["events"][-1]["seq"])
            if not got["has_more"]:
                break
        self.event_seq = since

    def storm_reconnect(self, started: float) -> None:
        """The socket drops with everyone else's; come back at once: a new
        socket with the access token, the missed user events, the rooms."""
        if self.ws is None:
            return
        err: Exception | None = None
        with self.reconnecting:
            self.event_seq = max(self.event_seq, self.ws.event_seq)
            self.ws.close()
            try:
                self.reopen()
                self.resume_events()
            except (CallError, OSError, RuntimeError, requests.RequestException) as exc:
                err = exc
        self.report("storm: back", (time.time() - started) * 1000.0, 0, err, "event")

    def refresh(self) -> None:
        tokens = self.call("auth.refresh", {"refresh_token": self.refresh_token})
        self.access_token, self.refresh_token = tokens["access_token"], tokens["refresh_token"]
        self.call("auth.authenticate", {"access_token": self.access_token})

    def handle_events(self) -> None:
        """What the app does with pushes between user actions."""
        if self.ws is None:
            return
        for name, data in self.ws.take_events():
            if name == "auth.expiring":
                self.refresh()
            elif name == "booking.created" and self.user.has("chat"):
                booking = data["booking"]
                if booking.get("conversation_id") and booking["host_id"] == self.user_id:
                    self.join(booking["conversation_id"])

    # chat rooms -------------------------------------------------------------------

    def join(self, conversation_id: str, since_seq: int | None = None) -> dict:
        if conversation_id not in self.last_seq and len(self.last_seq) >= MAX_JOINED_ROOMS:
            oldest = next(iter(self.last_seq))
            self.call("chat.leave", {"conversation_id": oldest})
            self.last_seq.pop(oldest, None)
            self.seen.pop(oldest, None)
            self.read_seq.pop(oldest, None)
        params: dict[str, Any] = {"conversation_id": conversation_id}
        if since_seq is not None:
            params["since_seq"] = since_seq
        self.last_seq.setdefault(conversation_id, since_seq or 0)
        joined = self.call("chat.join", params)
        seqs = [m["seq"] for m in joined["messages"]]
        start = since_seq if since_seq is not None else (seqs[0] - 1 if seqs else joined["last_seq"])
        self.seen.setdefault(conversation_id, SeqWindow(start)).take_all(seqs)
        if since_seq is not None and not joined["truncated"]:
            # Resuming must give every message after since_seq, without a gap.
            want = list(range(since_seq + 1, joined["last_seq"] + 1))
            resume_checks["ok" if seqs[: len(want)] == want else "gap"] += 1
            if seqs[: len(want)] != want:
                self.report("chat.join (resume without gap)", 0, 0,
                            AssertionError(f"since_seq={since_seq} last_seq={joined['last_seq']} got {seqs[:10]}..."))
        self.last_seq[conversation_id] = max([self.last_seq.get(conversation_id, 0), joined["last_seq"], *seqs])
        self.read_seq[conversation_id] = joined["conversation"].get("read_seq", 0)
        return joined

    def mark_read(self, conversation_id: str) -> None:
        """The room is on screen: everything received in it has been read."""
        seen = self.last_seq.get(conversation_id, 0)
        if self.user.has("read_positions") and seen > self.read_seq.get(conversation_id, 0):
            self.read_seq[conversation_id] = self.call("chat.read", {"conversation_id": conversation_id, "seq": seen})["read_seq"]

    def resume_rooms(self) -> None:
        for conv, seq in list(self.last_seq.items()):
            window = self.seen.get(conv)
            self.join(conv, since_seq=window.through if window is not None else seq)

    def send_message(self, conversation_id: str) -> None:
        cmid = str(uuid.uuid4())
        self.sent_at[cmid] = time.perf_counter()
        if len(self.sent_at) > 200:  # never delivered (socket dropped): forget
            self.sent_at.pop(next(iter(self.sent_at)))
        text = random.choice(("hi!", "see you then", "running 5 min late", "where exactly?", "great, thanks"))
        self.call("chat.send", {"conversation_id": conversation_id, "content": text, "client_msg_id": cmid})


def flow(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """A task: first what the app does between actions (reconnect a dropped
    socket, handle pushes), then the action. A failed call was reported to
    locust when its reply came; the flow just stops there, as the app would."""

    @functools.wraps(fn)
    def run(self: "HangoutUser") -> None:
        try:
            if not self.ready:
                self.setup()
                return
            self.s.ensure_connected()
            self.s.handle_events()
            fn(self)
        except (CallError, requests.RequestException, OSError, RuntimeError):
            pass

    return run


class HangoutUser(User):
    abstract = True
    kind = ""

    def on_start(self) -> None:
        self.ws_url = ws_url_for(self.host)
        self.http_url = http_url_for(self.host)
        self.http = requests.Session()
        self.pool = pool(self.environment, self.host)
        self.account: dict | None = None
        self.s: Session | None = None
        self.ready = False
        try:
            self.setup()
        except (CallError, requests.RequestException, OSError, RuntimeError):
            pass  # reported; the next task tries again

    def setup(self) -> None:
        """Open the app: a pooled account's stored session, or a new sign-up."""
        self.services = services(self.ws_url)
        if self.s is not None and self.s.ws is not None:
            self.s.ws.close()
        self.s = Session(self)
        user = None
        if self.account is None and random.random() >= SIGNUP_SHARE:
            self.account = self.pool.take(self.kind)
        if self.account is not None:
            user = self.s.sign_in(self.account)
            if user is None:  # the deployment lost it (e.g. a new dev stack)
                self.pool.gone.add(self.account["email"])
                self.account = None
                self.s.ws.close()  # type: ignore[union-attr]
                self.s = Session(self)
        if user is None:
            user = self.s.sign_up(f"{self.kind.title()} {random.randint(1, 9999)}",
                                  random.choice(("female", "male", "nonbinary")))
            self.s.verify_kyc()
            self.account = {"email": self.s.email, "user_id": self.s.user_id, "kind": self.kind,
                            "refresh_token": self.s.refresh_token}
        self.prepare(user)
        self.s.open_inbox()
        self.ready = True

    def prepare(self, user: dict) -> None:
        """What a kind of user needs before its tasks (a price, money)."""

    def on_stop(self) -> None:
        if self.s is not None:
            if self.s.ws is not None:
                self.s.ws.close()
            if self.account is not None and self.s.refresh_token:
                self.account["refresh_token"] = self.s.refresh_token
                self.pool.give_back(self.account)
        self.http.close()

    def has(self, service: str) -> bool:
        return self.services.get(service, False)


# Think time between a user's actions, scaled by LOADTEST_THINK (1 = a
# person's pace; the smoke test in tests/ runs at a tenth of it).
THINK = float(os.environ.get("LOADTEST_THINK", "1"))


class Host(HangoutUser):
    """Rents out time: sets a price, then mostly answers chats."""

    weight = 1
    wait_time = between(2 * THINK, 5 * THINK)
    kind = "host"

    def prepare(self, user: dict) -> None:
        if user.get("price_per_hour") is None:
            self.s.call("users.update", {"price_per_hour": f"{random.randint(10, 150)}.00"})

    @task(6)
    @flow
    def answer_chats(self) -> None:
        if not self.has("chat") or not self.s.last_seq:
            return
        conv = random.choice(list(self.s.last_seq))
        self.s.mark_read(conv)
        self.s.send_message(conv)

    @task(2)
    @flow
    def check_calendar(self) -> None:
        now = dt.datetime.now(UTC)
        self.s.call("hosts.availability", {"host_id": self.s.user_id, "from": now, "to": now + dt.timedelta(days=30)})

    @task(2)
    @flow
    def check_bookings(self) -> None:
        if self.has("bookings"):
            self.s.call("bookings.list", {"role": "host", "limit": 20})
        else:
            self.s.call("users.me")

    @task(1)
    @flow
    def read_history(self) -> None:
        if self.has("chat") and self.s.last_seq:
            self.s.call("chat.history", {"conversation_id": random.choice(list(self.s.last_seq)), "limit": 20})


class Booker(HangoutUser):
    """Books people's time, pays from the wallet, chats with them."""

    weight = 3
    wait_time = between(1 * THINK, 3 * THINK)
    kind = "booker"

    def prepare(self, user: dict) -> None:
        self.bookings: dict[str, dict] = {}  # confirmed bookings this user made in this run
        self.topup_keys: list[tuple[str, str]] = []
        if self.has("wallet") and float(user.get("balance") or 0) < 500:
            self.topup("1000.00")

    # wallet -------------------------------------------------------------------

    def topup(self, amount: str) -> None:
        key = str(uuid.uuid4())
        self.s.call("wallet.topup", {"amount": amount, "idempotency_key": key})
        self.topup_keys = (self.topup_keys + [(key, amount)])[-5:]

    @task(2)
    @flow
    def wallet(self) -> None:
        if not self.has("wallet"):
            return
        if self.topup_keys and random.random() < 0.2:
            # The app retries a top-up whose reply it lost: must not credit twice.
            key, amount = random.choice(self.topup_keys)
            if not self.s.call("wallet.topup", {"amount": amount, "idempotency_key": key})["replayed"]:
                self.s.report("wallet.topup (replay)", 0, 0, AssertionError("a replayed top-up credited again"))
        else:
            self.topup(random.choice(("50.00", "100.00", "250.00")))
        self.s.call("wallet.transactions", {"limit": 10})

    # search and look-ups ------------------------------------------------------------

    def search(self, with_range: bool) -> list[dict]:
        params: dict[str, Any] = {"limit": 20}
        if random.random() < 0.5:
            low = random.randint(1, 120)
            params["min_price"] = f"{low}.00"
            params["max_price"] = f"{low + random.randint(10, 60)}.00"
        if random.random() < 0.3:
            params["gender"] = random.choice(("female", "male", "nonbinary"))
        if with_range:
            params["start_at"], params["end_at"] = future_slot()
        return self.s.call("hosts.search", params)["hosts"]

    @task(10)
    @flow
    def browse(self) -> None:
        """Search, then open a few profiles at once (pipelined on one socket)."""
        hosts = self.search(with_range=random.random() < 0.4)
        assert self.s.ws is not None
        pending = [self.s.ws.send("users.get", {"user_id": h["id"]}) for h in random.sample(hosts, min(3, len(hosts)))]
        for p in pending:
            try:
                p.wait(30)
            except CallError:
                pass  # already reported as a failure

    # bookings --------------------------------------------------------------------------

    @task(4)
    @flow
    def book(self) -> None:
        if not self.has("bookings"):
            return
        start, end = future_slot()
        hosts = self.s.call("hosts.search", {"start_at": start, "end_at": end, "limit": 20,
                                             "min_price": f"{random.randint(1, 100)}.00"})["hosts"]
        if not hosts:
            return
        host = random.choice(hosts)
        t0 = time.perf_counter()
        try:
            result = self.s.call(
                "bookings.create",
                {"host_id": host["id"], "start_at": start, "end_at": end, "idempotency_key": str(uuid.uuid4())},
                expected=BUSINESS_ANSWERS,
            )
        except CallError as err:
            if err.code in BUSINESS_ANSWERS:
                if err.code == "insufficient_funds" and self.has("wallet"):
                    self.topup("500.00")
            return
        booking = result["booking"]
        self.bookings[booking["id"]] = booking
        if len(self.bookings) > 50:
            self.bookings.pop(next(iter(self.bookings)))
        self.s.wait_event("booking.created", t0)
        if self.has("chat") and booking.get("conversation_id"):
            self.s.join(booking["conversation_id"])
            self.s.send_message(booking["conversation_id"])

    @task(1)
    @flow
    def cancel(self) -> None:
        if not self.bookings:
            return
        booking_id = random.choice(list(self.bookings))
        self.s.call("bookings.cancel", {"booking_id": booking_id})
        self.bookings.pop(booking_id)

    @task(1)
    @flow
    def my_bookings(self) -> None:
        if self.has("bookings"):
            self.s.call("bookings.list", {"role": "booker", "limit": 20})
            if self.bookings:
                self.s.call("bookings.get", {"booking_id": random.choice(list(self.bookings))})

    # chat -----------------------------------------------------------------------------

    @task(6)
    @flow
    def chat(self) -> None:
        if not self.has("chat") or not self.s.last_seq:
            return
        conv = random.choice(list(self.s.last_seq))
        self.s.mark_read(conv)
        self.s.send_message(conv)
        if random.random() < 0.3:
            self.s.call("chat.history", {"conversation_id": conv, "limit": 20})
        if random.random() < 0.1:
            self.s.call("chat.conversations", {"limit": 20})

    # the device ---------------------------------------------------------------------

    @task(1)
    @flow
    def reconnect(self) -> None:
        """The phone loses its network: reconnect with the access token at the
        upgrade and resume every room with since_seq."""
        assert self.s.ws is not None
        with self.s.reconnecting:  # never beside a storm's reopen
            self.s.ws.close()
            self.s.reopen()
        self.s.call("users.me")

    @task(1)
    @flow
    def refresh_tokens(self) -> None:
        self.s.refresh()

    @task(1)
    @flow
    def sign_out_and_in(self) -> None:
        """Rare (argon2 is deliberately expensive): log out, log back in."""
        if random.random() < 0.3:
            self.s.call("auth.logout", {})
            self.s.adopt(self.s.call("auth.login", {"email": self.s.email, "password": PASSWORD}))
            self.s.resume_rooms()  # logging out left every room
        else:
            self.s.call("users.me")


# ---- load shapes (loadtests/shapes.py) ---------------------------------------------

# The one shape class locust finds here, when LOADTEST_SHAPE names one.
Shape = shapes.chosen(os.environ.get("LOADTEST_SHAPE", ""))
if Shape is None:
    del Shape


def _storm_reconnect(user: HangoutUser, started: float) -> None:
    if user.ready and user.s is not None:
        user.s.storm_reconnect(started)


@events.init.add_listener
def _listen_for_storms(environment: Any, **_kw: Any) -> None:
    # The master only sends the storm; the processes running users act on it.
    from locust.runners import MasterRunner

    if environment.runner is not None and not isinstance(environment.runner, MasterRunner):
        environment.runner.register_message(shapes.STORM_MESSAGE, shapes.storm_listener(_storm_reconnect))
