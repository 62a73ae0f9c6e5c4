"""`wsi convert` to a local folder starts without the S3 clients and Zarr: their imports are
most of the command's start-up CPU (aiohttp alone ~0.15 s), which small slides pay in full.
Each command runs in a fresh interpreter, as a user runs it, and reports the `sys.modules` it
ended with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import sample

_REPORT_MODULES = """
import atexit, json, runpy, sys
report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "wsi"
runpy.run_module("server.cli", run_name="__main__", alter_sys=True)
"""
"""`python -m server.cli ARGS` (the console script's module), writing the names of the modules
it imported to a file when it exits."""

NOT_FOR_LOCAL = ("s3fs", "aiohttp", "botocore", "aiobotocore", "zarr", "numcodecs")
"""Packages a lossy conversion to a local folder has no use for."""


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


def test_convert_to_a_local_folder_imports_no_s3_client_nor_zarr(tmp_path):
    out = tmp_path / "store"
    run, modules = _modules_after(
        tmp_path, "convert", "--out", str(out), str(sample("CMU-1-Small-Region.svs"))
    )
    assert run.returncode == 0, run.stderr
    assert list(out.glob("*/manifest.json")), "the conversion published nothing"
    loaded = _top_level(modules)
    # The report is of the process that converted: the source reader and both writers ran.
    assert {"tifffile", "pydicom", "imagecodecs", "wsi"} <= loaded
    assert {"wsi.writers.dicom", "wsi.writers.omezarr"} <= modules
    assert not loaded & set(NOT_FOR_LOCAL), sorted(loaded & set(NOT_FOR_LOCAL))


def test_help_of_every_library_command_imports_no_s3_client(tmp_path):
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


def test_store_failures_include_the_s3_clients_errors_once_they_are_loaded():
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


def test_store_failures_catch_what_the_s3_clients_raise():
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
