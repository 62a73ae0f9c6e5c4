"""The aiohttp tile service (built in the tile-server issue)."""
