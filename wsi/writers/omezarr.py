"""OME-Zarr 0.5 (Zarr v3) writer, optionally with a DICOM-WSI view of the same bytes.

Each level array has one shard covering the whole level (`<level>/c/0/0/0`), so a 20 GB slide is a
handful of objects instead of millions, and the shard is written front to back as tiles arrive
(see `shard.py`). Nothing of a level is held in memory beyond one row of tiles and the index.
With a `DicomSlide`, every level object and associated image is also a DICOM VL Whole Slide
Microscopy instance: one pixel copy, two standard views.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from wsi.codecs import jpeg
from wsi.errors import InvalidArgument, WsiError
from wsi.model import JPEG_CODEC_NAME as CODEC_NAME
from wsi.model import Level
from wsi.store.objects import Store
from wsi.writers.base import ChunkFormat, PyramidWriter, SlideInfo, StoredObject
from wsi.writers.dicom import ASSOCIATED_FLAVOR, DicomSlide, Flavor, instance_header
from wsi.writers.shard import HeaderFactory, ShardStream

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


class OmeZarrWriter(PyramidWriter):
    """Writes `<prefix>/` as an OME-Zarr 0.5 multiscale image (the prefix ends in `slide.zarr`)."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        dicom: DicomSlide | None = None,
        zarr_metadata: bool = True,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.dicom = dicom
        self.zarr_metadata = zarr_metadata
        self.dicom_instances: list[dict[str, Any]] = []
        """Every DICOM instance written: key, SOP instance UID, flavor, level."""
        self._stack = contextlib.ExitStack()
        self._shards: dict[int, ShardStream] = {}
        self._levels: dict[int, tuple[Level, ChunkFormat]] = {}
        self._objects: list[StoredObject] = []
        self._associated: list[dict[str, Any]] = []

    def begin_level(self, index: int, level: Level, chunk_format: ChunkFormat) -> None:
        if index in self._levels:
            raise InvalidArgument(f"level {index} begun twice")
        self._levels[index] = (level, chunk_format)
        key = f"{self.prefix}/{index}/c/0/0/0"
        header = self._dicom_header(key, "VOLUME", index, level)
        self._shards[index] = ShardStream(self.store, key, level, self._stack, header)

    def _dicom_header(
        self, key: str, flavor: Flavor, index: int, level: Level
    ) -> HeaderFactory | None:
        dicom = self.dicom
        if dicom is None:
            return None
        name = f"level-{index}" if flavor == "VOLUME" else flavor.lower()
        self.dicom_instances.append(
            {
                "key": key,
                "sop_instance_uid": dicom.instance_uid(name),
                "flavor": flavor,
                "level": index if flavor == "VOLUME" else None,
            }
        )

        def header(first_frames: list[bytes]) -> bytes:
            return instance_header(dicom, flavor, index, level, first_frames)[1]

        return header

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
            if self.dicom is not None:
                raise InvalidArgument("DICOM instances need JPEG associated images")
            chunk = encode_chunk_zstd(pixels, fmt.zstd_level)
        flavor = ASSOCIATED_FLAVOR[name]
        header = self._dicom_header(f"{key}/c/0/0/0", flavor, 0, level)
        with contextlib.ExitStack() as stack:
            shard = ShardStream(self.store, f"{key}/c/0/0/0", level, stack, header)
            shard.append(chunk)
            stored = shard.close()
        self._objects.append(stored)
        if self.zarr_metadata:
            attrs = {"associated": name}
            self._put_json(f"{key}/zarr.json", level_array_metadata(level, fmt, attrs))
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
        if self.zarr_metadata:
            self._write_zarr_metadata(info)
        return list(self._objects)

    def _write_zarr_metadata(self, info: SlideInfo) -> None:
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
            "dicom": {
                "study_instance_uid": self.dicom.study_uid,
                "series_instance_uid": self.dicom.series_uid,
                "instances": self.dicom_instances,
            }
            if self.dicom
            else None,
        }

    def abort(self) -> None:
        # Exit the open streams *with* an exception so they are discarded (S3 multipart uploads
        # aborted, local temporary files removed) rather than completed as truncated objects.
        error = WsiError("conversion aborted")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(error), error, None)
        self._shards.clear()
