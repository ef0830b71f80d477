"""The intake process's Prometheus metrics (docs/operations.md), served on 127.0.0.1 at
CRM_INTAKE_METRICS_PORT (default 9103; a free port when taken), announced in `$CRM_STATE_DIR/run/intake.metrics`.
Labels are bounded: outcomes are three, reasons those of hygiene.py and the intake's own."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECORDS = Counter("crm_intake_records_total", "Intake records taken, by outcome: sealed (written to the events "
                  "topic), refused (dead-lettered to crm.intake.deadletter).", ["outcome"])
REFUSED = Counter("crm_intake_refused_total", "Intake records refused and dead-lettered, by reason.", ["reason"])
BATCH_SECONDS = Histogram("crm_intake_batch_duration_seconds", "Time to check, seal, write and commit one batch.",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SEND_RETRIES = Counter("crm_intake_send_retries_total", "Times a batch's writes were retried because Kafka did not "
                       "acknowledge them.")


def summary(samples: object) -> list[str]:
    """`crm status` lines from a scrape (services/health.py Samples)."""
    from services.health import _breakdown, _ms, _n

    return [f"records {_breakdown(samples.by('crm_intake_records_total', 'outcome'))}; refused "  # type: ignore[attr-defined]
            f"{_breakdown(samples.by('crm_intake_refused_total', 'reason'))}; batch mean "  # type: ignore[attr-defined]
            f"{_ms(samples.mean('crm_intake_batch_duration_seconds'))}; send retries "  # type: ignore[attr-defined]
            f"{_n(samples.total('crm_intake_send_retries_total'))}"]  # type: ignore[attr-defined]
