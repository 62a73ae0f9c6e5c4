"""The archive tier: published slides recompressed losslessly with JPEG XL, and restored.

`archive` recodes every JPEG chunk of a published slide (levels and associated images) with JPEG
XL lossless JPEG recompression (`wsi.codecs.jxl`) and publishes the result as a new version of
the slide; `restore` gives back the JPEG form, byte for byte. zstd chunks stay as they are.

Each stored object keeps its layout, so it is still one copy for both views:
- the DICOM header is unchanged except for the Transfer Syntax UID in the File Meta Information
  (JPEG baseline <-> JPEG XL JPEG Recompression) and the lossy compression record (see
  `archived_header`): same SOP Instance UIDs, every other element the same;
- the frames are the same items in the same order, each holding the recoded chunk (padded to
  even length), and the trailing Zarr shard index points at the new chunks;
- each array's zarr.json names the `wsistore.jpegxl` codec instead of `wsistore.jpeg`, and the
  root's `wsistore` attributes give the level's codec as `jpegxl` (its tier).
Everything else in those objects is copied, and libjxl rebuilds each JPEG exactly (checked for
every chunk while archiving), so the JPEG form comes back identical. The manifest records each
replaced object's pre-archive size and CRC32C (`Manifest.archived`): a restore that would give
anything else is refused before it is published, and the restored manifest has the bytes it
had before the archive.

Publishing follows the converter's protocol: the new version is built in `<id>/staging-<run>/`
while the old one is served; then its manifest is written there (the version is complete), the
slide is unpublished, the new objects are moved in, and the manifest last (the commit point). A
run killed before that leaves the old version served (the staging folder is removed by the next
run); one killed during the swap leaves a complete staged version that the next `archive`,
`restore`, conversion of the slide or archive-policy round moves in before anything else
(`wsi.store.versions`: the one protocol of every version swap).

Memory is bounded: objects are streamed frame by frame, `ArchiveSettings.batch_frames` chunks at
a time, recoded on a thread pool (libjxl releases the GIL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import io
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Literal

import google_crc32c
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator

from wsi.codecs import jxl
from wsi.errors import CorruptSlide, InvalidArgument, UnsupportedSlide, WsiError
from wsi.model import Level
from wsi.published import layout
from wsi.published.layout import (
    ARCHIVE_CODECS,
    EMPTY_CHUNK,
    JPEG,
    JPEGXL,
    CodecId,
    Manifest,
    ObjectEntry,
    SlideAttributes,
    SlideKeys,
)
from wsi.store.objects import Store, StoreSettings, check_slide_id
from wsi.store.versions import finish_swap, interrupted_swaps, swap_in
from wsi.writers.dicom import (
    EMPTY_BOT,
    ITEM,
    JPEG_XL_JPEG_RECOMPRESSION,
    PIXEL_DATA_HEADER,
    data_set_offset,
    item_header,
    trailer_header,
    transfer_syntax,
    with_transfer_syntax,
)

log = logging.getLogger("wsistore.archive")

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
TRANSFER_SYNTAX: dict[CodecId, str] = {JPEG: JPEG_BASELINE, JPEGXL: JPEG_XL_JPEG_RECOMPRESSION}
"""The Transfer Syntax UID of a DICOM instance whose frames are in each form."""
_TRAILER_BYTES = len(trailer_header(0))
"""The sequence delimiter and the (FFFC,FFFC) element header between the last frame and the
index of a DICOM object."""


@dataclass(frozen=True)
class ArchiveSettings:
    """How an archive or restore runs (not what it produces: the bytes are always the same)."""

    threads: int = 0
    """Threads recoding chunks; 0: one per core."""
    batch_frames: int = 64
    """Chunks read, recoded and written at a time: with ~10-100 KB chunks, a few MB per object
    in memory, whatever the level's size."""

    def __post_init__(self) -> None:
        if self.threads < 0 or self.batch_frames < 1:
            raise InvalidArgument("threads must be >= 0 and batch_frames >= 1")


