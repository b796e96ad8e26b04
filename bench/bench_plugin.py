"""The vLLM plugin: throughput against vLLM's built-in OLMoE, and real-size serving of subsets.

`throughput`: one EMO demo checkpoint with no shared expert and the same random weights
converted to vLLM's built-in `OlmoeForCausalLM` (renamed norms; OLMoE always applies QK-norm,
which vLLM's olmoe.py has no switch for, so its q/k norm weights are set to 1 -- the OLMoE side
does that extra work and its numbers differ). Prefill and decode tokens/s at batch 1 and 16; the
sides alternate over rounds, one engine at a time, each in a fresh process; medians and ranges.
Batch-1 decode is compared with the machine's ceiling: measured read bandwidth / bytes of
weights one token reads (attention, norms, router, lm_head, the top-k experts of each layer).

`scale`: the real-size demo model (`emo-1b14b`, ~27 GB bf16) on this 24 GB machine. Every engine
runs under the same address-space cap (RLIMIT_AS, inherited by vLLM's engine and worker
processes; a watchdog also kills the process tree if its RSS passes the cap): the full model is
refused, subset manifests (type (c), weights streamed from the base) load and generate; load
seconds, bytes read, peak RSS of the engine processes and decode tokens/s.

    .venv/bin/python bench/bench_plugin.py throughput --rounds 2
    .venv/bin/python bench/bench_plugin.py scale --base /work/bigckpt/emo-1b14b --sizes 16,32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GB = 1e9
# Throughput model: EMO's layout (pre-norm, SwiGLU experts, top-k routing) at a size that loads
# in seconds but is big enough for weight reads to matter (~0.9 GB bf16).
THROUGHPUT_SHAPE = dict(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16,
                        intermediate_size=512, num_experts=32, num_shared_experts=0,
                        num_experts_per_tok=4, vocab_size=16384, torch_dtype="bfloat16")
PREFILL = {1: 512, 16: 128}  # batch -> prompt tokens
DECODE = {1: 64, 16: 32}  # batch -> generated tokens
ENGINE_TIMEOUT_S = 900


# -- the engine job (child process) -------------------------------------------------------------
def prompts(batch: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    """Distinct token prompts (prefix caching is off anyway), clear of special tokens."""
    return [[4 + (7919 * (i + 1) * (j + 3) + salt) % (vocab - 4) for j in range(length)]
            for i in range(batch)]


def engine_job(job: dict[str, Any]) -> dict[str, Any]:
    """Start an engine on job["model"], run the job's measurements, report times."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], enforce_eager=True, max_model_len=job.get("max_model_len", 1024),
              max_num_seqs=16, enable_prefix_caching=False, seed=0, trust_remote_code=False)
    out: dict[str, Any] = {"ready_s": time.perf_counter() - t0}
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def timed(batch: int, length: int, new: int, salt: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts(batch, length, vocab, salt)]
        start = time.perf_counter()
        res = llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - start, [list(r.outputs[0].token_ids) for r in res]

    timed(2, 32, 4, salt=1)  # warm-up: first-call allocations, kernels' one-time setup
    for batch, length in job.get("prefill", {}).items():
        batch = int(batch)
        best = min(timed(batch, length, 1, salt=s)[0] for s in (11, 12))
        out[f"prefill_b{batch}"] = batch * length / best
    for batch, new in job.get("decode", {}).items():
        batch, length = int(batch), job.get("decode_prompt", 32)
        base = min(timed(batch, length, 1, salt=s)[0] for s in (21, 22))
        full, tokens = timed(batch, length, 1 + new, salt=23)
        out[f"decode_b{batch}"] = batch * new / max(full - base, 1e-9)
        out.setdefault("sample_tokens", tokens[0][:16])
    return out


# -- running jobs: fresh process, memory cap, RSS of the whole tree ---------------------------
def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_job(job: dict[str, Any], work: Path, *, cap_bytes: int | None = None) -> dict[str, Any]:
    """Run `engine_job` in a fresh interpreter (optionally under an address-space cap) while
    sampling the RSS of its process tree; returns its result plus peak RSS, wall time, log."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    def limit() -> None:
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    log_path = work / "engine.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "_job", str(work / "job.json")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit,
                                start_new_session=True)
    peak, killed = 0, False
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak, killed
        while not stop.wait(0.25):
            rss = tree_rss(proc.pid)
            peak = max(peak, rss)
            if cap_bytes and rss > cap_bytes and not killed:
                killed = True
                os.killpg(proc.pid, 9)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc.wait(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    finally:
        stop.set()
        watcher.join()
        _reap_group(proc.pid)
    log = log_path.read_text(errors="replace")
    result: dict[str, Any] = {"rc": proc.returncode, "wall_s": time.perf_counter() - start,
                              "peak_rss": peak, "killed_by_watchdog": killed, "log": str(log_path)}
    if proc.returncode == 0 and (work / "result.json").exists():
        result.update(json.loads((work / "result.json").read_text()))
    else:
        result["error"] = failure_reason(log)
    if m := re.search(r"emo subset \S+: read (\d+) tensor bytes in (\d+) requests "
                      r"\(\+(\d+) header bytes\) from \S+ in ([\d.]+) s", log):
        result.update(read_bytes=int(m[1]) + int(m[3]), read_requests=int(m[2]), stream_s=float(m[4]))
    return result


def _reap_group(pgid: int) -> None:
    """vLLM's engine/worker processes must not outlive a job (the next one measures alone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    time.sleep(2)
    try:
        os.killpg(pgid, 9)
    except ProcessLookupError:
        pass


