"""The HTTP service over the library: aiohttp app, auth, CORS, audit, and one module per API."""
