"""Ingestion: inbox -> TorchServe -> PostgreSQL."""
