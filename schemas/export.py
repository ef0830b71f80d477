"""JSON Schema files for producers written in other languages, one per (type, schema_version), and
for subscribers: the alerts topic's record (schemas/alerts.py AlertChange)."""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.alerts import ALERT_CHANGE_TYPE, AlertChange
from schemas.codec import SYSTEM_RECORDS
from schemas.events import event_model, registered_versions

DEFAULT_DIR = Path(__file__).resolve().parent / "jsonschema"


def schema_documents() -> dict[str, bytes]:
    documents = {}
    models = [(type_name, version, event_model(type_name, version)) for type_name, version in registered_versions()]
    system = [(type_name, 1, model) for type_name, model in SYSTEM_RECORDS.items()]
    outgoing = [(ALERT_CHANGE_TYPE, 1, AlertChange)]
    for type_name, version, model in [*models, *system, *outgoing]:
        schema = model.model_json_schema(mode="validation")  # type: ignore[union-attr]
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": f"crm/events/{type_name}.v{version}.json", **schema}
        documents[f"{type_name}.v{version}.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return documents


def export(folder: Path | None = None) -> list[Path]:
    folder = folder or DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in schema_documents().items():
        path = folder / name
        path.write_bytes(content)
        written.append(path)
    return written
