"""Write a small, genuine 3DHISTECH MIRAX slide (`.mrxs` + companion folder) from an RGB array.

    python sample_data/make_mirax.py OUT.mrxs [--width 1500 --height 1100 --tile 256]

MIRAX is a multi-file format: `name.mrxs` (OpenSlide only checks that it exists; scanners write
an INI of their own there) and a folder `name/` with

* `Slidedat.ini`: the slide's geometry: how many camera images across and down
  (`IMAGENUMBER_X/Y`), the hierarchical layer "Slide zoom level" whose values are the pyramid
  levels, one section per level (image size, overlap, µm per pixel, image format, fill colour,
  concatenation exponent), and the list of data files.
* `Index.dat`: `01.02` + the slide id, then two little-endian int32 pointers (to the table of
  hierarchical records and to the table of non-hierarchical ones). Each hierarchical record
  (here: one per zoom level) points at a `0, first page` pair; a page is `count, next page
  (0 = last)` followed by `count` entries `image index, offset, length, data file number`.
  The image index is `y * IMAGENUMBER_X + x` in level-0 camera-image coordinates.
* `DataNNNN.dat`: the JPEG images, back to back, at the offsets Index.dat gives.

The layout written here is the simplest OpenSlide accepts: one image per camera position
(`CameraImageDivisionsPerSide=1`), zero overlap and no position buffer (so OpenSlide places
image (x, y) at (x * width, y * height)), no non-hierarchical layers (no label, macro or
position map), and zoom level k made of images that each cover 2^k x 2^k level-0 images,
downsampled 2^k times by area averaging to the same image size. Each zoom level goes into a data
file of its own, so a slide has `levels` data files.

Every image of a level has the same size (DIGITIZER_WIDTH x DIGITIZER_HEIGHT), so OpenSlide's
level 0 is a whole number of images. Per axis, the image size is the divisor of the input's size
nearest to `tile` (within a factor of two of it), so that level 0 is exactly the input's size;
where no such divisor exists the input is padded with white to a multiple of `tile`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INDEX_VERSION = b"01.02"
FILL_RGB = (255, 255, 255)


def image_size(length: int, tile: int) -> int:
    """The camera image size along one axis: the divisor of `length` nearest to `tile` within a
    factor of two of it, else `tile` itself (the axis is then padded)."""
    if length <= tile:
        return length
    best = None
    for d in range(max(1, tile // 2), min(length, 2 * tile) + 1):
        if length % d == 0 and (best is None or abs(d - tile) < abs(best - tile)):
            best = d
    return best if best is not None else tile


def _downsample2(pixels: np.ndarray) -> np.ndarray:
    """2x2 area average in float (the array's sides are even)."""
    return (pixels[0::2, 0::2] + pixels[0::2, 1::2] + pixels[1::2, 0::2] + pixels[1::2, 1::2]) / 4


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _slidedat(
    slide_id: str,
    images_x: int,
    images_y: int,
    tw: int,
    th: int,
    levels: int,
    mpp: float,
    magnification: int,
    data_files: list[str],
) -> str:
    bgr = FILL_RGB[2] << 16 | FILL_RGB[1] << 8 | FILL_RGB[0]
    lines = [
        "[GENERAL]",
        "SLIDE_VERSION=01.02",
        f"SLIDE_ID={slide_id}",
        "SLIDE_NAME=synthetic",
        "SLIDE_CREATIONDATETIME=20240101000000",
        f"IMAGENUMBER_X={images_x}",
        f"IMAGENUMBER_Y={images_y}",
        f"OBJECTIVE_MAGNIFICATION={magnification}",
        "CameraImageDivisionsPerSide=1",
        "",
        "[HIERARCHICAL]",
        "HIER_COUNT=1",
        "NONHIER_COUNT=0",
        "INDEXFILE=Index.dat",
        "HIER_0_NAME=Slide zoom level",
        f"HIER_0_COUNT={levels}",
    ]
    for k in range(levels):
        lines += [
            f"HIER_0_VAL_{k}=ZoomLevel_{k}",
            f"HIER_0_VAL_{k}_SECTION=LAYER_0_LEVEL_{k}_SECTION",
        ]
    lines += ["", "[DATAFILE]", f"FILE_COUNT={len(data_files)}"]
    lines += [f"FILE_{i}={name}" for i, name in enumerate(data_files)]
    for k in range(levels):
        lines += [
            "",
            f"[LAYER_0_LEVEL_{k}_SECTION]",
            f"IMAGE_CONCAT_FACTOR={0 if k == 0 else 1}",
            "OVERLAP_X=0",
            "OVERLAP_Y=0",
            f"MICROMETER_PER_PIXEL_X={mpp * 2**k!r}",
            f"MICROMETER_PER_PIXEL_Y={mpp * 2**k!r}",
            "IMAGE_FORMAT=JPEG",
            f"IMAGE_FILL_COLOR_BGR={bgr}",
            f"DIGITIZER_WIDTH={tw}",
            f"DIGITIZER_HEIGHT={th}",
        ]
    return "\n".join(lines) + "\n"


def _index(slide_id: str, levels: list[list[tuple[int, int, int, int]]]) -> bytes:
    """Index.dat for one hierarchical record per zoom level, each one data page holding its
    (image index, offset, length, file number) entries, and an empty non-hierarchical table."""
    head = INDEX_VERSION + slide_id.encode("ascii")
    i32 = struct.Struct("<i").pack
    hier_table = len(head) + 8
    nonhier_table = hier_table + 4 * len(levels)
    pos = nonhier_table  # no non-hierarchical records: the table is empty
    out = bytearray(head + i32(hier_table) + i32(nonhier_table))
    records = bytearray()
    for entries in levels:
        record = pos
        page = record + 8
        out += i32(record)
        records += i32(0) + i32(page)
        records += i32(len(entries)) + i32(0)  # one page, no next page
        for entry in entries:
            records += struct.pack("<4i", *entry)
        pos = page + 8 + 16 * len(entries)
    assert len(out) == nonhier_table
    return bytes(out + records)


def _checked(path: Path, image: np.ndarray, tile: int, levels: int) -> np.ndarray:
    """`image` as an array; ValueError for a name, an image or sizes MIRAX cannot hold."""
    if path.suffix != ".mrxs":
        raise ValueError(f"a MIRAX slide's name ends in .mrxs, not {path.name}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, not {image.shape} {image.dtype}")
    if levels < 1 or tile < 1:
        raise ValueError("levels and tile must be >= 1")
    return image


@dataclass(frozen=True)
class _Grid:
    """Level 0's images: how many per row and column, and their size in pixels."""

    images_x: int
    images_y: int
    tw: int
    th: int


def _padded(image: np.ndarray, grid: _Grid, levels: int) -> np.ndarray:
    """Level 0 padded with white so that every level's images are whole: the top level's
    images each cover 2^(levels-1) level-0 images per side."""
    span = 2 ** (levels - 1)
    rows = -(-grid.images_y // span) * span * grid.th
    cols = -(-grid.images_x // span) * span * grid.tw
    padded = np.empty((rows, cols, 3))
    padded[...] = FILL_RGB
    padded[: image.shape[0], : image.shape[1]] = image
    return padded


def _write_levels(
    folder: Path,
    data_files: list[str],
    padded: np.ndarray,
    grid: _Grid,
    quality: int,
    omit_blank: bool,
) -> list[list[tuple[int, int, int, int]]]:
    """Each level's JPEG images into its data file; returns each level's index entries
    (level-0 image number, offset, length, data file number)."""
    images_x, images_y, tw, th = grid.images_x, grid.images_y, grid.tw, grid.th
    index: list[list[tuple[int, int, int, int]]] = []
    current = padded
    blank: set[tuple[int, int]] = set()
    for k in range(len(data_files)):
        if k:
            current = _downsample2(current)
        step = 2**k  # level-0 images covered by one image of this level, per side
        level8 = np.clip(np.rint(current), 0, 255).astype(np.uint8)
        entries = []
        with (folder / data_files[k]).open("wb") as f:
            for y in range(0, images_y, step):
                for x in range(0, images_x, step):
                    row, col = y // step * th, x // step * tw
                    pixels = level8[row : row + th, col : col + tw]
                    if k == 0 and omit_blank and (pixels == FILL_RGB).all():
                        blank.add((x, y))
                    covered = {
                        (x + i, y + j)
                        for i in range(min(step, images_x - x))
                        for j in range(min(step, images_y - y))
                    }
                    if omit_blank and covered <= blank:
                        continue
                    jpeg = _jpeg(pixels, quality)
                    entries.append((y * images_x + x, f.tell(), len(jpeg), k))
                    f.write(jpeg)
        index.append(entries)
    return index


def write_mirax(
    path: Path,
    image: np.ndarray,
    tile: int = 256,
    levels: int = 3,
    quality: int = 90,
    *,
    mpp: float = 0.25,
    magnification: int = 20,
    slide_id: str | None = None,
    omit_blank: bool = False,
) -> Path:
    """Write `image` (H x W x 3 uint8) as the MIRAX slide `path` (`name.mrxs`) plus `name/`.

    Level 0 holds JPEGs of about `tile` x `tile` pixels (see `image_size`); level k (k <
    `levels`) is the 2^k area downsample. `slide_id` (default: a UUID derived from the pixels,
    so the same input gives the same files) goes into Slidedat.ini and Index.dat. With
    `omit_blank`, level-0 images that are all fill colour are not stored, nor the images of
    other levels that cover only such images (as a scanner skips fields it did not scan).
    Returns `path`.
    """
    path = Path(path)
    image = _checked(path, image, tile, levels)
    height, width = image.shape[:2]
    tw, th = image_size(width, tile), image_size(height, tile)
    images_x, images_y = -(-width // tw), -(-height // th)
    if slide_id is None:
        slide_id = str(uuid.UUID(bytes=hashlib.sha256(image.tobytes()).digest()[:16], version=4))
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    data_files = [f"Data{k:04d}.dat" for k in range(levels)]
    grid = _Grid(images_x, images_y, tw, th)
    padded = _padded(image, grid, levels)
    index = _write_levels(folder, data_files, padded, grid, quality, omit_blank)
    (folder / "Index.dat").write_bytes(_index(slide_id, index))
    (folder / "Slidedat.ini").write_text(
        _slidedat(slide_id, images_x, images_y, tw, th, levels, mpp, magnification, data_files),
        encoding="utf-8",
    )
    # Scanners write an INI of their own into the .mrxs; OpenSlide only checks it exists.
    path.write_text(f"[GENERAL]\nSLIDE_ID={slide_id}\nSLIDE_NAME={path.stem}\n", encoding="utf-8")
    return path


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic tissue-like RGB image: smooth pink/purple blobs with gradients and noise on
    near-white background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.08, 0.25) * min(width, height)
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    tissue = np.clip(field, 0, 1)[..., None]
    stain = np.stack(
        [200 - 60 * np.sin(xx / 37.0), 110 + 50 * np.cos(yy / 23.0), 180 + 0.02 * (xx - yy)],
        axis=-1,
    )
    background = np.array([242.0, 241.0, 240.0])
    pixels = tissue * stain + (1 - tissue) * background
    # Texture: mostly in brightness (as in stained tissue), a little in colour.
    pixels += rng.normal(0, 10, (height, width, 1)) + rng.normal(0, 3, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def add_image_arguments(parser: argparse.ArgumentParser, width: int, height: int) -> None:
    """The options of every generator of a tiled JPEG slide here: size, tile, levels, quality,
    seed, and which pixels (`image_from`)."""
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--height", type=int, default=height)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--benchmark-pixels",
        action="store_true",
        help="the benchmarks' slide (sample_data/generate.py: glass, tissue, nuclei) instead of"
        " smooth blobs; needs far less memory at large sizes",
    )


def image_from(args: argparse.Namespace) -> np.ndarray:
    """The pixels `add_image_arguments`' options ask for."""
    if args.benchmark_pixels:
        from sample_data.generate import build

        return np.asarray(build(args.width, args.height, args.seed).numpy())
    return tissue_image(args.width, args.height, args.seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .mrxs to write (its folder goes beside it)")
    add_image_arguments(parser, 1500, 1100)
    args = parser.parse_args(argv)
    image = image_from(args)
    out = write_mirax(args.out, image, args.tile, args.levels, args.quality)
    print(out)


if __name__ == "__main__":
    main()
