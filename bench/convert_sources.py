"""The slides the conversion benchmark converts: generating them once into ``bench/out/`` (a
pyramidal JPEG TIFF, a NanoZoomer-like NDPI, an Aperio JPEG 2000 SVS), reading what a source is
(levels, compression, files, dimensions) and warming the page cache so that every tool reads it
from memory. Other benchmarks take their slides from here too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyvips
import tifffile

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GENERATOR = ROOT / "sample_data" / "generate.py"
NDPI_GENERATOR = ROOT / "sample_data" / "make_ndpi.py"
J2K_GENERATOR = ROOT / "sample_data" / "make_j2k.py"


def ensure_source(width: int, height: int, seed: int, base_only: bool = False) -> Path:
    """The generated slide for this size and seed (level 0 alone with `base_only`), generating
    it if missing."""
    path = OUT / f"slide_{width}x{height}_seed{seed}{'_base' if base_only else ''}.tif"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        tmp = path.with_suffix(".tmp.tif")
        subprocess.run(
            [
                sys.executable,
                str(GENERATOR),
                str(tmp),
                f"--width={width}",
                f"--height={height}",
                f"--seed={seed}",
                *(["--base-only"] if base_only else []),
            ],
            check=True,
        )
        tmp.rename(path)
    return path


def ensure_ndpi_source(width: int, height: int, seed: int) -> Path:
    """The generated NDPI for this size and seed, laid out as a NanoZoomer writes it (2048 px
    restart intervals, 4:4:4, levels 4x apart, the smallest one JPEG without restart markers:
    see `sample_data/make_ndpi.py`)."""
    path = OUT / f"slide_{width}x{height}_seed{seed}_nanozoomer.ndpi"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        tmp = path.with_suffix(".tmp.ndpi")
        command = [sys.executable, str(NDPI_GENERATOR), str(tmp)]
        command += [f"--width={width}", f"--height={height}", f"--seed={seed}"]
        command += ["--level-step=4", "--single-frame-smallest"]
        subprocess.run(command, check=True)
        tmp.rename(path)
    return path


def ensure_j2k_source(width: int, height: int, seed: int) -> Path:
    """The generated Aperio JPEG 2000 SVS (33005, 256 px tiles, levels 4x apart: see
    `sample_data/make_j2k.py`) for this size and seed."""
    path = OUT / f"slide_{width}x{height}_seed{seed}.j2k.svs"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        tmp = path.with_suffix(".tmp.svs")
        command = [sys.executable, str(J2K_GENERATOR), str(tmp)]
        command += [f"--width={width}", f"--height={height}", f"--seed={seed}"]
        subprocess.run(command, check=True)
        tmp.rename(path)
    return path


def source_levels(path: Path) -> int:
    """Pyramid levels of the source's first TIFF series (0 if not a TIFF)."""
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels)
    except Exception:  # not a TIFF, or one tifffile cannot read
        return 0


def source_compression(path: Path) -> str:
    """Compression of the source's first TIFF page (``"unknown"`` if not a TIFF)."""
    try:
        with tifffile.TiffFile(path) as tif:
            return tifffile.COMPRESSION(tif.pages.first.compression).name
    except Exception:  # not a TIFF, or one tifffile cannot read
        return "unknown"


def source_files(path: Path) -> list[Path]:
    """Every file of the slide: `path`, and for multi-file formats (MIRAX) its companion
    folder's files, so that the source's size and page cache cover them all."""
    from wsi.slidefiles import slide_parts

    files: list[Path] = []
    for part in slide_parts(path):
        files += sorted(f for f in part.rglob("*") if f.is_file()) if part.is_dir() else [part]
    return files


def source_dimensions(path: Path) -> tuple[int, int]:
    """Level 0's (width, height): OpenSlide's reading of a vendor format it detects (libvips
    reads a Leica or Ventana file's first page, a macro or label, and has no MIRAX loader
    here), else libvips's."""
    import openslide

    if openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-tiff"):
        with openslide.OpenSlide(str(path)) as slide:
            return slide.dimensions
    header = pyvips.Image.new_from_file(str(path))
    return header.width, header.height


def warm_page_cache(path: Path) -> None:
    """Read the source once so that every tool, and every repeat, sees it cached."""
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass
