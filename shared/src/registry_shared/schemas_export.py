"""Write the JSON Schema of every event type to docs/events/ (`python -m registry_shared.schemas_export`).

The pydantic models in registry_shared.events are the contract; these files publish it for
consumers in other languages. tests/unit/test_event_schemas.py fails if they drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from registry_shared.events import EVENT_TYPES, CloudEvent


def render() -> dict[str, str]:
    """file name → JSON text, for the envelope and every event type's `data`."""
    files = {"cloudevent.schema.json": CloudEvent.model_json_schema()}
    for event_type, cls in sorted(EVENT_TYPES.items()):
        schema = cls.model_json_schema()
        schema["title"] = event_type
        schema["x-topic"] = cls.topic
        files[f"{event_type}.schema.json"] = schema
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in files.items()}


def main(out: str = "docs/events") -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (folder / name).write_text(text)
    print(f"wrote {len(render())} schemas to {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:])
