"""What the front end asks of vLLM on GPUs and on CPUs, without a GPU: each engine's command line
(KV cache, memory share, CUDA graphs), dedicated engines splitting a GPU, `auto` choosing the shared
engine and routing capture staying on for `--device cuda`, the GPU-memory checks of `engines.memory`
on a stand-in for `torch.cuda.mem_get_info`, and `serve --help`. Nothing here runs on a GPU."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from emo_serve.api.service import EmoService
from emo_serve.checkpoint import Checkpoint
from emo_serve.cli import main
from emo_serve.engines import memory
from emo_serve.engines.memory import (
    RUNTIME_BYTES,
    EngineMemory,
    check_base_fits,
    default_expert_slots,
    engine_memory,
    weight_bytes,
)
from emo_serve.engines.placement import USAGE_CONFIG
from emo_serve.engines.process import GIB, EngineOptions, engine_command, gpu_memory_share
from emo_serve.errors import SettingsError
from emo_serve.settings import DEFAULT_GPU_MEMORY_UTILIZATION, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EMO_"):
            monkeypatch.delenv(key)


def command(**opts: object) -> list[str]:
    return engine_command("/m", "m", Path("/s.sock"), EngineOptions(logs_dir=Path("/l"), socket_dir=Path("/s"),
                                                                    **opts))  # type: ignore[arg-type]


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


# -- the engine's command line -----------------------------------------------------------------
def test_cpu_engine_gets_one_gib_of_kv_cache_and_runs_eager() -> None:
    cmd = command(platform="cpu", gpu_memory_utilization=0.46)
    assert flag(cmd, "--kv-cache-memory-bytes") == str(GIB)
    assert "--enforce-eager" in cmd
    assert "--gpu-memory-utilization" not in cmd  # on CPU it would size the KV cache from host RAM
    assert flag(command(platform="cpu", kv_cache_gb=2.5), "--kv-cache-memory-bytes") == str(int(2.5 * GIB))


def test_gpu_engine_lets_vllm_size_the_kv_cache_from_its_share_with_cuda_graphs() -> None:
    cmd = command(platform="cuda", gpu_memory_utilization=0.46)
    assert "--kv-cache-memory-bytes" not in cmd
    assert flag(cmd, "--gpu-memory-utilization") == "0.46"
    assert "--enforce-eager" not in cmd


def test_gpu_engine_with_a_kv_cache_size_still_gets_its_share() -> None:
    """vLLM's GPU worker checks at start that its share is free even when the KV cache size is given."""
    cmd = command(platform="cuda", kv_cache_gb=2, gpu_memory_utilization=0.3066)
    assert flag(cmd, "--kv-cache-memory-bytes") == str(2 * GIB)
    assert flag(cmd, "--gpu-memory-utilization") == "0.3066"


def test_gpu_engine_without_a_share_keeps_vllms_default() -> None:
    assert "--gpu-memory-utilization" not in command(platform="cuda")


def test_extra_engine_args_come_last_and_so_win() -> None:
    cmd = command(platform="cuda", gpu_memory_utilization=0.46, extra_args=("--gpu-memory-utilization", "0.3"))
    assert cmd[-2:] == ["--gpu-memory-utilization", "0.3"]


VLLM_PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser())
out = []
for argv in json.loads(sys.argv[1]):
    a = parser.parse_args(argv)
    out.append([a.kv_cache_memory_bytes, a.gpu_memory_utilization, a.enforce_eager])
