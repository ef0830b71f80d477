"""`crm intake`: the edge for producers that write to Kafka directly. It takes `crm.intake` (plain
events, kept a day), checks each record with the ingestion API's rules (services/ingest/hygiene.py),
seals the personal fields and writes the result to `crm.events`; refused records go to
`crm.intake.deadletter`. docs/intake.md is the producers' view."""
