"""registry_notifier."""
