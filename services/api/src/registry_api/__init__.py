"""registry_api."""