print(json.dumps(out))
"""


def test_vllms_own_parser_takes_both_command_lines() -> None:
    """The installed vLLM's server parser reads the flags as meant (the GPU one too: the parser is
    the same in every build)."""
    argvs = [command(platform=p, gpu_memory_utilization=0.46, kv_cache_gb=kv)[3:]
             for p, kv in (("cpu", None), ("cuda", None), ("cuda", 2))]
    r = subprocess.run([sys.executable, "-c", VLLM_PARSE, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == [[GIB, DEFAULT_GPU_MEMORY_UTILIZATION, True],
                                                     [None, 0.46, False], [2 * GIB, 0.46, False]]


# -- settings ----------------------------------------------------------------------------------
def test_kv_cache_and_gpu_share_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.kv_cache_gb is None and s.gpu_memory_utilization == DEFAULT_GPU_MEMORY_UTILIZATION == 0.92
    monkeypatch.setenv("EMO_GPU_MEMORY_UTILIZATION", "0.8")
    monkeypatch.setenv("EMO_KV_CACHE_GB", "")
    s = Settings()
    assert s.gpu_memory_utilization == 0.8 and s.kv_cache_gb is None
    for bad in ("0", "1.5"):
        monkeypatch.setenv("EMO_GPU_MEMORY_UTILIZATION", bad)
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            Settings()


@pytest.mark.parametrize("engines", range(1, 65))
def test_dedicated_shares_never_add_up_to_more_than_the_setting(engines: int) -> None:
    for total in (0.92, 0.9, 0.5, 1.0, 0.01):
        share = gpu_memory_share(total, engines)
        assert 0 < share * engines <= total and total / engines - share < 1e-4


def test_gpu_shares_of_a_few_engines() -> None:
    assert [gpu_memory_share(0.92, n) for n in (1, 2, 3, 4)] == [0.92, 0.46, 0.3066, 0.23]


# -- the service, as for `--device cuda` -------------------------------------------------------
@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """A stand-in for the GPU query: one 80 GiB GPU with 79 GiB free (edit the list to change it)."""
    fake = [(79 * GIB, 80 * GIB)]
    monkeypatch.setattr(memory, "gpu_memory", lambda count=1: fake[:count] if len(fake) >= count else None)
    return fake


def service(tmp_path: Path, model: Path, **kw: object) -> EmoService:
    svc = EmoService(Settings(state_dir=tmp_path / "state", model=str(model), **kw))  # type: ignore[arg-type]
    svc.prepare()
    return svc


@pytest.mark.parametrize("mode, expected", [("auto", "shared"), ("shared", "shared"), ("dedicated", "dedicated")])
def test_engine_mode_on_gpus(mode: str, expected: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`auto` is the shared engine on GPUs too, and asking for it is no longer refused; the log
    says once that the GPU path is unverified and how to check it."""
    with caplog.at_level(logging.WARNING):
        assert EmoService(Settings(state_dir=tmp_path, device="cuda", engine_mode=mode))._engine_mode() == expected
    assert "emo-serve doctor" in caplog.text and "Model Runner V2" in caplog.text


def test_engine_mode_on_cpu_says_nothing_of_gpus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert EmoService(Settings(state_dir=tmp_path, device="cpu"))._engine_mode() == "shared"
    assert "doctor" not in caplog.text