@dataclass(frozen=True)
class ArchiveResult:
    """What one `archive` or `restore` did to one slide."""

    slide_id: str
    action: Literal["archive", "restore"]
    bytes_before: int
    """Stored bytes of the slide's published version before (every object, manifest aside)."""
    bytes_after: int
    objects: int
    """Objects recoded; 0: nothing to do (already in that form, or no JPEG chunks)."""
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def line(self) -> str:
        """The one-line report of the CLI."""
        if not self.objects:
            state = "archived" if self.action == "archive" else "in its JPEG form"
            return f"{self.slide_id}: already {state} ({self.bytes_before} bytes)"
        return (
            f"{self.slide_id}: {self.action}d {self.objects} objects, {self.bytes_before} -> "
            f"{self.bytes_after} bytes ({self.ratio:.3f}x) in {self.seconds:.1f} s"
        )


def archive(store: Store, slide_id: str, settings: ArchiveSettings | None = None) -> ArchiveResult:
    """Recompress every JPEG chunk of a published slide with JPEG XL and publish that version."""
    return _recode(store, slide_id, JPEGXL, settings or ArchiveSettings())


def restore(store: Store, slide_id: str, settings: ArchiveSettings | None = None) -> ArchiveResult:
    """Publish the JPEG form of an archived slide again, byte for byte as before its archive."""
    return _recode(store, slide_id, JPEG, settings or ArchiveSettings())


class JpegForm:
    """The JPEG form of a slide's archived objects, written where a caller wants it without
    restoring the slide: `wsi export-dicom` hands a PACS and every DICOM reader (OpenSlide,
    wsidicom, Orthanc) JPEG baseline instances, not JPEG XL ones none of them decodes. Each is
    checked to be the object it was before the archive (`Manifest.archived`), as a restore's."""

    def __init__(
        self, store: Store, manifest: Manifest, settings: ArchiveSettings | None = None
    ) -> None:
        self._store = store
        self._manifest = manifest
        self._settings = settings or ArchiveSettings()
        self._keys = SlideKeys(manifest.slide_id)
        self._arrays: dict[str, _Array] = {}
        if manifest.archived and manifest.zarr_view:  # only the Zarr view's arrays are archived
            what = f"{manifest.slide_id}: root zarr.json"
            root = store.get(self._keys.root_metadata)
            attributes = SlideAttributes.from_root_metadata(root, what)
            for array in _arrays(store, self._keys, manifest, attributes, JPEGXL):
                self._arrays[self._keys.in_slide(self._keys.shard(array.path))] = array

    def archived(self, key_in_slide: str) -> bool:
        """Whether the object `key_in_slide` is stored in its archived (JPEG XL) form."""
        return key_in_slide in self._arrays

    def write(self, key_in_slide: str, out: IO[bytes]) -> None:
        """Write the JPEG form of the archived object `key_in_slide` into `out`; CorruptSlide
        when it would not be the object it was before the archive (`out` then holds part of
        it: the caller removes it)."""
        array = self._arrays[key_in_slide]
        size = self._manifest.object(key_in_slide).size
        key = self._keys.in_store(key_in_slide)
        plan = ObjectPlan.read(self._store, key, size, array.chunks, array.dicom)
        threads = self._settings.threads or os.cpu_count() or 1
        with cf.ThreadPoolExecutor(threads, thread_name_prefix="wsi-jpeg-form") as pool:
            writer = _recode_object(self._store, plan, out, JPEG, pool, self._settings.batch_frames)
        if self._manifest.archived.get(key_in_slide) != ObjectEntry(writer.size, writer.crc32c):
            raise CorruptSlide(
                f"the JPEG form of {key_in_slide} of slide {self._manifest.slide_id} is not the "
                "object it was before its archive"
            )


