"""Where published slides live: a local folder or `s3://bucket/prefix`, objects written whole
or not at all, every key validated."""

from wsi.store.objects import MANIFEST, Store, StoreSettings, check_key, check_slide_id

__all__ = ["MANIFEST", "Store", "StoreSettings", "check_key", "check_slide_id"]
