"""The base served when `--model` is not given: the trained toy EMO shipped in the package, or,
in a build without it, a tiny demo checkpoint generated once into the state dir.

Apart from `settings` so that reading the configuration never reaches the demo generator.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_ID = "emo-demo"


def shipped_default_model() -> Path | None:
    """The trained toy EMO shipped inside the package, if this build has one."""
    shipped = resources.files("emo_serve") / "data" / "models" / DEFAULT_MODEL_ID
    return Path(str(shipped)) if (shipped / "config.json").is_file() else None


def resolve_default_model(state_dir: Path) -> Path:
    """The embedded default base: the shipped toy EMO if there is one, otherwise the tiny demo
    checkpoint, generated once into `<state_dir>/models/emo-demo`."""
    shipped = shipped_default_model()
    if shipped is not None:
        return shipped
    target = state_dir / "models" / DEFAULT_MODEL_ID
    if not (target / "config.json").is_file():
        from .demo import write_demo_checkpoint  # the generator (and torch) only when needed

        try:
            write_demo_checkpoint(target, "tiny", seed=0)
        except FileExistsError:  # another process generated it first (or left a partial dir)
            if not (target / "config.json").is_file():
                raise
    return target
