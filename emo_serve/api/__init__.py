"""The HTTP front end: FastAPI app over the engine manager and the subset store."""

from __future__ import annotations

from .main import create_app

__all__ = ["create_app"]
