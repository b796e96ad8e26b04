"""vLLM engines behind the front end: OpenAI server child processes, and which models each serves."""

from __future__ import annotations

from .manager import (
                      CapacityExhausted,
                      Engine,
                      EngineError,
                      EngineManager,
                      EngineState,
                      Lease,
                      ModelInUse,
                      ModelUnavailable,
                      UnknownModel,
)
from .placement import DedicatedPlacement, Placement, SharedPlacement
from .process import EngineOptions, EngineProcess, EngineStartError, engine_platform

__all__ = ["CapacityExhausted", "DedicatedPlacement", "Engine", "EngineError", "EngineManager", "EngineOptions",
           "EngineProcess", "EngineStartError", "EngineState", "Lease", "ModelInUse",
           "ModelUnavailable", "Placement", "SharedPlacement", "UnknownModel", "engine_platform"]
