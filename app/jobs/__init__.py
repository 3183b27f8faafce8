"""Durable jobs: the SQLite store, API keys and the worker processes that run the pipeline."""
