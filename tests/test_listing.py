"""The slide listing on a store of more slides than the reader keeps open: kept between requests
(a slide is opened again only when its manifest changed) and answered a page at a time. Every
`GET /slides` and every index page opened every slide again (6 s for 2,000 slides)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import server.app
import wsi
from server.api.dicomweb.instances import DICOMWEB, DicomWebState, Instance
from server.api.dicomweb.qido import Search
from server.api.dicomweb.query import Row
from server.app import create_app
from server.catalog import Catalog
from server.index_file import NAME
from server.keys import CATALOG, INDEX_FILE, WARMED
from server.listing import SlideListing, natural
from server.settings import ServerSettings
from wsi.ingest.settings import IngestSettings
from wsi.published.store import PublishedStore
from wsi.published.values import ReaderSettings

from .conftest import sample
from .helpers import FakeClock
from .slide_copies import copy_slide, rename

RETRIEVE_URL = "00081190"
SERIES_IN_STUDY = "00201206"
SLIDES = 300
"""More than the reader keeps open (`ReaderSettings.slide_cache_entries`, 256)."""


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    store = tmp_path_factory.mktemp("listing") / "store"
    result = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(store)))
    )
    first = result.slide_id
    ids = [f"s{i:04d}{first[5:]}" for i in range(SLIDES)]
    for i, slide_id in enumerate(ids):
        copy_slide(store, first, slide_id, f"slide {i:04d}", f"case {i % 7}")
    shutil.rmtree(store / first)
    return store, ids


def counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The slides the reader opens (their manifest parsed, attributes read), in order."""
    opened: list[str] = []
    load: Callable[..., Awaitable[Any]] = PublishedStore._load

    async def spy(self: PublishedStore, keys: Any, data: bytes) -> Any:
        opened.append(keys.slide_id)
        return await load(self, keys, data)

    monkeypatch.setattr(PublishedStore, "_load", spy)
    return opened


