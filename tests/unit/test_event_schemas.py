"""The published JSON Schemas in docs/events/ match the event models."""

from __future__ import annotations

from pathlib import Path

from registry_shared.schemas_export import render

DOCS = Path(__file__).resolve().parents[2] / "docs/events"


def test_published_event_schemas_are_current():
    expected = render()
    present = {p.name for p in DOCS.glob("*.schema.json")}
    assert present == set(expected), "run: uv run python -m registry_shared.schemas_export"
    for name, text in expected.items():
        assert (DOCS / name).read_text() == text, (
            f"{name} is stale; run: uv run python -m registry_shared.schemas_export"
        )
