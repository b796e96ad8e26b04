"""`emo-serve doctor`: does one shared engine serve subsets exactly as dedicated engines do, here?"""

from __future__ import annotations

from .run import Options, Report, run_doctor

__all__ = ["Options", "Report", "run_doctor"]
