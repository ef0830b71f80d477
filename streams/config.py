"""Where things are: every knob comes from the environment so that the same code runs on the
embedded local stack, in tests, and against real clusters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    # Everything the local stack writes (Kafka data, worker state, embedded ClickHouse) lives here.
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("CRM_STATE_DIR", PROJECT_ROOT / ".state")))
    # Set to use an existing Kafka cluster; unset means the local broker from deploy/kafka.
    kafka_bootstrap_override: str | None = field(default_factory=lambda: os.environ.get("CRM_KAFKA_BOOTSTRAP") or None)
    kafka_port: int = field(default_factory=lambda: int(os.environ.get("CRM_KAFKA_PORT", "9092")))
    kafka_controller_port: int = field(default_factory=lambda: int(os.environ.get("CRM_KAFKA_CONTROLLER_PORT", "9093")))
    kafka_replication: int = field(default_factory=lambda: int(os.environ.get("CRM_KAFKA_REPLICATION", "1")))
    # Set (http://user:pass@host:8123/crm) to use a ClickHouse server; unset means embedded chdb.
    clickhouse_dsn: str | None = field(default_factory=lambda: os.environ.get("CRM_CLICKHOUSE_DSN") or None)
    # The DSN's path names the database (…:8123/crm); CRM_CLICKHOUSE_DATABASE overrides; default crm.
    clickhouse_database: str = field(default_factory=lambda: _database_from_env())
    # The loyalty rules file (every version ever in force); default deploy/loyalty-rules.toml.
    loyalty_rules: Path = field(default_factory=lambda: Path(
        os.environ.get("CRM_LOYALTY_RULES", PROJECT_ROOT / "deploy" / "loyalty-rules.toml")))
    # The segment rules file (lifecycle thresholds, every version); default deploy/segment-rules.toml.
    segment_rules: Path = field(default_factory=lambda: Path(
        os.environ.get("CRM_SEGMENT_RULES", PROJECT_ROOT / "deploy" / "segment-rules.toml")))
    # How often the worker's leader writes a clock tick to every events partition (schemas/clock.py);
    # 0 turns the clock off (tests that write their own ticks).
    tick_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_TICK_SECONDS", "60")))
    # The worker's batches (streams/runtime/app.py): at most this many records, gathered for at most
    # this long; and how many state values per partition it keeps in memory (as bytes), in
    # front of RocksDB (streams/state.py).
    worker_batch_size: int = field(default_factory=lambda: int(os.environ.get("CRM_WORKER_BATCH_SIZE", "2000")))
    worker_batch_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_WORKER_BATCH_SECONDS", "0.1")))
    state_cache_keys: int = field(default_factory=lambda: int(os.environ.get("CRM_STATE_CACHE_KEYS", "5000")))
    # Where the worker and the projection writer serve Prometheus /metrics on 127.0.0.1
    # (docs/operations.md): 0 is any free port, and a taken port falls back to a free one; the address
    # each process bound is in $CRM_STATE_DIR/run/<process>.metrics (deploy/metrics_endpoint.py).
    worker_metrics_port: int = field(default_factory=lambda: int(os.environ.get("CRM_WORKER_METRICS_PORT", "9101")))
    writer_metrics_port: int = field(default_factory=lambda: int(os.environ.get("CRM_WRITER_METRICS_PORT", "9102")))
    # How often the projection writer recomputes the population boundaries of value tiers and RFM
    # scores and appends them to the events log (projections/boundaries.py); 0 turns that off.
    boundaries_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_BOUNDARIES_SECONDS", "3600")))
    # The churn rules file (indicators, severity, actions; every version); default deploy/churn-rules.toml.
    churn_rules: Path = field(default_factory=lambda: Path(
        os.environ.get("CRM_CHURN_RULES", PROJECT_ROOT / "deploy" / "churn-rules.toml")))
    # How often the projection writer refits the BG/NBD churn model over the purchase history and
    # appends it to the events log (projections/churn_model.py); 0 turns that off.
    churn_model_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_CHURN_MODEL_SECONDS", "86400")))

    # The ingestion API (services/ingest): where it listens, and the region for phone numbers
    # written without a country code (normalised to E.164 before hashing).
    api_host: str = field(default_factory=lambda: os.environ.get("CRM_API_HOST", "127.0.0.1"))
    api_port: int = field(default_factory=lambda: int(os.environ.get("CRM_API_PORT", "8080")))
    phone_region: str = field(default_factory=lambda: os.environ.get("CRM_PHONE_REGION", "DE"))

    # SQL over HTTP (services/sql_http.py, docs/sql-http.md), served by the projection writer while it owns
    # the embedded ClickHouse, always to its local admin (`crm sql`): where it listens (port 0: off), which
    # analysts may query ("name:password,..." and/or a file of such lines), and what each of their
    # queries may use (0: no limit).
    sql_host: str = field(default_factory=lambda: os.environ.get("CRM_SQL_HOST", "127.0.0.1"))
    sql_port: int = field(default_factory=lambda: int(os.environ.get("CRM_SQL_PORT", "8123")))
    sql_users: str = field(default_factory=lambda: os.environ.get("CRM_SQL_USERS", ""), repr=False)
    sql_users_file: Path | None = field(default_factory=lambda: Path(os.environ["CRM_SQL_USERS_FILE"])
                                        if os.environ.get("CRM_SQL_USERS_FILE") else None)
    sql_max_execution_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_SQL_MAX_EXECUTION_SECONDS", "60")))
    sql_max_result_rows: int = field(default_factory=lambda: int(os.environ.get("CRM_SQL_MAX_RESULT_ROWS", "1000000")))
    sql_max_result_bytes: int = field(default_factory=lambda: int(os.environ.get("CRM_SQL_MAX_RESULT_BYTES", "268435456")))
    sql_max_memory_bytes: int = field(default_factory=lambda: int(os.environ.get("CRM_SQL_MAX_MEMORY_BYTES", "2000000000")))
    sql_max_concurrent: int = field(default_factory=lambda: int(os.environ.get("CRM_SQL_MAX_CONCURRENT", "2")))

    # Alert delivery (services/alerts, docs/webhooks.md): where its API listens; per webhook, how many
    # attempts before a delivery is dead, the retry backoff (base doubling per attempt up to the cap,
    # full jitter), the whole-request timeout and how many requests may be in flight at once.
    alerts_host: str = field(default_factory=lambda: os.environ.get("CRM_ALERTS_HOST", "127.0.0.1"))
    alerts_port: int = field(default_factory=lambda: int(os.environ.get("CRM_ALERTS_PORT", "8090")))
    alerts_max_attempts: int = field(default_factory=lambda: int(os.environ.get("CRM_ALERTS_MAX_ATTEMPTS", "25")))
    alerts_backoff_base_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CRM_ALERTS_BACKOFF_BASE_SECONDS", "1")))
    alerts_backoff_cap_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CRM_ALERTS_BACKOFF_CAP_SECONDS", "300")))
    alerts_timeout_seconds: float = field(default_factory=lambda: float(os.environ.get("CRM_ALERTS_TIMEOUT_SECONDS", "10")))
    alerts_concurrency: int = field(default_factory=lambda: int(os.environ.get("CRM_ALERTS_CONCURRENCY", "4")))

    # The dashboard (services/dashboard, docs/dashboard.md): its port on 127.0.0.1, how often its pages
    # fetch their figures again, and the backoffice key its live feed reads the alerts stream with
    # (unset: a key of its own, made once; services/dashboard/live.py).
    dashboard_port: int = field(default_factory=lambda: int(os.environ.get("CRM_DASHBOARD_PORT", "8200")))
    dashboard_refresh_seconds: float = field(
        default_factory=lambda: float(os.environ.get("CRM_DASHBOARD_REFRESH_SECONDS", "10")))
    dashboard_alerts_key: str = field(default_factory=lambda: os.environ.get("CRM_DASHBOARD_ALERTS_KEY", ""), repr=False)

    @property
    def alerts_db(self) -> Path:
        """Webhook subscriptions, the alert log and the delivery state (SQLite, WAL)."""
        return self.state_dir / "alerts" / "alerts.sqlite"

    @property
    def ingest_db(self) -> Path:
        """API keys and the event ids the API has written (SQLite)."""
        return self.state_dir / "ingest" / "ingest.sqlite"

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap_override or f"127.0.0.1:{self.kafka_port}"

    @property
    def uses_local_kafka(self) -> bool:
        return self.kafka_bootstrap_override is None

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def worker_dir(self) -> Path:
        return self.state_dir / "worker"

    @property
    def chdb_dir(self) -> Path:
        return self.state_dir / "clickhouse"


def _database_from_env() -> str:
    from urllib.parse import urlparse

    dsn_path = urlparse(os.environ.get("CRM_CLICKHOUSE_DSN", "")).path.strip("/")
    return os.environ.get("CRM_CLICKHOUSE_DATABASE") or dsn_path or "crm"


def settings() -> Settings:
    return Settings()
