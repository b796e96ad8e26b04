"""emo-serve: profile, export and serve task-specific expert subsets of EMO MoE models."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
