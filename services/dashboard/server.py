"""`crm dashboard`: the pages, their figures as JSON, the live feed, on 127.0.0.1 (docs/dashboard.md).

Who may look: the analysts of the SQL endpoint, with the same user list and the same password check
(services/sql_http.py's load_users and SqlUser), over HTTP Basic. Every figure is then fetched from the
SQL endpoint as that analyst (sql.py), so the dashboard can show nothing its viewer could not query.
The pages hold placeholders only: the browser fetches each panel's figure (`/api/panels/<name>`) and
fetches it again every CRM_DASHBOARD_REFRESH_SECONDS (static/dashboard.js)."""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from services.dashboard import live
from services.dashboard.charts import TABLES, render
from services.dashboard.queries import CUSTOMER_PAGE, PAGES, PANELS, Page, Panel
from services.dashboard.sql import QueryFailed, SqlEndpoint
from services.sql_http import SqlUser, load_users
from streams.config import Settings

HOST = "127.0.0.1"
PACKAGE = Path(__file__).resolve().parent
CHALLENGE = 'Basic realm="crm dashboard", charset="UTF-8"'
FEED_COLUMNS = ("opened_at", "alert_type", "severity", "customer_key", "reasons", "store_id")
PING_SECONDS = 15
WIDE_CHARTS = TABLES | {"lanes", "timeline"}   # panels across the whole page


@dataclass(frozen=True)
class Analyst:
    name: str
    password: str   # passed on to the SQL endpoint, which checks it again


class AnalystLogin:
    """ASGI middleware: every path but /health needs an analyst's name and password."""

    def __init__(self, app: ASGIApp, users: dict[str, SqlUser]):
        self.app, self.users = app, users

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        analyst = analyst_of(Headers(scope=scope).get("authorization"), self.users)
        if analyst is None:
            refused = PlainTextResponse("Log in as an analyst (a user of CRM_SQL_USERS; docs/dashboard.md).\n",
                                        status_code=401, headers={"WWW-Authenticate": CHALLENGE})
            await refused(scope, receive, send)
            return
        scope.setdefault("state", {})["analyst"] = analyst
        await self.app(scope, receive, send)


def analyst_of(authorization: str | None, users: dict[str, SqlUser]) -> Analyst | None:
    """The analyst whose Basic credentials these are, or None."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = users.get(name)
    return Analyst(name, password) if colon and user is not None and user.accepts(password) else None


def create_app(settings: Settings, users: dict[str, SqlUser] | None = None) -> Starlette:
    templates = Jinja2Templates(directory=PACKAGE / "templates")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.sql = SqlEndpoint(settings)
        app.state.alerts_key = live.alerts_key(settings)
        try:
            yield
        finally:
            await app.state.sql.close()

    def page_view(page: Page, key: str | None = None):
        async def view(request: Request) -> Response:
            panels = [PANELS[name] for name in page.panels]
            return templates.TemplateResponse(request, "page.html", {
                "page": page, "pages": PAGES.values(), "panels": panels, "customer": key,
                "heading": f"Customer {key}" if key else page.title, "analyst": request.state.analyst.name,
                "refresh_seconds": settings.dashboard_refresh_seconds, "feed_columns": FEED_COLUMNS,
                "sources": {panel.name: panel_source(panel, key) for panel in panels}, "wide": WIDE_CHARTS})
        return view

    async def customer(request: Request) -> Response:
        return await page_view(CUSTOMER_PAGE, request.path_params["key"])(request)

    async def find_customer(request: Request) -> Response:
        key = request.query_params.get("key", "").strip()
        return RedirectResponse(f"/customers/{quote(key, safe='')}" if key else "/", status_code=303)

    async def panel(request: Request) -> Response:
        found = PANELS.get(request.path_params["name"])
        if found is None:
            return JSONResponse({"error": "no such panel"}, status_code=404)
        key = request.query_params.get("customer")
        if found.per_customer and key is None:
            return JSONResponse({"error": "this panel needs ?customer=<key>"}, status_code=400)
        analyst: Analyst = request.state.analyst
        try:
            result = await request.app.state.sql.query(found.sql, {"key": key} if found.per_customer else {},
                                                       analyst.name, analyst.password)
        except QueryFailed as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse({"html": render(found.chart, found.options, result.columns, result.rows)})

    async def live_feed(request: Request) -> Response:
        try:
            upstream = await live.Upstream.open(settings, request.app.state.alerts_key,
                                                request.headers.get("last-event-id"))
        except (httpx.HTTPError, live.UpstreamRefused) as exc:
            return JSONResponse({"error": f"the alerts service's stream is not available: {exc}"}, status_code=502)
        return EventSourceResponse(upstream.opened_alerts(), ping=PING_SECONDS)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes: list[Any] = [Route(page.path, page_view(page)) for page in PAGES.values()]
    routes += [Route("/customers", find_customer), Route("/customers/{key:path}", customer),
               Route("/api/panels/{name}", panel), Route("/api/alerts/live", live_feed), Route("/health", health),
               Mount("/static", StaticFiles(directory=PACKAGE / "static"), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(AnalystLogin, users=load_users(settings) if users is None else users)
    return app


def panel_source(panel: Panel, key: str | None) -> str:
    """Where the page fetches the panel's figure."""
    return f"/api/panels/{panel.name}" + (f"?customer={quote(key, safe='')}" if panel.per_customer and key else "")


def off_reason(settings: Settings) -> str | None:
    """Why the dashboard cannot serve, or None: it needs analysts to let in."""
    try:
        if not load_users(settings):
            return "no analyst users (set CRM_SQL_USERS=name:password or CRM_SQL_USERS_FILE, as for SQL over HTTP)"
    except (OSError, ValueError) as exc:
        return f"cannot read the analyst users: {exc}"
    return None


def url(settings: Settings, port: int | None = None) -> str:
    return f"http://{HOST}:{settings.dashboard_port if port is None else port}"


def serve(settings: Settings, port: int | None = None) -> None:
    """In the foreground until SIGTERM or Ctrl-C; live feeds are cut after a few seconds of shutdown."""
    import uvicorn

    uvicorn.run(create_app(settings), host=HOST, port=settings.dashboard_port if port is None else port,
                log_config=None, access_log=False, timeout_graceful_shutdown=3)


def describe(settings: Settings) -> str:
    """One line for `crm status`."""
    reason = off_reason(settings)
    if reason:
        return f"dashboard: off ({reason})"
    try:
        answering = httpx.get(f"{url(settings)}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        answering = False
    return f"dashboard: {url(settings)} ({'answering' if answering else 'not answering'})"
