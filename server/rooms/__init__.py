"""Live fan-out between server processes (see hub.Hub)."""

from server.rooms.follower import Follower
from server.rooms.hub import Hub
from server.rooms.repair import Backfill

__all__ = ["Backfill", "Follower", "Hub"]
