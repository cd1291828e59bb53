"""One module per service; importing them registers their methods."""

from server.handlers import auth, users  # noqa: F401
