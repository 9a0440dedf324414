"""Console entry point: `registry-notifier`."""

from registry_shared.serve import serve


def main() -> None:
    """Start the notifier service on $NOTIFIER_PORT (default 8084)."""
    serve("notifier", "registry_notifier.app:app", "NOTIFIER_PORT", 8084)
