"""The HTTP lookup service (`media-retention serve`): an ASGI app over the catalog, run by uvicorn."""

from worker.http.app import create_app

__all__ = ["create_app"]
