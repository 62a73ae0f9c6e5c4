"""The ids de-identified slides are published under: keyed pseudonyms of their content ids.

A slide's content id is a hash of its bytes that anyone holding the file can compute
(`wsi.slide_id`). Published under it, a de-identified copy could be linked back to the identified
slide (the same id in the lab's identified store, or computed from a second hospital's copy of
the file), and so could everything made from the id: its DICOM UIDs, its dummy Patient ID and
Study ID, its neutral name. A de-identified conversion publishes under HMAC-SHA256(key, content
id) instead, 24 hex digits like a content id: the same for the same slide and key (converting it
again finds it published, and ingest recognises a slide dropped twice), not computable without
the key (PS3.15's pseudonymisation, whose key the lab keeps and never publishes).

The key is a file of at least `MIN_KEY_BYTES` bytes (raw; a passphrase works): the one named by
`wsi convert --deidentify-key-file` or `WSI_DEIDENTIFY_KEY_FILE`, which must exist, or by default
`$XDG_CONFIG_HOME/wsistore/deidentify.key` (`~/.config/wsistore/deidentify.key`), made the first
time one is needed (32 bytes from the operating system, mode 0600 in a 0700 folder). Every
machine converting into one store must be given the same key file, or one slide gets one id per
key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from wsi.errors import InvalidArgument

KEY_FILE_ENV = "WSI_DEIDENTIFY_KEY_FILE"
"""The environment variable naming the key file (the commands' `--deidentify-key-file`)."""
MIN_KEY_BYTES = 16
"""A shorter key could be guessed, and every pseudonym with it."""
MAX_KEY_BYTES = 4096
"""Read at most this much of a key file (anything longer is refused, not read whole)."""
NEW_KEY_BYTES = 32
_DOMAIN = b"wsistore-deidentified-slide-id-1\0"
"""Bound into every pseudonym, so the key used for nothing else would give other values."""
_ID_HEX = 24


def default_key_file() -> Path:
    """`$XDG_CONFIG_HOME/wsistore/deidentify.key`, `~/.config/...` when the variable is unset."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "wsistore" / "deidentify.key"


@dataclass(frozen=True)
class PublishedIds:
    """How a deployment names the slides it publishes: by content id, or (de-identifying) by
    the keyed pseudonym of it. The key never shows in a repr."""

    key: bytes | None = field(default=None, repr=False)

    def of(self, content_id: str) -> str:
        """The id the slide whose content id is `content_id` is published under."""
        if self.key is None:
            return content_id
        mac = hmac.new(self.key, _DOMAIN + content_id.encode(), hashlib.sha256)
        return mac.hexdigest()[:_ID_HEX]


CONTENT_IDS = PublishedIds()
"""The ids of a deployment that does not de-identify: content ids as they are."""


def published_ids(deidentify: bool, key_file: str | None = None) -> PublishedIds:
    """The ids of a deployment that de-identifies or not; the key read from `key_file`, or from
    the default file, made if absent (InvalidArgument, one line, when neither can be)."""
    if not deidentify:
        return CONTENT_IDS
    return PublishedIds(read_key(Path(key_file)) if key_file else _default_key())


def read_key(path: Path) -> bytes:
    """The key in `path` (InvalidArgument when missing, unreadable, too short or too long)."""
    try:
        with path.open("rb") as f:
            key = f.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(
            f"the de-identification key file {path} does not exist (make one with "
            f"`head -c {NEW_KEY_BYTES} /dev/urandom > FILE` and keep it: it decides the ids)"
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the de-identification key file {path}: {exc.strerror}"
        ) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgument(
            f"the de-identification key file {path} must hold {MIN_KEY_BYTES} to "
            f"{MAX_KEY_BYTES} bytes"
        )
    return key


def _default_key() -> bytes:
    """The default key file's key, the file made first if absent: written in full under a
    temporary name and linked into place, so two processes starting at once agree on one key
    (the second link fails and it reads the first's)."""
    path = default_key_file()
    if path.exists():
        return read_key(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(NEW_KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # the key decides every id: it must survive a power cut once used
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise InvalidArgument(
            f"cannot make the de-identification key file {path}: {exc.strerror} "
            f"(name one with --deidentify-key-file or {KEY_FILE_ENV})"
        ) from None
    return read_key(path)
