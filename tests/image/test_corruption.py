"""Every corruption of an image is detected: byte changes, truncations, extensions."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.image import unpack_image, verify_image
from hpcckpt.image.errors import CorruptImageError, ImageError


def test_small_image_is_valid(small_image: bytes) -> None:
    s = verify_image(io.BytesIO(small_image))
    assert [x.name for x in s.sections] == ["d", "d/f"]
    assert s.sections[1].chunks == 2
    assert s.length == len(small_image)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_detected(small_image: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(small_image) - 1), label="offset")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != small_image[pos]), label="byte")
    bad = bytearray(small_image)
    bad[pos] = new
    with pytest.raises(ImageError):
        verify_image(io.BytesIO(bytes(bad)))


def test_every_offset_flipped_is_detected(small_image: bytes) -> None:
    # exhaustive, complementing the random property above: each byte, all bits flipped
    for pos in range(len(small_image)):
        bad = bytearray(small_image)
        bad[pos] ^= 0xFF
        with pytest.raises(ImageError):
            verify_image(io.BytesIO(bytes(bad)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_any_truncation_is_detected(small_image: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(small_image) - 1), label="length")
    with pytest.raises(CorruptImageError):
        verify_image(io.BytesIO(small_image[:cut]))


def test_every_truncation_is_detected(small_image: bytes) -> None:
    for cut in range(len(small_image)):
        with pytest.raises(CorruptImageError):
            verify_image(io.BytesIO(small_image[:cut]))


@given(extra=st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_detected(small_image: bytes, extra: bytes) -> None:
    with pytest.raises(CorruptImageError, match="after the trailer"):
        verify_image(io.BytesIO(small_image + extra))


def test_error_names_file_offset_record_and_type(small_image: bytes, tmp_path: Path) -> None:
    bad = bytearray(small_image)
    bad[-100] ^= 1  # inside the last chunk's data
    path = tmp_path / "bad.hck"
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptImageError) as info:
        verify_image(path)
    err = info.value
    assert err.path == str(path) and err.offset is not None and err.record is not None
    assert err.rtype == "chunk"
    assert str(path) in str(err) and f"offset {err.offset}" in str(err) and f"record {err.record}" in str(err)
    assert err.hint and "older checkpoint" in err.hint


def test_corrupt_image_unpacks_nothing(small_image: bytes, tmp_path: Path) -> None:
    bad = bytearray(small_image)
    bad[-100] ^= 1
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CorruptImageError):
        unpack_image(io.BytesIO(bytes(bad)), dest)
    assert list(dest.iterdir()) == []
    # a target this call created is removed again
    with pytest.raises(CorruptImageError):
        unpack_image(io.BytesIO(small_image[:-5]), tmp_path / "new")
    assert not (tmp_path / "new").exists()
