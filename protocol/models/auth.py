"""auth.* methods and the auth.expiring event."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from protocol.methods import MethodSpec
from protocol.models.common import Params, Result, Time, has_control
from protocol.models.users import Gender, Name, OwnUser

# Deliberately plain: one @, a dot in the domain, no spaces. Deliverability is
# proven by the KYC flow, not by a regex.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalize_email(value: str) -> str:
    return value.strip().lower()


class _EmailParams(Params):
    email: Annotated[str, Field(max_length=320)]

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = normalize_email(v)
        if len(v) > 255 or not _EMAIL.match(v) or has_control(v):
            raise ValueError("not a valid email address")
        return v


class RegisterParams(_EmailParams):
    password: Annotated[str, Field(min_length=8, max_length=256)]
    name: Name
    gender: Gender


class LoginParams(Params):
    email: Annotated[str, Field(max_length=320)]
    password: Annotated[str, Field(max_length=256)]

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        return normalize_email(v)


class SessionResult(Result):
    user: OwnUser
    access_token: str
    refresh_token: str


# Tokens have no length rule of their own: any string that is not a valid
# token is unauthenticated (access) or invalid_credentials (refresh), as the
# contract says, and the frame size bounds the work.
class AuthenticateParams(Params):
    access_token: str


class AuthenticateResult(Result):
    user: OwnUser


class RefreshParams(Params):
    refresh_token: str


class RefreshResult(Result):
    access_token: str
    refresh_token: str


class LogoutParams(Params):
    pass


class ExpiringEvent(Result):
    expires_at: Time


METHODS = (
    MethodSpec("auth.register", RegisterParams, SessionResult, auth=False),
    MethodSpec("auth.login", LoginParams, SessionResult, auth=False),
    MethodSpec("auth.authenticate", AuthenticateParams, AuthenticateResult, auth=False),
    MethodSpec("auth.refresh", RefreshParams, RefreshResult, auth=False),
    MethodSpec("auth.logout", LogoutParams, dict),
)
EVENTS = {"auth.expiring": ExpiringEvent}
