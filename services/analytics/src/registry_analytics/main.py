"""Console entry point: `registry-analytics`."""

from registry_shared.serve import serve


def main() -> None:
    """Start the analytics service on $ANALYTICS_PORT (default 8083)."""
    serve("analytics", "registry_analytics.app:app", "ANALYTICS_PORT", 8083)
