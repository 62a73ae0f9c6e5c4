"""Service settings: explicit, frozen, read once at start from flags and `WSI_*` variables."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, TypeAlias

from wsi.errors import InvalidArgument
from wsi.ingest.settings import ENV_PREFIX, IngestSettings, env_values

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_PROCESSES = 256
MIN_SIGNING_KEY_BYTES = 32
"""Shortest `signing_key` (UTF-8 bytes), the size of HMAC-SHA256's output: one signed URL is
all a guesser needs to test keys offline, as fast as it can hash, and a right guess signs any
slide's URLs."""
MIN_TOKEN_CHARS = 16
"""Shortest token secret: every request may guess one, and nothing slows the guessing."""
TokenRole: TypeAlias = Literal["admin", "read", "pixels"]
"""What a token may do (`server.auth.permits`): everything, read everything, or read pixels."""
ADMIN: TokenRole = "admin"
READ: TokenRole = "read"
PIXELS: TokenRole = "pixels"
RANDOM_KEY_COMMAND = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
"""The command the refusals of short secrets suggest (43 characters, 256 random bits)."""
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?"
)


@dataclass(frozen=True)
class ServerSettings:
    """Everything `wsi serve` can be told. Environment: `WSI_<FIELD>` in upper case (lists are
    comma-separated, booleans 1/true/yes), the fields of `ingest` included (`WSI_WORKERS`)."""

    store: str = "./data"
    """Published slides: a local folder or s3://bucket/prefix."""
    sources: tuple[str, ...] = ()
    """Folders of slides not yet converted, served on the fly from the source file."""
    host: str = "127.0.0.1"
    port: int = 8000
    s3_endpoint: str | None = None
    tokens: tuple[str, ...] = ()
    """API tokens accepted as `Authorization: Bearer <token>`; required off loopback, and once
    given they are required on loopback too (a service behind a proxy on the same machine is
    reached from beyond it). An entry `name:secret` gives the token a name for the audit log; a
    bare secret is named by a digest. Each secret has at least `MIN_TOKEN_CHARS` characters.
    These tokens may do everything (`server.auth.ADMIN`); `read_tokens` and `pixel_tokens` less."""
    read_tokens: tuple[str, ...] = ()
    """Tokens that read everything `tokens` read (slides, metadata, DICOMweb, jobs) but change
    nothing: no job submitted, cancelled or retried, no quarantined slide put back (a 403).
    Written as `tokens` are."""
    pixel_tokens: tuple[str, ...] = ()
    """Tokens that read a slide's pixels only, given its id: its plain and DeepZoom tiles and
    its IIIF images, for AI pipelines and research. No listing, name, case, metadata, associated
    image, DICOMweb (patient names) or ingest: a 403."""
    signing_key: str = ""
    """Secret for signed tile URLs (viewers); required off loopback. At least
    `MIN_SIGNING_KEY_BYTES` bytes."""
    signed_url_seconds: int = 3600
    """How long a signed link stays valid. At least 1: 0 or less signed every viewer link and
    tile already expired (the page opened, then every tile was a 401)."""
    allow_label: bool = False
    """Serve label and macro images (they may show patient names)."""
    tile_cache_mb: int = 256
    max_render_pixels: int = 16_000_000
    """Pixel budget of any response we render (IIIF region/size, thumbnails)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Serving processes sharing the port (`server.processes`), each with its own event loop,
    thread pool and tile cache (`tile_cache_mb` is per process). 1: one process, no supervisor."""
    index_at_start: bool = True
    """Fill the slide listing and QIDO-RS's series index in the background as each serving
    process starts (each opens every slide of the store once: ~10 ms a slide), instead of at the
    first listing or search, which would wait for it."""
    express: bool = True
    """Answer the requests a viewer makes most (tiles, DeepZoom tiles, WADO-RS frames whose
    bytes are at hand) from the connection, without aiohttp's request handling
    (`server.express`): the same answers at a fraction of the work. Off: every request goes
    aiohttp's way."""
    watch: tuple[str, ...] = ()
    """Folders scanners drop slides into: each complete slide becomes a conversion job."""
    s3_sources: tuple[str, ...] = ()
    """`s3://bucket/prefix/` URLs that `POST /jobs` may convert from (none by default)."""
    cors_origins: tuple[str, ...] = ()
    """Origins (`https://viewer.example.org`) whose pages may read the APIs cross-origin; none by
    default, on loopback too: any web page the user opens could otherwise read the patient data
    a service on their own machine answers with."""
    audit_log: str | None = None
    """Append one JSON line per request that names a slide to this file (who: the token's name,
    a signature's scope, or "anonymous" without auth)."""
    verify_every_hours: float = 24.0
    """With ingest on (`watch` or `s3_sources`): read every published object again and check it
    against its manifest this often (0: never). The result: `GET /integrity`, `/metrics`,
    `/readyz`."""
    verify_rate_mb: float = 50.0
    """Most MB (10^6 bytes) a second that check reads, so that it never takes the disk or the
    network from serving (50 MB/s: a 1 GB slide in 20 s, 4 TB a day)."""
    ingest: IngestSettings = field(default_factory=IngestSettings)
    """How watch folders become jobs and jobs conversions (`WSI_WORKERS`, `WSI_QUIET_SECONDS`,
    ...): the same settings `wsi watch` and `wsi worker` read. Used when `watch` or `s3_sources`
    is set."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"port must be 1-65535, got {self.port}")
        self._check_secrets()
        if self.requires_auth and not (self.all_tokens and self.signing_key):
            if self.all_tokens:
                raise InvalidArgument(
                    "WSI_TOKENS (or WSI_READ_TOKENS, WSI_PIXEL_TOKENS) turns authentication on, "
                    "which needs WSI_SIGNING_KEY too (the viewer's signed tile URLs)"
                )
            raise InvalidArgument(
                f"listening on {self.host} (not loopback) needs WSI_TOKENS and WSI_SIGNING_KEY"
            )
        if self.signed_url_seconds <= 0:
            raise InvalidArgument(
                f"WSI_SIGNED_URL_SECONDS must be at least 1, got {self.signed_url_seconds}"
            )
        if self.max_render_pixels <= 0 or self.tile_cache_mb < 0 or self.threads <= 0:
            raise InvalidArgument("max_render_pixels, tile_cache_mb and threads must be positive")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise InvalidArgument(f"processes must be 1-{MAX_PROCESSES}, got {self.processes}")
        if self.verify_every_hours < 0 or not self.verify_rate_mb > 0:
            raise InvalidArgument("verify_every_hours must be >= 0 and verify_rate_mb positive")
        self.ingest.check_watch_folders(self.watch, self.store)
        for origin in self.cors_origins:
            if not _ORIGIN.fullmatch(origin):
                raise InvalidArgument(
                    f"cors_origins entries must be scheme://host[:port], got {origin!r}"
                )
        for prefix in self.s3_sources:
            if not prefix.startswith("s3://") or len(prefix.rstrip("/")) <= len("s3://"):
                raise InvalidArgument(f"s3_sources entries must be s3://bucket[/prefix]: {prefix}")

    def _check_secrets(self) -> None:
        """Refuse, at start, secrets anyone could guess: a signing key shorter than
        `MIN_SIGNING_KEY_BYTES` or of whitespace only, a token whose secret is shorter than
        `MIN_TOKEN_CHARS` or whitespace only (named, never quoted: the error may be logged)."""
        key = self.signing_key
        if key and (len(key.encode()) < MIN_SIGNING_KEY_BYTES or not key.strip()):
            raise InvalidArgument(
                f"WSI_SIGNING_KEY must be at least {MIN_SIGNING_KEY_BYTES} bytes, not all "
                f"whitespace; make one with: {RANDOM_KEY_COMMAND}"
            )
        seen: set[str] = set()
        for variable, entry, _ in self._token_entries():
            name, secret = token_entry(entry)
            if len(secret) < MIN_TOKEN_CHARS or not secret.strip():
                raise InvalidArgument(
                    f"{variable}: the secret of token {name} must be at least {MIN_TOKEN_CHARS} "
                    f"characters, not all whitespace; make one with: {RANDOM_KEY_COMMAND}"
                )
            if secret in seen:  # which of its roles would it have?
                raise InvalidArgument(f"{variable}: the secret of token {name} is given twice")
            seen.add(secret)

    def _token_entries(self) -> list[tuple[str, str, TokenRole]]:
        """(variable, entry, role) of every token configured."""
        return [
            (variable, entry, role)
            for variable, entries, role in (
                ("WSI_TOKENS", self.tokens, ADMIN),
                ("WSI_READ_TOKENS", self.read_tokens, READ),
                ("WSI_PIXEL_TOKENS", self.pixel_tokens, PIXELS),
            )
            for entry in entries
        ]

    @property
    def all_tokens(self) -> tuple[tuple[str, TokenRole], ...]:
        """(entry, role) of every token: `tokens` are "admin", `read_tokens` "read" and
        `pixel_tokens` "pixels" (what each may do: `server.auth.permits`)."""
        return tuple((entry, role) for _, entry, role in self._token_entries())

    @property
    def requires_auth(self) -> bool:
        """Off loopback, or with tokens configured: a service given tokens is meant to ask for
        them, wherever it listens."""
        return self.host not in LOOPBACK or bool(self.all_tokens)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> ServerSettings:
        """Defaults, then `WSI_*` variables, then explicit overrides (CLI flags that were given).
        `ingest` is read from the same variables (`IngestSettings.from_env`) unless given."""
        env = os.environ if environ is None else environ
        check_setting_names(env)
        values = env_values(cls, env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "ingest" not in values:
            values["ingest"] = IngestSettings.from_env(env)
        return cls(**values)


SETTING_NAMES = frozenset(
    ENV_PREFIX + f.name.upper()
    for settings in (ServerSettings, IngestSettings)
    for f in fields(settings)
    if f.name != "ingest" and f.metadata.get("env", True)
)
"""Every `WSI_*` variable a service reads (the ingest ones included)."""


def check_setting_names(environ: Mapping[str, str]) -> None:
    """Refuse a `WSI_*` variable that is not a setting but all but spells one (`WSI_TOKEN`,
    `WSI_SIGNINGKEY`, `WSI_ALLOW_LABELS`): it was ignored without a word, and a token typed so
    on loopback left the service without authentication, open to whatever reaches its port
    (a reverse proxy forwards as `Host: 127.0.0.1` by default). Other `WSI_*` names, which may
    be a deployment's own, are left alone; the error names the variable, never its value."""
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in SETTING_NAMES:
            continue
        close = difflib.get_close_matches(name, SETTING_NAMES, n=1, cutoff=0.85)
        if close:
            raise InvalidArgument(
                f"{name} is not a setting; did you mean {close[0]}? (a setting spelt otherwise "
                "is not applied)"
            )


def token_entry(entry: str) -> tuple[str, str]:
    """(name, secret) of a configured token (`ServerSettings.tokens`): `name:secret`, or a bare
    secret named by a digest of it (the audit log and errors must say who, never the secret)."""
    name, sep, secret = entry.partition(":")
    if sep and name and secret:
        return name, secret
    return f"token-{hashlib.sha256(entry.encode()).hexdigest()[:12]}", entry


@dataclass(frozen=True)
class ProcessRole:
    """The part one process plays in the service. Alone (the default) it is the whole service;
    among the `processes` that `server.processes` starts, each serves, and only one runs the
    ingest roles (watcher, workers, purge, archive policy, integrity check), so that nothing runs
    twice."""

    index: int = 0
    """0 .. processes - 1; process 0 runs the ingest roles."""
    ingest: bool = True
    """Runs the ingest roles (when `watch` or `s3_sources` asks for them). The others open the
    same job table, to answer `/jobs` and to follow the conversions it lists."""
    shared: str | None = None
    """The supervisor's private folder (mode 0700), where every process keeps a small status
    file (its metrics; the ingest roles' state): how `/metrics`, `/readyz` and `/integrity`
    answer for the whole service from any process. None for a process alone."""
