"""The dashboard (services/dashboard) in a real browser: headless Chromium (Debian's, installed by
deploy/browser.py when missing) driven by Playwright, against `crm dashboard` as a process of its own,
which gets its figures from the SQL endpoint served here beside the writer (as test_sql_http.py does)
and its live feed from the alerts service (in a thread here, as test_metrics.py runs it).

Known customers of a store of their own go through the real pipeline first. Every page is loaded and
every figure it shows is compared with its query (services/dashboard/queries.py) run directly on the
embedded database; then an alert that opens while the alerts page is open must appear in its live
feed without a reload. Screenshots of every page go to $CRM_SCREENSHOTS_DIR (default .state/screenshots)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from deploy.browser import LAUNCH_ARGS, ensure_chromium
from projections import boundaries
from services.alerts.service import AlertService
from services.dashboard.charts import render, shown
from services.dashboard.queries import CUSTOMER_PAGE, PAGES, PANELS, Panel
from services.dashboard.server import FEED_COLUMNS
from services.sql_http import SqlHttpServer, parse_users
from streams.config import PROJECT_ROOT
from streams.rulebooks import load_rulebooks
from tests.factories import encoded, event
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

USER, PASSWORD = "analyst", "dashboard s3cret"
SCREENSHOTS = Path(os.environ.get("CRM_SCREENSHOTS_DIR") or PROJECT_ROOT / ".state" / "screenshots")
FIGURES_SETTLE_SECONDS = 90.0
ALL_PANELS_SHOWN = "() => [...document.querySelectorAll('[data-panel]')].every(panel => panel.dataset.state === 'ok')"
TEXTS = "elements => elements.map(element => element.textContent)"


# ---- the stack around the dashboard -----------------------------------------------------------------


@dataclass
class Shop:
    store: str
    purchases: dict[str, int]
    events: dict[str, int]
    detractor: str


@pytest.fixture(scope="module")
def shop(stack) -> Shop:
    """Five customers of one store over the last 80 days, a detractor among them (a bad-experience
    alert), then population boundaries and one more event each, so that all of them are scored."""
    tag = uuid.uuid4().hex[:8]
    store = f"dash-{tag}"
    now = datetime.now(UTC).replace(microsecond=0)
    plans = {f"dash-{tag}-c{n}": days for n, days in enumerate(([80, 65, 50, 35, 20, 5], [70, 40], [85], [30, 10], []))}
    events: dict[str, int] = {}
    for customer, purchase_days in plans.items():
        bodies = [event("customer_registered", customer, occurred_at=(now - timedelta(days=88)).isoformat())]
        bodies += [_purchase(customer, store, now - timedelta(days=d)) for d in purchase_days]
        bodies += [event("app_session_started", customer, occurred_at=(now - timedelta(days=d)).isoformat(),
                         payload={"session_id": f"s-{d}"}) for d in (60, 3)]
        bodies += [event("daily_sign_in", customer, occurred_at=(now - timedelta(days=2)).isoformat())]
        for body in bodies:
            stack.send(customer.encode(), encoded(body))
        events[customer] = len(bodies)
    detractor = list(plans)[2]
    answer = event("survey_answered", detractor, occurred_at=(now - timedelta(days=1)).isoformat(),
                   payload={"survey_id": "s", "kind": "nps", "score": 2})
    stack.send(detractor.encode(), encoded(answer))
    events[detractor] += 1
    stack.flush()
    keys = list(plans)
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key IN {k:Array(String)}",
                                       {"k": keys})[0][0] == sum(events.values()), what="the shop's events")
    boundaries.publish(stack.client, stack.settings.clickhouse_database, load_rulebooks(stack.settings).segments,
                       stack.producer)
    for customer in keys:   # a customer's own next event is scored with the boundaries in force
        stack.send(customer.encode(), encoded(event("product_viewed", customer, occurred_at=now.isoformat())))
        events[customer] += 1
    stack.flush()
    buyers = [c for c, days in plans.items() if days]
    scored = ("SELECT countIf(rfm_recency > 0 AND value_tier != '') FROM customer_profiles FINAL "
              "WHERE customer_key IN {k:Array(String)}")
    stack.wait_for(lambda: stack.query(scored, {"k": buyers})[0][0] == len(buyers),
                   what="every buyer of the shop scored against boundaries")
    stack.wait_for(lambda: stack.query("SELECT count() FROM churn_alerts FINAL WHERE customer_key = {c:String}",
                                       {"c": detractor})[0][0] >= 1, what="the detractor's alert in churn_alerts")
    return Shop(store, {c: len(days) for c, days in plans.items()}, events, detractor)


def _purchase(customer: str, store: str, at: datetime) -> dict:
    body = event("purchase_completed", customer, occurred_at=at.isoformat(),
                 source={"channel": "pos", "store_id": store, "terminal_id": "t-1"})
    body["payload"]["lines"][0]["quantity"] = 1 + at.day % 4
    return body


@pytest.fixture(scope="module")
def sql_endpoint(stack) -> Iterator[SqlHttpServer]:
    if stack.settings.clickhouse_dsn:
        pytest.skip("the dashboard reads the writer's SQL endpoint, which a ClickHouse server replaces")
    server = SqlHttpServer(stack.settings, users=parse_users(f"{USER}:{PASSWORD}"), host="127.0.0.1", port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alerts(stack) -> Iterator[AlertService]:
    service = AlertService(stack.settings, host="127.0.0.1", port=0).start_in_thread()
    yield service
    service.stop()


@dataclass
class Dashboard:
    url: str
    process: subprocess.Popen
    log_path: Path


@pytest.fixture(scope="module")
def dashboard(stack, sql_endpoint, alerts, tmp_path_factory) -> Iterator[Dashboard]:
    """`crm dashboard` with the analysts of the SQL endpoint, refreshing every 2 seconds."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    env = {**os.environ, "CRM_SQL_USERS": f"{USER}:{PASSWORD}", "CRM_SQL_PORT": str(sql_endpoint.port),
           "CRM_ALERTS_PORT": str(alerts.port), "CRM_DASHBOARD_REFRESH_SECONDS": "2"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "dashboard", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for(lambda: _healthy(url, process), timeout=60, what=f"crm dashboard to answer (log {log_path})")
        yield Dashboard(url, process, log_path)
    finally:
        process.terminate()
        process.wait(30)


