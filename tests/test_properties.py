"""Property-based tests of the pure functions: payload encoding, redaction, header helpers and
the spool's record format, on data hypothesis makes up (modest example counts: seconds)."""

from __future__ import annotations

import copy
import datetime as dt
import pickle
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import serialization

from otel_celery_publish import headers as hdr
from otel_celery_publish import redaction, rows
from otel_celery_publish.sink.records import HEADER, Decoded, check_row, decode, encode, load_row

# No example database: the tests leave nothing behind in the work tree.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KEYS = frozenset({"password", "token", "api_key"})

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from(
    ["password", "Password", "db_PASSWORD", "my_token", "X-Api-Key", "user", "id", "n", "tok", ""]
) | st.text(max_size=8)
anything = st.recursive(
    json_scalars
    | st.binary(max_size=8)
    | st.builds(object)
    | st.complex_numbers()
    | st.frozensets(st.integers(), max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(names | st.integers(), inner, max_size=4)
    ),
    max_leaves=30,
)


# -- payload encoding ----------------------------------------------------------------------


@PROPERTY
@given(
    args=st.lists(json_values, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_encode_payload_round_trips_json_bodies(args: list[Any], kwargs: dict[str, Any]) -> None:
    """encode_payload() then kombu's loads() gives the body back for any JSON-able body."""
    body = [args, kwargs, {}]
    data, content_type, encoding, error = rows.encode_payload(body, "json", 1 << 30)
    assert error is None
    assert data is not None
    assert serialization.loads(data, content_type, encoding) == body  # type: ignore[no-untyped-call]
    small = rows.encode_payload(body, "json", len(data) - 1)
    assert small[0] is None
    assert small[3] is not None
    assert "exceeds max_payload_bytes" in small[3]


# -- redaction -----------------------------------------------------------------------------


def _assert_redacted(before: Any, after: Any, depth: int = 0) -> None:
    """``after`` is ``before`` with every value under a sensitive key masked, containers
    beyond the depth limit masked whole, and everything else the same object."""
    container = isinstance(before, (Mapping, list, tuple))
    if container and depth > redaction._MAX_DEPTH:
        assert after == redaction.REDACTED
    elif isinstance(before, Mapping):
        assert list(after) == list(before)
        for key, value in before.items():
            if isinstance(key, str) and redaction.is_sensitive(key, KEYS):
                assert after[key] == redaction.REDACTED
            else:
                _assert_redacted(value, after[key], depth + 1)
    elif isinstance(before, (list, tuple)):
        assert isinstance(after, (list, tuple))
        assert len(after) == len(before)
        for old, new in zip(before, after, strict=True):
            _assert_redacted(old, new, depth + 1)
    else:
        assert after is before


@PROPERTY
@given(value=anything)
def test_redact_masks_exactly_the_sensitive_values(value: Any) -> None:
    """redact() never raises; it masks every value under a sensitive key within the depth
    limit and leaves the rest unchanged, returning the very input when nothing matched."""
    snapshot = repr(value)
    out, hit = redaction.redact(value, KEYS)
    _assert_redacted(value, out)
    assert repr(value) == snapshot, "the input is not modified"
    if not hit:
        assert out is value


@PROPERTY
@given(
    depth=st.integers(min_value=0, max_value=20),
    wrappers=st.lists(st.sampled_from(["list", "tuple", "dict"]), min_size=20, max_size=20),
)
def test_no_secret_survives_at_any_depth(depth: int, wrappers: list[str]) -> None:
    """A secret under a sensitive key is gone from the copy however deep it is nested: masked
    by its key within the limit, or with its whole container beyond it."""
    value: Any = {"user": "bob", "Password": "s3cr3t-value"}
    for kind in wrappers[:depth]:
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
    out, hit = redaction.redact(value, KEYS)
    assert hit
    assert "s3cr3t-value" not in repr(out)


@PROPERTY
@given(headers=st.dictionaries(names, anything, max_size=6))
def test_custom_headers_mask_what_redact_masks(headers: dict[str, Any]) -> None:
    """custom_headers() never raises; it masks sensitive header names like redact() masks
    keys, and says so exactly when something was masked."""
    stored, hit = rows.custom_headers(headers, (), KEYS)
    plain = {k: rows.storable(v) for k, v in headers.items() if k not in rows.CELERY_HEADERS}
    expected, expected_hit = redaction.redact(plain, KEYS)
    assert (stored, hit) == (expected, expected_hit)


# -- header helpers ------------------------------------------------------------------------

header_names = st.text(min_size=1, max_size=12).filter(lambda name: name != "headers")


@PROPERTY
@given(
    top=st.dictionaries(header_names, json_values, max_size=5),
    nested=st.none() | st.dictionaries(header_names, json_values, max_size=5) | json_scalars,
    ours=st.dictionaries(header_names, st.text(max_size=12), max_size=4),
)
def test_stamp_writes_both_levels_and_leaves_the_callers_dict(
    top: dict[str, Any], nested: Any, ours: dict[str, str]
) -> None:
    """stamp() puts ours at the top level and in a new nested dict that keeps the caller's other
    entries, without touching the caller's nested dict."""
    headers: dict[str, Any] = {**top, "headers": nested}
    nested_before = copy.deepcopy(nested)
    hdr.stamp(headers, ours)
    assert nested == nested_before
    assert headers["headers"] is not nested
    for key, value in ours.items():
        assert headers[key] == value
        assert headers["headers"][key] == value
    for key, value in top.items():
        if key not in ours:
            assert headers[key] == value
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if key not in ours:
                assert headers["headers"][key] == value


header_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.decimals()
    | st.fractions()
    | st.complex_numbers()
    | st.lists(st.integers(), max_size=3)
    | st.from_regex(r"\A-?[0-9]{1,400}(\.[0-9]+)?(e-?[0-9]{1,4})?\Z")
)


@PROPERTY
@given(value=header_values)
def test_as_timestamp_never_raises_and_stays_in_bounds(value: Any) -> None:
    """as_timestamp() takes anything a broker client could send: None or a plausible epoch."""
    result = hdr.as_timestamp(value)
    assert result is None or hdr.MIN_TIMESTAMP <= result <= hdr.MAX_TIMESTAMP


@PROPERTY
@given(value=st.floats(min_value=hdr.MIN_TIMESTAMP, max_value=hdr.MAX_TIMESTAMP))
def test_as_timestamp_keeps_plausible_values(value: float) -> None:
    """as_timestamp() returns a plausible timestamp unchanged, as a number or its string."""
    assert hdr.as_timestamp(value) == value
    assert hdr.as_timestamp(repr(value)) == value


@PROPERTY
@given(value=header_values | st.uuids().map(str) | st.uuids().map(lambda u: u.hex))
def test_as_publish_id_never_raises_and_accepts_only_our_format(value: Any) -> None:
    """as_publish_id() returns the value itself when it is our id format, else None."""
    result = hdr.as_publish_id(value)
    if result is not None:
        assert result is value
        assert 0 < len(result) <= 36
        assert set(result) <= set("0123456789abcdef-")
    assert hdr.as_publish_id(uuid.uuid4().hex) is not None


@PROPERTY
@given(
    value=header_values,
    limit=st.integers(min_value=len(hdr.TRUNCATED), max_value=600),
)
def test_as_text_never_raises_and_respects_its_bound(value: Any, limit: int) -> None:
    """as_text() is at most ``limit`` characters, NUL-free, the whole text when it fits and a
    visibly cut prefix when it does not."""
    result = hdr.as_text(value, limit)
    clean = ("" if value is None else str(value)).replace("\x00", "")
    assert len(result) <= limit
    assert "\x00" not in result
    if len(clean) <= limit:
        assert result == clean
    else:
        assert result.endswith(hdr.TRUNCATED)
        assert clean.startswith(result[: -len(hdr.TRUNCATED)])


# -- the spool's record format -------------------------------------------------------------

offsets = st.timedeltas(min_value=-dt.timedelta(hours=23), max_value=dt.timedelta(hours=23))
timestamps = st.datetimes(timezones=st.none() | st.just(dt.timezone.utc) | offsets.map(dt.timezone))
spool_rows = st.fixed_dictionaries(
    {"publish_id": st.text(min_size=1, max_size=36)},
    optional={
        "task_id": st.text(max_size=40),
        "task_name": st.text(max_size=40),
        "published_at": timestamps,
        "attempt": st.none() | st.integers(),
        "eta": st.none() | timestamps,
        "payload": st.none() | st.binary(max_size=64),
        "payload_redacted": st.none() | st.booleans(),
        "options": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "runtime_s": st.none() | st.floats(allow_nan=False) | st.integers(),
        "exception_message": st.none() | st.text(),
    },
)


@PROPERTY
@given(batch=st.lists(spool_rows, max_size=6), cut=st.integers(min_value=0))
def test_spool_records_round_trip_and_a_cut_keeps_whole_records(
    batch: list[dict[str, Any]], cut: int
) -> None:
    """decode(encode(...)) gives the rows back; cut anywhere, it gives the whole records before
    the cut and stops cleanly (nothing refused, nothing called corrupt)."""
    frames = [encode(row) for row in batch]
    data = b"".join(frames)
    assert decode(data, load_row) == Decoded(batch, len(data), [], None)
    cut %= len(data) + 1
    whole, used = 0, 0
    for frame in frames:
        if used + len(frame) > cut:
            break
        used += len(frame)
        whole += 1
    assert decode(data[:cut], load_row) == Decoded(batch[:whole], used, [], None)


def _assert_clean(result: Decoded, size: int) -> None:
    assert 0 <= result.used <= size
    for row in result.rows:
        check_row(row)


@PROPERTY
@given(data=st.binary(max_size=2048))
def test_decode_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    """decode() of any bytes returns what it could read and refusals, never an exception."""
    _assert_clean(decode(data, load_row), len(data))


@PROPERTY
@given(payload=st.binary(max_size=512), extra=st.binary(max_size=64))
def test_decode_never_raises_on_well_framed_garbage(payload: bytes, extra: bytes) -> None:
    """A record whose length and CRC are right but whose content is garbage is refused alone."""
    data = HEADER.pack(len(payload), zlib.crc32(payload)) + payload + extra
    _assert_clean(decode(data, load_row), len(data))


@PROPERTY
@given(
    row=spool_rows,
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=8
    ),
)
def test_decode_never_raises_on_mutated_pickles(row: dict[str, Any], flips: list[Any]) -> None:
    """Corrupting a real record's pickle (with a recomputed CRC) gives a refusal or a row that
    still has the audit shape, never an exception."""
    data = bytearray(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
    for position, mask in flips:
        data[position % len(data)] ^= mask
    framed = HEADER.pack(len(data), zlib.crc32(data)) + bytes(data)
    _assert_clean(decode(framed, load_row), len(framed))
