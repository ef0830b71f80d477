"""The exported JSON Schema files are what producers in other languages build against: they must
match the models, so a model change without a re-export fails here."""

import orjson

from schemas.events import registered_versions
from schemas.codec import SYSTEM_RECORDS
from schemas.export import DEFAULT_DIR, schema_documents


def test_committed_schema_files_match_the_models():
    documents = schema_documents()
    # every event type, the platform's own records, and the alerts topic's record
    assert len(documents) == len(registered_versions()) + len(SYSTEM_RECORDS) + 1
    assert {"clock_ticked.v1.json", "churn_model_published.v1.json", "alert_change.v1.json"} <= set(documents)
    for name, content in documents.items():
        path = DEFAULT_DIR / name
        assert path.exists(), f"{name} missing: run `crm schemas export`"
        assert path.read_bytes() == content, f"{name} is stale: run `crm schemas export`"


def test_personal_fields_are_flagged_in_the_exported_schema():
    schema = orjson.loads((DEFAULT_DIR / "customer_registered.v1.json").read_bytes())
    payload = schema["$defs"]["CustomerRegistered"]["properties"]
    assert payload["email"]["x-personal"] is True
    assert "x-personal" not in payload["preferred_store_id"]
