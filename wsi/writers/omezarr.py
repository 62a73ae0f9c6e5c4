"""OME-Zarr 0.5 (Zarr v3) writer: one shard object per level, streamed in tile order.

Each level array has one shard covering the whole level (`<level>/c/0/0/0`), so a 20 GB slide is a
handful of objects instead of millions, and the shard is written front to back as tiles arrive:
chunk bytes first, then the shard index (offset, length per chunk, then crc32c) at the end. Nothing
of a level is held in memory beyond one tile and the index.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from typing import IO, Any

import google_crc32c
import numcodecs
import numpy as np

from .. import jpeg
from ..errors import InvalidArgument, WsiError
from ..model import Level
from ..store import Store
from ..zarr_codec import CODEC_NAME
from .base import ChunkFormat, PyramidWriter, SlideInfo, StoredObject

FORMAT_VERSION = 1


def chunk_codecs(fmt: ChunkFormat) -> list[dict[str, Any]]:
    """Inner codecs of a level's chunks: channels last, then JPEG or raw bytes + zstd."""
    transpose = {"name": "transpose", "configuration": {"order": [1, 2, 0]}}
    if fmt.codec == "jpeg":
        return [transpose, {"name": CODEC_NAME, "configuration": {"quality": fmt.quality}}]
    return [
        transpose,
        {"name": "bytes"},
        {"name": "zstd", "configuration": {"level": fmt.zstd_level, "checksum": False}},
    ]


def level_array_metadata(level: Level, fmt: ChunkFormat, attributes: dict[str, Any]) -> dict:
    """zarr.json of a level: a single shard over the tile grid (padded to whole tiles)."""
    th, tw = level.tile_height, level.tile_width
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [3, level.height, level.width],
        "data_type": "uint8",
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [3, level.rows * th, level.cols * tw]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 255,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [3, th, tw],
                    "codecs": chunk_codecs(fmt),
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "attributes": attributes,
        "dimension_names": ["c", "y", "x"],
    }


def encode_chunk_zstd(pixels: np.ndarray, level: int = 3) -> bytes:
    """(h, w, 3) uint8 -> zstd of the interleaved bytes (what `transpose` + `bytes` produce)."""
    return bytes(numcodecs.Zstd(level=level).encode(np.ascontiguousarray(pixels)))


class _ShardStream:
    """Appends chunks to one shard object and ends it with the index; tracks size and crc32c."""

    def __init__(self, store: Store, key: str, level: Level, stack: contextlib.ExitStack):
        self.key = key
        self.level = level
        self._file: IO[bytes] = stack.enter_context(store.open_write(key))
        self._crc = google_crc32c.Checksum()
        self._offset = 0
        self._index = np.full((level.tile_count, 2), 2**64 - 1, dtype="<u8")
        self._next = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._crc.update(data)
        self._offset += len(data)

    def append(self, data: bytes) -> None:
        if self._next >= self.level.tile_count:
            raise WsiError(f"too many tiles for level {self.key}")
        self._index[self._next] = (self._offset, len(data))
        self._next += 1
        self._write(data)

    def extend(self, tiles: list[bytes]) -> None:
        """Append several chunks with one write (tiles are ~10-100 KB: fewer, larger writes)."""
        if self._next + len(tiles) > self.level.tile_count:
            raise WsiError(f"too many tiles for level {self.key}")
        offset = self._offset
        for data in tiles:
            self._index[self._next] = (offset, len(data))
            self._next += 1
            offset += len(data)
        self._write(b"".join(tiles))

    def close(self) -> StoredObject:
        if self._next != self.level.tile_count:
            raise WsiError(f"level {self.key}: {self._next} of {self.level.tile_count} tiles")
        index = self._index.tobytes()
        self._write(index + struct.pack("<I", google_crc32c.value(index)))
        return StoredObject(self.key, self._offset, self._crc.hexdigest().decode())


