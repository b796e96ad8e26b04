"""Fixtures of the subset tests: a many-shard checkpoint for selective-reading checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset in 8 shards: several shards hold nothing but experts of one layer."""
    from emo_serve.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt8") / "tiny8", "tiny", shards=8, seed=3)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: thread-pool hand-offs cost more than the math on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
