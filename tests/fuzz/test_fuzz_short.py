"""Short runs of the fuzzers (the long ones: python -m tests.fuzz.fuzz_image|fuzz_policy|fuzz_cli --seconds N)."""

from __future__ import annotations

from tests.fuzz.fuzz_image import make_test, run, seeds, split_records


def test_seeds_are_valid_and_splittable() -> None:
    from io import BytesIO

    from hpcckpt.image import verify_image

    for img in seeds():
        verify_image(BytesIO(img))
        assert split_records(img)


def test_fuzz_reader_short() -> None:
    make_test(300)()


def test_fuzz_memory_bounded() -> None:
    assert run(2.0, batch=50) >= 50


def test_fuzz_policy_loader_short() -> None:
    from tests.fuzz import fuzz_policy

    assert fuzz_policy.run(2.0, batch=50) >= 50


def test_fuzz_cli_short() -> None:
    from tests.fuzz import fuzz_cli

    assert fuzz_cli.run(2.0, batch=50) >= 50
