"""Write a large synthetic whole-slide image (tiled, pyramidal, JPEG, BigTIFF).

The slide looks vaguely like an H&E section: about 40% of the area is "tissue"
(eosin-pink stroma with purple, round nuclei, textured at several scales) and
the rest is near-white glass background with a little noise. It is built
entirely from lazy pyvips operations, so the image is streamed to disk tile by
tile and never held in memory; a 40000x30000 slide takes well under a minute
on two cores.

How it stays cheap:

* the picture is synthesised at half resolution and doubled with a
  nearest-neighbour zoom, so only the zoom and the encoder run at full size;
* fine textures (nuclei, stroma, noise) are small seamless tiles rendered once
  into memory and repeated; their periods differ (and are not multiples of the
  TIFF tile size), and the tissue outline and nuclei size vary with a
  non-periodic field, so no two output tiles repeat;
* all arithmetic is one-band; colour comes last, from a single 16-bit lookup
  table indexed by (tissue alpha, nucleus alpha, texture).

The output is deterministic for a given size and seed. The TIFF is written
without an ImageDescription, so OpenSlide reports it as ``generic-tiff``.

Usage::

    python sample_data/generate.py OUT.tif --width 40000 --height 30000 \
        [--tile 256] [--quality 80] [--seed 0] [--base-only]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyvips

#: Fraction of the slide area that should be tissue.
TISSUE_FRACTION = 0.40

#: Resolution written to the TIFF tags: 0.5 µm per pixel, a typical 20x scan.
PIXELS_PER_MM = 2000.0

#: Colours (RGB) of the ingredients; the variations are multiplied by a texture
#: value in [-1, 1].
BACKGROUND = (243.0, 241.0, 245.0)
BACKGROUND_VARIATION = (5.0, 5.0, 4.0)
EOSIN = (232.0, 158.0, 198.0)
EOSIN_VARIATION = (14.0, 50.0, 30.0)
HEMATOXYLIN = (100.0, 66.0, 152.0)
HEMATOXYLIN_VARIATION = (30.0, 26.0, 20.0)

#: On large slides the large-scale field (tissue outline, nucleus density) is
#: computed at down to this fraction of the synthesis resolution and zoomed up.
FIELD_ZOOM = 4

#: Levels of the two alphas in the colour lookup table (4 bits each) and of the
#: texture (8 bits): together a 16-bit index.
ALPHA_LEVELS = 16
TEXTURE_LEVELS = 256

#: Nuclei, in pixels of the half-resolution synthesis grid: Worley cell size
#: (at most one nucleus per cell); radius = mean + spread * jitter (jitter a
#: Perlin field of about +-0.5, so some nuclei vanish) + depth gain * how far
#: the large-scale field is above the tissue threshold.
NUCLEUS_CELL = 12
NUCLEUS_RADIUS_MEAN = 2.0
NUCLEUS_RADIUS_SPREAD = 4.0
NUCLEUS_DEPTH_GAIN = 2.0


def _memory_tile(image: pyvips.Image) -> pyvips.Image:
    """Render a small image into memory once so repeating it costs nothing."""
    return image.copy_memory()


def _repeat(tile: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """Repeat ``tile`` to cover ``width`` x ``height``."""
    across = math.ceil(width / tile.width)
    down = math.ceil(height / tile.height)
    return tile.replicate(across, down).crop(0, 0, width, height)


def _perlin_tile(side_cells: int, cell: int, seed: int) -> pyvips.Image:
    """A seamless Perlin tile (its side is a whole number of cells), values ~[-1, 1]."""
    side = side_cells * cell
    return _memory_tile(pyvips.Image.perlin(side, side, cell_size=cell, seed=seed))


def _large_scale_field(width: int, height: int, seed: int) -> pyvips.Image:
    """A smooth, non-periodic float field: two Perlin octaves sized to the slide.

    On large slides it varies over thousands of pixels, so it is computed at up
    to 1/FIELD_ZOOM of the requested size and zoomed back: the steps are then
    far below what the alphas derived from it can resolve, and it costs a
    fraction of a full-size Perlin.
    """
    zoom = max(1, min(FIELD_ZOOM, max(width, height) // 5000))
    small_w, small_h = math.ceil(width / zoom), math.ceil(height / zoom)
    big = max(16, max(small_w, small_h) // 5)
    coarse = pyvips.Image.perlin(small_w, small_h, cell_size=big, seed=seed)
    finer = pyvips.Image.perlin(small_w, small_h, cell_size=max(8, big // 3), seed=seed + 1)
    field = coarse + finer * 0.5
    return field.zoom(zoom, zoom).crop(0, 0, width, height) if zoom > 1 else field


def _quantised_alpha(field: pyvips.Image, low: float, high: float) -> pyvips.Image:
    """uchar 0..ALPHA_LEVELS-1: 0 where ``field <= low``, the top level where ``>= high``."""
    top = ALPHA_LEVELS - 1
    gain = (top + 1) / (high - low)
    return field.linear(gain, -low * gain).clamp(min=0, max=top).cast("uchar")


def _tissue_alpha(field: pyvips.Image) -> tuple[pyvips.Image, float]:
    """Soft tissue alpha covering ~TISSUE_FRACTION of the area, and its threshold."""
    # Estimate the threshold from a sparse sample of the (lazy) field.
    step = max(1, int(math.sqrt(field.width * field.height / 100_000)))
    sample = field.subsample(step, step).numpy()
    threshold = float(np.quantile(sample, 1.0 - TISSUE_FRACTION))
    softness = 0.02 * float(sample.max() - sample.min())
    # Centre the soft edge on the threshold so the area stays ~TISSUE_FRACTION.
    low = threshold - softness / 2
    return _quantised_alpha(field, low, low + softness), threshold


def _nucleus_alpha(
    field: pyvips.Image, threshold: float, width: int, height: int, seed: int
) -> pyvips.Image:
    """Round nuclei: discs around Worley feature points, bigger deeper in tissue."""
    # One seamless tile holds, per pixel, (radius - distance to the nearest
    # Worley point), where the radius varies per nucleus with a Perlin jitter of
    # cell size about one nucleus (so some vanish).
    side = 84 * NUCLEUS_CELL  # period 1008
    distance = pyvips.Image.worley(side, side, cell_size=NUCLEUS_CELL, seed=seed)
    jitter = pyvips.Image.perlin(side, side, cell_size=NUCLEUS_CELL, seed=seed + 1)
    tile = _memory_tile(jitter.linear(NUCLEUS_RADIUS_SPREAD, NUCLEUS_RADIUS_MEAN) - distance)
    # Nuclei grow deeper in the tissue.
    depth = field.linear(NUCLEUS_DEPTH_GAIN, -NUCLEUS_DEPTH_GAIN * threshold)
    inside = _repeat(tile, width, height) + depth
    # alpha grows from 0 at the rim to opaque one pixel inside it
    return _quantised_alpha(inside, 0.0, 1.0)


def _texture(width: int, height: int, seed: int) -> pyvips.Image:
    """uchar texture 0..255 (128 = neutral): stroma at two scales plus fine noise."""
    coarse = _repeat(_perlin_tile(43, 24, seed), width, height)  # period 1032
    fine = _repeat(_perlin_tile(167, 6, seed + 1), width, height)  # period 1002
    noise = _repeat(
        _memory_tile(pyvips.Image.gaussnoise(1031, 1021, sigma=14.0, mean=0.0, seed=seed + 2)),
        width,
        height,
    )
    return (coarse.linear(60.0, 128.0) + fine * 35.0 + noise).cast("uchar")


def colour_table() -> pyvips.Image:
    """The 65536-entry RGB lookup table: index = (tissue * 16 + nucleus) * 256 + texture."""
    top = ALPHA_LEVELS - 1
    tissue = np.arange(ALPHA_LEVELS).reshape(-1, 1, 1, 1) / top
    nucleus = np.arange(ALPHA_LEVELS).reshape(1, -1, 1, 1) / top
    texture = ((np.arange(TEXTURE_LEVELS) - 128.0) / 128.0).reshape(1, 1, -1, 1)

    def colour(base: tuple[float, ...], variation: tuple[float, ...]) -> np.ndarray:
        return np.asarray(base) + texture * np.asarray(variation)

    stained = (
        colour(EOSIN, EOSIN_VARIATION) * (1 - nucleus)
        + colour(HEMATOXYLIN, HEMATOXYLIN_VARIATION) * nucleus
    )
    rgb = colour(BACKGROUND, BACKGROUND_VARIATION) * (1 - tissue) + stained * tissue
    table = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(1, -1, 3)
    return pyvips.Image.new_from_array(table)


def build(width: int, height: int, seed: int = 0) -> pyvips.Image:
    """The synthetic slide as a lazy uchar RGB pyvips image (nothing rendered yet)."""
    if width < 2 or height < 2:
        raise ValueError("width and height must be at least 2")
    half_w, half_h = math.ceil(width / 2), math.ceil(height / 2)
    seed *= 1000  # keep the per-ingredient seeds of different slides apart

    field = _large_scale_field(half_w, half_h, seed)
    tissue, threshold = _tissue_alpha(field)
    nucleus = _nucleus_alpha(field, threshold, half_w, half_h, seed + 10)
    texture = _texture(half_w, half_h, seed + 20)

    index = tissue.linear(ALPHA_LEVELS * TEXTURE_LEVELS, 0) + nucleus * TEXTURE_LEVELS + texture
    half = index.cast("ushort").maplut(colour_table())
    return half.zoom(2, 2).crop(0, 0, width, height).copy(interpretation="srgb")


def generate(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    tile: int = 256,
    quality: int = 80,
    seed: int = 0,
    base_only: bool = False,
) -> Path:
    """Write the synthetic slide to ``path`` as a tiled pyramidal JPEG BigTIFF; with
    ``base_only``, level 0 alone (what many scanners' exports and stitched tiles give: every
    lower level must then be built by the converter)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = build(width, height, seed)
    image.tiffsave(
        str(out),
        tile=True,
        pyramid=not base_only,
        compression="jpeg",
        Q=quality,
        bigtiff=True,
        tile_width=tile,
        tile_height=tile,
        xres=PIXELS_PER_MM,
        yres=PIXELS_PER_MM,
        resunit="cm",
        keep=pyvips.ForeignKeep.NONE,  # no metadata at all
        properties=False,  # and in particular no ImageDescription
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output .tif path")
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--tile", type=int, default=256, help="TIFF tile size")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--base-only", action="store_true", help="write level 0 only (no pyramid levels)"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = generate(
        args.out, args.width, args.height, args.tile, args.quality, args.seed, args.base_only
    )
    elapsed = time.perf_counter() - start
    size = out.stat().st_size
    print(
        f"{out}: {args.width}x{args.height}, {size:,} bytes ({size / 1e6:.1f} MB), {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
