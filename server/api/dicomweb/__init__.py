"""DICOMweb (PS3.18) by concern; `routes` registers them.

- `instances`: the instances of a published slide, their headers, the per-app caches.
- `negotiation`: Accept headers and multipart bodies.
- `query`: QIDO-RS query strings parsed, and rows matched against them.
- `qido`: QIDO-RS search responses.
- `wado`: WADO-RS metadata, frames and retrieval.
- `rendered`: rendered images and thumbnails.
"""

from server.api.dicomweb.routes import OPENAPI, register

__all__ = ["OPENAPI", "register"]
