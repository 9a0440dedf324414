"""registry_shared."""