def test_listings_open_each_slide_once_and_come_a_page_at_a_time(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ids = big_store
    opened = counting_loads(monkeypatch)

    async def main() -> None:
        settings = ServerSettings(store=str(store), index_at_start=False)
        async with TestClient(TestServer(create_app(settings))) as c:
            first = await (await c.get("/slides")).json()
            assert first["total"] == SLIDES and len(first["slides"]) == SLIDES
            assert sorted(opened) == sorted(ids)
            opened.clear()
            again = await (await c.get("/slides")).json()
            home = await c.get("/")
            assert home.status == 200 and opened == []  # nothing opened again
            assert again == first

            # Pages: listing order (by case, then name), `cases` over every match.
            page = await (await c.get("/slides?q=case%203&offset=10&limit=5")).json()
            names = [f"slide {i:04d}" for i in range(SLIDES) if i % 7 == 3]
            assert [s["name"] for s in page["slides"]] == names[10:15]
            assert (page["total"], page["offset"]) == (len(names), 10)
            assert page["cases"] == [{"case": "case 3", "slides": len(names)}]
            past = await (await c.get(f"/slides?offset={SLIDES}")).json()
            assert (past["slides"], past["total"]) == ([], SLIDES)
            for bad in ("limit=0", "limit=1001", "offset=-1", "limit=x"):
                r = await c.get(f"/slides?{bad}")
                assert r.status == 400 and (await r.json())["status"] == 400, bad

            # The index: 200 cards a page, links to the others, search on the server.
            text = await home.text()
            assert text.count('<li data-search="') == 200
            assert 'href="/?page=2" rel="next"' in text and "page 1 of 2" in text
            second = await (await c.get("/?page=2")).text()
            assert second.count('<li data-search="') == SLIDES - 200
            assert "slide 0299" in second and "slide 0299" not in text
            past = await (await c.get("/?page=9")).text()  # past the end: the last page
            assert past == second and "page 2 of 2" in past
            found = await (await c.get("/?q=slide%200123")).text()
            assert found.count('<li data-search="') == 1 and 'class="pages"' not in found
            assert (await c.get("/?page=x")).status == 400

    asyncio.run(main())


def test_a_listing_opens_again_only_what_changed(big_store: tuple[Path, list[str]]) -> None:
    store, ids = big_store
    clock = FakeClock()

    async def main() -> None:
        reader = PublishedStore(str(store), ReaderSettings(recheck_seconds=2.0))
        async with reader:
            opened = []
            catalog = Catalog(reader)
            listed = catalog.listed

            async def spy(slide_id: str) -> Any:
                opened.append(slide_id)
                return await listed(slide_id)

            catalog.listed = spy  # type: ignore[method-assign]
            listing = SlideListing(catalog, False, 2.0, clock)
            assert (await listing.page(limit=1)).total == SLIDES
            assert len(opened) == SLIDES
            opened.clear()
            clock.step(3)  # every entry checked again: one manifest read each, none opened
            rename(store, ids[5], "renamed")
            shutil.rmtree(store / ids[6])
            page = await listing.page("renamed")
            assert opened == [ids[5]]
            assert [s.slide_id for s in page.slides] == [ids[5]] and page.of_all == SLIDES - 1
            opened.clear()
            assert (await listing.page()).total == SLIDES - 1 and opened == []

    try:
        asyncio.run(main())
    finally:  # the module's store is shared: put the slides back as they were
        rename(store, ids[5], "slide 0005")
        if not (store / ids[6]).exists():
            copy_slide(store, ids[7], ids[6], "slide 0006", "case 6")


def test_a_listing_looks_for_a_slides_manifest_until_it_finds_it(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every listing and search lists the store's folders; each looked for its manifest, one
    HEAD a slide on S3 at every request (300 slides of SeaweedFS: 0.28 s for a page of 10),
    where once it is found only a read of the manifest finding it gone matters."""
    store, ids = big_store
    clock = FakeClock()
    asked: list[str] = []
    exists = wsi.Store.exists

    def spy(self: wsi.Store, key: str) -> bool:
        asked.append(key.split("/")[0])
        return exists(self, key)

    monkeypatch.setattr(wsi.Store, "exists", spy)
    manifest = store / ids[8] / "manifest.json"
    kept = manifest.read_bytes()

    async def main() -> None:
        reader = PublishedStore(str(store), ReaderSettings(recheck_seconds=2.0), clock=clock)
        async with reader:
            listing = SlideListing(Catalog(reader), False, 2.0, clock)
            assert (await listing.page(limit=1)).total == SLIDES
            assert sorted(asked) == sorted(ids)
            asked.clear()
            assert (await listing.page(limit=1)).total == SLIDES
            clock.step(3)
            assert (await listing.page(limit=1)).total == SLIDES
            assert asked == []
            manifest.unlink()  # unpublished, its folder still there
            clock.step(3)  # its manifest read again: gone
            assert (await listing.page(limit=1)).total == SLIDES - 1
            assert (await listing.page(limit=1)).total == SLIDES - 1
            assert asked == [ids[8]]  # looked for again, until it is published again
            manifest.write_bytes(kept)
            assert (await listing.page(limit=1)).total == SLIDES
            assert asked == [ids[8], ids[8]]

    try:
        asyncio.run(main())
    finally:
        if not manifest.exists():
            manifest.write_bytes(kept)


def test_study_and_series_searches_open_each_slide_once(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QIDO-RS studies and series searches come from an index of one record per slide: a
    second search opens no slide, and gives what matching every instance's header gives."""
    store, ids = big_store
    opened = counting_loads(monkeypatch)

    async def main() -> None:
        settings = ServerSettings(store=str(store), index_at_start=False)
        async with TestClient(TestServer(create_app(settings))) as c:

            async def search(path: str) -> Any:
                r = await c.get(path, headers={"Accept": "application/dicom+json"})
                assert r.status == 200, await r.text()
                return await r.json()

            first = await search("/dicomweb/studies?includefield=all")
            assert sorted(opened) == sorted(ids)
            opened.clear()
            again = await search("/dicomweb/studies?includefield=all")
            series = await search("/dicomweb/series")
            assert opened == [] and again == first
            (study,) = first  # the copies share their DICOM UIDs
            uid = study["0020000D"]["Value"][0]
            assert study["00201206"]["Value"] == [SLIDES]  # NumberOfStudyRelatedSeries
            scoped = await search(f"/dicomweb/studies/{uid}/series")
            assert [s["0020000E"] for s in scoped] == [s["0020000E"] for s in series]
            assert opened == []
            missing = await c.get("/dicomweb/studies/1.2.3/series")
            assert missing.status == 404
            # A filter on an attribute of each instance matches every header instead: the
            # same answer.
            each = await search("/dicomweb/studies?includefield=all&ImageType=*")
            assert each == first

    asyncio.run(main())


def _kept(store: Path, state: Path) -> ServerSettings:
    return ServerSettings(store=str(store), ingest=IngestSettings(state_dir=str(state)))


def test_each_process_fills_its_indexes_at_start(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first listing or QIDO-RS search after a start opened every slide while its client
    waited (21 s for `GET /dicomweb/studies` on 2,000 slides): each process now fills both
    indexes in the background as it starts, and the first requests open nothing. The series
    index reads each slide's smallest level and leaves the header cache to the requests."""
    store, ids = big_store
    opened = counting_loads(monkeypatch)

    async def main() -> None:
        app = create_app(_kept(store, tmp_path / "state"))
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]
            assert sorted(set(opened)) == sorted(ids)
            opened.clear()
            listed = await (await c.get("/slides")).json()
            assert listed["total"] == SLIDES and (await c.get("/")).status == 200
            r = await c.get("/dicomweb/studies", headers={"Accept": "application/dicom+json"})
            assert r.status == 200 and len(await r.json()) == 1
            assert opened == []
            assert len(app[DICOMWEB].headers) == 0

    asyncio.run(main())


def test_indexes_are_kept_between_starts(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A restart (an upgrade, a serving process restarted after a crash) filled both indexes
    again by opening every slide: their entries are kept in the state folder, and a start opens
    only the slides whose manifest changed meanwhile. Entries are private, and never read by
    other code or other settings."""
    store, ids = big_store
    state = tmp_path / "state"
    opened = counting_loads(monkeypatch)

    async def answers(app: web.Application) -> tuple[Any, Any, Any]:
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]
            slides = await (await c.get("/slides")).json()
            index = await (await c.get("/?page=2")).text()
            r = await c.get("/dicomweb/studies", headers={"Accept": "application/dicom+json"})
            assert r.status == 200
            studies = [{k: v for k, v in s.items() if k != RETRIEVE_URL} for s in await r.json()]
            return slides, index, studies  # (its RetrieveURL names the test server's port)

    try:
        first = asyncio.run(answers(create_app(_kept(store, state))))
        assert sorted(set(opened)) == sorted(ids)
        saved = state / NAME
        assert saved.stat().st_mode & 0o077 == 0 and state.stat().st_mode & 0o077 == 0
        assert all(p.stat().st_mode & 0o077 == 0 for p in state.iterdir())

        opened.clear()
        assert asyncio.run(answers(create_app(_kept(store, state)))) == first
        assert opened == []  # every entry read from the file: one version read a slide

        # Changed while stopped: the renamed slide is opened again, the removed one leaves.
        rename(store, ids[5], "renamed")
        shutil.rmtree(store / ids[6])
        slides, _, studies = asyncio.run(answers(create_app(_kept(store, state))))
        assert set(opened) == {ids[5]}
        names = {s["id"]: s["name"] for s in slides["slides"]}
        assert names[ids[5]] == "renamed" and ids[6] not in names
        assert studies[0][SERIES_IN_STUDY]["Value"] == [SLIDES - 1]  # the copies share a study
        opened.clear()
        asyncio.run(answers(create_app(_kept(store, state))))
        assert opened == []  # what the last start found was kept

        # Other settings (labels shown) or other code: the file's entries are not used.
        labels = dataclasses.replace(_kept(store, state), allow_label=True)
        asyncio.run(answers(create_app(labels)))
        assert len(set(opened)) == SLIDES - 1
        opened.clear()
        monkeypatch.setattr(server.app, "code_fingerprint", lambda: "other code")
        asyncio.run(answers(create_app(labels)))
        assert len(set(opened)) == SLIDES - 1
    finally:  # the module's store is shared: put the slides back as they were
        rename(store, ids[5], "slide 0005")
        if not (store / ids[6]).exists():
            copy_slide(store, ids[7], ids[6], "slide 0006", "case 6")


def test_processes_starting_together_fill_the_indexes_once(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The service's processes start together and each filled both indexes, opening every slide
    of the store: N processes took N times the CPU, on the same cores. One fills them at a time
    (the state folder's lock) and the others read what it kept: every slide opened once in all,
    and every process answers the same."""
    store, ids = big_store
    openers: list[PublishedStore] = []
    load: Callable[..., Awaitable[Any]] = PublishedStore._load

    async def spy(self: PublishedStore, keys: Any, data: bytes) -> Any:
        openers.append(self)
        return await load(self, keys, data)

    monkeypatch.setattr(PublishedStore, "_load", spy)
    settings = _kept(store, tmp_path / "state")

    async def main() -> None:
        apps = [create_app(settings) for _ in range(3)]
        clients = [TestClient(TestServer(app)) for app in apps]
        for client in clients:
            await client.start_server()
        try:
            await asyncio.gather(*(app[WARMED] for app in apps))
            stores = {id(app[CATALOG].store) for app in apps}
            assert len({id(s) for s in openers}) == 1  # one of the three opened slides
            assert {id(s) for s in openers} <= stores and len(openers) >= SLIDES
            openers.clear()
            for client in clients:
                listed = await (await client.get("/slides")).json()
                assert sorted(s["id"] for s in listed["slides"]) == sorted(ids)
            assert openers == []
        finally:
            for client in clients:
                await client.close()

    asyncio.run(main())


def test_a_state_folder_that_cannot_be_made_costs_only_the_time(
    big_store: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = big_store
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")

    async def main() -> None:
        app = create_app(_kept(store, blocked / "state"))
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]
            assert INDEX_FILE not in app
            assert (await (await c.get("/slides")).json())["total"] == SLIDES

    with caplog.at_level(logging.WARNING, "server.index_file"):
        asyncio.run(main())
    assert "indexes are not kept between starts" in caplog.text


def test_indexes_are_not_filled_at_start_when_told(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store, _ = big_store
    opened = counting_loads(monkeypatch)

    async def main() -> None:
        settings = dataclasses.replace(_kept(store, tmp_path / "state"), index_at_start=False)
        app = create_app(settings)
        async with TestClient(TestServer(app)) as c:
            assert (await c.get("/healthz")).status == 200
            assert WARMED not in app and INDEX_FILE not in app and opened == []
        assert not (tmp_path / "state").exists()

    asyncio.run(main())


def test_a_damaged_file_or_entry_is_read_again_from_the_store(
    big_store: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged entry (a disk error, an edit) is left out and its slide opened again; a file
    that is not SQLite at all is no file. Neither fails a listing or a search."""
    store, ids = big_store
    state = tmp_path / "state"

    async def answers() -> tuple[Any, Any]:
        app = create_app(
            ServerSettings(store=str(store), ingest=IngestSettings(state_dir=str(state)))
        )
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]
            slides = await (await c.get("/slides")).json()
            r = await c.get("/dicomweb/studies", headers={"Accept": "application/dicom+json"})
            assert r.status == 200
            return slides["total"], (await r.json())[0]["00201206"]

    assert asyncio.run(answers()) == (SLIDES, {"vr": "IS", "Value": [SLIDES]})
    db = sqlite3.connect(state / NAME)
    damage = [
        ("not json", b""),
        ("[1, 2]", b""),
        ('["a", null, "ready", "w", 1, [1, 1], true]', b""),
    ]
    for i, (meta, data) in enumerate(damage):
        db.execute("UPDATE entries SET meta = ?, data = ? WHERE slide_id = ?", (meta, data, ids[i]))
    db.execute("UPDATE entries SET data = ? WHERE kind = 'series' AND slide_id = ?", (b"x", ids[5]))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, "server.index_file"):
        assert asyncio.run(answers()) == (SLIDES, {"vr": "IS", "Value": [SLIDES]})
    assert "unreadable, their slides read again" in caplog.text
    (state / NAME).write_bytes(b"not a database" * 100)
    for extra in state.glob(NAME + "-*"):
        extra.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "server.index_file"):
        assert asyncio.run(answers()) == (SLIDES, {"vr": "IS", "Value": [SLIDES]})
    assert "indexes are not kept between starts" in caplog.text


def test_an_instance_search_reads_as_far_as_its_page(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`GET /dicomweb/instances` read the header of every instance of the store whatever its
    `limit` (a minute on 2,000 slides: 16,000 headers of 64 KB, for anyone who asks): slides are
    now taken from the series index, those its UIDs and slide-level attributes rule out are
    never opened, and headers are read until the page is full: each page is the same slice of
    a longer one."""
    store, _ = big_store
    reads: list[str] = []
    header = DicomWebState.header

    async def counting(self: DicomWebState, catalog: Catalog, inst: Instance) -> Any:
        reads.append(inst.slide.slide_id)
        return await header(self, catalog, inst)

    monkeypatch.setattr(DicomWebState, "header", counting)
    made: list[str] = []
    instance = Search.instance

    def counting_instance(self: Search, row: Row) -> dict[str, Any]:
        made.append(row.slide_id)
        return instance(self, row)

    monkeypatch.setattr(Search, "instance", counting_instance)

    async def main() -> None:
        app = create_app(_kept(store, tmp_path / "state"))
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]

            async def search(path: str) -> Any:
                r = await c.get(path, headers={"Accept": "application/dicom+json"})
                assert r.status == 200, await r.text()
                return await r.json()

            every = await search("/dicomweb/instances?includefield=all&limit=40")
            assert len(every) == 40
            pages = {"limit=5": every[:5], "limit=4&offset=9": every[9:13]}
            pages |= {"limit=3&Modality=SM": every[:3], "limit=2&ImageType=*": every[:2]}
            for query, expected in pages.items():
                reads.clear()
                found = await search(f"/dicomweb/instances?includefield=all&{query}")
                assert found == expected, query
                assert len(set(reads)) <= 4, (query, len(set(reads)))  # slides, of 300
            reads.clear()
            assert await search("/dicomweb/instances?PatientID=nobody") == []
            assert reads == []  # ruled out by the index: no slide opened, no header read

            # Far pages: the rows before the offset are read but not kept (every header was
            # held until the answer was made, however large the offset).
            made.clear()
            far = await search("/dicomweb/instances?includefield=all&limit=10&offset=1000")
            assert len(far) == 10 and len(made) <= 11 + 6 * 32  # of 1,800: a batch of slides
            again = await search("/dicomweb/instances?includefield=all&limit=3&offset=1005")
            assert again == far[5:8]
            assert await search("/dicomweb/instances?offset=100000") == []

    asyncio.run(main())


def test_a_study_the_process_has_not_seen_is_found_in_the_series_index(
    big_store: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A study-scoped path naming a study this process had not looked up yet (every study after
    a start, or any UID a client makes up, at most every 2 s) opened every slide of the store
    to find it; the series index answers it now, reading no slide."""
    store, _ = big_store
    opened = counting_loads(monkeypatch)
    scans: list[int] = []
    scan = DicomWebState.scan

    async def counting_scan(self: DicomWebState, catalog: Catalog) -> Any:
        scans.append(1)
        return await scan(self, catalog)

    monkeypatch.setattr(DicomWebState, "scan", counting_scan)

    async def main() -> None:
        app = create_app(_kept(store, tmp_path / "state"))
        async with TestClient(TestServer(app)) as c:
            await app[WARMED]
            accept = {"Accept": "application/dicom+json"}
            (series,) = await (await c.get("/dicomweb/series", headers=accept)).json()
            study, uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
            opened.clear()
            for made_up in ("1.2.3", "1.2.4"):
                r = await c.get(f"/dicomweb/studies/{made_up}/series/4.5/instances", headers=accept)
                assert r.status == 404
            assert opened == [] and scans == []
            path = f"/dicomweb/studies/{study}/series/{uid}/instances?limit=1"
            r = await c.get(path, headers=accept)
            assert r.status == 200 and len(await r.json()) == 1 and scans == []

    asyncio.run(main())


def test_slides_and_cases_sort_as_people_read_numbers() -> None:
    """Blocks of a case came B0, B120, B160, B40 (names sorted as text): numbers in names are
    read as numbers, case folded, whatever surrounds them."""
    names = ["S24-0000-B120", "s24-0000-b40", "S24-0000-B0", "A10", "a2", "A1", "B", "10", "9"]
    assert sorted(names, key=natural) == [
        "9", "10", "A1", "a2", "A10", "B", "S24-0000-B0", "s24-0000-b40", "S24-0000-B120",
    ]  # fmt: skip