# -- the object layout ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectPlan:
    """Where the parts of one stored object lie: header, chunks (in stored order), tail."""

    key: str
    size: int
    chunks: int
    """Chunks of the array (entries of the shard index)."""
    dicom: bool
    """The object is also a DICOM instance: each chunk is a Pixel Data item."""
    index: np.ndarray
    spans: tuple[tuple[int, int], ...]
    """(offset, length) of each distinct stored chunk, in stored order."""
    header_end: int
    """Bytes before the first chunk's item (DICOM: through the empty Basic Offset Table)."""
    data_end: int
    """Where the last chunk (and its pad byte) ends."""

    @classmethod
    def read(cls, store: Store, key: str, size: int, chunks: int, dicom: bool) -> ObjectPlan:
        start, end = layout.index_range(size, chunks, key)
        return cls.from_index(key, size, chunks, dicom, store.get_range(key, start, end))

    @classmethod
    def from_index(
        cls, key: str, size: int, chunks: int, dicom: bool, raw_index: bytes
    ) -> ObjectPlan:
        index = layout.decode_index(raw_index, chunks, key)
        present = index[~((index[:, 0] == EMPTY_CHUNK) & (index[:, 1] == EMPTY_CHUNK))]
        spans = tuple(sorted({(int(o), int(n)) for o, n in present}))
        data_end = size - layout.index_nbytes(chunks) - (_TRAILER_BYTES if dicom else 0)
        framing = 8 if dicom else 0
        header_end = spans[0][0] - framing if spans else data_end
        position = header_end
        for offset, length in spans:  # each chunk right after the previous one (and its item)
            if offset != position + framing or length <= 0:
                raise UnsupportedSlide(f"{key}: chunks are not laid out as the writer does")
            position = offset + length + (length & 1 if dicom else 0)
        if position != data_end or header_end < 0:
            raise UnsupportedSlide(f"{key}: chunks are not laid out as the writer does")
        return cls(key, size, chunks, dicom, index, spans, header_end, data_end)

    def batches(self, frames: int, start: int = 0) -> Iterator[tuple[tuple[int, int], ...]]:
        """The spans from the `start`-th on, `frames` at a time."""
        for i in range(start, len(self.spans), frames):
            yield self.spans[i : i + frames]

    def batch_range(self, batch: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """[start, end) of the bytes a batch of chunks occupies (items and pads included)."""
        first, (last, length) = batch[0][0], batch[-1]
        framing = 8 if self.dicom else 0
        return first - framing, last + length + (length & 1 if self.dicom else 0)

    def chunks_of(self, batch: tuple[tuple[int, int], ...], data: bytes) -> list[bytes]:
        """The chunk bytes of a batch from the bytes of its range, the item lengths checked."""
        start = self.batch_range(batch)[0]
        out = []
        for offset, length in batch:
            if self.dicom:
                tag, item_length = struct.unpack_from("<II", data, offset - 8 - start)
                if tag != ITEM or item_length != length + (length & 1):
                    raise CorruptSlide(f"{self.key}: frame item at {offset - 8} is damaged")
            out.append(data[offset - start : offset - start + length])
        if sum(len(c) for c in out) != sum(n for _, n in batch):
            raise CorruptSlide(f"{self.key} ends inside a chunk")
        return out

    def check_header(self, header: bytes, codec: CodecId) -> None:
        """A DICOM header must end where the frames start and be in `codec`'s syntax."""
        if not self.dicom:
            if header:
                raise UnsupportedSlide(f"{self.key}: a shard without DICOM has no header")
            return
        if not header.endswith(PIXEL_DATA_HEADER + EMPTY_BOT):
            raise UnsupportedSlide(f"{self.key}: the frames do not follow an empty offset table")
        found = transfer_syntax(header)
        if found != TRANSFER_SYNTAX[codec]:
            raise UnsupportedSlide(f"{self.key}: transfer syntax {found} is not {codec}'s")

    def new_index(self, moved: dict[tuple[int, int], tuple[int, int]]) -> bytes:
        """The shard index of the recoded object: each chunk at its new (offset, length)."""
        index = layout.empty_index(self.chunks)
        for i, (offset, length) in enumerate(self.index):
            if (int(offset), int(length)) != (EMPTY_CHUNK, EMPTY_CHUNK):
                index[i] = moved[(int(offset), int(length))]
        return layout.encode_index(index)


class ObjectWriter:
    """Writes a recoded object part by part: header, chunks (framed as items in a DICOM object,
    padded to even length), then the tail and the new index; tracks offsets, size and CRC32C."""

    def __init__(self, plan: ObjectPlan, sink: Callable[[bytes], object]) -> None:
        self.plan = plan
        self._sink = sink
        self._crc = google_crc32c.Checksum()
        self.size = 0
        self._moved: dict[tuple[int, int], tuple[int, int]] = {}

    def _write(self, data: bytes) -> None:
        self._sink(data)
        self._crc.update(data)
        self.size += len(data)

    def header(self, header: bytes, to: CodecId, sample: tuple[int, int] = (0, 0)) -> None:
        """The object's header in `to`'s form (`sample`: see `archived_header`)."""
        self._write(form_header(header, to, sample) if self.plan.dicom else b"")

    def chunks(self, spans: tuple[tuple[int, int], ...], recoded: list[bytes]) -> None:
        parts = []
        offset = self.size
        for span, data in zip(spans, recoded, strict=True):
            pad = len(data) & 1 if self.plan.dicom else 0
            if self.plan.dicom:
                parts.append(item_header(len(data) + pad))
                offset += 8
            self._moved[span] = (offset, len(data))
            parts.append(data + b"\0" * pad)
            offset += len(data) + pad
        self._write(b"".join(parts))

    def finish(self) -> None:
        index = self.plan.new_index(self._moved)
        self._write((trailer_header(len(index)) if self.plan.dicom else b"") + index)

    @property
    def crc32c(self) -> str:
        return str(self._crc.hexdigest().decode())


def recode_chunk(data: bytes, to: CodecId) -> bytes:
    """One chunk in the other form: JPEG XL made from a JPEG (its exact rebuild checked), or the
    JPEG rebuilt from one."""
    return jxl.recompress_exactly(data) if to == JPEGXL else jxl.jxl_to_jpeg(data)


# -- the DICOM header of each form ----------------------------------------------------------------
JPEG_XL_METHOD = "ISO_18181_1"
"""Lossy Image Compression Method (0028,2114) Defined Term of JPEG XL (PS3.3 C.7.6.1.1.5.1)."""
RATIO_SAMPLE_FRAMES = 16
"""Frames (the first ones stored) whose sizes before and after JPEG XL give the compression ratio
recorded for the archive step (the DICOM writer estimates the JPEG step's ratio from its first
frames too); a fixed count, so the archived bytes do not depend on `ArchiveSettings`."""
_METHOD, _RATIO = 0x00282114, 0x00282112


def form_header(header: bytes, to: CodecId, sample: tuple[int, int] = (0, 0)) -> bytes:
    """A DICOM instance's header (its bytes up to the first frame) in `to`'s form, from its
    header in the other form: `archived_header` or `jpeg_header`, and the matching Transfer
    Syntax UID. An archived header that would not give the JPEG one back exactly is refused
    before anything is published."""
    if to == JPEGXL:
        archived = archived_header(header, sample)
        if jpeg_header(archived) != header:
            raise UnsupportedSlide("the DICOM header's lossy compression record is not ours")
        header = archived
    else:
        header = jpeg_header(header)
    return with_transfer_syntax(header, TRANSFER_SYNTAX[to])


def archived_header(header: bytes, sample: tuple[int, int]) -> bytes:
    """The data set of an archived instance: JPEG XL appended to its lossy compression record.

    PS3.3 C.7.6.1.1.5 keeps that record in Lossy Image Compression Method (0028,2114) and Ratio
    (0028,2112), one value per successive step, in the same order. JPEG XL JPEG Recompression
    loses nothing (it "preserves the bits of the (lossy) JPEG encoding", PS3.5 8.2.15): the JPEG
    step stays first, its ratio unchanged. The JPEG XL step is appended, since validators expect
    the last method to name the compression the transfer syntax holds (dciodvfy: "method
    inconsistent with Transfer Syntax" otherwise), its ratio uncompressed size over JPEG XL size
    (C.7.6.1.1.5.2 allows a measured value): the JPEG ratio times what JPEG XL gained on a sample
    of frames (`sample`: their bytes as JPEG, as JPEG XL). A header without that record, or
    without a sample, is left as it is."""
    found = _elements(header)
    jpeg_bytes, jxl_bytes = sample
    if _METHOD not in found or _RATIO not in found or not jxl_bytes:
        return header
    methods, ratios = _strings(found[_METHOD][1]), _strings(found[_RATIO][1])
    ratio = f"{float(ratios[-1]) * jpeg_bytes / jxl_bytes:.2f}"
    header = _with_strings(header, found[_METHOD][0], [*methods, JPEG_XL_METHOD])
    return _with_strings(header, found[_RATIO][0], [*ratios, ratio])


def jpeg_header(header: bytes) -> bytes:
    """The data set of an archived instance as it was before its archive: `archived_header`'s
    last method and ratio dropped (a header without them is left as it is)."""
    found = _elements(header)
    if _METHOD not in found or _RATIO not in found:
        return header
    methods, ratios = _strings(found[_METHOD][1]), _strings(found[_RATIO][1])
    if len(methods) < 2 or len(ratios) < 2 or methods[-1] != JPEG_XL_METHOD:
        return header
    header = _with_strings(header, found[_METHOD][0], methods[:-1])
    return _with_strings(header, found[_RATIO][0], ratios[:-1])


def _elements(header: bytes) -> dict[int, tuple[int, bytes]]:
    """The data set's elements up to (0028,2114): tag -> (offset of the element in `header`,
    value). Explicit VR little endian, as every transfer syntax of our instances encodes it."""
    start = data_set_offset(header)
    found: dict[int, tuple[int, bytes]] = {}
    stream = io.BytesIO(header[start:])
    for element in data_element_generator(
        stream, False, True, stop_when=lambda tag, _vr, _length: tag > _METHOD
    ):
        if element.tag not in (_METHOD, _RATIO):
            continue
        if not (isinstance(element, RawDataElement) and isinstance(element.value, bytes)):
            raise UnsupportedSlide(f"DICOM element {element.tag} is not encoded as we write")
        if element.VR not in ("CS", "DS"):
            raise UnsupportedSlide(f"DICOM element {element.tag} is not a CS or DS string")
        found[int(element.tag)] = (start + element.value_tell - 8, element.value)
    return found


def _strings(value: bytes) -> list[str]:
    return value.decode("ascii").rstrip(" ").split("\\")


def _with_strings(header: bytes, offset: int, values: list[str]) -> bytes:
    """`header` with the short-VR string element at `offset` holding `values` (padded to even
    length with a space, as PS3.5 6.2 pads CS and DS values)."""
    (length,) = struct.unpack_from("<H", header, offset + 6)
    value = "\\".join(values).encode("ascii")
    value += b" " * (len(value) & 1)
    return (
        header[: offset + 6] + struct.pack("<H", len(value)) + value + header[offset + 8 + length :]
    )


def _recode_object(
    store: Store,
    plan: ObjectPlan,
    out: IO[bytes],
    to: CodecId,
    pool: cf.Executor,
    batch_frames: int,
) -> ObjectWriter:
    writer = ObjectWriter(plan, out.write)
    header = store.get_range(plan.key, 0, plan.header_end) if plan.header_end else b""
    plan.check_header(header, ARCHIVE_CODECS[to])

    def recode(batch: tuple[tuple[int, int], ...]) -> list[bytes]:
        chunks = plan.chunks_of(batch, store.get_range(plan.key, *plan.batch_range(batch)))
        return list(pool.map(recode_chunk, chunks, [to] * len(chunks)))

    # The first frames are recoded before the header is written: it records what they gained.
    first = plan.spans[:RATIO_SAMPLE_FRAMES]
    recoded = recode(first) if first else []
    writer.header(header, to, (sum(n for _, n in first), sum(map(len, recoded))))
    if first:
        writer.chunks(first, recoded)
    for batch in plan.batches(batch_frames, start=len(first)):
        writer.chunks(batch, recode(batch))
    tail = store.get_range(plan.key, plan.data_end, plan.size - layout.index_nbytes(plan.chunks))
    if plan.dicom and tail != trailer_header(layout.index_nbytes(plan.chunks)):
        raise UnsupportedSlide(f"{plan.key}: the index is not in a trailing padding element")
    writer.finish()
    return writer


# -- one slide ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Array:
    """An array whose chunks the run recodes."""

    path: str
    chunks: int
    dicom: bool
    level: bool
    """A pyramid level (its codec is also in the root attributes), not an associated image."""


def _arrays(
    store: Store, keys: SlideKeys, manifest: Manifest, attributes: SlideAttributes, source: CodecId
) -> list[_Array]:
    """The arrays stored as `source` (JPEG to archive, JPEG XL to restore)."""
    dicom = {i.key for i in manifest.dicom}
    found = []
    for entry in attributes.levels:
        if entry.codec == source:
            grid = Level(entry.width, entry.height, entry.tile_width, entry.tile_height)
            shard = keys.in_slide(keys.shard(entry.path))
            found.append(_Array(entry.path, grid.tile_count, shard in dicom, True))
    for image in attributes.associated_images:
        meta_key = keys.array_metadata(image.path)
        meta = layout.load_json(store.get(meta_key), meta_key)
        if layout.codec_of_array(meta, meta_key) == source:
            shard = keys.in_slide(keys.shard(image.path))
            found.append(_Array(image.path, 1, shard in dicom, False))
    return found


def _recode(store: Store, slide_id: str, to: CodecId, settings: ArchiveSettings) -> ArchiveResult:
    started = time.perf_counter()
    action: Literal["archive", "restore"] = "archive" if to == JPEGXL else "restore"
    keys = SlideKeys(check_slide_id(slide_id))
    with store.slide_lock(slide_id):
        if finish_swap(store, slide_id):
            log.info("slide %s: finished the swap of an interrupted run", slide_id)
        manifest = store.manifest(slide_id)
        if not manifest.zarr_view:
            raise InvalidArgument(
                f"slide {slide_id} has no Zarr view (published with --format dicom): the "
                "archive tier recodes the arrays the Zarr view describes; publish it again "
                "with --format both to archive it"
            )
        root = store.get(keys.root_metadata)
        attributes = SlideAttributes.from_root_metadata(root, f"{slide_id}: root zarr.json")
        arrays = _arrays(store, keys, manifest, attributes, ARCHIVE_CODECS[to])
        before = manifest.stored_bytes
        if not arrays:
            return ArchiveResult(slide_id, action, before, before, 0, 0.0)
        staged = keys.staging(uuid.uuid4().hex[:12])
        try:
            written = _write_version(store, keys, staged, manifest, root, arrays, to, settings)
            new = _next_manifest(manifest, written, to)
        except BaseException:
            with contextlib.suppress(Exception):
                store.delete_prefix(staged.root)
            raise
        swap_in(store, staged, new.to_bytes(), sorted(written))
    seconds = time.perf_counter() - started
    return ArchiveResult(slide_id, action, before, new.stored_bytes, len(written), seconds)


def _write_version(
    store: Store,
    keys: SlideKeys,
    staged: SlideKeys,
    manifest: Manifest,
    root: bytes,
    arrays: list[_Array],
    to: CodecId,
    settings: ArchiveSettings,
) -> dict[str, ObjectEntry]:
    """Write the recoded objects into `staged`: key in the slide -> size and CRC32C. A restored
    object must be the one the manifest says it was before the archive."""
    written: dict[str, ObjectEntry] = {}

    def put(key_in_slide: str, data: bytes) -> None:
        store.put(staged.in_store(key_in_slide), data)
        done(key_in_slide, ObjectEntry(len(data), layout.crc32c_hex(data)))

    def done(key_in_slide: str, entry: ObjectEntry) -> None:
        if to == JPEG and manifest.archived.get(key_in_slide) != entry:
            raise CorruptSlide(
                f"restoring {keys.slide_id} would not give {key_in_slide} as it was before its "
                "archive; the archived version stays published"
            )
        written[key_in_slide] = entry

    threads = settings.threads or os.cpu_count() or 1
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="wsi-archive") as pool:
        for array in arrays:
            shard = keys.in_slide(keys.shard(array.path))
            size = manifest.object(shard).size
            plan = ObjectPlan.read(store, keys.shard(array.path), size, array.chunks, array.dicom)
            with store.open_write(staged.in_store(shard)) as out:
                writer = _recode_object(store, plan, out, to, pool, settings.batch_frames)
            done(shard, ObjectEntry(writer.size, writer.crc32c))
            meta = keys.in_slide(keys.array_metadata(array.path))
            put(meta, layout.recode_array_metadata(store.get(keys.in_store(meta)), to, meta))
    levels = [a.path for a in arrays if a.level]
    if levels:
        what = f"{keys.slide_id}: root zarr.json"
        put(keys.in_slide(keys.root_metadata), layout.recode_root_metadata(root, levels, to, what))
    return written


