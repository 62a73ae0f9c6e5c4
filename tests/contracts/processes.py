"""Job queue clients in other OS processes, for the queue contract's multi-process cases.

A child opens the queue under test from a `QueueSpec` (so the same code serves every backend)
and then races others to claim or submit, or holds one job's lease until it is killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class QueueSpec:
    """How a child process opens the same queue: `factory(*args)`, the factory named
    `module:attribute` (the child uses the real clock and the default retry policy)."""

    factory: str
    args: tuple[str, ...]


_CHILD = """
import importlib, json, sys, time
from pathlib import Path

spec, mode, go, name = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
module, _, attribute = spec["factory"].partition(":")
factory = getattr(importlib.import_module(module), attribute)
deadline = time.monotonic() + 60
while go != "-" and not Path(go).exists():  # start together, so the processes really race
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.005)
out = []
with factory(*spec["args"]) as q:
    if mode == "claim":
        while (job := q.claim(name, 60)) is not None:
            time.sleep(0.001)  # hold it a moment, as a worker would
            out.append([job.id, q.complete(job.id, name, job.id)])
    elif mode == "submit":
        for i in json.loads(sys.argv[5]):
            out.append([i, q.submit(f"/drop/{name}/{i}.svs", slide_id=f"slide-{i}").id])
    else:  # hold: take one job and renew its lease as fast as possible until killed
        job = q.claim(name, 30)
        print(json.dumps(None if job is None else job.id), flush=True)
        while job is not None:
            q.heartbeat(job.id, name, 1.0)
print(json.dumps(out))
"""


def child(spec: QueueSpec, mode: str, go: str, *args: str) -> subprocess.Popen[str]:
    """A child process in `mode` (claim, submit or hold) that starts once `go` exists ("-": at
    once); its stdout is text."""
    payload = json.dumps({"factory": spec.factory, "args": list(spec.args)})
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, payload, mode, go, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def race(spec: QueueSpec, go: Path, mode: str, args: list[list[str]]) -> list[Any]:
    """Runs one process per entry of `args` (its name, then extra arguments), released together."""
    procs = [child(spec, mode, str(go), *a) for a in args]
    try:
        time.sleep(0.2)  # let them all start polling: the race is the point, not its outcome
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    return [json.loads(out) for out, _ in outputs]
