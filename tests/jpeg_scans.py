"""JPEG streams of flat 8x8 blocks with any scan script: the legal but rare layouts encoders
seldom write (one scan per component, progressive scripts that never send some coefficients,
repeated scans), written bit by bit so that no test needs cjpeg's `-scans`.

Every block is one level (DC only, all AC zero); the quantisation table is all ones, so a
block's DC coefficient is 8 x (level - 128). Components are sampled 1x1."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from wsi.codecs.restart import BitWriter

Scan = tuple[tuple[int, ...], int, int]
"""(component indexes, Ss, Se): Ss = Se = 0 is a DC scan, Ss >= 1 an AC scan (progressive)."""


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def flat_blocks_jpeg(levels: np.ndarray, scans: Sequence[Scan], progressive: bool) -> bytes:
    """A JPEG of (rows, cols, components) block levels, 8 pixels a block, with `scans` in order
    (a baseline frame when not `progressive`: then every scan is Ss=0, Se=63)."""
    rows, cols, ncomp = levels.shape
    dc = ((levels.astype(np.int64) - 128) * 8).reshape(rows * cols, ncomp)
    categories = sorted(
        {0}
        | {int(abs(int(v))).bit_length() for v in np.diff(dc, axis=0).ravel()}
        | {int(abs(int(v))).bit_length() for v in dc[0]}
    )
    length = max(1, len(categories).bit_length())  # codes 0 .. n-1: never the all-ones code
    code = {cat: i for i, cat in enumerate(categories)}
    counts = [0] * 16
    counts[length - 1] = len(categories)
    dht = bytes([0x00, *counts, *categories])  # DC table 0
    dht += bytes([0x10, 1, *([0] * 15), 0x00])  # AC table 0: EOB alone, code '0'
    header = b"\xff\xd8" + _segment(0xDB, bytes([0]) + bytes([1]) * 64)
    frame = struct.pack(">BHHB", 8, rows * 8, cols * 8, ncomp)
    frame += b"".join(bytes([ci + 1, 0x11, 0]) for ci in range(ncomp))
    header += _segment(0xC2 if progressive else 0xC0, frame) + _segment(0xC4, dht)
    body = b""
    for comps, ss, se in scans:
        if not progressive:
            ss, se = 0, 63
        sos = bytes([len(comps)]) + b"".join(bytes([ci + 1, 0x00]) for ci in comps)
        body += _segment(0xDA, sos + bytes([ss, se, 0]))
        bits = BitWriter()
        last = dict.fromkeys(comps, 0)
        for block in range(rows * cols):
            for ci in comps:
                if ss == 0:
                    diff = int(dc[block, ci]) - last[ci]
                    last[ci] = int(dc[block, ci])
                    cat = abs(diff).bit_length()
                    bits.put(code[cat], length)
                    if cat:
                        bits.put(diff if diff > 0 else diff + (1 << cat) - 1, cat)
                if se > 0:
                    bits.put(0, 1)  # EOB: no AC coefficient
        body += bits.flush()
    return header + body + b"\xff\xd9"
