"""Names people recognise: each slide is named from its sidecar's or DICOM header's identifiers
(accession number, specimen, container) or its file's stem, belongs to a case, is searchable
by both and listed with the slides of its case; a slide published before names existed is
named by its id. Under de-identification the name is neutral and the real one is written
nowhere: every byte the service writes is searched for it."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import wsi
from server.app import create_app
from server.settings import ServerSettings
from wsi.ingest.queue import SQLiteJobQueue
from wsi.ingest.settings import IngestSettings
from wsi.metadata import SlideMetadata, neutral_name, slide_case, slide_name

from .conftest import make_tiff, sample
from .helpers import drain, wait_until

SIDECAR_A = {"accession_number": "S24-0042", "specimen_id": "A1", "patient_name": "Doe^Jane"}
SIDECAR_B = {"accession_number": "S24-0042", "specimen_id": "B2", "patient_id": "MRN12345"}


def convert(path: Path, store: Path, **settings: Any) -> str:
    options = wsi.ConvertSettings(**settings) if settings else None
    return wsi.convert_slide(path, wsi.Store(wsi.StoreSettings(str(store))), options).slide_id


def manifest(store: Path, slide_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((store / slide_id / "manifest.json").read_bytes())
    return doc


async def listing(c: TestClient, query: str = "") -> dict[str, Any]:
    r = await c.get("/slides" + query)
    assert r.status == 200, await r.text()
    doc: dict[str, Any] = await r.json()
    return doc


@pytest.fixture(scope="module")
def named_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Four slides: two of case S24-0042 named by their sidecars, one named by its DICOM
    header, one by its file's stem."""
    tmp = tmp_path_factory.mktemp("names")
    store = tmp / "store"
    ids = {}
    a = tmp / "case-a.svs"
    shutil.copy(sample("openslide-python-fixtures/small.svs"), a)
    (tmp / "case-a.svs.json").write_text(json.dumps(SIDECAR_A))
    ids["a"] = convert(a, store)
    b = tmp / "case-b.svs"
    shutil.copy(sample("CMU-1-Small-Region.svs"), b)
    (tmp / "case-b.json").write_text(json.dumps(SIDECAR_B))  # the `<stem>.json` spelling
    ids["b"] = convert(b, store)
    ids["dicom"] = convert(sample("highdicom/sm_image.dcm"), store)
    ids["stem"] = convert(sample("openslide-python-fixtures/boxes.tiff"), store)
    return store, ids


def test_the_name_rule() -> None:
    both = SlideMetadata(accession_number="S24-1", specimen_id="A", container_id="S24-1-A")
    assert slide_name(both, Path("x.svs")) == "S24-1-A"  # the barcode says it all
    assert slide_name(SlideMetadata(accession_number="S24-1", specimen_id="B2"), Path("x")) == (
        "S24-1 · B2"
    )
    assert slide_name(SlideMetadata(), Path("/in/case 7.ome.tiff")) == "case 7.ome"
    assert slide_case(SlideMetadata(study_id="ST-9")) == "ST-9"
    assert slide_case(SlideMetadata()) is None
    assert neutral_name("0123456789abcdef01234567") == "Slide 01234567"


def test_names_and_cases_are_published_in_the_manifest(
    named_store: tuple[Path, dict[str, str]],
) -> None:
    store, ids = named_store
    got = {
        k: (manifest(store, sid).get("name"), manifest(store, sid).get("case"))
        for k, sid in ids.items()
    }
    assert got == {
        "a": ("S24-0042 · A1", "S24-0042"),
        "b": ("S24-0042 · B2", "S24-0042"),
        "dicom": ("S19-1_A_1_1", "S19-1_A_1_1"),  # AccessionNumber = ContainerIdentifier
        "stem": ("boxes", None),
    }
    # Converting again with the same settings finds it up to date: the name is no setting.
    b = store.parent / "case-b.svs"
    assert wsi.convert_slide(b, wsi.Store(wsi.StoreSettings(str(store)))).skipped


def test_slides_lists_names_grouped_by_case_and_searches_them(
    named_store: tuple[Path, dict[str, str]],
) -> None:
    store, ids = named_store

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(store))))) as c:
            doc = await listing(c)
            assert [(s["name"], s["case"]) for s in doc["slides"]] == [
                ("S19-1_A_1_1", "S19-1_A_1_1"),
                ("S24-0042 · A1", "S24-0042"),
                ("S24-0042 · B2", "S24-0042"),
                ("boxes", None),
            ]
            assert doc["cases"] == [
                {"case": "S19-1_A_1_1", "slides": 1},
                {"case": "S24-0042", "slides": 2},
            ]
            one = await (await c.get(f"/slides/{ids['a']}")).json()
            assert (one["name"], one["case"]) == ("S24-0042 · A1", "S24-0042")

            async def names(query: str) -> list[str]:
                return [s["name"] for s in (await listing(c, query))["slides"]]

            assert await names("?q=s24") == ["S24-0042 · A1", "S24-0042 · B2"]
            assert await names("?q=BOX") == ["boxes"]
            assert await names("?q=%C2%B7%20b2") == ["S24-0042 · B2"]  # "· b2"
            assert await names("?q=s19-1_a_1") == ["S19-1_A_1_1"]
            assert await names("?q=nothing-like-it") == []
            assert await names("?case=S24-0042") == ["S24-0042 · A1", "S24-0042 · B2"]
            assert await names("?case=s24-0042") == []  # a case is matched exactly
            assert len(await names("?q=")) == 4
            r = await c.get("/slides?q=" + "x" * 201)
            assert r.status == 400 and "q must be" in (await r.json())["error"]
            spec = await (await c.get("/openapi.json")).json()
            params = {p["name"] for p in spec["paths"]["/slides"]["get"]["parameters"]}
            assert params == {"q", "case", "offset", "limit"}

    asyncio.run(main())


