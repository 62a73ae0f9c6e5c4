"""The canonical URL an IIIF image answer names in its `Link` header is one the service takes,
and it names the very same image: its rotation in plain decimal (IIIF 3 canonical form), never
an exponent ("1e-07" was refused with a 400) nor rounded to 6 digits ("359.99999" became "360",
another image under the same ETag)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.api.iiif_params import parse_rotation, rotation_text
from server.app import create_app
from server.settings import ServerSettings

from .conftest import sample

ROTATIONS = ["0.0000001", "!0.0000001", "359.99999", "90.0", "!180.50", "12.3456789", "360"]
CANONICAL = re.compile(r'<(/iiif/3/[^>]+)>;rel="canonical"')


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("canonical")
    sid = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root)))
    ).slide_id
    return root, sid


def test_canonical_links_answer_the_same_bytes(store: tuple[Path, str]) -> None:
    root, sid = store

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(root))))) as c:
            for rotation in ROTATIONS:
                asked = await c.get(f"/iiif/3/{sid}/0,0,240,120/max/{rotation}/default.jpg")
                assert asked.status == 200, await asked.text()
                match = CANONICAL.search(asked.headers["Link"])
                assert match, asked.headers["Link"]
                link = match.group(1)
                degrees = link.split("/")[-2]
                assert "e" not in degrees.lower() and not degrees.endswith(".")
                assert "." not in degrees or not degrees.endswith("0"), link
                canonical = await c.get(link)
                assert canonical.status == 200, (rotation, link, await canonical.text())
                assert await canonical.read() == await asked.read(), (rotation, link)
                assert canonical.headers["ETag"] == asked.headers["ETag"]
                assert f"<{link}>" in canonical.headers["Link"]

    asyncio.run(main())


def test_rotation_text_reads_back_as_the_same_rotation() -> None:
    """Every rotation the parser takes, spelled canonically, is read back the same: integers
    without a decimal point, others without trailing zeros."""
    samples = [f"{d}" for d in range(361)]
    samples += [f"{d}.{f}" for d in (0, 1, 89, 90, 180, 359) for f in ("0", "5", "05", "000000001")]
    samples += ["0.1", "0.3", "359.999999999", "123.456789012", "45.100000000"]
    for text in samples + ["!" + s for s in samples]:
        mirror, degrees = parse_rotation(text)
        spelled = rotation_text(mirror, degrees)
        assert parse_rotation(spelled) == (mirror, degrees), (text, spelled)
        number = spelled.removeprefix("!")
        assert re.fullmatch(r"0|[1-9][0-9]{0,2}|(0|[1-9][0-9]{0,2})\.[0-9]*[1-9]", number), (
            text,
            spelled,
        )
    assert rotation_text(False, 90.0) == "90" and rotation_text(True, 1e-7) == "!0.0000001"