def test_dedicated_engines_split_the_gpu(tmp_path: Path, tiny_ckpt: Path, gpus: list[tuple[int, int]],
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        svc = service(tmp_path, tiny_ckpt, device="cuda", engine_mode="dedicated", max_engines=4,
                      gpu_memory_utilization=0.8)
    opts = svc._engine_options()
    assert (opts.platform, opts.gpu_memory_utilization, opts.kv_cache_gb) == ("cuda", 0.2, None)
    cmd = engine_command("/m", "m", Path("/s.sock"), opts)
    assert flag(cmd, "--gpu-memory-utilization") == "0.2" and "--kv-cache-memory-bytes" not in cmd
    assert "each engine may use 0.2 of each GPU's memory: --gpu-memory-utilization 0.8 over up to 4" in caplog.text


def test_the_shared_engine_gets_the_whole_share(tmp_path: Path, tiny_ckpt: Path, gpus: list[tuple[int, int]]) -> None:
    svc = service(tmp_path, tiny_ckpt, device="cuda", max_engines=4, kv_cache_gb=4)
    opts = svc._engine_options()
    assert svc.engine_mode == "shared"
    assert (opts.gpu_memory_utilization, opts.kv_cache_gb) == (0.92, 4)


def test_cpu_options_are_as_before(tmp_path: Path, tiny_ckpt: Path) -> None:
    cmd = engine_command("/m", "m", Path("/s.sock"), service(tmp_path, tiny_ckpt, device="cpu")._engine_options())
    assert flag(cmd, "--kv-cache-memory-bytes") == str(GIB) and "--enforce-eager" in cmd
    assert "--gpu-memory-utilization" not in cmd


def test_routing_capture_is_on_for_gpus(tmp_path: Path, tiny_ckpt: Path, gpus: list[tuple[int, int]]) -> None:
    """Started with no base and no preloads, the server starts no engine: its placement is built
    as for a GPU, with routing capture in every engine's plugin config."""
    async def run() -> None:
        svc = EmoService(Settings(state_dir=tmp_path / "state", model=str(tiny_ckpt), device="cuda",
                                  serve_base=False))
        try:
            await svc.start()
            assert svc.engine_mode == "shared" and svc.routing is not None
            assert svc.placement.engine_config.get(USAGE_CONFIG) is True
            assert svc.engines.opts.platform == "cuda" and svc.engines.opts.gpu_memory_utilization == 0.92
            assert svc.engines.loaded_count == 0
        finally:
            await svc.stop()

    asyncio.run(run())


# -- memory checks against GPU memory ----------------------------------------------------------
def test_engine_memory_on_gpus_is_the_share_capped_by_what_is_free(gpus: list[tuple[int, int]]) -> None:
    m = engine_memory("cuda", kv_cache_gb=None, gpu_memory_utilization=0.5)
    assert (m.available, m.kv_cache, m.shards, m.where) == (40 * GIB, 0, 1, "GPU memory")
    gpus[:] = [(79 * GIB, 80 * GIB), (10 * GIB, 80 * GIB)]
    m = engine_memory("cuda", kv_cache_gb=2, gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert (m.available, m.kv_cache, m.shards, m.where) == (10 * GIB, 2 * GIB, 2, "GPU memory per GPU")
    assert engine_memory("cuda", kv_cache_gb=None, gpu_memory_utilization=0.5, tensor_parallel_size=4).available is None


def test_engine_memory_on_cpu_is_ram_with_one_gib_of_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * GIB)
    monkeypatch.setattr(memory, "gpu_memory", lambda count=1: pytest.fail("GPU memory read on CPU"))
    assert engine_memory("cpu", kv_cache_gb=None, gpu_memory_utilization=0.5) == EngineMemory(16 * GIB, "RAM", GIB)


def test_base_fits_in_gpu_memory_or_is_refused(tiny_ckpt: Path) -> None:
    base = Checkpoint(str(tiny_ckpt))
    other, experts, _ = weight_bytes(base, "auto")
    need = other + experts + RUNTIME_BYTES
    check_base_fits(base, dtype="auto", memory=EngineMemory(need, "GPU memory", 0))
    with pytest.raises(SettingsError, match=r"GiB of GPU memory .* --no-serve-base"):
        check_base_fits(base, dtype="auto", memory=EngineMemory(need - 1, "GPU memory", 0))
    # split over two GPUs, each holds half the weights
    check_base_fits(base, dtype="auto", memory=EngineMemory((other + experts) // 2 + RUNTIME_BYTES, "GPU memory", 0,
                                                            shards=2))
    check_base_fits(base, dtype="auto", memory=EngineMemory(None, "GPU memory", 0))  # unknown: not checked


def test_expert_slots_sized_from_gpu_memory(tiny_ckpt: Path) -> None:
    base = Checkpoint(str(tiny_ckpt))
    other, _, one_each = weight_bytes(base, "auto")
    most = max(base.config.routed_counts())
    room = other + RUNTIME_BYTES + 6 * one_each  # half of what is left is for slots, the rest KV cache
    assert default_expert_slots(base, dtype="auto", memory=EngineMemory(room, "GPU memory", 0)) == min(3, most)
    assert default_expert_slots(base, dtype="auto", memory=EngineMemory(None, "GPU memory", 0)) == most
    with pytest.raises(SettingsError, match="raise --gpu-memory-utilization or give --expert-slots"):
        default_expert_slots(base, dtype="auto", memory=EngineMemory(other + RUNTIME_BYTES, "GPU memory", 0))
    with pytest.raises(SettingsError, match="lower --kv-cache-gb"):
        default_expert_slots(base, dtype="auto", memory=EngineMemory(other + RUNTIME_BYTES + GIB, "RAM", GIB))


def test_a_base_too_large_for_the_gpu_is_refused_at_prepare(tmp_path: Path, tiny_ckpt: Path,
                                                           gpus: list[tuple[int, int]]) -> None:
    gpus[:] = [(RUNTIME_BYTES, 80 * GIB)]  # room for the runtime, none for the weights
    with pytest.raises(SettingsError, match="GPU memory"):
        service(tmp_path, tiny_ckpt, device="cuda")


def test_gpu_query_reads_each_gpu_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_GPU_QUERY", "print(5, 10)\nprint(6, 12)")
    assert memory.gpu_memory(2) == [(5, 10), (6, 12)]
    assert memory.gpu_memory(3) is None  # fewer GPUs than the engine spans: nothing is checked
    monkeypatch.setattr(memory, "_GPU_QUERY", "raise SystemExit(1)")
    assert memory.gpu_memory(1) is None


# -- the CLI -----------------------------------------------------------------------------------
def test_serve_help_explains_the_gpu_memory_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-utilization" in text and "(EMO_GPU_MEMORY_UTILIZATION, default 0.92)" in text
    assert "each getting this divided by --max-engines (the most engines that run at once)" in text
    assert "default: 1 on CPU; on GPUs vLLM sizes it from what --gpu-memory-utilization leaves" in text
    assert "auto: shared (on GPUs too" in text
