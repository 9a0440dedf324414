"""Console entry point: `registry-api`."""

from registry_shared.serve import serve


def main() -> None:
    """Start the api on $API_PORT (default 8081, the spec's dev URL)."""
    serve("api", "registry_api.app:app", "API_PORT", 8081)
