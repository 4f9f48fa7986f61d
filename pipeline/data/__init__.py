"""Data layer: sources, decoding, de-identification, ingestion, versioning."""
