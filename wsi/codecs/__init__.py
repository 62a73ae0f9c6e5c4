"""Tile codecs: our libjpeg-turbo binding (DCT-scaled decoding, strided encoding) and the
`wsistore.jpeg` Zarr v3 codec that lets plain zarr-python decode our JPEG chunks."""
