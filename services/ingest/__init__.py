"""The ingestion edge: an HTTP API for POS terminals, apps and back offices (api.py), the API keys
that say who may send what (keys.py), and the rules every event passes before it reaches Kafka
(hygiene.py). docs/ingestion.md is the user's view."""
