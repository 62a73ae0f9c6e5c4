"""Typed keys of the state an app shares with its routes: route modules import these, never the
app factory, so the factory can import every route module without a cycle."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf

from aiohttp import web

from server.audit import AUDIT as AUDIT
from server.bucket_copies import StagedSources
from server.catalog import Catalog
from server.index_file import IndexFile
from server.integrity import IntegrityMonitor
from server.listing import SlideListing
from server.metrics import Metrics
from server.probes import Probes
from server.settings import ProcessRole, ServerSettings
from wsi.ingest.queue import JobQueue
from wsi.ingest.supervise import Supervisor
from wsi.pseudonyms import PublishedIds

SETTINGS = web.AppKey("settings", ServerSettings)
ROLE = web.AppKey("role", ProcessRole)
"""This process's part in the service (alone, or one of several: `server.processes`)."""
CATALOG = web.AppKey("catalog", Catalog)
LISTING = web.AppKey("listing", SlideListing)
"""Every slide as the listings show it, kept between requests (`server.listing`)."""
INDEX_FILE = web.AppKey("index_file", IndexFile)
"""Where this service keeps its listing's and QIDO-RS's entries between starts (absent when it
cannot: `server.index_file`)."""
WARM_UP = web.AppKey("warm_up", list)
"""Coroutine functions `(app) -> None` that fill a process's indexes (the listing, QIDO's series)
right after it starts, one after the other, in the background (`server.app`), so that the first
search after a start does not open every slide of the store while a client waits."""
WARMED = web.AppKey("warmed", asyncio.Task)
"""The task running `WARM_UP` (done once every index is filled, or failed and logged)."""
EXECUTOR = web.AppKey("executor", cf.ThreadPoolExecutor)
METRICS = web.AppKey("metrics", Metrics)
PROBES = web.AppKey("probes", Probes)
"""The blocking reads of `/readyz` and `/metrics`, one flight each (`server.probes`)."""
ROUTE_MODULES = web.AppKey("route_modules", list)
PUBLISHED_IDS = web.AppKey("published_ids", PublishedIds)
"""The ids slides are submitted and viewed under before conversion: content ids, or with
`--deidentify` their keyed pseudonyms (`wsi.pseudonyms`), the key read once at start."""
JOBS = web.AppKey("jobs", JobQueue)
JOBS_WAKE = web.AppKey("jobs_wake", asyncio.Event)
"""Set when a job is submitted here, so this process's idle workers claim it at once."""
COPIES = web.AppKey("copies", StagedSources)
"""Local copies of s3:// job sources (made at submit, viewed and converted from)."""
INTEGRITY = web.AppKey("integrity", IntegrityMonitor)
"""The scheduled integrity check, in the process that runs ingest (`server.integrity`)."""
INGEST_TASKS = web.AppKey("ingest_tasks", Supervisor)
"""The ingest loops (watcher feed, workers, purge, copies keeper): `/readyz` lists those down."""
