"""Churn alerts to subscribers (docs/webhooks.md): `crm alerts` reads `crm.alerts` into an alert log
(SQLite), delivers it to webhook subscriptions with signatures, retries and dead letters, and serves
it as a resumable live stream.

    store.py     subscriptions, the alert log and delivery state (SQLite, WAL)
    filters.py   which alerts a subscription or a stream wants
    consumer.py  crm.alerts -> the alert log (+ deliveries), then Kafka offsets
    dispatch.py  one delivery loop per subscription: signing, retries, backoff, dead letters, order
    signing.py   X-CRM-Signature: sign and verify (also for receivers)
    api.py       the HTTP API: webhooks, dead letters, the SSE stream
    service.py   the process that runs all of it
"""
