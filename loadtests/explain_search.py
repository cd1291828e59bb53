"""EXPLAIN proof that hosts.search walks its indexes at scale.

    python -m loadtests.explain_search [--database-url URL] [--users 100000] [--bookings 200000]

Makes a scratch database (``hangout_explain`` on the same server as
``--database-url``, the dev stack by default), applies the migrations,
fills it once with ``--users`` users (30% bookable hosts, three genders) and
``--bookings`` bookings (70% active, with their booking_busy rows), then
EXPLAIN ANALYZEs every form of the search exactly as the server builds it
(``server.db.users.search_hosts_query``): once planned for its parameters
(what the first executions of a prepared statement get) and once as the
generic plan (what a prepared statement may switch to after five runs).

A plan passes when users is read through ``idx_users_bookable_price_id``
(the partial index that holds exactly the bookable hosts, in (price, id)
order, so the LIMIT stops the walk early), and, with a time range,
booking_busy is probed through the GiST index of its exclusion constraint
(``ex_booking_busy_no_overlap``, on (user_id, during)); neither table may be
read by a sequential scan. Exits 1 if any plan fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg

from server.db.migrate import SQL_DIR, migrate
from server.db.users import search_hosts_query

USERS_INDEX = "idx_users_bookable_price_id"
BUSY_INDEX = "ex_booking_busy_no_overlap"
# Bookings are laid out one hour each over this many hours (90 days ahead),
# with distinct people in each hour, so none overlap.
HOURS = 90 * 24
BASE = dt.datetime(2031, 1, 6, tzinfo=dt.timezone.utc)  # far from any test's dates


@dataclass
class Case:
    name: str
    generic: bool
    plan: str = ""
    execution_ms: float = 0.0
    problems: list[str] = field(default_factory=list)


def with_database(url: str, database: str) -> str:
    return urlunparse(urlparse(url)._replace(path="/" + database))


async def _behind(scratch: str) -> bool:
    """The scratch database lacks a migration. Its tables are unlogged, and a
    later migration may not apply to them (a logged table cannot reference an
    unlogged one), so such a database is made again from nothing."""
    conn = await asyncpg.connect(scratch)
    try:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    return any(path.stem not in applied for path in SQL_DIR.glob("*.sql"))


async def ensure_database(url: str, database: str) -> str:
    scratch = with_database(url, database)
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists and await _behind(scratch):
            await conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            exists = False
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    await migrate(scratch)
    return scratch


async def unlogged(conn: asyncpg.Connection) -> None:
    """Make every table of the scratch database unlogged: its hundreds of
    megabytes then never reach the WAL, so the replicas of the server (the
    dev stack's, shared with the tests) do not fall behind replaying them.
    Plans are the same for unlogged tables."""
    pending = [r["relname"] for r in await conn.fetch(
        """SELECT relname FROM pg_class WHERE relkind = 'r' AND relpersistence = 'p'
           AND relnamespace = 'public'::regnamespace""")]
    while pending:
        left = []
        for table in pending:
            try:  # a table referenced by a still-logged one has to wait its turn
                await conn.execute(f'ALTER TABLE "{table}" SET UNLOGGED')
            except asyncpg.exceptions.InvalidTableDefinitionError:
                left.append(table)
        if len(left) == len(pending):
            raise RuntimeError(f"cannot make these tables unlogged: {left}")
        pending = left


async def fill(conn: asyncpg.Connection, users: int, bookings: int) -> None:
    """Fill once; a later run with the same sizes reuses the data."""
    have = await conn.fetchval("SELECT count(*) FROM users WHERE email LIKE 'explain-%'")
    if have == users and await conn.fetchval("SELECT count(*) FROM bookings") == bookings:
        return
    print(f"filling: {users:,} users, {bookings:,} bookings ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    await unlogged(conn)
    async with conn.transaction():
        await conn.execute("TRUNCATE users, bookings, booking_busy, payments, transactions, conversations, topups CASCADE")
        # Foreign-key triggers would double the fill time; the rows below are
        # consistent by construction (and the exclusion constraint still holds).
        await conn.execute("SET LOCAL session_replication_role = replica")
        # 30% bookable hosts, 30% verified without a price, 40% pending.
        await conn.execute(
            """INSERT INTO users (email, password_hash, name, gender, kyc_status, price_per_hour)
               SELECT 'explain-' || i || '@example.test', 'x', 'User ' || i,
                      (ARRAY['female', 'male', 'nonbinary'])[1 + i % 3],
                      CASE WHEN i % 10 < 6 THEN 'verified' ELSE 'pending' END,
                      CASE WHEN i % 10 < 3 THEN round((1 + random() * 499)::numeric, 2) END
               FROM generate_series(1, $1) AS i""",
            users,
        )
        await conn.execute(
            """CREATE TEMP TABLE hosts_n ON COMMIT DROP AS
               SELECT (row_number() OVER (ORDER BY id) - 1)::int AS n, id FROM users WHERE price_per_hour IS NOT NULL"""
        )
        await conn.execute(
            """CREATE TEMP TABLE bookers_n ON COMMIT DROP AS
               SELECT (row_number() OVER (ORDER BY id) - 1)::int AS n, id FROM users WHERE price_per_hour IS NULL"""
        )
        hosts = await conn.fetchval("SELECT count(*) FROM hosts_n")
        bookers = await conn.fetchval("SELECT count(*) FROM bookers_n")
        per_hour = -(-bookings // HOURS)
        if per_hour > min(hosts, bookers):
            raise SystemExit("too many bookings for the users: raise --users")
        # Booking i takes hour i % HOURS; within an hour its host and booker
        # are distinct from every other booking's, so nothing overlaps.
        await conn.execute(
            """INSERT INTO bookings (user_id, host_id, start_at, end_at, idempotency_key, status, amount, request_hash)
               SELECT k.id, h.id, $2::timestamptz + s.hour * interval '1 hour', $2::timestamptz + (s.hour + 1) * interval '1 hour',
                      'explain-' || s.i,
                      CASE WHEN s.j % 10 < 7 THEN 'confirmed' WHEN s.j % 10 < 9 THEN 'cancelled' ELSE 'failed' END,
                      10, '\\x00'
               FROM (SELECT i, i % $3 AS hour, i / $3 AS j FROM generate_series(0, $1 - 1) AS i) s
               JOIN hosts_n h ON h.n = (s.hour * 101 + s.j) % $4
               JOIN bookers_n k ON k.n = (s.hour * 211 + s.j) % $5""",
            bookings, BASE, HOURS, hosts, bookers,
        )
        await conn.execute(
            """INSERT INTO booking_busy (booking_id, user_id, role, during)
               SELECT b.id, p.uid, p.role, tstzrange(b.start_at, b.end_at, '[)')
               FROM bookings b, LATERAL (VALUES (b.user_id, 'booker'), (b.host_id, 'host')) AS p(uid, role)
               WHERE b.status = 'confirmed'"""
        )
    await conn.execute("ANALYZE")
    print(f"filled in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", []):
        out.extend(_walk(child))
    return out


def check(plan: dict[str, Any], with_range: bool) -> list[str]:
    nodes = _walk(plan["Plan"])
    problems = []
    for n in nodes:
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in ("users", "booking_busy"):
            problems.append(f"sequential scan of {n['Relation Name']}")
    used = {n.get("Index Name") for n in nodes}
    if USERS_INDEX not in used:
        problems.append(f"users not read through {USERS_INDEX}")
    if with_range:
        # A probe per host (user_id = u.id AND during && range), not one pass
        # over every busy row of the range.
        probes = [n for n in nodes if n.get("Index Name") == BUSY_INDEX and "user_id = u.id" in n.get("Index Cond", "")]
        if not probes:
            problems.append(f"booking_busy not probed per host through {BUSY_INDEX}")
    return problems


def _literal(value: Any) -> str:
    """A typed SQL literal for EXECUTE (values here are ours, never user input)."""
    if value is None:
        return "NULL"
    if isinstance(value, uuid.UUID):
        return f"'{value}'::uuid"
    if isinstance(value, dt.datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, (int, Decimal)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def explain(conn: asyncpg.Connection, name: str, sql: str, args: list[Any], generic: bool) -> Case:
    case = Case(name, generic)
    with_range = "booking_busy" in sql
    if not generic:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
        text = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
    else:
        # The generic plan: planned without knowing the parameters.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE q AS {sql}")
        try:
            execute = f"EXECUTE q({', '.join(_literal(a) for a in args)})"
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {execute}")
            text = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {execute}")
        finally:
            await conn.execute("DEALLOCATE q")
            await conn.execute("RESET plan_cache_mode")
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
    case.plan = "\n".join(r[0] for r in text)
    case.execution_ms = plan["Execution Time"]
    case.problems = check(plan, with_range)
    return case


async def cases(conn: asyncpg.Connection) -> list[tuple[str, str, list[Any]]]:
    caller = await conn.fetchval("SELECT id FROM users WHERE price_per_hour IS NULL LIMIT 1")
    mid = await conn.fetchrow(
        "SELECT price_per_hour, id FROM users WHERE price_per_hour IS NOT NULL AND kyc_status = 'verified' "
        "ORDER BY price_per_hour, id OFFSET 5000 LIMIT 1"
    )
    busy_hour = BASE + dt.timedelta(hours=37)
    week = (BASE + dt.timedelta(days=3), BASE + dt.timedelta(days=3, hours=8))
    forms = {
        "first page, no filters": dict(),
        "gender": dict(gender="male"),
        "price bounds": dict(min_price=Decimal("100.00"), max_price=Decimal("120.00")),
        "narrow price bounds + gender": dict(min_price=Decimal("250.00"), max_price=Decimal("251.00"), gender="female"),
        "keyset page": dict(after=(mid["price_per_hour"], mid["id"])),
        "free for one busy hour": dict(start_at=busy_hour, end_at=busy_hour + dt.timedelta(hours=1)),
        "free for 8 hours + gender + price": dict(
            start_at=week[0], end_at=week[1], gender="nonbinary", min_price=Decimal("50.00"), max_price=Decimal("300.00")
        ),
        "free for one hour, keyset page": dict(
            start_at=busy_hour, end_at=busy_hour + dt.timedelta(hours=1), after=(mid["price_per_hour"], mid["id"])
        ),
    }
    out = []
    for name, f in forms.items():
        sql, args = search_hosts_query(
            caller, f.get("start_at"), f.get("end_at"), f.get("min_price"), f.get("max_price"),
            f.get("gender"), f.get("after"), 21,
        )
        out.append((name, sql, args))
    return out


async def run(database_url: str, users: int = 100_000, bookings: int = 200_000,
              database: str = "hangout_explain") -> list[Case]:
    scratch = await ensure_database(database_url, database)
    conn = await asyncpg.connect(scratch)
    try:
        await fill(conn, users, bookings)
        report = []
        for name, sql, args in await cases(conn):
            for generic in (False, True):
                report.append(await explain(conn, name, sql, args, generic))
        return report
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.explain_search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", help="any database on the server to use [the dev stack]")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--bookings", type=int, default=200_000)
    ap.add_argument("--plans", action="store_true", help="print every plan, not only failing ones")
    args = ap.parse_args(argv)
    url = args.database_url
    if url is None:
        from server import devstack

        stack = devstack.from_env()
        stack.start()
        url = stack.database_url
    report = asyncio.run(run(url, args.users, args.bookings))
    failed = False
    for case in report:
        kind = "generic" if case.generic else "custom "
        verdict = "FAIL " + "; ".join(case.problems) if case.problems else "ok"
        print(f"{case.name:<36} {kind} {case.execution_ms:8.3f} ms  {verdict}")
        if case.problems or args.plans:
            print("    " + case.plan.replace("\n", "\n    "))
        failed = failed or bool(case.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
