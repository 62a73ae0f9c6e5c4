"""The C extensions only; the package's metadata lives in pyproject.toml.

`wsi.codecs._jpeglib` is compiled against the system's libjpeg(-turbo) headers (Debian:
libjpeg62-turbo-dev) and links -ljpeg: the same libjpeg-turbo that `wsi.codecs.jpeg` calls through
TurboJPEG, so cropped decoding matches whole-tile decoding bit for bit. `wsi.pyramid._pixels`
(the 2x2 means and blank check of derived levels) needs only Python's headers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wsi.codecs._jpeglib",
            sources=["wsi/codecs/_jpeglib.c"],
            depends=[
                "wsi/codecs/_jpeglib_huffman.h",
                "wsi/codecs/_jpeglib_copy.h",
                "wsi/codecs/_jpeglib_copy_calls.h",
                "wsi/codecs/_jpeglib_decode.h",
                "wsi/codecs/_jpeglib_glass.h",
                "wsi/codecs/_jpeglib_batch.h",
                "wsi/codecs/_jpeglib_region.h",
            ],
            libraries=["jpeg"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "wsi.pyramid._pixels",
            sources=["wsi/pyramid/_pixels.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
