"""The REST service (FastAPI): ``create_app`` builds it, ``tessera serve`` runs it on uvicorn."""