def failure_reason(log: str) -> str:
    """The root cause in a failed engine's log: an allocation refused, else the first error
    (later ones are vLLM reporting that the engine core died)."""
    patterns = [r"DefaultCPUAllocator: can't allocate memory[^\n]*", r"MemoryError[^\n]*",
                r"(?:SubsetError|RuntimeError|ValueError)[^\n]*"]
    for pat in patterns:
        if found := re.findall(pat, log):
            return found[0].strip()[:200]
    return (log.strip().splitlines() or ["(no output)"])[-1][:200]


# -- throughput: EMO plugin vs built-in OLMoE ---------------------------------------------------
def to_olmoe(emo_dir: Path, out: Path) -> Path:
    """The same weights as vLLM's built-in `OlmoeForCausalLM` checkpoint (see module doc)."""
    import torch
    from safetensors.torch import load_file, save_file

    from emo_serve.checkpoint import TOKENIZER_FILES

    cfg = json.loads((emo_dir / "config.json").read_text())
    out.mkdir(parents=True)
    olmoe = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                 "rms_norm_eps", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                                 "tie_word_embeddings", "torch_dtype", "bos_token_id", "eos_token_id",
                                 "pad_token_id", "rope_theta")}
    olmoe.update(model_type="olmoe", architectures=["OlmoeForCausalLM"], clip_qkv=None)
    (out / "config.json").write_text(json.dumps(olmoe, indent=2))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    for name in (*TOKENIZER_FILES, "model.safetensors.index.json"):
        if (emo_dir / name).exists():
            shutil.copy(emo_dir / name, out / name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(emo_dir / shard)
        renamed = {k.replace("pre_attention_layernorm", "input_layernorm")
                    .replace("pre_feedforward_layernorm", "post_attention_layernorm"): v
                   for k, v in tensors.items()}
        for k, v in tensors.items():
            if k.endswith("pre_attention_layernorm.weight"):
                p = k.removesuffix("pre_attention_layernorm.weight") + "self_attn."
                renamed[p + "q_norm.weight"] = torch.ones(cfg["num_attention_heads"] * head_dim, dtype=v.dtype)
                renamed[p + "k_norm.weight"] = torch.ones(cfg["num_key_value_heads"] * head_dim, dtype=v.dtype)
        save_file(renamed, out / shard, metadata={"format": "pt"})
        for k in renamed:
            index["weight_map"][k] = shard
    index["weight_map"] = {k.replace("pre_attention_layernorm", "input_layernorm")
                           .replace("pre_feedforward_layernorm", "post_attention_layernorm"): v
                           for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def active_bytes_per_token(ckpt_dir: Path) -> int:
    """Bytes of weights a batch-1 decode step reads: everything but the embedding table (one row)
    and the experts a token is not routed to."""
    from emo_serve.checkpoint import Checkpoint

    ckpt = Checkpoint(ckpt_dir)
    cfg = ckpt.config
    total = 0
    for name, info in ckpt.tensors.items():
        if name == "model.embed_tokens.weight":
            total += info.nbytes // info.shape[0]
        elif m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.", name):
            r = cfg.layer_routing(int(m[1]))
            total += info.nbytes * r.top_k // r.num_experts
        else:
            total += info.nbytes
    return total


def read_bandwidth(threads: int = 2, size: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing a 1 GiB tensor (best of `repeats`), with vLLM's thread count."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(size // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return size / best


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> None:
    from emo_serve.demo import write_demo_checkpoint

    work = Path(args.work)
    emo_dir = work / "emo"
    if not emo_dir.exists():
        write_demo_checkpoint(emo_dir, "tiny", shards=2, seed=0, **THROUGHPUT_SHAPE)
    olmoe_dir = work / "olmoe"
    if not olmoe_dir.exists():
        to_olmoe(emo_dir, olmoe_dir)
    per_token = active_bytes_per_token(emo_dir)
    bandwidth: list[float] = []  # measured before every engine: the machine is shared
    job = {"prefill": PREFILL, "decode": DECODE}
    sides = {"plugin (EmoForCausalLM)": emo_dir, "built-in (OlmoeForCausalLM)": olmoe_dir}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rnd in range(args.rounds):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        for side in order:
            bandwidth.append(read_bandwidth())
            res = run_job({**job, "model": str(sides[side])}, work / f"run-{rnd}-{side.split()[0]}")
            if res["rc"] != 0:
                raise SystemExit(f"{side} failed: {res['error']} (log: {res['log']})")
            runs[side].append(res)
            print(f"round {rnd + 1} {side}: " + ", ".join(
                f"{k} {res[k]:.1f}" for k in res if k.startswith(("prefill", "decode"))), file=sys.stderr)
    metrics = [f"prefill_b{b}" for b in PREFILL] + [f"decode_b{b}" for b in DECODE]
    plugin, builtin = (runs[s] for s in sides)
    lines = [f"model: {emo_dir} ({THROUGHPUT_SHAPE}); {args.rounds} rounds, medians (range)", "",
             "| tokens/s | plugin (EmoForCausalLM) | built-in (OlmoeForCausalLM) | plugin / built-in |",
             "|---|---|---|---|"]
    for m in metrics:
        a, b = [r[m] for r in plugin], [r[m] for r in builtin]
        lines.append(f"| {m.replace('_b', ' batch ')} | {fmt(a)} | {fmt(b)} | "
                     f"{statistics.median(a) / statistics.median(b):.2f} |")
    bw = statistics.median(bandwidth)
    ceiling = bw / per_token
    dec1 = statistics.median(r["decode_b1"] for r in plugin)
    lines += ["", f"read bandwidth (2 threads, sum of 1 GiB, before each engine): {bw / GB:.1f} GB/s "
                  f"({min(bandwidth) / GB:.1f}–{max(bandwidth) / GB:.1f}); weights read per decoded token: "
                  f"{per_token / 1e6:.1f} MB; batch-1 decode ceiling {ceiling:.0f} tokens/s; plugin batch-1 "
                  f"decode {dec1:.1f} tokens/s = {dec1 / ceiling:.2f} of the ceiling; "
                  f"load average now {os.getloadavg()[0]:.1f}"]
    print("\n".join(lines))


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


# -- scale: the 28 GB model under a memory cap --------------------------------------------------
def scale(args: argparse.Namespace) -> None:
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.export import materialize_subset
    from emo_serve.stream import subset_sizes
    from emo_serve.subset import random_subset

    work = Path(args.work)
    base = Checkpoint(args.base)
    cap = int(args.cap_gb * GB)
    shared = base.config.layer_routing(base.config.moe_layers()[0]).num_shared
    rows = []
    job = {"decode": {1: args.decode_tokens}, "max_model_len": 512}
    if not args.skip_full:
        res = run_job({**job, "model": str(base.location)}, work / "full", cap_bytes=cap)
        rows.append(("full (128 experts)", base.total_tensor_bytes, res))
    for size in args.sizes:
        spec = random_subset(base, size - shared, f"bench-{size}", seed=0)
        manifest = work / f"manifest-{size}"
        if not manifest.exists():
            materialize_subset(base, spec, manifest)
        res = run_job({**job, "model": str(manifest)}, work / f"subset-{size}", cap_bytes=cap)
        rows.append((f"manifest, {size} experts/layer", subset_sizes(base, spec)["subset_bytes"], res))
    lines = [f"base: {base.location} ({base.total_tensor_bytes / GB:.1f} GB of tensors); every engine "
             f"under RLIMIT_AS = {args.cap_gb:g} GB (+ RSS watchdog); machine RAM "
             f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.1f} GB", "",
             "| model | weights GB | result | engine ready s | weights streamed s | read GB | peak RSS GB "
             "(engine processes) | decode tokens/s (batch 1) |", "|---|---|---|---|---|---|---|---|"]
    for label, nbytes, r in rows:
        ok = r["rc"] == 0
        result = "generates" if ok else f"refused after {r['wall_s']:.0f} s: {r['error']}"
        streamed = (f"{r['stream_s']:.1f} | {r['read_bytes'] / GB:.2f}" if "read_bytes" in r
                    else "– | –")
        ready, decode = (f"{r['ready_s']:.0f}", f"{r['decode_b1']:.1f}") if ok else ("–", "–")
        lines.append(f"| {label} | {nbytes / GB:.2f} | {result} | {ready} | {streamed} | "
                     f"{r['peak_rss'] / GB:.2f} | {decode} |")
    print("\n".join(lines))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_job":
        job_path = Path(sys.argv[2])
        result = engine_job(json.loads(job_path.read_text()))
        (job_path.parent / "result.json").write_text(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="plugin vs built-in OLMoE, tokens/s")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "emo-bench-plugin"))
    t.set_defaults(func=throughput)
    s = sub.add_parser("scale", help="real-size model vs subset manifests under a memory cap")
    s.add_argument("--base", default="/work/bigckpt/emo-1b14b")
    s.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=[16, 32])
    s.add_argument("--cap-gb", type=float, default=16.0)
    s.add_argument("--decode-tokens", type=int, default=32)
    s.add_argument("--skip-full", action="store_true")
    s.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "emo-bench-plugin-scale"))
    s.set_defaults(func=scale)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
