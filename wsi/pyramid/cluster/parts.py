"""Objects written in numbered parts by many processes, then completed by one: defined in
`wsi.store.parts` (whose S3 part uploads the one-process converter's streamed DICOM level
objects use too, `wsi.store.head_last`), named here for the cluster's modules."""

from wsi.store.parts import MAX_PART_NUMBER, MIN_PART_BYTES, ObjectParts, PartRef, crc32c_combine

__all__ = ["MAX_PART_NUMBER", "MIN_PART_BYTES", "ObjectParts", "PartRef", "crc32c_combine"]