def _healthy(url: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, "crm dashboard exited"
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def page(dashboard) -> Iterator[Any]:
    """A page of headless Chromium, logged in as the analyst."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(ensure_chromium()), args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, http_credentials={
            "username": USER, "password": PASSWORD, "origin": dashboard.url, "send": "always"})
        context.set_default_timeout(60_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


# ---- what the page shows, and what the query says ---------------------------------------------------


def shown_figures(page, panel: Panel) -> list[list[str]]:
    """The rows of the panel's table as the browser shows them (the data table beside a chart, or the
    table that is the figure); [] when it shows none."""
    return page.eval_on_selector(f'[data-panel="{panel.name}"] .figure', """figure => {
        const table = figure.querySelector("table.data");
        return table ? [...table.tBodies[0].rows].map(row => [...row.cells].map(cell => cell.textContent)) : [];
    }""")


def queried_figures(stack, panel: Panel, key: str | None = None) -> list[list[str]]:
    """The panel's query run directly on the embedded database, formatted as the dashboard formats."""
    result = stack.client.query(panel.sql, parameters={"key": key} if panel.per_customer else None)
    columns, rows = result.column_names, result.result_rows
    if panel.chart == "record":
        return [[column, shown(as_json(value), column)] for column, value in zip(columns, rows[0])] if rows else []
    return [[shown(as_json(value), column) for column, value in zip(columns, row)] for row in rows]


