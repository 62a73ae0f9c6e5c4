"""Write a synthetic Hamamatsu NDPI slide that OpenSlide opens as vendor `hamamatsu`.

    python sample_data/make_ndpi.py OUT.ndpi [--width 20480 --height 20480 --levels 4
        --stripe 2048 --level-step 2 --single-frame-smallest --quality 80 --subsampling 444
        --seed 0]

The layout is the one NanoZoomer scanners write: a classic little-endian TIFF whose first
directory carries the NDPI format flag (tag 65420); one directory per pyramid level, largest
first, each holding ONE baseline JPEG stream as a single strip (`RowsPerStrip` = height), written
with a restart marker every `stripe / MCU width` MCUs so that a row of MCUs is a whole number of
restart intervals ("stripes" of `stripe` x MCU-height pixels); tag 65426 (McuStarts) gives the
offset of every interval from the start of the strip, tag 65421 the objective magnification of
the level (`SourceLens`), 65424 the focal plane (0), 65449 a property map; then a macro image
(`SourceLens` -1), one JPEG without restart markers. No label: NDPI has none of its own.

What real files look like, and the options that copy it: a NanoZoomer brightfield scan
(OpenSlide's CMU-1.ndpi, as opentile's tests describe it) has 2048 x 8 px stripes at level 0,
stores levels 4x apart (`--level-step 4`) with the same number of stripes across every striped
level (512, then 128 px wide), and its smallest level is one JPEG without restart markers
(`--single-frame-smallest`); OpenSlide makes the levels in between by scaled decoding. The two
fluorescence samples in `sample_data/hamamatsu` store levels 2x apart with one stripe per row
of MCUs (3968 px at level 0) and 4:4:4 YCbCr. So: the same stripe count across levels, here
too; `--level-step 2` (the default) or 4.

Pixels come from `generate.build` (the tissue-like synthetic slide, lazy libvips) and are
streamed as PPM into libjpeg-turbo's `cjpeg` with its restart option (`-restart NB`): memory
stays bounded by a few strips of pixels whatever the slide's size. Level k is level k-1's JPEG
decoded at 1/2 (or 1/4) scale by libjpeg-turbo (DCT scaling), as a scanner derives its levels
from the one above. Chroma is 4:4:4 or 4:2:2 (`--subsampling`), not 4:2:0: OpenSlide decodes
one restart interval at a time under the whole level's frame header, and 4:2:0's upsampling
reads the next row of MCUs, which it does not give it (OpenSlide 4.0.1 fails such a slide with
"found marker 0xd9 instead of RST0").

Every level's width must be a whole number of stripes and MCUs (OpenSlide rejects restart
offsets otherwise): the width and height are rounded up to a multiple of the MCU size times
step^(levels-1). Level 0's stripe width is the largest divisor of its width up to `stripe` that
is a whole number of MCUs; a lower level has as many stripes across as level 0 when that makes
them whole MCUs, else the same divisor rule.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyvips

if not __package__:  # run as a script: make `sample_data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sample_data.generate import build

_SHORT, _LONG, _RATIONAL, _SLONG, _FLOAT, _ASCII = 3, 4, 5, 9, 11, 2
_TYPE_SIZE = {_SHORT: 2, _LONG: 4, _RATIONAL: 8, _SLONG: 4, _FLOAT: 4, _ASCII: 1}
_TYPE_CODE = {_SHORT: "H", _LONG: "I", _SLONG: "i", _FLOAT: "f"}
PIXELS_PER_CM = 44_000  # 0.227 µm per pixel, a 40x NanoZoomer scan
MACRO_HEIGHT = 320
MACRO_PIXELS_PER_CM = 120  # a whole 76 x 26 mm glass in about 900 x 320 pixels
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_CHUNK = 1 << 22
_LOW = 0xFFFFFFFF


def stripe_width(width: int, stripe: int, mcu_width: int) -> int:
    """The restart interval of a level `width` pixels wide, in pixels: the largest multiple of
    the MCU width up to `stripe` that divides the width."""
    return max(d for d in range(mcu_width, min(stripe, width) + 1, mcu_width) if width % d == 0)


def level_stripes(widths: list[int], stripe: int, mcu_width: int) -> list[int]:
    """The stripe width of each level (widths largest first): as many stripes across as level 0
    has, where that is a whole number of MCUs (what scanners write), else `stripe_width`."""
    across = widths[0] // stripe_width(widths[0], stripe, mcu_width)
    return [
        w // across
        if w % across == 0 and (w // across) % mcu_width == 0
        else stripe_width(w, stripe, mcu_width)
        for w in widths
    ]


def _mcu(subsampling: str) -> tuple[int, int]:
    return (16, 8) if subsampling == "422" else (8, 8)


def _interval_starts(path: Path) -> list[int]:
    """The offset of every restart interval of a JPEG file from its start, read in chunks."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
        pos = 2
        while True:
            if pos + 4 > len(head) or head[pos] != 0xFF:
                raise ValueError(f"{path}: no scan header in the first 64 KB")
            marker = head[pos + 1]
            pos += 2 + struct.unpack(">H", head[pos + 2 : pos + 4])[0]
            if marker == 0xDA:
                break
        starts = [pos]
        f.seek(pos)
        base, carry = pos, b""
        while chunk := f.read(_CHUNK):
            data = carry + chunk
            starts.extend(base - len(carry) + m.end() for m in _RST.finditer(data))
            carry = data[-1:] if data[-1:] == b"\xff" else b""
            base += len(chunk)
    return starts


