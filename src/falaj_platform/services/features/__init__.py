"""Features service: feature views over ingest datasets, materialization, online and point-in-time reads."""
