"""OpenSlide backend: every format OpenSlide 4 reads (NDPI, MIRAX, Philips, Ventana, DICOM, ...).

OpenSlide only hands out decoded pixels, so slides read through it are re-encoded. It is the
fallback of the probe order; formats with a raw-tile backend are claimed by that backend first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import openslide

from wsi.errors import CorruptSlide, UnsupportedSlide
from wsi.model import ASSOCIATED_KINDS, Level, SlideProperties
from wsi.sources.base import SlideSource, check_region_size

DEFAULT_TILE = 256


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (transparent where there is no tissue scan) onto white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


_EQUIPMENT = {
    # vendor: (manufacturer, property holding the model, property holding the serial number)
    "aperio": ("Aperio", None, "aperio.ScanScope ID"),
    "hamamatsu": ("Hamamatsu", "hamamatsu.Product", "hamamatsu.Serial"),
    "leica": ("Leica", "leica.device-model", "leica.device-version"),
    "mirax": ("3DHISTECH", None, None),
    "philips": ("Philips", None, "philips.DICOM_DEVICE_SERIAL_NUMBER"),
    "ventana": ("Ventana", None, None),
}


def _scan_datetime(props: dict[str, str]) -> str | None:
    """Vendor scan time -> DICOM DT (YYYYMMDDHHMMSS), or None."""
    date, time = props.get("aperio.Date"), props.get("aperio.Time")
    if date and time:  # MM/DD/YY and HH:MM:SS
        try:
            month, day, year = (int(x) for x in date.split("/"))
            year += 2000 if year < 100 else 0
            return f"{year:04d}{month:02d}{day:02d}" + time.replace(":", "")[:6]
        except ValueError:
            return None
    stamp = props.get("tiff.DateTime") or props.get("hamamatsu.Created")
    if stamp and len(stamp) >= 19 and stamp[4] in ":-/":  # YYYY:MM:DD HH:MM:SS
        digits = "".join(c for c in stamp[:19] if c.isdigit())
        return digits if len(digits) == 14 else None
    return None


def properties_from_openslide(slide: openslide.AbstractSlide) -> SlideProperties:
    """Map OpenSlide's standard properties to ours; the vendor's own keys are kept as they are."""
    props = dict(slide.properties)
    icc = None
    with contextlib.suppress(Exception):  # an unreadable profile must not make the slide unreadable
        profile = slide.color_profile
        if profile is not None:
            icc = profile.tobytes()
    vendor = props.get("openslide.vendor")
    maker, model_key, serial_key = _EQUIPMENT.get(vendor or "", (None, None, None))
    return SlideProperties(
        vendor=vendor,
        scan_datetime=_scan_datetime(props),
        manufacturer=maker or props.get("tiff.Make"),
        model=props.get(model_key) if model_key else props.get("tiff.Model"),
        serial_number=props.get(serial_key) if serial_key else None,
        mpp_x=_float(props.get("openslide.mpp-x")),
        mpp_y=_float(props.get("openslide.mpp-y")),
        objective_power=_float(props.get("openslide.objective-power")),
        vendor_properties={k: v for k, v in props.items() if not k.startswith("openslide.")},
        icc_profile=icc,
    )


MAX_ASSOCIATED_PIXELS = 10_000 * 10_000
"""Most pixels of a label, macro or thumbnail read through OpenSlide (a macro photograph is a
few million): OpenSlide allocates the whole RGBA image before reading it, so a damaged page
declaring 256 x 4,000,000 pixels in a few KB held 4 GB, or failed with a MemoryError under an
address-space limit."""


def read_associated_openslide(slide: openslide.AbstractSlide, name: str) -> np.ndarray:
    prefix = f"openslide.associated.{name}"
    width = _float(slide.properties.get(f"{prefix}.width")) or 0
    height = _float(slide.properties.get(f"{prefix}.height")) or 0
    if width * height > MAX_ASSOCIATED_PIXELS:
        raise CorruptSlide(
            f"associated image {name!r} declares {width:.0f} x {height:.0f} pixels, over the "
            f"{MAX_ASSOCIATED_PIXELS} pixel limit"
        )
    try:
        image = slide.associated_images[name]
    except KeyError as exc:
        raise UnsupportedSlide(f"no associated image {name!r}") from exc
    except openslide.OpenSlideError as exc:
        raise CorruptSlide(f"cannot read associated image {name!r}: {exc}") from exc
    return rgba_to_rgb(np.asarray(image.convert("RGBA")))


SCAN_AREA_THUMBNAILS = frozenset({"aperio"})
"""Vendors whose `thumbnail` is a reduced copy of the scanned area, never of the label (Aperio:
the second page of an SVS file is a thumbnail of the base image; the label and the macro are
pages of their own). Other vendors' thumbnails may show the whole glass."""


class OpenSlideSource(SlideSource):
    """Any slide OpenSlide can open; pixels come out decoded."""

    name = "openslide"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        try:
            return openslide.OpenSlide.detect_format(str(path)) is not None
        except Exception:
            return False

    def __init__(self, path: Path) -> None:
        self._closed = False
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedSlide("OpenSlide does not recognise this file") from exc
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"OpenSlide cannot open this slide: {exc}") from exc
        props = self._slide.properties
        levels = []
        for i, ((w, h), ds) in enumerate(
            zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
        ):
            tw = int(props.get(f"openslide.level[{i}].tile-width", DEFAULT_TILE))
            th = int(props.get(f"openslide.level[{i}].tile-height", DEFAULT_TILE))
            levels.append(Level(w, h, tw, th, max(1.0, ds)))
        self._levels = tuple(levels)
        self._properties = properties_from_openslide(self._slide)

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def properties(self) -> SlideProperties:
        return self._properties

    def tile_size_hint(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the tiles OpenSlide says level `level` is stored in, or None when
        it gives none (its format reader then places the stored images off a regular grid)."""
        self.level(level)
        props = self._slide.properties
        width = props.get(f"openslide.level[{level}].tile-width")
        height = props.get(f"openslide.level[{level}].tile-height")
        return (int(width), int(height)) if width and height else None

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        lv = self.level(level)
        lv.check_tile(col, row)
        return self.read_region(
            level, col * lv.tile_width, row * lv.tile_height, lv.tile_width, lv.tile_height
        )

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self.level(level)
        check_region_size(width, height)
        origin = (round(x * lv.downsample), round(y * lv.downsample))
        try:
            image = self._slide.read_region(origin, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"cannot read pixels: {exc}") from exc
        return rgba_to_rgb(np.asarray(image))

    @property
    def associated_names(self) -> tuple[str, ...]:
        # Iterate the names: a membership test on OpenSlide's mapping decodes the image.
        present = set(iter(self._slide.associated_images))
        return tuple(n for n in ASSOCIATED_KINDS if n in present)

    def read_associated(self, name: str) -> np.ndarray:
        return read_associated_openslide(self._slide, name)

    def associated_shows_label(self, name: str) -> bool:
        return not (name == "thumbnail" and self._properties.vendor in SCAN_AREA_THUMBNAILS)

    def close(self) -> None:
        # OpenSlide refuses a second close; ours may be called again (a context manager after an
        # explicit close, a TiffSource closing the OpenSlideSource it wraps).
        if not self._closed:
            self._closed = True
            self._slide.close()
