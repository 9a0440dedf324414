"""registry_ingest."""
