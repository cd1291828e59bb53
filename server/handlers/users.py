"""users.* and hosts.*."""

from __future__ import annotations

from protocol.errors import ErrorCode, RpcError
from protocol.models import users as m
from server import events
from server import cursors
from server.db import users as users_db
from server.rpc import Call, rpc
from server.services import Services


@rpc("users.me")
async def me(call: Call, p: m.MeParams) -> m.OwnUser:
    row = await call.services.db.read(call.user_id, users_db.get_own, call.user_id)
    if row is None:
        raise RpcError(ErrorCode.NOT_FOUND)
    return m.OwnUser.model_validate(dict(row))


@rpc("users.update")
async def update(call: Call, p: m.UpdateParams) -> m.OwnUser:
    changes = {f: getattr(p, f) for f in p.model_fields_set}
    try:
        row = await call.services.db.write(call.user_id, users_db.update_profile, call.user_id, changes)
    except PermissionError:
        raise RpcError(ErrorCode.KYC_REQUIRED, "set a price after identity verification") from None
    if row is None:
        raise RpcError(ErrorCode.NOT_FOUND)
    user = m.OwnUser.model_validate(dict(row))
    if changes:
        await publish_user_updated(call.services, user)
    return user


@rpc("users.get")
async def get(call: Call, p: m.GetParams) -> m.PublicUser:
    # Only the user's own writes change their profile, so read-your-writes
    # needs the caller's write position only when they look at themselves.
    reader = call.user_id if p.user_id == call.user_id else None
    # Concurrent look-ups share one query; an id the replica lacks is asked of
    # the primary only if the replica may be behind (see Database.read_one).
    row = await call.services.db.read_one(reader, users_db.get_public_many, p.user_id, checked_miss=True)
    if row is None:
        raise RpcError(ErrorCode.NOT_FOUND)
    return m.PublicUser.model_validate(dict(row))


@rpc("hosts.search")
async def search(call: Call, p: m.SearchParams) -> m.SearchResult:
    after = cursors.after(call.services.config, "hosts.search", p)
    rows = await call.services.db.read(
        call.user_id, users_db.search_hosts, call.user_id, p.start_at, p.end_at,
        p.min_price, p.max_price, p.gender, after, p.limit + 1,
    )
    hosts = [m.PublicUser.model_validate(dict(r)) for r in rows[: p.limit]]
    next_cursor = (cursors.make(call.services.config, "hosts.search", p, hosts[-1].price_per_hour, hosts[-1].id)
                   if len(rows) > p.limit else None)
    return m.SearchResult(hosts=hosts, next_cursor=next_cursor)


@rpc("hosts.availability")
async def availability(call: Call, p: m.AvailabilityParams) -> m.AvailabilityResult:
    rows = await call.services.db.read(call.user_id, users_db.busy_intervals, p.host_id, p.from_, p.to,
                                       checked_miss=True)
    if rows is None:
        raise RpcError(ErrorCode.NOT_FOUND)
    return m.AvailabilityResult(busy=[m.BusyInterval.model_validate(dict(r)) for r in rows])


# ---- shared with the KYC status changes (server/kyc.py) -------------------


async def publish_user_updated(services: Services, user: m.OwnUser) -> None:
    """``user`` as the change stored it: its ``event_seq`` is the event's seq."""
    await events.to_users_numbered(services, [(user.id, user.event_seq, "user.updated", m.UserUpdatedEvent(user=user))])
