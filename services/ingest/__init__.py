"""The ingestion edge: an HTTP API for POS terminals, apps and back offices (api.py), the API keys
that say who may send what (keys.py), the rules every event passes before it reaches Kafka
(hygiene.py), and the sealing of personal fields that every producer of `crm.events` uses (sealing.py:
the API, the intake, `crm import`, the simulator). docs/ingestion.md is the user's view."""
