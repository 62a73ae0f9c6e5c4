"""The console (`/console`): one page for the people who run the service. Jobs with retry and
cancel, the quarantine with retry, what the watch folders hold, storage per slide, the last
integrity check, and the health of the store and the job table, refreshed every few seconds.

The page is a shell: it holds no data and is served without a token. `console.js` reads
everything through the same REST API scripts use (`/jobs`, `/quarantine`, `/watch`,
`/storage`, `/integrity`, `/readyz`), with the Bearer token the user types in (kept in
`sessionStorage`, for this tab only) when auth is on. Strict CSP: our own scripts and styles
only, nothing inline.
"""

from __future__ import annotations

from aiohttp import web

from server.front import routes

CONSOLE_PATH = "/console"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
REFRESH_SECONDS = 5
"""How often the page reads the APIs again (it also does after each action)."""

NO_SCRIPT = (
    "The console needs JavaScript: it reads everything it shows from the service's REST API. "
    "Without it, use the API directly: GET /jobs, /quarantine, /watch, /storage, /readyz "
    "(with an Authorization: Bearer header when the service requires a token); "
    "/openapi.json lists every route."
)

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Console · wsistore</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/console.css">
</head><body data-refresh="{REFRESH_SECONDS}">
<header><h1>Console</h1><span id="updated" aria-live="polite"></span>
<button type="button" id="forget" hidden>Forget token</button></header>
<noscript><p class="banner error" id="noscript">{NO_SCRIPT}</p></noscript>
<p class="banner error" id="problem" role="alert" hidden></p>
<form id="login" hidden>
<label for="token">This service requires a token. API token:</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit">Open console</button>
<p class="hint">Kept in this browser tab only (sessionStorage) and sent as a Bearer header.</p>
</form>
<main id="panels" hidden>
<section id="health"><h2>Health</h2><div class="body"></div></section>
<section id="integrity"><h2>Integrity check</h2><div class="body"></div></section>
<section id="jobs" class="wide"><h2>Jobs</h2><div class="body"></div></section>
<section id="quarantine"><h2>Quarantine</h2><div class="body"></div></section>
<section id="watch"><h2>Watch folders</h2><div class="body"></div></section>
<section id="storage" class="wide"><h2>Storage</h2><div class="body"></div></section>
</main>
<script src="/static/console.js"></script>
</body></html>
"""


async def console(request: web.Request) -> web.Response:
    return web.Response(
        text=PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def register(app: web.Application) -> None:
    routes(app).add_get(CONSOLE_PATH, console, name="console.page")


OPENAPI = {
    CONSOLE_PATH: {
        "get": {
            "summary": "Console for the people who run the service (HTML; served without a "
            "token, it asks for one and shows nothing until the APIs accept it)",
            "responses": {"200": {"description": "text/html"}},
        }
    },
}