def as_json(value: Any) -> Any:
    """A value as clickhouse-connect gives it, as the SQL endpoint's JSON gives it to the dashboard."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    return value


def settled(page, what: str, actual: Callable[[], Any], expected: Callable[[], Any]) -> Any:
    """Waits until the page shows what is expected (it refreshes itself every 2 s), then returns it;
    fails with both sides if it never does."""
    deadline = time.monotonic() + FIGURES_SETTLE_SECONDS
    while True:
        seen, wanted = actual(), expected()
        if seen == wanted or time.monotonic() > deadline:
            assert seen == wanted, what
            return seen
        page.wait_for_timeout(500)


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function(ALL_PANELS_SHOWN)


def check_panels(page, stack, names, key: str | None = None) -> None:
    for name in names:
        panel = PANELS[name]
        settled(page, f"{name}: the figures shown are the query's", lambda: shown_figures(page, panel),
                lambda: queried_figures(stack, panel, key))


# ---- the tests --------------------------------------------------------------------------------------


def test_every_page_shows_the_figures_its_queries_give(stack, shop, dashboard, page):
    for path, dashboard_page in PAGES.items():
        open_page(page, dashboard.url + path)
        assert page.locator("h1").inner_text() == dashboard_page.title
        check_panels(page, stack, dashboard_page.panels)
        page.screenshot(path=SCREENSHOTS / f"{dashboard_page.title.lower()}.png", full_page=True)
        if path == "/":
            _rfm_cells_are_the_counts(page, stack)
        if path == "/loyalty":
            _tier_bars_and_liability_are_the_counts(page, stack)

    # The detractor's page, opened from the search box: their profile, events, points, segments, alert.
    page.goto(dashboard.url + "/")
    page.fill("input[name=key]", shop.detractor)
    page.click("form.find button")
    page.wait_for_url(re.compile(r"/customers/"))
    page.wait_for_function(ALL_PANELS_SHOWN)
    check_panels(page, stack, CUSTOMER_PAGE.panels, shop.detractor)
    profile = dict(shown_figures(page, PANELS["customer_profile"]))
    assert profile["customer_key"] == shop.detractor
    assert profile["purchase_count"] == str(shop.purchases[shop.detractor])
    assert len(shown_figures(page, PANELS["customer_timeline"])) == shop.events[shop.detractor]
    assert [row[0] for row in shown_figures(page, PANELS["customer_alerts"])] == ["bad_experience"]
    assert shown_figures(page, PANELS["customer_points"]) and shown_figures(page, PANELS["customer_segments"])
    page.screenshot(path=SCREENSHOTS / "customer.png", full_page=True)


def _rfm_cells_are_the_counts(page, stack) -> None:
    cells = page.eval_on_selector_all('[data-panel="rfm_grid"] g.cell', """cells => cells.map(cell =>
        [Number(cell.dataset.row), Number(cell.dataset.column), cell.querySelector("text").textContent])""")
    counts = dict(((r, f), n) for r, f, n in stack.query(
        "SELECT rfm_recency, rfm_frequency, count() FROM customer_profiles FINAL WHERE merged_into = '' "
        "AND rfm_recency > 0 GROUP BY rfm_recency, rfm_frequency"))
    assert cells == [[r, f, f"{counts.get((r, f), 0):,}"] for r in (5, 4, 3, 2, 1) for f in (1, 2, 3, 4, 5)]
    assert sum(counts.values()) > 0


def _tier_bars_and_liability_are_the_counts(page, stack) -> None:
    bars = page.eval_on_selector_all('[data-panel="tier_mix"] g.bar', """bars => bars.map(bar =>
        [bar.querySelector("text.label").textContent, bar.querySelector("text.value").textContent])""")
    assert bars == [[tier, f"{members:,}"] for tier, members in stack.query(
        "SELECT tier, count() AS members FROM points_balances FINAL GROUP BY tier ORDER BY members DESC, tier")]
    kpis = page.eval_on_selector_all('[data-panel="points_liability"] .kpi-value', TEXTS)
    [(available, pending)] = stack.query("SELECT sum(available), sum(pending) FROM points_balances FINAL")
    assert kpis[:2] == [f"{available:,}", f"{pending:,}"]


def test_an_alert_that_opens_appears_in_the_live_feed_without_a_reload(stack, shop, dashboard, page):
    page.goto(dashboard.url + "/alerts")
    page.wait_for_selector('#live-feed .live-state[data-state="live"]')
    page.evaluate("window.sameDocument = true")
    assert page.eval_on_selector_all("#live-feed thead th", TEXTS) == list(FEED_COLUMNS)
    assert FEED_COLUMNS == tuple(stack.client.query(PANELS["latest_alerts"].sql).column_names)

    customer = f"{shop.store}-live"
    now = datetime.now(UTC)
    stack.send(customer.encode(), encoded(_purchase(customer, shop.store, now - timedelta(days=3))))
    stack.send(customer.encode(), encoded(event("survey_answered", customer, occurred_at=now.isoformat(),
                                                payload={"survey_id": "s", "kind": "nps", "score": 1})))
    stack.flush()

    row = page.wait_for_selector(f'#live-feed tbody tr:has(a:text-is("{customer}"))', timeout=120_000)
    assert page.evaluate("window.sameDocument") is True, "the page was not reloaded"
    cells = dict(zip(FEED_COLUMNS, row.eval_on_selector_all("td", TEXTS)))
    assert (cells["alert_type"], cells["reasons"], cells["store_id"]) == ("bad_experience", "nps_detractor", shop.store)
    page.screenshot(path=SCREENSHOTS / "live-feed.png", full_page=True)
    # The same alert, as analysts see it in churn_alerts.
    [(change_id, opened_at)] = stack.wait_for(lambda: stack.query(
        "SELECT toString(change_id), opened_at FROM churn_alerts FINAL WHERE customer_key = {c:String} "
        "AND status = 'opened'", {"c": customer}), what="the live alert in churn_alerts")
    assert row.get_attribute("data-change-id") == change_id
    assert cells["opened_at"] == shown(as_json(opened_at))


def test_only_the_analysts_of_the_sql_endpoint_are_let_in(dashboard):
    assert httpx.get(f"{dashboard.url}/health").json() == {"status": "ok"}
    for auth in (None, (USER, "wrong"), ("nobody", PASSWORD)):
        refused = httpx.get(f"{dashboard.url}/", auth=auth)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic ")
        assert httpx.get(f"{dashboard.url}/api/panels/tags", auth=auth).status_code == 401
    assert httpx.get(f"{dashboard.url}/static/dashboard.js").status_code == 401
    answer = httpx.get(f"{dashboard.url}/api/panels/tags", auth=(USER, PASSWORD))
    assert answer.status_code == 200 and "<svg" in answer.json()["html"]
    assert httpx.get(f"{dashboard.url}/api/panels/nothing", auth=(USER, PASSWORD)).status_code == 404


def test_text_from_the_data_is_escaped_in_every_chart():
    hostile = "<img src=x onerror=alert(1)>"
    charts = {
        "lines_by": (["day", "segment", "customers"], [["2026-03-01", hostile, 1], ["2026-03-02", hostile, 2]], {}),
        "bars": (["tag", "customers"], [[hostile, 3]], {}),
        "stacked_bars": (["reason", "opened", "resolved"], [[hostile, 2, 1]],
                         {"total": "opened", "parts": ["resolved"]}),
        "grid": (["row", "column", "n"], [[hostile, hostile, 1]], {}),
        "table": (["customer_key", "reasons"], [[hostile, hostile]], {}),
        "record": (["customer_key"], [[hostile]], {}),
        "lanes": (["occurred_at", "dimension", "from", "to"], [["2026-03-01 10:00:00.000", hostile, "", hostile]], {}),
        "timeline": (["occurred_at", "type"], [["2026-03-01 10:00:00.000", hostile]], {}),
    }
    for chart, (columns, rows, options) in charts.items():
        html = render(chart, options, columns, rows)
        assert "<img" not in html and "&lt;img" in html, chart


def test_the_docs_show_every_panel_and_its_query_as_it_stands():
    docs = (PROJECT_ROOT / "docs" / "dashboard.md").read_text()
    for panel in PANELS.values():
        assert f"`{panel.name}`" in docs, panel.name
        assert panel.sql.strip() in docs, f"docs/dashboard.md lacks the SQL of {panel.name} as it stands"