def _encode(image: pyvips.Image, path: Path, quality: int, subsampling: str, ri: int) -> None:
    """Stream `image` as PPM (our header, libvips' raw pixels) into libjpeg-turbo's `cjpeg`, a
    restart marker every `ri` MCUs (none when 0)."""
    if shutil.which("cjpeg") is None:
        raise SystemExit("make_ndpi: cjpeg not found (apt-get install libjpeg-turbo-progs)")
    sample = "2x1" if subsampling == "422" else "1x1"
    command = ["cjpeg", "-quality", str(quality), "-sample", sample]
    command += ["-restart", f"{ri}B"] if ri else []
    with path.open("wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        try:
            proc.stdin.write(f"P6\n{image.width} {image.height}\n255\n".encode())
            proc.stdin.flush()
            target = pyvips.Target.new_to_descriptor(proc.stdin.fileno())
            image.cast("uchar").write_to_target(target, ".raw")  # the PPM's pixels
        finally:
            proc.stdin.close()
            if proc.wait() != 0:
                raise RuntimeError(f"cjpeg failed with exit status {proc.returncode}")


def _ifd(tags: list[tuple[int, int, Any]], at: int) -> bytes:
    """An NDPI directory written at offset `at`: the entry count, 12-byte classic entries, an
    8-byte next-directory offset (0, patched later), then the high 32 bits of every entry's
    value or value offset (NDPI's 64-bit extension of classic TIFF), then the values that do not
    fit an entry (ASCII never does in NDPI)."""
    n = len(tags)
    data_at = at + 2 + 12 * n + 8 + 4 * n
    entries = bytearray(struct.pack("<H", n))
    high = bytearray()
    extra = bytearray()
    for code, kind, value in sorted(tags, key=lambda t: t[0]):
        if kind == _ASCII:
            raw = str(value).encode() + b"\x00"
        elif kind == _RATIONAL:
            raw = struct.pack("<II", *value)
        else:
            values = value if isinstance(value, list | tuple) else [value]
            raw = struct.pack(
                f"<{len(values)}{_TYPE_CODE[kind]}",
                *(v & _LOW if kind == _LONG else v for v in values),
            )
        count = len(raw) // _TYPE_SIZE[kind]
        if len(raw) <= 4 and kind != _ASCII:
            entries += struct.pack("<HHI", code, kind, count) + raw.ljust(4, b"\x00")
            upper = value >> 32 if kind == _LONG and isinstance(value, int) else 0
        else:
            offset = data_at + len(extra)
            entries += struct.pack("<HHII", code, kind, count, offset & _LOW)
            upper = offset >> 32
            extra += raw + (b"\x00" if len(raw) % 2 else b"")
        high += struct.pack("<I", upper)
    return bytes(entries) + struct.pack("<Q", 0) + bytes(high) + bytes(extra)


def _page_tags(
    width: int, height: int, offset: int, size: int, lens: float, starts: list[int] | None
) -> list[tuple[int, int, Any]]:
    res = max(1, round(PIXELS_PER_CM * lens / 40)) if lens > 0 else MACRO_PIXELS_PER_CM
    tags: list[tuple[int, int, Any]] = [
        (256, _LONG, width),
        (257, _LONG, height),
        (258, _SHORT, [8, 8, 8]),
        (259, _SHORT, 7),
        (262, _SHORT, 6),
        (271, _ASCII, "Hamamatsu"),
        (272, _ASCII, "synthetic"),
        (305, _ASCII, "NDP.scan"),
        (273, _LONG, offset),
        (277, _SHORT, 3),
        (278, _LONG, height),
        (279, _LONG, size),
        (282, _RATIONAL, (res, 1)),
        (283, _RATIONAL, (res, 1)),
        (296, _SHORT, 3),
        (65420, _LONG, 1),
        (65421, _FLOAT, lens),
        (65422, _SLONG, 0),
        (65423, _SLONG, 0),
        (65424, _SLONG, 0),
        (65449, _ASCII, "Product=synthetic\r\nCreated=2026/01/01\r\nsystem.version=1.0"),
    ]
    if starts is not None:
        tags.append((65426, _LONG, starts))
        if starts[-1] > _LOW:
            tags.append((65432, _LONG, [v >> 32 for v in starts]))
    return tags


def write_ndpi(
    path: str | Path,
    width: int = 20480,
    height: int = 20480,
    levels: int = 4,
    stripe: int = 2048,
    quality: int = 80,
    subsampling: str = "444",
    seed: int = 0,
    level_step: int = 2,
    single_frame_smallest: bool = False,
) -> Path:
    """Write the slide (see the module docstring); returns its path."""
    out = Path(path)
    mw, mh = _mcu(subsampling)
    if stripe % mw:
        raise ValueError(f"the stripe width must be a multiple of the MCU width {mw}")
    if level_step not in (2, 4):
        raise ValueError("levels are 2x or 4x apart")
    scale = level_step ** (levels - 1)
    step_w, step_h = mw * scale, mh * scale
    width, height = -(-width // step_w) * step_w, -(-height // step_h) * step_h
    sizes = [(width // level_step**k, height // level_step**k) for k in range(levels)]
    stripes = level_stripes([w for w, _ in sizes], stripe, mw)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        jpegs: list[tuple[Path, int, int, float, bool]] = []
        image = build(width, height, seed)
        for k, ((w, h), sw) in enumerate(zip(sizes, stripes, strict=True)):
            if k:
                previous = str(jpegs[-1][0])
                image = pyvips.Image.jpegload(previous, shrink=level_step, access="sequential")
            target = Path(tmp) / f"level{k}.jpg"
            single = single_frame_smallest and k == levels - 1 and k > 0
            _encode(image, target, quality, subsampling, 0 if single else sw // mw)
            jpegs.append((target, w, h, 40.0 / level_step**k, not single))
        macro = pyvips.Image.jpegload(str(jpegs[-1][0])).thumbnail_image(
            10_000, height=MACRO_HEIGHT
        )
        macro = macro.embed(
            MACRO_HEIGHT, 0, macro.width + MACRO_HEIGHT, MACRO_HEIGHT, extend="white"
        )
        macro_path = Path(tmp) / "macro.jpg"
        macro.jpegsave(str(macro_path), Q=85, keep=pyvips.ForeignKeep.NONE)
        _assemble(out, jpegs, macro_path, macro.width, macro.height)
    return out


def _assemble(
    out: Path, jpegs: list[tuple[Path, int, int, float, bool]], macro: Path, mw: int, mh: int
) -> None:
    """Strips first (copied from the JPEG files), then the directories."""
    pages: list[list[tuple[int, int, Any]]] = []
    with out.open("wb") as f:
        f.write(b"II*\x00" + struct.pack("<Q", 0))
        for jpg, w, h, lens, striped in [*jpegs, (macro, mw, mh, -1.0, False)]:
            offset, size = f.tell(), jpg.stat().st_size
            starts = _interval_starts(jpg) if striped else None
            with jpg.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
            pages.append(_page_tags(w, h, offset, size, lens, starts))
            if f.tell() % 2:
                f.write(b"\x00")
        ifd_offsets = []
        for tags in pages:
            ifd_offsets.append(f.tell())
            f.write(_ifd(tags, f.tell()))
        for i, at in enumerate(ifd_offsets):
            f.seek(at + 2 + 12 * len(pages[i]))
            f.write(struct.pack("<Q", ifd_offsets[i + 1] if i + 1 < len(pages) else 0))
        f.seek(4)
        f.write(struct.pack("<Q", ifd_offsets[0]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=20480)
    parser.add_argument("--height", type=int, default=20480)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument(
        "--stripe", type=int, default=2048, help="level 0's restart interval, in pixels"
    )
    parser.add_argument("--level-step", type=int, choices=(2, 4), default=2)
    parser.add_argument(
        "--single-frame-smallest",
        action="store_true",
        help="the smallest level is one JPEG without restart markers (as in CMU-1.ndpi)",
    )
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--subsampling", choices=("444", "422"), default="444")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_ndpi(
        args.out,
        args.width,
        args.height,
        args.levels,
        args.stripe,
        args.quality,
        args.subsampling,
        args.seed,
        args.level_step,
        args.single_frame_smallest,
    )
    print(path)


if __name__ == "__main__":
    main()
