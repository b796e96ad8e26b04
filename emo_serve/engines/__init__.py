"""vLLM engines behind the front end: OpenAI server child processes, and which models each serves."""

from __future__ import annotations

from .manager import (
    CapacityExhausted,
    Engine,
    EngineManager,
    EngineState,
    Lease,
    ModelInUse,
    ModelUnavailable,
    UnknownModel,
    UpstreamTimeout,
)
from .placement import DedicatedPlacement, Placement, SharedPlacement
from .process import EngineOptions, EngineProcess, EngineStartError, engine_platform

__all__ = ["CapacityExhausted", "DedicatedPlacement", "Engine", "EngineManager", "EngineOptions",
           "EngineProcess", "EngineStartError", "EngineState", "Lease", "ModelInUse", "ModelUnavailable",
           "Placement", "SharedPlacement", "UnknownModel", "UpstreamTimeout", "engine_platform"]
