"""Console entry point: `registry-ingest`."""

from registry_shared.serve import serve


def main() -> None:
    """Start the ingest service on $INGEST_PORT (default 8082)."""
    serve("ingest", "registry_ingest.app:app", "INGEST_PORT", 8082)
