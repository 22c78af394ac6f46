"""The checkpoint-state encoding: exact round trips, refusals, and damage reported with offsets."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcckpt.app import state
from hpcckpt.errors import UsageError
from hpcckpt.image.errors import CorruptImageError


def roundtrip(obj: Any) -> Any:
    return state.decode(state.encode_bytes(obj))


def test_plain_values_roundtrip_exactly() -> None:
    obj = {
        "none": None,
        "flags": [True, False],
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**200, -(2**200) + 7],
        "floats": (0.1, -0.0, math.inf, 1e-310),
        "text": "grüße \udcff",  # a lone surrogate, as os.fsdecode produces
        "raw": b"\x00\xff" * 3,
        "buf": bytearray(b"abc"),
        (1, "k"): {b"x": 1.5, None: [], 3: ()},
    }
    out = roundtrip(obj)
    assert out == obj
    assert type(out["buf"]) is bytearray
    assert type(out["floats"]) is tuple
    assert math.copysign(1.0, out["floats"][1]) == -1.0


def test_nan_keeps_its_bits() -> None:
    nan = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]
    out = roundtrip(nan)
    assert struct.pack("<d", out) == struct.pack("<d", nan)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(24, dtype=np.float64).reshape(2, 3, 4),
        np.arange(10, dtype=">i4"),  # big-endian stays big-endian
        np.zeros((0, 5), dtype=np.complex128),
        np.array([b"ab", b"c"], dtype="S2"),
        np.array(["x", "yz"], dtype="<U2"),
        np.array([True, False]),
        np.arange(12, dtype=np.int16).reshape(3, 4).T,  # not C-contiguous
        np.array(["2024-01-01"], dtype="datetime64[D]"),
    ],
)
def test_arrays_roundtrip_bit_identical(arr: np.ndarray) -> None:
    out = roundtrip({"a": arr})["a"]
    assert type(out) is np.ndarray
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()
    assert out.flags.writeable and out.flags.owndata


def test_numpy_scalars_keep_their_type() -> None:
    out = roundtrip([np.float32(1.25), np.int64(-3), np.bool_(True), np.float64(0.1)])
    assert [type(x) for x in out] == [np.float32, np.int64, np.bool_, np.float64]
    assert out[0] == np.float32(1.25) and out[1] == -3 and out[3] == 0.1


@pytest.mark.parametrize(
    "bad",
    [
        object(),
        {1, 2},
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.ma.masked_array([1, 2], mask=[False, True]),
    ],
)
def test_unencodable_values_are_refused_with_their_place(bad: Any) -> None:
    with pytest.raises(UsageError) as info:
        state.encode_bytes({"outer": [1, bad]})
    assert "state['outer'][1]" in str(info.value)


def test_unhashable_dict_key_is_refused() -> None:
    with pytest.raises(UsageError, match="dict key"):
        state.encode_bytes({frozenset({1}): 1})


def test_too_deep_is_refused() -> None:
    deep: Any = []
    for _ in range(state.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(UsageError, match="nested deeper"):
        state.encode_bytes(deep)


def test_file_roundtrip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "s.hst"
    state.write_file({"a": np.ones(3)}, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert np.array_equal(state.read_file(path)["a"], np.ones(3))


def test_truncation_is_caught_with_the_file_name(tmp_path: Path) -> None:
    data = state.encode_bytes({"a": np.arange(100)})
    path = tmp_path / "s.hst"
    path.write_bytes(data[:-10])
    with pytest.raises(CorruptImageError) as info:
        state.read_file(path)
    assert str(path) in str(info.value) and "offset 16" in str(info.value)


def test_bad_magic_and_version() -> None:
    data = bytearray(state.encode_bytes(1))
    with pytest.raises(CorruptImageError, match="not a checkpoint state file"):
        state.decode(b"X" + bytes(data[1:]))
    data[8] = 99
    with pytest.raises(CorruptImageError, match="version 99 is not supported"):
        state.decode(bytes(data))


def _with_body(body: bytes) -> bytes:
    return struct.pack("<8sHHIQ", state.MAGIC, 1, 0, 0, len(body)) + body


@pytest.mark.parametrize(
    ("body", "message", "offset"),
    [
        (b"\x63", "unknown value tag 99", 24),
        (struct.pack("<BQ", 8, 2**40), "element count", 33),
        (struct.pack("<BQ", 7, 100) + b"x", "needs 100 bytes", 33),
        (b"\x06" + struct.pack("<Q", 1) + b"\xff", "invalid utf-8", 24),
        (b"\x01\x01", "unexpected bytes after", 25),
        (struct.pack("<BQ", 10, 1) + struct.pack("<BQ", 8, 0) + b"\x00", "dict key of type list", 33),
        (struct.pack("<BH", 11, 3) + b"|O8", "bad numpy dtype|not allowed", 24),
        (struct.pack("<BH", 11, 3) + b"<f8" + struct.pack("<BQQ", 1, 4, 8) + b"\x00" * 8, "needs 32", 24),
    ],
)
def test_damaged_bodies_name_the_offset(body: bytes, message: str, offset: int) -> None:
    with pytest.raises(CorruptImageError, match=message) as info:
        state.decode(_with_body(body), "shard.hst")
    assert f"shard.hst, offset {offset}:" in str(info.value)


def test_deep_nesting_in_a_file_is_refused_without_recursion_error() -> None:
    body = struct.pack("<BQ", 8, 1) * 10_000 + b"\x00"
    with pytest.raises(CorruptImageError, match="nested deeper"):
        state.decode(_with_body(body))


leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
keys = st.none() | st.booleans() | st.integers() | st.text() | st.binary()
values = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=4)
    | st.tuples(kids, kids)
    | st.dictionaries(keys, kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_any_plain_value_roundtrips(obj: Any) -> None:
    assert roundtrip(obj) == obj


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(blob: bytes) -> None:
    try:
        state.decode(_with_body(blob))
    except CorruptImageError:
        pass
