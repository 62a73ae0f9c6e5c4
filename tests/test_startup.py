"""`wsi convert` to a local folder starts without the S3 clients, Zarr and pydicom: their
imports are most of the command's start-up CPU (aiohttp alone ~0.15 s, pydicom ~0.1 s with the
`requests` it imports), which small slides pay in full. Each command runs in a fresh interpreter,
as a user runs it, and reports the `sys.modules` it ended with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

from .conftest import make_tiff, sample

_REPORT_MODULES = """
import atexit, json, runpy, sys
report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "wsi"
runpy.run_module("server.cli", run_name="__main__", alter_sys=True)
"""
"""`python -m server.cli ARGS` (the console script's module), writing the names of the modules
it imported to a file when it exits."""

NOT_FOR_LOCAL = (
    "s3fs",
    "aiohttp",
    "botocore",
    "aiobotocore",
    "zarr",
    "numcodecs",
    "pydicom",
    "requests",
    "urllib3",
    "wsidicom",
    "tqdm",
    "sqlite3",
    "distributed",
    "fsspec",
    "obstore",
    "asyncio",
)
"""Packages a lossy conversion of a TIFF to a local folder has no use for: the DICOM headers are
encoded without pydicom, the store and the content id read and write plain files (fsspec and
obstore, with the asyncio they import, are for S3), no job table is opened, no Dask cluster is
used."""


def _modules_after(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    report = tmp_path / "modules.json"
    run = subprocess.run(
        [sys.executable, "-c", _REPORT_MODULES, str(report), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return run, set(json.loads(report.read_text()))


def _top_level(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_convert_to_a_local_folder_imports_no_s3_client_nor_zarr(tmp_path: Path) -> None:
    out = tmp_path / "store"
    run, modules = _modules_after(
        tmp_path, "convert", "--out", str(out), str(sample("CMU-1-Small-Region.svs"))
    )
    assert run.returncode == 0, run.stderr
    assert list(out.glob("*/manifest.json")), "the conversion published nothing"
    loaded = _top_level(modules)
    # The report is of the process that converted: the source reader and both writers ran.
    assert {"tifffile", "imagecodecs", "wsi"} <= loaded
    assert {"wsi.writers.dicom", "wsi.writers.omezarr"} <= modules
    assert not loaded & set(NOT_FOR_LOCAL), sorted(loaded & set(NOT_FOR_LOCAL))


_IMPORT_THEN_CONVERT = """
import json, sys
import server.cli
after_import = sorted(sys.modules)
status = server.cli.main(sys.argv[1:])
print(json.dumps([status, after_import, sorted(sys.modules)]))
"""


def test_cli_import_and_a_tiff_conversion_in_one_process_import_no_dicom_nor_s3(
    tmp_path: Path,
) -> None:
    """The console script's module, then `wsi convert` of a generated TIFF with both views in
    the same interpreter: pydicom (and the `requests` it imports), the S3 clients and Zarr are
    loaded by neither; the conversion wrote DICOM instances (their headers needed no pydicom)."""
    source = make_tiff(tmp_path / "small.tif", 700, 500)
    out = tmp_path / "store"
    command = ["convert", "--out", str(out), "--no-progress", str(source)]
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_THEN_CONVERT, *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    status, after_import, after_convert = json.loads(run.stdout.splitlines()[-1])
    assert status == 0
    (manifest,) = out.glob("*/manifest.json")
    instances = json.loads(manifest.read_text())["dicom"]
    assert len(instances) == 3, instances  # 700 x 500 in 256-pixel tiles: three levels
    for instance in instances:  # this process may import pydicom: it reads what was written
        ds = pydicom.dcmread(manifest.parent / instance["key"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == instance["sop_instance_uid"]
    assert "wsi.convert" not in after_import, "the CLI imports the converter before a command"
    assert {"wsi.convert", "wsi.writers.dicom", "tifffile"} <= set(after_convert)
    for modules in (after_import, after_convert):
        loaded = _top_level(set(modules))
        assert not loaded & {"pydicom", "requests", "s3fs", "aiohttp", "zarr"}, sorted(loaded)


def test_help_of_every_library_command_imports_no_s3_client(tmp_path: Path) -> None:
    run, modules = _modules_after(tmp_path, "convert", "--help")
    assert run.returncode == 0, run.stderr
    assert "--out" in run.stdout
    assert not _top_level(modules) & set(NOT_FOR_LOCAL)


_FAILURES_BEFORE_AND_AFTER_S3 = """
import json
from wsi.store.objects import store_failures
before = [c.__module__ + "." + c.__qualname__ for c in store_failures()]
import s3fs
after = [c.__module__ + "." + c.__qualname__ for c in store_failures()]
print(json.dumps([before, after]))
"""


def test_store_failures_include_the_s3_clients_errors_once_they_are_loaded() -> None:
    """Before anything imported the S3 clients none of their errors can be raised; once s3fs is
    imported, the tuple catches the same errors as a tuple built from eager imports."""
    run = subprocess.run(
        [sys.executable, "-c", _FAILURES_BEFORE_AND_AFTER_S3],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    before, after = json.loads(run.stdout)
    assert before == ["builtins.OSError"]
    assert set(after) == {
        "builtins.OSError",
        "botocore.exceptions.BotoCoreError",
        "botocore.exceptions.ClientError",
        "aiohttp.client_exceptions.ClientError",
    }


def test_store_failures_catch_what_the_s3_clients_raise() -> None:
    import aiohttp
    from botocore.exceptions import ClientError, EndpointConnectionError

    from wsi.store.objects import store_failures

    raised = [
        aiohttp.ClientConnectionError("refused"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"),
        ConnectionResetError("reset"),
    ]
    for error in raised:
        try:
            raise error
        except store_failures() as caught:
            assert caught is error
