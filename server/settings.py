"""Service settings: explicit, frozen, read once at start from flags and `WSI_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from wsi.errors import InvalidArgument
from wsi.ingest.watcher import check_watch_folders

ENV_PREFIX = "WSI_"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class ServerSettings:
    """Everything `wsi serve` can be told. Environment: `WSI_<FIELD>` in upper case (lists are
    comma-separated, booleans 1/true/yes)."""

    store: str = "./data"
    """Published slides: a local folder or s3://bucket/prefix."""
    sources: tuple[str, ...] = ()
    """Folders of slides not yet converted, served on the fly from the source file."""
    host: str = "127.0.0.1"
    port: int = 8000
    s3_endpoint: str | None = None
    tokens: tuple[str, ...] = ()
    """API tokens accepted as `Authorization: Bearer <token>`; required off loopback."""
    signing_key: str = ""
    """Secret for signed tile URLs (viewers); required off loopback."""
    signed_url_seconds: int = 3600
    allow_label: bool = False
    """Serve label and macro images (they may show patient names)."""
    tile_cache_mb: int = 256
    max_render_pixels: int = 16_000_000
    """Pixel budget of any response we render (IIIF region/size, thumbnails)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    watch: tuple[str, ...] = ()
    """Folders scanners drop slides into: each complete slide becomes a conversion job."""
    jobs_db: str = ""
    """The job table (SQLite); default: `jobs.sqlite` in the store folder, or in the current
    folder when the store is S3."""
    quiet_seconds: float = 5.0
    """A dropped slide is taken once its size and mtime have not changed for this long."""
    poll_seconds: float = 2.0
    """Watch folders are also polled (network shares where inotify sees nothing)."""
    workers: int = 1
    """Conversions running at once, each in its own subprocess."""
    after_success: str = "keep"
    """keep, move (to done_dir) or delete the source once its slide is published."""
    lease_seconds: float = 60.0
    """A job whose worker stopped heart-beating this long (crash, SIGKILL) runs again."""
    done_dir: str = "done"
    quarantine_dir: str = "quarantine"
    stop_timeout: float = 30.0
    """On SIGTERM, running conversions get this long to finish; then they are stopped and their
    jobs given back (resumed at the next start, the attempt not counted)."""
    job_timeout: float = 0.0
    """Stop a conversion running longer than this (seconds; 0: no limit); it is retried."""
    stall_timeout: float = 600.0
    """Stop a conversion that reports no progress for this long (0: never); it is retried."""
    keep_jobs_days: float = 30.0
    """Done, failed and cancelled jobs are deleted this long after they ended (0: kept)."""
    s3_sources: tuple[str, ...] = ()
    """`s3://bucket/prefix/` URLs that `POST /jobs` may convert from (none by default)."""
    spool_dir: str = ""
    """Where s3:// sources are downloaded for conversion; default `.spool` beside the jobs
    table."""

    @property
    def spool_path(self) -> str:
        return self.spool_dir or os.path.join(os.path.dirname(self.jobs_path), ".spool")

    @property
    def jobs_path(self) -> str:
        if self.jobs_db:
            return self.jobs_db
        base = "." if self.store.startswith("s3://") else self.store
        return os.path.join(base, "jobs.sqlite")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"port must be 1-65535, got {self.port}")
        if self.requires_auth and not (self.tokens and self.signing_key):
            raise InvalidArgument(
                f"listening on {self.host} (not loopback) needs WSI_TOKENS and WSI_SIGNING_KEY"
            )
        if self.max_render_pixels <= 0 or self.tile_cache_mb < 0 or self.threads <= 0:
            raise InvalidArgument("max_render_pixels, tile_cache_mb and threads must be positive")
        if self.after_success not in ("keep", "move", "delete"):
            raise InvalidArgument("after_success must be keep, move or delete")
        if (
            self.quiet_seconds < 0
            or self.poll_seconds <= 0
            or self.workers < 0
            or (self.lease_seconds <= 0)
        ):
            raise InvalidArgument("quiet_seconds, poll_seconds and workers must be positive")
        if min(self.stop_timeout, self.job_timeout, self.stall_timeout, self.keep_jobs_days) < 0:
            raise InvalidArgument("timeouts and keep_jobs_days must be >= 0")
        check_watch_folders(
            self.watch,
            store=self.store,
            **{"job table": os.path.dirname(os.path.abspath(self.jobs_path))},
            spool=self.spool_path,
            done=self.done_dir,
            quarantine=self.quarantine_dir,
        )
        for prefix in self.s3_sources:
            if not prefix.startswith("s3://") or len(prefix.rstrip("/")) <= len("s3://"):
                raise InvalidArgument(f"s3_sources entries must be s3://bucket[/prefix]: {prefix}")

    @property
    def requires_auth(self) -> bool:
        return self.host not in LOOPBACK

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> ServerSettings:
        """Defaults, then `WSI_*` variables, then explicit overrides (CLI flags that were given)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = str(f.type)
            if "tuple" in kind:
                values[f.name] = tuple(x.strip() for x in raw.split(",") if x.strip())
            elif "bool" in kind:
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind.startswith(("int", "float")):
                try:
                    values[f.name] = int(raw) if kind.startswith("int") else float(raw)
                except ValueError as exc:
                    raise InvalidArgument(f"{ENV_PREFIX}{f.name.upper()} must be a number") from exc
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
