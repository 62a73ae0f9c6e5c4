"""Write a small, genuine Leica SCN slide (OpenSlide vendor `leica`) from an RGB array.

    python sample_data/make_leica.py OUT.scn [--width 2048 --height 1024 --offset 1024 0]

A Leica SCN (SCN400, Aperio Versa) is a BigTIFF whose first page's ImageDescription is an XML
`scn` document (namespace .../scn/2010/10/01): one `collection` (the whole glass, its size in
nanometres) holding `image`s, each with a `view` (its size and offset on the glass, in nm) and
`pixels` listing the TIFF page (`ifd`) of each of its resolutions. The image covering the whole
glass at offset 0 is the macro; the others are main images. OpenSlide's level k is the whole
collection at main-image resolution k (so it is larger than the main image, which sits at its
offset, transparent around it).

Written here: page 0 the macro (tiled JPEG), then the main image's pyramid (2x steps, tiled JPEG
YCbCr 4:2:0, edge tiles padded with white), brightfield, at `mpp` micrometres a pixel placed
`offset` level-0 pixels from the glass's corner, and a `margin` of glass right and below it.
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

NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"
MACRO_WIDTH = 256


def _image_xml(
    name: str, view: tuple[int, int, int, int], dims: list[tuple[int, int, int]], objective: str
) -> str:
    """An `image` element: view (width, height, x, y in nm), dimensions (width, height, ifd)."""
    width, height, x, y = view
    dimensions = "".join(
        f'<dimension sizeX="{w}" sizeY="{h}" r="{r}" ifd="{ifd}"/>'
        for r, (w, h, ifd) in enumerate(dims)
    )
    return (
        f'<image name="{name}"><creationDate>2024-01-01T00:00:00.00Z</creationDate>'
        '<device model="Leica SCN400;Leica SCN" version="1.5.1.10804 2012/05/10 13:29:07"/>'
        f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{dimensions}</pixels>'
        f'<view sizeX="{width}" sizeY="{height}" offsetX="{x}" offsetY="{y}" spacingZ="0"/>'
        "<scanSettings><objectiveSettings>"
        f"<objective>{objective}</objective></objectiveSettings><illuminationSettings>"
        "<numericalAperture>0.4</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource>"
        "</illuminationSettings></scanSettings></image>"
    )


def write_leica(
    path: Path,
    image: np.ndarray,
    tile: int = 256,
    levels: int = 3,
    quality: int = 90,
    *,
    offset: tuple[int, int] = (1024, 0),
    margin: int = 512,
    mpp: float = 0.5,
) -> Path:
    """Write `image` (H x W x 3 uint8) as the main image of the Leica SCN `path`; level k is the
    2^k area mean of level 0. Returns `path`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, not {image.shape} {image.dtype}")
    if levels < 1 or tile < 16 or tile % 16:
        raise ValueError("levels must be >= 1 and tile a multiple of 16")
    nm = round(mpp * 1000)
    height, width = image.shape[:2]
    glass = (offset[0] + width + margin, offset[1] + height + margin)
    macro_h = max(16, round(MACRO_WIDTH * glass[1] / glass[0]))
    macro = np.full((macro_h, MACRO_WIDTH, 3), (235, 235, 225), np.uint8)
    pyramid = [image]
    for _ in range(1, levels):
        pyramid.append(halve(pyramid[-1]))
    dims = [(p.shape[1], p.shape[0], k + 1) for k, p in enumerate(pyramid)]
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{NAMESPACE}">'
        f'<collection name="synthetic" sizeX="{glass[0] * nm}" sizeY="{glass[1] * nm}">'
        + _image_xml(
            "macro", (glass[0] * nm, glass[1] * nm, 0, 0), [(*macro.shape[1::-1], 0)], "1.25"
        )
        + _image_xml("main", (width * nm, height * nm, offset[0] * nm, offset[1] * nm), dims, "20")
        + "</collection></scn>"
    )
    resolution = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, page in enumerate([macro, *pyramid]):
            tif.write(
                jpeg_tiles(page, tile if k else 64, quality, sparse=False),
                shape=page.shape,
                dtype=np.uint8,
                tile=(tile, tile) if k else (64, 64),
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(2, 2),
                description=xml if k == 0 else None,
                resolution=resolution if k else None,
                resolutionunit="CENTIMETER" if k else None,
                metadata=None,
            )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .scn to write")
    add_image_arguments(parser, 2048, 1024)
    parser.add_argument("--offset", type=int, nargs=2, default=(1024, 0), metavar=("X", "Y"))
    args = parser.parse_args(argv)
    image = image_from(args)
    out = write_leica(args.out, image, args.tile, args.levels, args.quality, offset=args.offset)
    print(out)


if __name__ == "__main__":
    main()
