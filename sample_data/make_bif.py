"""Write a small, genuine Ventana BIF slide (OpenSlide vendor `ventana`) from an RGB array.

    python sample_data/make_bif.py OUT.bif [--width 1536 --height 1024 --overlap 0]

A BIF (Ventana iScan, Roche DP 200) is a tiled JPEG TIFF. Its first page (the label image here)
carries an XMP packet (tag 700) with an `iScan` element: magnification, microns per pixel
(`ScanRes`), scanner details. The pyramid levels are pages described `level=N mag=M quality=Q`;
level 0's XMP packet is an `EncodeInfo` document listing the areas of interest (AOIs) the scanner
imaged: for each, its tile grid (`NumCols` x `NumRows` tiles, from `AoiOrigin`), its position,
and a `TileJointInfo` per pair of neighbouring tiles giving how far the camera fields overlap
(`OverlapX/Y`, pixels) and how sure the stitcher is (`Confidence`). Tiles are numbered from 1,
row by row from the bottom, every other row right to left. OpenSlide places tiles one mean
overlap-corrected step apart and shows only the AOIs' tiles.

Written here: one AOI covering the whole image at the grid's origin, every joint the same
`overlap` (0: the tiles abut exactly, as OpenSlide then draws the pages as they are), levels in
2x steps, each page padded with white to whole tiles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

if not __package__:  # run as a script: make `sample_data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sample_data.make_mirax import add_image_arguments, image_from
from sample_data.make_philips import halve, jpeg_tiles

WHITE = 255
XMP = 700


def tile_number(col: int, row: int, across: int, down: int) -> int:
    """A tile's number in an AOI of across x down tiles: from 1, rows from the bottom, every
    other row (the 2nd, 4th, ... from the bottom) right to left."""
    from_bottom = down - row - 1
    position = col if from_bottom % 2 == 0 else across - col - 1
    return from_bottom * across + position + 1


def encode_info(tile: int, aoi: tuple[int, int, int, int], overlap: int) -> str:
    """Level 0's EncodeInfo: one AOI of across x down tiles from tile (col, row) (`aoi`), every
    joint `overlap` pixels, confidence 100, placed on the tile grid."""
    first_col, first_row, across, down = aoi
    joints = []
    for row in range(down):
        for col in range(across):
            if col + 1 < across:
                a, b = tile_number(col, row, across, down), tile_number(col + 1, row, across, down)
                joints.append(("RIGHT", a, b, overlap, 0))
            if row > 0:
                a, b = tile_number(col, row, across, down), tile_number(col, row - 1, across, down)
                joints.append(("UP", a, b, 0, overlap))
    info = "".join(
        f'<TileJointInfo FlagJoined="1" Direction="{d}" Tile1="{a}" Tile2="{b}" '
        f'OverlapX="{ox}" OverlapY="{oy}" Confidence="100"/>'
        for d, a, b, ox, oy in joints
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><EncodeInfo Ver="2"><SlideStitchInfo>'
        f'<ImageInfo AOIScanned="1" AOIIndex="0" Width="{tile}" Height="{tile}" '
        f'NumRows="{down}" NumCols="{across}" Pos-X="{first_col * tile}" Pos-Y="0">'
        f"{info}</ImageInfo></SlideStitchInfo><AoiOrigin>"
        f'<AOI0 OriginX="{first_col * tile}" OriginY="{first_row * tile}"/>'
        "</AoiOrigin></EncodeInfo>"
    )


def iscan_xml(magnification: int, mpp: float) -> str:
    """The label page's XMP: the scanner's magnification and resolution, as a DP 200 writes
    them."""
    return (
        '<?xml version="1.0" encoding="utf-8"?><Metadata><iScan '
        f'Magnification="{magnification}" ScanRes="{mpp!r}" UnitNumber="SYNTHETIC-1" '
        'ScannerModel="VENTANA DP 200"/></Metadata>'
    )


def write_bif(
    path: Path,
    image: np.ndarray,
    tile: int = 256,
    levels: int = 3,
    quality: int = 90,
    *,
    overlap: int = 0,
    aoi: tuple[int, int, int, int] | None = None,
    mpp: float = 0.25,
    magnification: int = 40,
) -> Path:
    """Write `image` (H x W x 3 uint8) as the BIF `path`: level k is the 2^k area mean of level
    0, the AOI's joints all `overlap` pixels; the AOI (first column, first row, columns, rows
    of tiles) is the whole image unless `aoi` says otherwise. Returns `path`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, not {image.shape} {image.dtype}")
    if levels < 1 or tile < 16 or tile % 16:
        raise ValueError("levels must be >= 1 and tile a multiple of 16")
    across, down = -(-image.shape[1] // tile), -(-image.shape[0] // tile)
    iscan = iscan_xml(magnification, mpp)
    label = np.full((128, 128, 3), (225, 225, 235), np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            label,
            photometric="rgb",
            description="Label_Image",
            extratags=[(XMP, "B", len(iscan), iscan.encode(), True)],
            metadata=None,
        )
        current = image
        for k in range(levels):
            if k:
                current = halve(current)
            ph, pw = -(-current.shape[0] // tile) * tile, -(-current.shape[1] // tile) * tile
            page = np.full((ph, pw, 3), WHITE, np.uint8)
            page[: current.shape[0], : current.shape[1]] = current
            extratags = []
            if k == 0:
                xml = encode_info(tile, aoi or (0, 0, across, down), overlap).encode()
                extratags = [(XMP, "B", len(xml), xml, True)]
            tif.write(
                jpeg_tiles(page, tile, quality, sparse=False),
                shape=page.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(2, 2),
                description=f"level={k} mag={magnification / 2**k:g} quality={quality}",
                resolution=(1e4 / mpp / 2**k, 1e4 / mpp / 2**k),
                resolutionunit="CENTIMETER",
                extratags=extratags,
                metadata=None,
            )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .bif to write")
    add_image_arguments(parser, 1536, 1024)
    parser.add_argument("--overlap", type=int, default=0, help="every joint's overlap, pixels")
    args = parser.parse_args(argv)
    image = image_from(args)
    out = write_bif(args.out, image, args.tile, args.levels, args.quality, overlap=args.overlap)
    print(out)


if __name__ == "__main__":
    main()
