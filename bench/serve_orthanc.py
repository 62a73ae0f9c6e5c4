"""Orthanc, the C++ DICOM server, with its WSI and DICOMweb plugins, for `bench/serve.py`.

The slide is converted with `OrthancWSIDicomizer` (its default: the source's JPEG tiles passed
through, at most 10 MB per instance, `--threads` = CPUs) once, into ``bench/out/orthanc-<stem>/``;
each run starts an Orthanc of its own with a generated configuration (HTTP on a free port, its
DICOM port off, storage and index in a temporary folder, only the two plugins loaded, its storage
cache large enough for the whole slide: see `storage_cache_mb`) and uploads the instances
(`POST /instances`). Authentication is off: Orthanc then refuses every client but
loopback (`RemoteAccessAllowed: false`), and it runs only while the benchmark does.

**Orthanc listens on 0.0.0.0** (it has no bind-address option): for the benchmark's lifetime its
HTTP port is open on every interface (answering loopback only, as configured). It is stopped at
the end, on errors and on ^C.

Debian packages: ``apt-get install orthanc orthanc-wsi orthanc-dicomweb`` (bookworm: Orthanc
1.10, WSI 1.1, DICOMweb 1.7; the plugins are in ``/usr/share/orthanc/plugins``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_load import Running, free_port, stop, wait_ready

PLUGINS = Path("/usr/share/orthanc/plugins")
PLUGIN_FILES = ("libOrthancWSI.so", "libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web"


def missing() -> str | None:
    """Why Orthanc cannot be measured here, or None when it can."""
    for program in ("Orthanc", "OrthancWSIDicomizer"):
        if shutil.which(program) is None:
            return (
                f"{program} is not installed (apt-get install orthanc orthanc-wsi orthanc-dicomweb)"
            )
    for name in PLUGIN_FILES:
        if not (PLUGINS / name).exists():
            return f"{PLUGINS / name} is missing (apt-get install orthanc-wsi orthanc-dicomweb)"
    return None


def dicomize(src: Path, out: Path, threads: int) -> list[Path]:
    """The slide's DICOM instances as `OrthancWSIDicomizer` writes them (made once, kept)."""
    folder = out / f"orthanc-{src.stem}"
    done = folder / "complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log = folder / "dicomizer.log"
        print(f"OrthancWSIDicomizer {src.name} -> {folder} ...", flush=True)
        with log.open("wb") as sink:
            subprocess.run(
                ["OrthancWSIDicomizer", f"--threads={threads}", f"--folder={folder}", str(src)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                check=True,
            )
        done.touch()
    return sorted(folder.glob("*.dcm"))


@dataclass(frozen=True)
class OrthancSlide:
    """What the workloads need of the uploaded slide."""

    series: str
    """Orthanc's id of the series (the `/wsi/tiles/{series}/...` key)."""
    levels: list[dict[str, int]]
    """Per level (0 = full resolution): width, height, tile_width, tile_height, cols, rows."""
    frames: list[tuple[str, int]]
    """The full-resolution level's instances: (WADO-RS path up to `/frames/`, frame count)."""


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def _config(folder: Path, port: int, cache_mb: int) -> dict[str, Any]:
    return {
        "Name": "wsistore-bench",
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "StorageCompression": False,
        "MaximumStorageCacheSize": cache_mb,
        "HttpCompressionEnabled": False,
        "Plugins": [str(PLUGINS / name) for name in PLUGIN_FILES],
        "DicomWeb": {"Enable": True, "Root": f"{DICOMWEB_ROOT}/"},
    }


@contextlib.contextmanager
def orthanc(cpus: list[int] | None, log: Path, cache_mb: int) -> Iterator[Running]:
    """A fresh Orthanc (empty storage in a temporary folder) on a free port, pinned to `cpus`
    (None: all), its storage cache `cache_mb` (see `storage_cache_mb`); stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="wsi-bench-orthanc-") as tmp:
        folder = Path(tmp)
        port = free_port()
        config = folder / "orthanc.json"
        config.write_text(json.dumps(_config(folder, port, cache_mb), indent=1))
        command = ["Orthanc", str(config)]
        if cpus:  # pinned before exec, so that every thread Orthanc starts inherits it
            pinning = (
                f"import os; os.sched_setaffinity(0, {cpus!r}); os.execvp('Orthanc', {command!r})"
            )
            command = [sys.executable, "-c", pinning]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url + "/system", proc, "Orthanc", log)
                yield Running(url, proc.pid)
            finally:
                stop(proc)


def upload(server: Running, files: list[Path]) -> OrthancSlide:
    """Store the instances in Orthanc (REST `POST /instances`); the series' geometry."""
    for path in files:
        request = urllib.request.Request(
            server.url + "/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
    series = _get(server.url + "/series")
    if len(series) != 1:
        raise SystemExit(f"Orthanc holds {len(series)} series, expected 1")
    pyramid = _get(f"{server.url}/wsi/pyramids/{series[0]}")
    levels = [
        {
            "width": w,
            "height": h,
            "tile_width": tw,
            "tile_height": th,
            "cols": cols,
            "rows": rows,
        }
        for (w, h), (tw, th), (cols, rows) in zip(
            pyramid["Sizes"], pyramid["TilesSizes"], pyramid["TilesCount"], strict=True
        )
    ]
    frames: list[tuple[str, int]] = []
    for instance in _get(f"{server.url}/series/{series[0]}")["Instances"]:
        tags = _get(f"{server.url}/instances/{instance}/simplified-tags")
        if int(tags.get("TotalPixelMatrixColumns", 0)) != levels[0]["width"]:
            continue
        prefix = (
            f"{DICOMWEB_ROOT}/studies/{tags['StudyInstanceUID']}/series/"
            f"{tags['SeriesInstanceUID']}/instances/{tags['SOPInstanceUID']}/frames/"
        )
        frames.append((prefix, int(tags["NumberOfFrames"])))
    if not frames:
        raise SystemExit("Orthanc holds no instance of the full-resolution level")
    return OrthancSlide(series[0], levels, frames)


def storage_cache_mb(files: list[Path]) -> int:
    """Orthanc's storage cache, in MB: twice the slide's instances, so that they all stay in
    memory. With its default (128 MB) a hot set spread over a large slide's levels re-reads
    10 MB instances from disk for every tile (26 tiles/s instead of thousands)."""
    return max(128, 2 * sum(p.stat().st_size for p in files) // 2**20)


def dicomizer_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
