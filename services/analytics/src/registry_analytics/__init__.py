"""registry_analytics."""
