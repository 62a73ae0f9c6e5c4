"""De-identified slides are published under keyed pseudonyms of their content ids.

A de-identified copy was published under its source's content id, which anyone holding the file
computes: the same id as the identified conversion (in the lab's own store, or a second
hospital's copy of the file), and the DICOM UIDs, dummy Patient ID and neutral name made from
it, linked the copy back to the patient's slide."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from wsi.errors import InvalidArgument
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.scan import find_candidates
from wsi.ingest.settings import IngestSettings
from wsi.ingest.source_files import submit_slide
from wsi.pseudonyms import (
    NEW_KEY_BYTES,
    PublishedIds,
    default_key_file,
    published_ids,
)
from wsi.slide_id import content_slide_id
from wsi.store.objects import check_slide_id

from .conftest import sample
from .helpers import run_wsi

SLIDE = "openslide-python-fixtures/small.svs"


def _convert(src: Path, out: Path, *extra: str) -> tuple[str, str]:
    done = run_wsi("convert", str(src), "--out", str(out), "--no-progress", *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\t")[0], done.stdout


def test_a_deidentified_slide_is_published_under_its_keyed_pseudonym(tmp_path: Path) -> None:
    """The id depends on the key, not only on the file: the same key gives the same id (a
    second run finds the slide published), another key another id, and none is the content id,
    which no stored byte and no output line carries."""
    src = sample(SLIDE)
    content_id = content_slide_id(src)
    keys = {}
    for name in ("a", "b"):
        keys[name] = tmp_path / f"{name}.key"
        keys[name].write_bytes(os.urandom(NEW_KEY_BYTES))
    out = tmp_path / "store"
    first, _ = _convert(src, out, "--deidentify", "--deidentify-key-file", str(keys["a"]))
    again, said = _convert(src, out, "--deidentify", "--deidentify-key-file", str(keys["a"]))
    other, _ = _convert(src, out, "--deidentify", "--deidentify-key-file", str(keys["b"]))
    plain, _ = _convert(src, out)
    assert first == again and "already published" in said
    assert len({first, other, content_id}) == 3 and plain == content_id
    assert first == PublishedIds(keys["a"].read_bytes()).of(content_id) == check_slide_id(first)
    for slide_id in (first, other):
        stored = b"".join(p.read_bytes() for p in (out / slide_id).rglob("*") if p.is_file())
        assert content_id[:16].encode() not in stored  # the dummy Patient ID was its prefix
    # The environment names the key file as the flag does.
    env = {**os.environ, "WSI_DEIDENTIFY_KEY_FILE": str(keys["b"])}
    done = run_wsi("convert", str(src), "--out", str(out), "--no-progress", "--deidentify", env=env)
    assert done.returncode == 0 and done.stdout.split("\t")[0] == other, done.stderr


def test_the_default_key_is_made_once_and_kept_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key file named, the default one is made the first time (32 bytes, 0600 in a
    0700 folder) and used from then on; eight threads making it at once agree on one key."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = default_key_file()
    assert path == tmp_path / "config" / "wsistore" / "deidentify.key" and not path.exists()
    made: list[PublishedIds] = []
    threads = [threading.Thread(target=lambda: made.append(published_ids(True))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8 and {ids.key for ids in made} == {path.read_bytes()}
    assert len(path.read_bytes()) == NEW_KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert published_ids(True) == made[0] and published_ids(False).key is None
    assert path.read_bytes().hex() not in repr(made[0])


@pytest.mark.parametrize(
    ("content", "said"),
    [(None, "does not exist"), (b"short", "must hold 16 to 4096 bytes")],
    ids=["missing", "too-short"],
)
def test_a_key_file_that_cannot_serve_is_one_line(
    content: bytes | None, said: str, tmp_path: Path
) -> None:
    """A key file named but missing is refused, not made: a typo in its name would otherwise
    give every slide a new id."""
    key = tmp_path / "key"
    if content is not None:
        key.write_bytes(content)
    with pytest.raises(InvalidArgument, match=said):
        published_ids(True, str(key))
    out = tmp_path / "store"
    done = run_wsi(
        "convert", str(sample(SLIDE)), "--out", str(out), "--no-progress",
        "--deidentify", "--deidentify-key-file", str(key),
    )  # fmt: skip
    assert done.returncode == 1 and key.exists() == (content is not None)
    assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(out.glob("*/manifest.json"))


def test_ingest_submits_a_slide_under_the_id_its_conversion_publishes(tmp_path: Path) -> None:
    """A de-identifying ingest names the job by the keyed id (workers convert under the job's
    id, so the slide is published under it, and a slide dropped twice is one job)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "case.svs").write_bytes(sample(SLIDE).read_bytes())
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    ids = published_ids(True, str(key))
    queue = SQLiteJobQueue(str(tmp_path / "jobs.sqlite"))
    [candidate] = find_candidates(inbox)
    job = submit_slide(queue, candidate, ids=ids)
    content_id = content_slide_id(inbox / "case.svs")
    assert job.slide_id == ids.of(content_id) != content_id
    assert submit_slide(queue, candidate, ids=ids).id == job.id


def test_a_slide_viewed_before_conversion_has_the_id_it_is_published_under(
    tmp_path: Path,
) -> None:
    """`wsi serve --sources` de-identifying serves a slide waiting for conversion under the id
    its conversion publishes it under (it listed the content id, which links to the patient's
    slide, and a viewer's link broke once the slide was published under another)."""
    folder, store = tmp_path / "sources", tmp_path / "store"
    folder.mkdir()
    slide = folder / "case.svs"
    slide.write_bytes(sample(SLIDE).read_bytes())
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    ingest = IngestSettings(deidentify=True, deidentify_key_file=str(key))
    settings = ServerSettings(store=str(store), sources=(str(folder),), ingest=ingest)

    async def listed() -> dict[str, str]:
        async with TestClient(TestServer(create_app(settings))) as c:
            slides = (await (await c.get("/slides")).json())["slides"]
            return {s["id"]: s["status"] for s in slides}

    expected = PublishedIds(key.read_bytes()).of(content_slide_id(slide))
    assert asyncio.run(listed()) == {expected: "converting"}
    published, _ = _convert(slide, store, "--deidentify", "--deidentify-key-file", str(key))
    assert published == expected
    assert asyncio.run(listed()) == {expected: "ready"}
