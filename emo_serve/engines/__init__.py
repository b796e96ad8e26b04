"""vLLM engines behind the front end: one OpenAI server child process per loaded model."""

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
from .process import EngineOptions, EngineProcess, EngineStartError, engine_platform

__all__ = ["CapacityExhausted", "Engine", "EngineError", "EngineManager", "EngineOptions",
           "EngineProcess", "EngineStartError", "EngineState", "Lease", "ModelInUse",
           "ModelUnavailable", "UnknownModel", "engine_platform"]
