"""Live fan-out between server processes (see hub.Hub)."""

from server.rooms.follower import Follower
from server.rooms.hub import Hub

__all__ = ["Follower", "Hub"]
