"""Errors of the database layer.

The layer speaks of the database, not of the wire: the dispatcher decides
what a client is told (``DatabaseUnavailable`` becomes ``unavailable``).
"""

from __future__ import annotations


class DatabaseError(Exception):
    """Base of the errors the database layer raises itself."""


class DatabaseUnavailable(DatabaseError):
    """No connection could be had, or the database did not answer in time.
    Nothing of the operation is known to have committed unless it says so;
    the call may be retried."""
