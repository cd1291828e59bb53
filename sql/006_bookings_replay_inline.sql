-- booking_replay is a plain SELECT: declared STABLE, the planner inlines it
-- into booking_create's own (cached) statement. As VOLATILE, the default, it
-- was planned again on every call, which was a third of booking_create's
-- database time (loadtests/bench_bookings.py).
ALTER FUNCTION booking_replay(text, uuid, bytea) STABLE;
