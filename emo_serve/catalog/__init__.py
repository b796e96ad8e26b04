"""The catalog of a server's subsets: its state dir (default) or a PostgreSQL database shared by a
fleet of replicas (`--store`). See `base.py`."""

from __future__ import annotations

from pathlib import Path

from .base import Catalog, Entry, NameTaken, StoreUnavailable, SubsetNotFound, new_token
from .directory import DirectoryCatalog

__all__ = ["Catalog", "DirectoryCatalog", "Entry", "NameTaken", "StoreUnavailable", "SubsetNotFound",
           "new_token", "open_catalog"]


def open_catalog(url: str | None, *, state_dir: Path, base: str, replica: str) -> Catalog:
    """The catalog `--store` names: None for the state dir, else a PostgreSQL URL. `base` (the base
    checkpoint's fingerprint) keeps the subsets of different bases apart in one database."""
    if url is None:
        return DirectoryCatalog(state_dir)
    from .postgres import PostgresCatalog  # psycopg only when a database is used

    return PostgresCatalog(url, base=base, replica=replica)
