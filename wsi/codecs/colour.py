"""sRGB to CIELab, for the blank-glass tolerance and DICOM's CIELab attributes.

The CIE 1976 L*a*b* of an sRGB colour under D65, as IEC 61966-2-1 and CIE 15 define them: what
Delta-E 76 (the Euclidean distance in Lab) is measured in, and what DICOM's Recommended Absent
Pixel CIELab Value (0048,0015) holds, scaled to 16 bits like an ICC PCS Lab value (PS3.3
C.10.7.1.1: L* 0..100 and a*, b* -128..127 over 0..0xFFFF).
"""

from __future__ import annotations

import numpy as np

_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or float 0..255, last axis R, G, B) -> CIELab (D65), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def dicom_lab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """An sRGB colour as DICOM's 16-bit CIELab triplet (PS3.3 C.10.7.1.1)."""
    lab = srgb_to_lab(np.array(rgb))
    values = (lab[0] * 0xFFFF / 100, (lab[1] + 128) * 0xFFFF / 255, (lab[2] + 128) * 0xFFFF / 255)
    return tuple(int(min(0xFFFF, max(0, round(v)))) for v in values)  # type: ignore[return-value]


def srgb_of_dicom_lab(lab: tuple[int, int, int]) -> tuple[int, int, int]:
    """The sRGB colour (rounded, clipped to 0..255) of a DICOM 16-bit CIELab triplet: the
    inverse of `dicom_lab`, for a Recommended Absent Pixel CIELab Value read from a file."""
    v = np.asarray(lab, np.float64)
    lightness, a, b = v[0] * 100 / 0xFFFF, v[1] * 255 / 0xFFFF - 128, v[2] * 255 / 0xFFFF - 128
    fy = (lightness + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    eps, kappa = 216 / 24389, 24389 / 27
    xyz = np.where(f**3 > eps, f**3, (116 * f - 16) / kappa)
    linear = np.linalg.solve(_SRGB_TO_XYZ, xyz * _D65)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055)
    r, g, bl = (round(min(255.0, max(0.0, float(x) * 255))) for x in c)
    return r, g, bl
