"""The package's metadata, as installed: what pip, SBOM tools and a lab's licence review read."""

from __future__ import annotations

from importlib.metadata import metadata


def test_the_licence_is_an_spdx_expression() -> None:
    # PEP 639. setuptools deprecated the `license = { text = ... }` table, with builds to fail
    # from 2027-02-18; an SPDX expression is what licence scanners read.
    meta = metadata("wsistore")
    assert meta["License-Expression"] == "Apache-2.0"
