"""The dashboard (`crm dashboard`, docs/dashboard.md): the platform's figures as charts in a browser,
refreshed while people watch, and churn alerts as they open.

It is read-only and holds no data of its own. Every figure is one SQL query (queries.py) that the
server runs on the projection writer's SQL endpoint (services/sql_http.py) as the analyst who logged
in, and renders as SVG (charts.py); the live feed relays the alerts service's stream (live.py). The
embedded ClickHouse stays with the writer, its one owner, and the dashboard needs no assets from
outside the package."""
