"""Ingest service: validated, versioned datasets from streams, files and databases."""
