"""What an unattended process's log looks like: every line of it timed and marked as ours, its
warnings said to be warnings, the reader libraries' chatter dropped."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from server.cli import _add_serve
from wsi.cli import build_parser

from .conftest import ROOT

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} wsistore: "


def _stderr(stamped: bool) -> list[str]:
    script = textwrap.dedent(
        f"""
        import logging
        from wsi.process_logging import quiet_readers, report_ingest
        quiet_readers(stamped={stamped})
        report_ingest()
        logging.getLogger("wsi.ingest.watcher").warning("watched folder unavailable: inbox")
        logging.getLogger("wsi.ingest.worker").info("job 1: converting")
        logging.getLogger("tifffile").warning("a tag of DOE^JANE.tif")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stderr.splitlines()


def test_an_unattended_processs_warnings_are_timed_like_its_other_lines() -> None:
    """The service's warnings (a watch folder gone, a source that could not be quarantined) were
    the only lines of its log without a time or a mark of whose they were."""
    warning, info = _stderr(stamped=True)
    assert re.fullmatch(STAMP + "WARNING: watched folder unavailable: inbox", warning), warning
    assert re.fullmatch(STAMP + "job 1: converting", info), info
    # A command at a terminal says its warnings as they are; nobody's chatter either way.
    assert _stderr(stamped=False)[0] == "watched folder unavailable: inbox"


def test_the_unattended_commands_are_those_that_run_as_services() -> None:
    parser = build_parser([_add_serve])
    for argv in (["serve"], ["watch", "in", "--store", "s"], ["worker", "--store", "s"]):
        assert parser.parse_args(argv).unattended, argv
    for argv in (["convert", "a.svs", "--out", "s"], ["list", "s"], ["info", "a.svs"]):
        assert not getattr(parser.parse_args(argv), "unattended", False), argv
