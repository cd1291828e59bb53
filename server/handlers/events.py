"""events.resume: a user's durable events after a seq."""

from __future__ import annotations

from protocol.models import events as m
from server import events
from server.db import events as events_db
from server.rpc import Call, rpc


@rpc("events.resume")
async def resume(call: Call, p: m.ResumeParams) -> m.ResumeResult:
    # The socket follows its user's channel since it authenticated: whatever
    # commits after this read arrives live. Read from the primary, so that
    # no event committed before the read is missing from it. Resumes at the
    # same moment (a reconnect storm) share one statement.
    rows, last_seq = await call.services.db.read_one_primary(
        events_db.since_many, (call.user_id, p.since_seq, m.RESUME_MAX + 1))
    if p.since_seq > last_seq:
        return m.ResumeResult(events=[], last_seq=last_seq, has_more=False, truncated=True)
    page = rows[: m.RESUME_MAX]
    return m.ResumeResult(
        events=[m.StoredEvent(event=r["event"], seq=r["seq"],
                              data=events.stored_payload(r["event"], r["data"], r["seq"]).model_dump(mode="python"))
                for r in page],
        last_seq=last_seq,
        has_more=len(rows) > m.RESUME_MAX,
        # Retention deletes a user's oldest events first: a first seq past
        # since_seq + 1 means the ones between are gone.
        truncated=last_seq > p.since_seq and (not page or page[0]["seq"] != p.since_seq + 1),
    )
