"""protocol/: the frame codec, the value types every model uses, and errors.
Pure unit tests: no server, no database."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import msgpack
import pytest
from pydantic import ValidationError

from protocol.codec import DecodeError, decode, encode
from protocol.errors import ErrorCode, RpcError
from protocol.models.common import Id, Limit, Money, Params, Result, Time, WholeHour

UTC = dt.timezone.utc


# ---- codec -----------------------------------------------------------------


def test_a_frame_round_trips():
    frame = {"id": 2**64 - 1, "method": "m", "params": {"a": [1, -2, None, True, 1.5, "é", b"\x00\xff"], "b": {}}}
    assert decode(encode(frame)) == frame


def test_times_travel_as_the_timestamp_extension_in_utc():
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    data = encode({"at": when})
    raw = msgpack.unpackb(data, timestamp=0, ext_hook=lambda code, body: ("ext", code))
    assert isinstance(raw["at"], msgpack.Timestamp)  # type -1, not a string
    back = decode(data)["at"]
    assert back == when  # the same instant, to the microsecond
    assert back.utcoffset() == dt.timedelta(0)


def test_a_naive_time_is_encoded_as_utc():
    assert decode(encode(dt.datetime(2030, 1, 1, 12))) == dt.datetime(2030, 1, 1, 12, tzinfo=UTC)


def test_money_is_a_decimal_string_with_two_places():
    assert decode(encode({"m": Decimal("25")})) == {"m": "25.00"}
    assert decode(encode(Decimal("0.5"))) == "0.50"
    assert decode(encode(Decimal("-10.25"))) == "-10.25"


def test_ids_are_canonical_lowercase_uuid_strings():
    u = uuid.UUID("8C6D3B1E-0F2A-4E5B-9C7D-112233445566")
    assert decode(encode(u)) == "8c6d3b1e-0f2a-4e5b-9c7d-112233445566"


def test_an_unknown_type_is_not_encoded():
    with pytest.raises(TypeError):
        encode({"x": object()})


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", encode({"a": 1})[:-1], encode({"a": 1}) + b"\x00", encode(1) + encode(2), b"\xd9\x05ab"],
    ids=["empty", "never-used-byte", "truncated", "trailing-byte", "two-values", "short-string"],
)
def test_anything_but_exactly_one_value_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        decode(data)


def test_a_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize(
    "ts",
    [msgpack.Timestamp(2**62, 0), msgpack.Timestamp(-(2**62), 0), msgpack.Timestamp(253402300800, 0),
     msgpack.Timestamp(-62135596801, 0), msgpack.Timestamp(0, 1), msgpack.Timestamp(3600, 999)],
    ids=repr,
)
def test_a_timestamp_no_datetime_holds_exactly_is_left_for_the_models(ts):
    # Still a request frame: the params models name the field (invalid_params).
    assert decode(msgpack.packb({"at": [ts], "t": ts})) == {"at": [ts], "t": ts}
    assert decode(msgpack.packb(ts)) == ts


def test_a_timestamp_at_the_ends_of_datetime_range_decodes_as_a_datetime():
    first, last = msgpack.Timestamp(-62135596800, 0), msgpack.Timestamp(253402300799, 999_999_000)
    assert decode(msgpack.packb([first, {"t": last}])) == [
        dt.datetime(1, 1, 1, tzinfo=UTC), {"t": dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)}
    ]


def test_maps_may_have_non_string_keys():
    assert decode(encode({1: "a", None: "b"})) == {1: "a", None: "b"}


# ---- value types -------------------------------------------------------------


class Sample(Params):
    user_id: Id | None = None
    amount: Money | None = None
    at: Time | None = None
    limit: Limit = 20
    name: str | None = None


class SampleResult(Result):
    amount: Money
    user_id: Id


def errors_of(**params) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        Sample.model_validate(params)
    return [".".join(map(str, e["loc"])) for e in exc.value.errors()]


@pytest.mark.parametrize(
    "given, amount",
    [("25", "25.00"), ("25.5", "25.50"), ("025.50", "25.50"), (25, "25.00"), ("0.01", "0.01"), ("10000.00", "10000.00")],
)
def test_money_accepts_strings_and_integers(given, amount):
    assert Sample.model_validate({"amount": given}).amount == Decimal(amount)


@pytest.mark.parametrize(
    "given",
    [25.0, 0.1, True, False, "1.001", "abc", "", "NaN", "Infinity", "-Infinity", [], {}, "1" * 40,
     # Only ASCII digits with at most two places: no sign, exponent,
     # underscore, whitespace (a trailing newline included) or other digits.
     "1e2", "１２", "1_0", " 5", "5 ", "5.", ".5", "5\n", "+5", "-5", "5.0\n", "\u0665", "0x10", "5,00"],
    ids=repr,
)
def test_money_refuses_floats_more_than_two_places_and_garbage(given):
    assert errors_of(amount=given) == ["amount"]


def test_money_dumps_with_exactly_two_places():
    result = SampleResult(amount=Decimal("7"), user_id=uuid.uuid4())
    assert result.model_dump(mode="python")["amount"] == "7.00"


def test_ids_accept_uuid_strings_and_dump_canonical_lowercase():
    raw = "8C6D3B1E-0F2A-4E5B-9C7D-112233445566"
    assert Sample.model_validate({"user_id": raw}).user_id == uuid.UUID(raw)
    dumped = SampleResult(amount=Decimal(1), user_id=raw).model_dump(mode="python")["user_id"]
    assert dumped == raw.lower()


@pytest.mark.parametrize("given", ["nope", "", "8c6d3b1e-0f2a-4e5b-9c7d", 12, b"\x00" * 16, 1.5], ids=repr)
def test_ids_refuse_anything_but_a_uuid(given):
    assert errors_of(user_id=given) == ["user_id"]


@pytest.mark.parametrize(
    "given",
    [
        "2030-01-02T03:04:05Z",
        "2030-01-02T03:04:05z",
        "2030-01-02T05:04:05+02:00",
        "2030-01-02T03:04:05.000+00:00",
        dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    ],
)
def test_times_accept_timestamps_and_rfc3339_with_offset(given):
    at = Sample.model_validate({"at": given}).at
    assert at == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "given",
    ["2030-01-02T03:04:05", "2030-01-02", "tomorrow", "", 1893553445, 1893553445.0, dt.datetime(2030, 1, 2)],
    ids=repr,
)
def test_times_refuse_a_missing_offset_and_other_types(given):
    assert errors_of(at=given) == ["at"]


@pytest.mark.parametrize(
    "given",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-14:00", "0001-01-01T00:00:00+00:00:01",
     dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),
     msgpack.Timestamp(2**62, 0), msgpack.Timestamp(-62135596801, 0), msgpack.Timestamp(253402300800, 0)],
    ids=repr,
)
def test_times_that_utc_cannot_hold_are_a_field_error(given):
    # OverflowError from astimezone is no validation error: it was `internal`.
    assert errors_of(at=given) == ["at"]


@pytest.mark.parametrize(
    "given",
    [msgpack.Timestamp(1893553445, 999), "2030-01-02T03:04:05.000000999Z", "2030-01-02T03:04:05.0000009999+00:00"],
    ids=repr,
)
def test_times_below_the_microsecond_are_rounded_down(given):
    assert Sample.model_validate({"at": given}).at == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Hours(Params):
    at: WholeHour


@pytest.mark.parametrize(
    "given",
    [msgpack.Timestamp(1893553200, 1), msgpack.Timestamp(1893553200, 999), "2030-01-02T03:00:00.000000001Z",
     "2030-01-02T03:00:00.0000000000001Z", "2030-01-02T03:00:00.000001Z", "2030-01-02T03:00:01Z", "2030-01-02T04:00:00+00:30"],
    ids=repr,
)
def test_a_whole_hour_refuses_any_remainder_even_below_the_microsecond(given):
    with pytest.raises(ValidationError) as exc:
        Hours.model_validate({"at": given})
    assert [e["loc"] for e in exc.value.errors()] == [("at",)]


@pytest.mark.parametrize(
    "given", [msgpack.Timestamp(1893553200, 0), "2030-01-02T03:00:00.000000000Z", "2030-01-02T05:00:00+02:00"], ids=repr
)
def test_a_whole_hour_is_accepted_in_every_form(given):
    assert Hours.model_validate({"at": given}).at == dt.datetime(2030, 1, 2, 3, tzinfo=UTC)


@pytest.mark.parametrize("given", [0, 101, -1, "5", 5.0, True], ids=repr)
def test_limit_is_an_integer_from_1_to_100(given):
    assert errors_of(limit=given) == ["limit"]


def test_limit_bounds_are_accepted():
    assert Sample.model_validate({"limit": 1}).limit == 1
    assert Sample.model_validate({"limit": 100}).limit == 100


def test_params_ignore_unknown_keys_and_do_not_coerce_types():
    assert Sample.model_validate({"unknown": [1, 2], "name": "x"}).name == "x"
    assert errors_of(name=5) == ["name"]


def test_every_failing_field_is_named():
    assert sorted(errors_of(amount=1.5, user_id="x", at="y", limit=0)) == ["amount", "at", "limit", "user_id"]


# ---- errors ------------------------------------------------------------------


def test_an_error_round_trips_through_the_wire_form():
    err = RpcError(ErrorCode.RATE_LIMITED, data={"retry_after": 12})
    wire = err.to_wire()
    assert wire == {"code": "rate_limited", "message": "too many attempts", "data": {"retry_after": 12}}
    back = RpcError.from_wire(decode(encode(wire)))
    assert (back.code, back.message, back.data) == (err.code, err.message, err.data)


def test_an_error_without_data_has_no_data_key():
    assert RpcError(ErrorCode.NOT_FOUND).to_wire() == {"code": "not_found", "message": "not found"}


def test_every_error_code_of_the_contract_exists_with_a_default_message():
    codes = {
        "bad_frame", "unknown_method", "invalid_params", "unauthenticated", "token_expired",
        "invalid_credentials", "email_taken", "forbidden", "kyc_required", "not_found",
        "host_not_bookable", "slot_unavailable", "insufficient_funds", "invalid_state",
        "idempotency_conflict", "rate_limited", "too_many_requests", "unavailable", "internal",
    }
    assert {c.value for c in ErrorCode} == codes
    for code in codes:
        assert RpcError(code).message
