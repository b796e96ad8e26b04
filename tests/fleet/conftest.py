"""The fleet tests' fixtures (fleet_harness.py): a real PostgreSQL, three replicas, the router."""

from fleet_harness import fleet, wait  # noqa: F401
from postgres_server import postgres_fixture  # noqa: F401