class OmeZarrWriter(PyramidWriter):
    """Writes `<prefix>/` as an OME-Zarr 0.5 multiscale image (the prefix ends in `slide.zarr`)."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self._stack = contextlib.ExitStack()
        self._shards: dict[int, _ShardStream] = {}
        self._levels: dict[int, tuple[Level, ChunkFormat]] = {}
        self._objects: list[StoredObject] = []
        self._associated: list[dict[str, Any]] = []

    def begin_level(self, index: int, level: Level, chunk_format: ChunkFormat) -> None:
        if index in self._levels:
            raise InvalidArgument(f"level {index} begun twice")
        self._levels[index] = (level, chunk_format)
        key = f"{self.prefix}/{index}/c/0/0/0"
        self._shards[index] = _ShardStream(self.store, key, level, self._stack)

    def write_tile(self, index: int, data: bytes) -> None:
        self._shards[index].append(data)

    def write_tiles(self, index: int, tiles: list[bytes]) -> None:
        self._shards[index].extend(tiles)

    def end_level(self, index: int) -> None:
        shard = self._shards.pop(index)
        self._objects.append(shard.close())

    def write_associated(self, name: str, pixels: np.ndarray, fmt: ChunkFormat) -> None:
        """One associated image (label, macro, thumbnail) as its own single-chunk array."""
        h, w = pixels.shape[:2]
        level = Level(w, h, w, h)
        key = f"{self.prefix}/associated/{name}"
        if fmt.codec == "jpeg":
            chunk = jpeg.encode(pixels, fmt.quality, subsample_420=False)
        else:
            chunk = encode_chunk_zstd(pixels, fmt.zstd_level)
        with contextlib.ExitStack() as stack:
            shard = _ShardStream(self.store, f"{key}/c/0/0/0", level, stack)
            shard.append(chunk)
            stored = shard.close()
        self._objects.append(stored)
        self._put_json(f"{key}/zarr.json", level_array_metadata(level, fmt, {"associated": name}))
        self._associated.append(
            {"name": name, "path": f"associated/{name}", "width": w, "height": h}
        )

    def _put_json(self, key: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        self.store.put(key, data)
        self._objects.append(
            StoredObject(key, len(data), google_crc32c.Checksum(data).hexdigest().decode())
        )

    def finish(self, info: SlideInfo) -> list[StoredObject]:
        if self._shards:
            raise WsiError(f"levels still open: {sorted(self._shards)}")
        self._stack.close()
        props = info.properties
        mpp = props.mpp_x
        datasets = []
        for index in sorted(self._levels):
            level, fmt = self._levels[index]
            factor = float(2**index)
            scale = [1.0, factor * (props.mpp_y or mpp or 1.0), factor * (mpp or 1.0)]
            datasets.append(
                {
                    "path": str(index),
                    "coordinateTransformations": [{"type": "scale", "scale": scale}],
                }
            )
            attrs = {"level": index, "downsample": factor}
            self._put_json(
                f"{self.prefix}/{index}/zarr.json", level_array_metadata(level, fmt, attrs)
            )
        unit = {"unit": "micrometer"} if mpp else {}
        axes = [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit},
        ]
        channels = [
            {
                "label": label,
                "color": color,
                "active": True,
                "window": {"start": 0, "end": 255, "min": 0, "max": 255},
            }
            for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ]
        root = {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {
                "ome": {
                    "version": "0.5",
                    "multiscales": [{"name": info.slide_id, "axes": axes, "datasets": datasets}],
                    "omero": {"channels": channels, "rdefs": {"model": "color"}},
                },
                "wsistore": self._slide_attributes(info),
            },
        }
        if self._associated:
            group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
            self._put_json(f"{self.prefix}/associated/zarr.json", group)
        self._put_json(f"{self.prefix}/zarr.json", root)
        return list(self._objects)

    def _slide_attributes(self, info: SlideInfo) -> dict[str, Any]:
        props = info.properties
        levels = []
        for index in sorted(self._levels):
            level, fmt = self._levels[index]
            levels.append(
                {
                    "path": str(index),
                    "width": level.width,
                    "height": level.height,
                    "tile_width": level.tile_width,
                    "tile_height": level.tile_height,
                    "downsample": float(2**index),
                    "codec": fmt.codec,
                }
            )
        return {
            "format_version": FORMAT_VERSION,
            "slide_id": info.slide_id,
            "source_backend": info.source_backend,
            "vendor": props.vendor,
            "mpp_x": props.mpp_x,
            "mpp_y": props.mpp_y,
            "objective_power": props.objective_power,
            "levels": levels,
            "associated_images": self._associated,
            "vendor_properties": dict(props.vendor_properties),
            "icc_profile": base64.b64encode(props.icc_profile).decode()
            if props.icc_profile
            else None,
        }

    def abort(self) -> None:
        # Exit the open streams *with* an exception so they are discarded (S3 multipart uploads
        # aborted, local temporary files removed) rather than completed as truncated objects.
        error = WsiError("conversion aborted")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(error), error, None)
        self._shards.clear()