def _next_manifest(manifest: Manifest, written: dict[str, ObjectEntry], to: CodecId) -> Manifest:
    """The manifest of the recoded version: the new objects, and in `archived` the JPEG form of
    every object the archive tier replaced (dropped again as they are restored)."""
    objects = {**manifest.objects, **written}
    if to == JPEGXL:
        archived = {**{k: manifest.objects[k] for k in written}, **manifest.archived}
    else:
        archived = {k: v for k, v in manifest.archived.items() if k not in written}
    stored = sum(o.size for o in objects.values())
    return replace(manifest, objects=objects, archived=archived, stored_bytes=stored)


# -- the ingest policy ----------------------------------------------------------------------------
ARCHIVE_EVERY_SECONDS = 3600.0


def archive_due(
    store: Store,
    after_days: float,
    now: float,
    settings: ArchiveSettings | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> list[ArchiveResult]:
    """Archive every published slide whose manifest was written more than `after_days` before
    `now` (seconds since the epoch) and that is not archived yet; a slide that fails (busy,
    damaged) is logged and left for the next round. `stop` is asked between slides."""
    cutoff = now - after_days * 86400.0
    results = []
    for slide_id in interrupted_swaps(store):  # a version cut short in its swap: published
        try:
            with store.slide_lock(slide_id):
                if finish_swap(store, slide_id):
                    log.info("slide %s: finished the swap of an interrupted run", slide_id)
        except WsiError as exc:
            log.warning("slide %s: its interrupted swap was not finished: %s", slide_id, exc)
    for slide_id in store.published_slides():
        if stop():
            break
        try:
            if store.modified(SlideKeys(slide_id).manifest) > cutoff:
                continue
            manifest = store.manifest(slide_id)
            if manifest.archived or not manifest.zarr_view:  # done, or nothing it can recode
                continue
            result = archive(store, slide_id, settings)
        except WsiError as exc:
            log.warning("slide %s was not archived: %s", slide_id, exc)
            continue
        if result.objects:
            log.info("archive policy: %s", result.line())
            results.append(result)
    return results


async def archive_policy(
    store: StoreSettings,
    after_days: float,
    stop: asyncio.Event,
    clock: Callable[[], float] = time.time,
) -> None:
    """Hourly (and once at start): `archive_due` on the store, until `stop`. A store error is
    left for the next round: archiving is housekeeping, never a reason to stop."""
    target = Store(store)
    while not stop.is_set():
        with contextlib.suppress(WsiError):
            await asyncio.to_thread(archive_due, target, after_days, clock(), None, stop.is_set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ARCHIVE_EVERY_SECONDS)
