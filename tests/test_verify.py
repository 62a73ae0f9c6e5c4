"""`wsi verify`: every object read again and checked against its manifest; the scheduled check
of the service, shown at `/integrity`, in `/metrics` and `/readyz`.

Damage is made by hand on a real published slide: a flipped byte, a truncated object, a deleted
object, a manifest that no longer parses. Each must be found, named, and turn the exit status
non-zero; an intact store passes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings
from wsi.published.verify import Problem, ReadRate, verify_slide

from .conftest import sample
from .helpers import run_wsi, wait_until

LEVEL0 = "slide.zarr/0/c/0/0/0"
TOKEN, KEY = "t0ken-for-verify-tests", "k3y-for-the-verify-tests-0123456789"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """CMU-1-Small-Region published once; tests damage copies of this store."""
    root = tmp_path_factory.mktemp("verified")
    result = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root)))
    )
    return root, result.slide_id


@pytest.fixture
def store(published: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    root, sid = published
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    return copy, sid


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_store_passes(store: tuple[Path, str]) -> None:
    root, sid = store
    done = run_wsi("verify", str(root))
    assert done.returncode == 0, done.stderr
    objects = len(json.loads((root / sid / "manifest.json").read_text())["objects"])
    assert done.stdout.splitlines() == [
        f"{sid}\tok\t{objects} objects, {_tree_bytes(root / sid):,} bytes"
    ]
    assert "1 slides, 0 damaged" in done.stderr


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("flip", Problem.CRC_MISMATCH),
        ("truncate", Problem.TRUNCATED),
        ("delete", Problem.MISSING),
    ],
)
def test_damage_is_found(store: tuple[Path, str], damage: str, problem: Problem) -> None:
    root, sid = store
    target = root / sid / LEVEL0
    size = target.stat().st_size
    if damage == "flip":
        flip_byte(target, size // 2)  # inside a tile: no reader would notice before decoding it
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: size - 100])
    else:
        target.unlink()
    done = run_wsi("verify", str(root), sid)
    assert done.returncode == 1
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{sid}\tDAMAGED\t{LEVEL0}: {problem}")
    assert "; " not in line  # that object only
    assert "1 slides, 1 damaged" in done.stderr


def test_unreadable_manifest_and_unknown_slide(store: tuple[Path, str]) -> None:
    root, sid = store
    (root / sid / "manifest.json").write_text('{"format": "wsistore-manifest/1", "slide_')
    done = run_wsi("verify", str(root), sid, "0000notpublished")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert (
        lines[0]
        == f"{sid}\tDAMAGED\tmanifest.json: unreadable manifest (manifest is not valid JSON)"
    )
    assert lines[1] == "0000notpublished\tUNKNOWN\tno such slide in this store"
    assert "1 slides, 1 damaged, 1 unknown" in done.stderr


def test_an_unknown_id_is_not_damage_but_a_lost_manifest_is(store: tuple[Path, str]) -> None:
    """An id typed wrong names nothing in the store: said so, exit 1, and not counted as damage.
    A slide whose manifest is gone but whose objects are there is damage."""
    root, sid = store
    typo = run_wsi("verify", str(root), sid[:-1] + "x")
    assert typo.returncode == 1
    assert typo.stdout == f"{sid[:-1]}x\tUNKNOWN\tno such slide in this store\n"
    assert "0 slides, 0 damaged, 1 unknown" in typo.stderr
    (root / sid / "manifest.json").unlink()
    lost = run_wsi("verify", str(root), sid)
    assert lost.returncode == 1
    assert lost.stdout == f"{sid}\tDAMAGED\tmanifest.json: not published\n"
    assert "1 slides, 1 damaged," in lost.stderr


def test_reads_in_bounded_parts(store: tuple[Path, str]) -> None:
    """No object is read whole: every read is at most the chunk size, on an object larger."""
    root, sid = store

    class Recording(wsi.Store):
        largest = 0

        def get_range(self, key: str, start: int, end: int) -> bytes:
            Recording.largest = max(Recording.largest, end - start)
            return super().get_range(key, start, end)

    recording = Recording(wsi.StoreSettings(str(root)))
    check = verify_slide(recording, sid, chunk_bytes=65536)
    assert check.ok and check.bytes_read == _tree_bytes(root / sid)
    assert (root / sid / LEVEL0).stat().st_size > 65536 >= Recording.largest > 0


def test_read_rate_is_a_token_bucket() -> None:
    """At 1000 bytes/s, reading 5000 bytes in parts waits 4 s in all (the first second's worth
    may go at once), and no more."""
    now = [0.0]
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        now[0] += seconds
        return False

    rate = ReadRate(1000.0, clock=lambda: now[0], wait=wait)
    for _ in range(5):
        rate.take(1000)
    assert sum(waits) == pytest.approx(4.0)
    now[0] += 10.0  # idle: the allowance refills, but only up to one second's worth
    rate.take(1000)
    assert sum(waits) == pytest.approx(4.0)
    rate.take(500)
    assert sum(waits) == pytest.approx(4.5)


def test_the_service_checks_on_schedule(store: tuple[Path, str], tmp_path: Path) -> None:
    """With ingest on and a short interval, the service finds the damaged object and shows it at
    /integrity, in /metrics and in /readyz (which stays 200: one bad slide must not take the
    service out of its load balancer); once the object is good again the next run clears it, and
    a restarted service shows the last result kept in the state folder before it runs again."""
    root, sid = store
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = (root / sid / LEVEL0).read_bytes()
    flip_byte(root / sid / LEVEL0, len(good) // 3)

    def settings(hours: float) -> ServerSettings:
        ingest = IngestSettings(workers=0, poll_seconds=0.2, state_dir=str(tmp_path / "state"))
        return ServerSettings(
            store=str(root), watch=(str(inbox),), verify_every_hours=hours, ingest=ingest
        )

    async def first() -> None:
        async with TestClient(TestServer(create_app(settings(1 / 3600)))) as c:

            async def damaged() -> dict[str, Any]:
                doc = await (await c.get("/integrity")).json()
                return doc if doc["last_run"] and doc["damaged"] else {}

            doc = await wait_until(damaged, timeout=60)
            assert doc["damaged"] == [{"slide": sid, "object": LEVEL0, "problem": "crc mismatch"}]
            assert doc["slides_checked"] == 1 and doc["scheduled"] is True
            assert doc["bytes_read"] == _tree_bytes(root / sid)
            metrics = await (await c.get("/metrics")).text()
            assert "wsi_integrity_damaged_slides 1.0" in metrics
            assert "wsi_integrity_damaged_objects 1.0" in metrics
            assert "wsi_integrity_slides_checked 1.0" in metrics
            assert "wsi_integrity_last_run_timestamp_seconds" in metrics
            ready = await c.get("/readyz")
            assert ready.status == 200
            detail = (await ready.json())["integrity"]
            assert detail["status"] == "damaged" and detail["damaged_slides"] == 1
            assert sid not in json.dumps(detail)  # /readyz is open: counts only

            (root / sid / LEVEL0).write_bytes(good)

            async def clean() -> dict[str, Any]:
                doc = await (await c.get("/integrity")).json()
                return doc if doc["last_run"] and not doc["damaged"] else {}

            await wait_until(clean, timeout=60)
            assert (await (await c.get("/readyz")).json())["integrity"]["status"] == "ok"
            flip_byte(root / sid / LEVEL0, len(good) // 3)
            await wait_until(damaged, timeout=60)

    async def restarted() -> None:
        async with TestClient(TestServer(create_app(settings(24)))) as c:
            doc = await (await c.get("/integrity")).json()
            assert doc["running"] is False and doc["last_run"] is not None
            assert doc["damaged"] == [{"slide": sid, "object": LEVEL0, "problem": "crc mismatch"}]

    asyncio.run(first())
    asyncio.run(restarted())


def test_integrity_without_ingest_and_under_auth(published: tuple[Path, str]) -> None:
    """A serving-only process runs no check and says so; off loopback /integrity needs a token."""
    root, _sid = published
    settings = ServerSettings(store=str(root), host="0.0.0.0", tokens=(TOKEN,), signing_key=KEY)

    async def main() -> None:
        async with TestClient(TestServer(create_app(settings))) as c:
            assert (await c.get("/integrity")).status == 401
            r = await c.get("/integrity", headers={"Authorization": f"Bearer {TOKEN}"})
            doc = await r.json()
            assert r.status == 200 and doc["scheduled"] is False and doc["last_run"] is None
            readyz = await (await c.get("/readyz")).json()
            assert readyz["integrity"] == {"status": "off"}

    asyncio.run(main())


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