def test_a_slide_published_before_names_is_named_by_its_id(
    named_store: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    store, ids = named_store
    old = tmp_path / "old-store"
    shutil.copytree(store / ids["stem"], old / ids["stem"])
    doc = manifest(old, ids["stem"])
    del doc["name"]
    del doc["checksum"]  # nor a checksum (older still)
    assert "case" not in doc
    (old / ids["stem"] / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))

    async def main() -> None:
        async with TestClient(TestServer(create_app(ServerSettings(store=str(old))))) as c:
            [slide] = (await listing(c))["slides"]
            assert (slide["id"], slide["name"], slide["case"]) == (ids["stem"],) * 2 + (None,)
            assert (await c.get(f"/slides/{ids['stem']}/tiles/0/0/0")).status == 200

    asyncio.run(main())


def test_a_converting_slide_is_named_by_its_file(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    make_tiff(sources / "scan-77.tif", 600, 400)

    async def main(deidentify: bool) -> dict[str, Any]:
        settings = ServerSettings(
            store=str(tmp_path / "store"),
            sources=(str(sources),),
            ingest=IngestSettings(deidentify=deidentify),
        )
        async with TestClient(TestServer(create_app(settings))) as c:
            [slide] = (await listing(c))["slides"]
            assert slide["status"] == "converting"
            found = (await listing(c, "?q=SCAN-7"))["slides"]
            assert len(found) == (0 if deidentify else 1)
            return slide

    plain = asyncio.run(main(False))
    assert (plain["name"], plain["case"]) == ("scan-77", None)
    hidden = asyncio.run(main(True))
    assert (hidden["name"], hidden["case"]) == (neutral_name(hidden["id"]), None)


# ---------------------------------------------------------------------------------------------
# De-identification

PATIENT = "Doe_Jane_MRN12345"
SECRETS = ("Doe", "Jane", "MRN12345", "S24-0042", "A1x")
OUR_LOGGERS = ("wsi", "wsistore", "server")


def every_byte(folder: Path, skip: tuple[str, ...] = ()) -> list[tuple[Path, bytes]]:
    """Every file under `folder` (names and content), except those whose name starts with one
    of `skip`."""
    return [
        (p, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(skip)
    ]


def assert_secret_free(blob: bytes | str, where: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for secret in SECRETS:
        for spelling in (secret.encode(), secret.encode("utf-16-be")):
            assert spelling not in data, f"{secret!r} in {where}"


def test_under_deidentification_a_slide_has_a_neutral_name_stored_nowhere_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide named after its patient, with a sidecar naming its case, dropped into the watch
    folder of a de-identifying service: while it converts and once published it is `Slide
    <id>` with no case, in `/slides`, `/jobs`, `/storage` and the manifest; no file the service
    writes (store, state, quarantine, spool; the job table aside, which keeps the path workers
    need, in the private state folder) and no log line holds a name or identifier."""
    caplog.set_level(logging.DEBUG)
    inbox, store, state = tmp_path / "inbox", tmp_path / "store", tmp_path / "state"
    inbox.mkdir()
    shutil.copy(sample("openslide-python-fixtures/small.svs"), inbox / f"{PATIENT}.svs")
    (inbox / f"{PATIENT}.svs.json").write_text(
        json.dumps({**SIDECAR_A, "specimen_id": "A1x", "patient_id": "MRN12345"})
    )
    ingest = IngestSettings(
        deidentify=True, workers=0, quiet_seconds=0.3, poll_seconds=0.1, state_dir=str(state)
    )
    settings = ServerSettings(store=str(store), watch=(str(inbox),), ingest=ingest)
    shown: list[str] = []

    async def look(c: TestClient, state_wanted: str) -> dict[str, Any]:
        async def listed() -> dict[str, Any] | None:
            for path in ("/slides", "/slides?q=doe", "/jobs", "/storage", "/watch"):
                shown.append(await (await c.get(path)).text())
            slides = (await listing(c))["slides"]
            return slides[0] if slides and slides[0]["status"] == state_wanted else None

        slide: dict[str, Any] = await wait_until(listed, 60)
        return slide

    async def phase(state_wanted: str) -> dict[str, Any]:
        async with TestClient(TestServer(create_app(settings))) as c:
            slide = await look(c, state_wanted)
            jobs = (await (await c.get("/jobs")).json())["jobs"]
            assert [j["name"] for j in jobs] == [neutral_name(slide["id"])]
            return slide

    converting = asyncio.run(phase("converting"))
    assert (converting["name"], converting["case"]) == (neutral_name(converting["id"]), None)
    drain(SQLiteJobQueue(ingest.jobs_path(str(store))), str(store), ingest)
    ready = asyncio.run(phase("ready"))
    sid = ready["id"]
    assert (ready["id"], ready["name"], ready["case"]) == (
        converting["id"],
        f"Slide {sid[:8]}",
        None,
    )
    doc = manifest(store, sid)
    assert (doc["name"], "case" in doc) == (f"Slide {sid[:8]}", False)

    for text in shown:
        assert_secret_free(text, "an API answer")
    written = every_byte(store) + every_byte(state, skip=("jobs.sqlite",))
    assert any(p.name == "manifest.json" for p, _ in written)
    for path, data in written:
        assert_secret_free(str(path.relative_to(tmp_path)), "a file name")
        assert_secret_free(data, str(path))
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in OUR_LOGGERS]
    assert_secret_free("\n".join(ours), "our log")
