"""The one formatter of amounts (``zetta_ray/quantities.py``) that reports and errors share."""

from __future__ import annotations

import pytest

from zetta_ray.quantities import BINARY, format_amount, gib, mib


@pytest.mark.parametrize(
    ("n", "kwargs", "text"),
    [
        (8.39e6, {}, "8.39 MB"),
        (2.5e15, {}, "2.5 PB"),
        (999, {}, "999 B"),
        (0, {}, "0 B"),
        (0.0, {}, "0 B"),
        (12.5, {}, "12.5 B"),
        (-3e9, {}, "-3 GB"),
        (1.2e12, {"unit": "params"}, "1.2 Tparams"),
        (4e10, {"unit": "B/s"}, "40 GB/s"),
        (3 * 2**20, {"prefixes": BINARY}, "3 MiB"),
    ],
)
def test_format_amount(n, kwargs, text):
    assert format_amount(n, **kwargs) == text


def test_fixed_forms_of_errors():
    assert gib(2**29) == "0.5 GiB"
    assert gib(3 * 2**40) == "3.07e+03 GiB"  # always GiB, however large
    assert mib(33 * 2**20) == "33.0 MiB"
    assert mib(512) == "512 B"
