"""OME-Zarr 0.5 (Zarr v3) writer, optionally with a DICOM-WSI view of the same bytes.

Each level array has one shard covering the whole level, so a 20 GB slide is a handful of objects
instead of millions, and the shard is written front to back as tiles arrive (see `shard.py`).
Nothing of a level is held in memory beyond one row of tiles and the index, and the parts in
flight (`shard.py`, `wsi.store.head_last`: bounded per object, whatever the slide). With a
`DicomSlide`, every level object and associated image is also a DICOM VL Whole Slide Microscopy
instance: one pixel copy, two standard views. Keys, metadata documents and attributes come from
`wsi.published.layout`, which the reader shares.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wsi.codecs import jpeg
from wsi.errors import InvalidArgument, WsiError
from wsi.model import Level
from wsi.published import layout
from wsi.published.layout import (
    JPEG,
    AssociatedEntry,
    ChunkFormat,
    DicomEntry,
    DicomInstanceEntry,
    Flavor,
    LevelEntry,
    SlideAttributes,
    SlideKeys,
    StoredObject,
    encode_chunk_zstd,
)
from wsi.store.objects import Store
from wsi.writers.base import ALL_STORED, BlankTiles, PyramidWriter, SlideInfo
from wsi.writers.dicom import (
    DicomSlide,
    SparseFrames,
    header_multiple,
    instance_header,
    padded_header,
)
from wsi.writers.shard import HeaderFactory, ShardStream

_ENDING_THREADS = 4
"""Level objects ended at once by `end_levels` (mostly waiting on the disk or the network)."""

__all__ = ["OmeZarrWriter", "encode_chunk_zstd"]


class OmeZarrWriter(PyramidWriter):
    """Writes the `slide.zarr` group of one slide as an OME-Zarr 0.5 multiscale image."""

    def __init__(
        self,
        store: Store,
        keys: SlideKeys,
        dicom: DicomSlide | None = None,
        zarr_metadata: bool = True,
    ) -> None:
        self.store = store
        self.keys = keys
        self.dicom = dicom
        self.zarr_metadata = zarr_metadata
        self.dicom_instances: list[DicomInstanceEntry] = []
        """Every DICOM instance written, in the order written."""
        self._stack = contextlib.ExitStack()
        self._shards: dict[int, ShardStream] = {}
        self._levels: dict[int, tuple[Level, ChunkFormat, BlankTiles]] = {}
        self._objects: list[StoredObject] = []
        self._associated: list[AssociatedEntry] = []

    def begin_level(
        self, index: int, level: Level, chunk_format: ChunkFormat, blank: BlankTiles = ALL_STORED
    ) -> None:
        key, header, placeholder = self._register_level(index, level, chunk_format, blank)
        self._shards[index] = ShardStream(self.store, key, level, self._stack, header, placeholder)

    def _register_level(
        self, index: int, level: Level, chunk_format: ChunkFormat, blank: BlankTiles
    ) -> tuple[str, HeaderFactory | None, Callable[[], bytes]]:
        """Record a level: its object's key, its DICOM header factory (None without the DICOM
        view) and the placeholder chunk of a DICOM level with no tile stored."""
        if index in self._levels:
            raise InvalidArgument(f"level {index} begun twice")
        if self.dicom is not None and chunk_format.codec not in (layout.JPEG, layout.JPEG2000):
            raise InvalidArgument(
                "DICOM instances need JPEG or JPEG 2000 tiles: use the Zarr view only"
            )
        self._levels[index] = (level, chunk_format, blank)
        key = self.keys.shard(layout.level_path(index))
        header = self._dicom_header(key, layout.VOLUME, index, level, blank.fill)

        def placeholder() -> bytes:
            codec = chunk_format.codec
            return layout.background_chunk(codec, level.tile_width, level.tile_height, blank.fill)

        return key, header, placeholder

    def _dicom_header(
        self,
        key: str,
        flavor: Flavor,
        index: int,
        level: Level,
        fill: int = layout.FILL_VALUE,
        shows_label: bool = False,
    ) -> HeaderFactory | None:
        dicom = self.dicom
        if dicom is None:
            return None
        self.dicom_instances.append(
            DicomInstanceEntry(
                self.keys.in_slide(key),
                dicom.instance_uid(layout.instance_name(flavor, index)),
                flavor,
                index if flavor == layout.VOLUME else None,
            )
        )

        def header(first_frames: list[bytes], tiles: tuple[int, ...] | None, frames: int) -> bytes:
            sparse = SparseFrames(tiles, fill) if tiles is not None else None
            data = instance_header(dicom, flavor, index, level, first_frames, sparse, shows_label)[
                1
            ]
            return padded_header(data, header_multiple(frames))

        return header

    def _open_shard(self, index: int) -> ShardStream:
        shard = self._shards.get(index)
        if shard is None:
            raise InvalidArgument(f"level {index} is not open (begin_level first)")
        return shard

    def write_tile(self, index: int, data: bytes | None) -> None:
        self._open_shard(index).append(data)

    def write_tiles(self, index: int, tiles: Sequence[bytes | None]) -> None:
        self._open_shard(index).extend(tiles)

    def end_level(self, index: int) -> None:
        self._objects.append(self._open_shard(index).close())
        del self._shards[index]

    def end_levels(self, indices: Sequence[int]) -> None:
        """The levels' objects ended side by side. Ending one is its DICOM header (the
        per-frame groups of a sparse base level: ~50 ms of Python), the header put before the
        body and an fsync that waits on the disk (0.1-0.2 s for a 150 MB base level here), or an
        upload's completion: one after the other they would be the last 0.15-0.4 s of a
        conversion, with the cores idle. Every close has ended when this returns or raises."""
        shards = [self._open_shard(index) for index in indices]
        if len(shards) < 2:
            super().end_levels(indices)
            return
        with cf.ThreadPoolExecutor(min(len(shards), _ENDING_THREADS), "wsi-end-level") as pool:
            closing = [pool.submit(shard.close) for shard in shards]
        ended = [future.result() for future in closing]
        for index, stored in zip(indices, ended, strict=True):
            self._objects.append(stored)
            del self._shards[index]

    def write_associated(
        self, name: str, pixels: np.ndarray, fmt: ChunkFormat, shows_label: bool = True
    ) -> None:
        """One associated image (label, macro, thumbnail) as its own single-chunk array."""
        h, w = pixels.shape[:2]
        level = Level(w, h, w, h)
        path = layout.associated_path(name)
        if fmt.codec == JPEG:
            chunk = jpeg.encode(pixels, fmt.quality, subsample_420=False)
        else:
            if self.dicom is not None:
                raise InvalidArgument("DICOM instances need JPEG associated images")
            chunk = encode_chunk_zstd(pixels, fmt.zstd_level)
        key = self.keys.shard(path)
        header = self._dicom_header(
            key, layout.ASSOCIATED_FLAVOR[name], 0, level, shows_label=shows_label
        )
        with contextlib.ExitStack() as stack:
            shard = ShardStream(self.store, key, level, stack, header)
            shard.append(chunk)
            stored = shard.close()
        self._objects.append(stored)
        if self.zarr_metadata:
            doc = layout.associated_array_metadata(name, level, fmt)
            self._put_json(self.keys.array_metadata(path), doc)
        self._associated.append(AssociatedEntry(name, path, w, h, shows_label))

    def _put_json(self, key: str, doc: Mapping[str, Any]) -> None:
        data = layout.dump_json(doc)
        self.store.put(key, data)
        self._objects.append(StoredObject(key, len(data), layout.crc32c_hex(data)))

    def finish(self, info: SlideInfo) -> list[StoredObject]:
        if self._shards:
            raise WsiError(f"levels still open: {sorted(self._shards)}")
        self._stack.close()
        if self.zarr_metadata:
            self._write_zarr_metadata(info)
        return list(self._objects)

    def _write_zarr_metadata(self, info: SlideInfo) -> None:
        for index in sorted(self._levels):
            level, fmt, blank = self._levels[index]
            doc = layout.level_array_metadata(index, level, fmt, blank.fill)
            self._put_json(self.keys.array_metadata(layout.level_path(index)), doc)
        if self._associated:
            self._put_json(self.keys.associated_group_metadata, layout.ASSOCIATED_GROUP_METADATA)
        self._put_json(self.keys.root_metadata, layout.root_metadata(self.attributes(info)))

    def attributes(self, info: SlideInfo) -> SlideAttributes:
        """The slide's root attributes: in its root `zarr.json`, or without the Zarr view in
        its manifest (`Manifest.attributes`)."""
        props = info.properties
        levels = []
        for index in sorted(self._levels):
            level, fmt, _ = self._levels[index]
            levels.append(
                LevelEntry(
                    layout.level_path(index),
                    level.width,
                    level.height,
                    level.tile_width,
                    level.tile_height,
                    level.downsample,
                    fmt.codec,
                )
            )
        dicom = self.dicom
        blank = self._levels[min(self._levels)][2] if self._levels else ALL_STORED
        return SlideAttributes(
            slide_id=info.slide_id,
            source_backend=info.source_backend,
            levels=tuple(levels),
            associated_images=tuple(self._associated),
            vendor=props.vendor,
            mpp_x=props.mpp_x,
            mpp_y=props.mpp_y,
            objective_power=props.objective_power,
            vendor_properties=props.vendor_properties,
            icc_profile=props.icc_profile,
            dicom=DicomEntry(dicom.study_uid, dicom.series_uid, tuple(self.dicom_instances))
            if dicom
            else None,
            fill=blank.fill,
            background_delta_e76=blank.delta_e76,
        )

    def abort(self) -> None:
        # Exit the open streams *with* an exception so they are discarded (S3 multipart uploads
        # aborted, local temporary files removed) rather than completed as truncated objects.
        error = WsiError("conversion aborted")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(error), error, None)
        self._shards.clear()
