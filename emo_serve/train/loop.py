"""Tokenise the corpus, train one model (EMO pools or a standard MoE), export it in bf16.

Both variants share every setting and every random draw (data order, init) except the
document-level pools, so the comparison isolates EMO's recipe.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import EmoConfig
from ..demo import demo_config, write_tokenizer
from ..files import atomic_write_text, staged_dir
from ..safetensors_format import TensorSpec
from ..shards import shard_plan, write_sharded
from .corpus import DOMAINS, Document, build_corpus, example_files
from .model import EmoLM

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    variant: str = "emo"  # "emo" (document pools) or "moe" (standard MoE twin)
    steps: int = 600
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    balance_coef: float = 0.01
    # Pool sizes P (routed experts per document) are drawn per document: with probability
    # `small_pool_prob` uniformly in [min_pool, small_pool_max], else uniformly in
    # [min_pool, all routed]. The DESIGN reference used small_pool_prob = 0 (uniform).
    min_pool: int = 3
    small_pool_max: int = 6
    small_pool_prob: float = 0.5
    seed: int = 0
    threads: int = 1  # one thread: on a shared 2-core machine two threads thrash
    max_chars_per_domain: int = 4_000_000
    model: dict[str, Any] = field(default_factory=lambda: dict(
        num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=128,
        num_experts=16, num_shared_experts=1, num_experts_per_tok=4, vocab_size=2048,
        max_position_embeddings=2048))


def model_config(settings: TrainSettings) -> dict[str, Any]:
    return demo_config("tiny", **settings.model, torch_dtype="bfloat16")


class Windows:
    """Training windows of seq_len + 1 tokens, one document each (short tails are padded)."""

    def __init__(self, docs: Sequence[Document], tokenizer: Any, seq_len: int, pad_id: int, eos_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.by_domain: dict[str, list[list[int]]] = {d: [] for d in DOMAINS}
        encoded = tokenizer.encode_batch([d.text for d in docs])
        for doc, enc in zip(docs, encoded):
            ids = enc.ids + [eos_id]
            for start in range(0, len(ids) - 1, seq_len):
                chunk = ids[start:start + seq_len + 1]
                if len(chunk) >= 65:  # a tail of a few tokens says little about the document
                    self.by_domain[doc.domain].append(chunk)

    def batch(self, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [n, seq_len + 1] and a validity mask, domains drawn uniformly."""
        ids = torch.full((n, self.seq_len + 1), self.pad_id, dtype=torch.long)
        valid = torch.zeros(n, self.seq_len + 1, dtype=torch.bool)
        for row in range(n):
            chunks = self.by_domain[rng.choice(DOMAINS)]
            chunk = chunks[rng.randrange(len(chunks))]
            ids[row, :len(chunk)] = torch.tensor(chunk)
            valid[row, :len(chunk)] = True
        return ids, valid


def pool_sizes(settings: TrainSettings, routed: int, n: int, rng: random.Random) -> torch.Tensor:
    sizes = []
    for _ in range(n):
        hi = settings.small_pool_max if rng.random() < settings.small_pool_prob else routed
        sizes.append(rng.randint(settings.min_pool, min(hi, routed)))
    return torch.tensor(sizes)


def lr_at(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: EmoLM, ids: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    logits, aux = model(ids[:, :-1], valid[:, :-1], pool)
    target_valid = valid[:, 1:]
    loss = F.cross_entropy(logits[target_valid], ids[:, 1:][target_valid])
    return loss, aux


@torch.no_grad()
def heldout_loss(model: EmoLM, windows: Windows, per_domain: int = 32) -> dict[str, float]:
    """Mean next-token loss of the full model per domain on the first held-out windows."""
    out = {}
    for domain, chunks in windows.by_domain.items():
        chunks = chunks[:per_domain]
        ids = torch.full((len(chunks), windows.seq_len + 1), windows.pad_id, dtype=torch.long)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = torch.tensor(chunk)
            valid[row, :len(chunk)] = True
        out[domain] = float(lm_loss(model, ids, valid, None)[0])
    return out


def export(model: EmoLM, config: dict[str, Any], out_dir: Path, *, tokenizer_dir: Path | None = None,
           record: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config + tokenizer + one safetensors shard (+ index) + the training record."""
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict_for_checkpoint().items()}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                (tmp / name).write_bytes((tokenizer_dir / name).read_bytes())
        write_sharded(tmp, shard_plan(specs, 1), iter(tensors.items()), desc=f"export {out_dir.name}")
        if record is not None:
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def build_tokenizer(corpus: dict[str, list[Document]], config: dict[str, Any], work: Path) -> Any:
    """Byte-level BPE trained on the training documents, with the demo model's special tokens
    and chat template; written to `work` for the export."""
    from tokenizers import Tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        texts = [d.text for docs in corpus.values() for d in docs if not d.heldout]
        write_tokenizer(tok_dir, config, texts)
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def train(settings: TrainSettings, out_dir: Path, work: Path) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    config = model_config(settings)
    cfg = EmoConfig.from_dict(config)
    t0 = time.monotonic()
    corpus = build_corpus(settings.max_chars_per_domain, settings.seed)
    tok = build_tokenizer(corpus, config, work)
    vocab = json.loads((work / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    pad_id, eos_id = vocab["<|pad|>"], vocab["<|endoftext|>"]
    train_docs = [d for docs in corpus.values() for d in docs if not d.heldout]
    held_docs = [d for docs in corpus.values() for d in docs if d.heldout]
    windows = Windows(train_docs, tok, settings.seq_len, pad_id, eos_id)
    held = Windows(held_docs, tok, settings.seq_len, pad_id, eos_id)
    counts = {d: len(w) for d, w in windows.by_domain.items()}
    log.info("corpus: %s train windows per domain, %.0f s", counts, time.monotonic() - t0)

    model = EmoLM(cfg, seed=settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    data_rng, pool_rng = random.Random(settings.seed), random.Random(settings.seed + 1)
    routed = cfg.layer_routing(0).num_routed
    history = []
    t_train = time.monotonic()
    for step in range(settings.steps):
        ids, valid = windows.batch(data_rng, settings.batch)
        pools = pool_sizes(settings, routed, settings.batch, pool_rng)  # drawn for both variants
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        loss, aux = lm_loss(model, ids, valid, pools if settings.variant == "emo" else None)
        opt.zero_grad(set_to_none=True)
        (loss + settings.balance_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == settings.steps - 1:
            elapsed = time.monotonic() - t_train
            history.append({"step": step, "loss": round(loss.item(), 4), "balance": round(aux.item(), 4),
                            "elapsed_s": round(elapsed, 1)})
            log.info("step %d loss %.4f balance %.3f lr %.2e %.1f s", step, loss.item(), aux.item(),
                     lr_at(step, settings), elapsed)
    train_s = time.monotonic() - t_train
    model.eval()
    held_loss = heldout_loss(model, held)
    log.info("held-out loss (full model): %s", held_loss)
    torch.save(model.state_dict(), work / f"{settings.variant}.pt")
    record = {"settings": asdict(settings), "train_seconds": round(train_s, 1), "train_windows": counts,
              "heldout_loss": held_loss, "history": history,
              "corpus": {d: len(docs) for d, docs in corpus.items()}}
    export(model, config, out_dir, tokenizer_dir=work / "tokenizer", record=record)
    return record


def write_examples(out_dir: Path, settings: TrainSettings | None = None) -> list[Path]:
    """`examples/<domain>.jsonl` (5 profiling examples) and `heldout/<domain>.jsonl` (documents
    to evaluate on), all from documents the models never trained on."""
    settings = settings or TrainSettings()
    written = []
    files = example_files(build_corpus(settings.max_chars_per_domain, settings.seed))
    for domain, (profile, evaluate) in files.items():
        for sub, rows in (("examples", profile), ("heldout", evaluate)):
            path = out_dir / sub / f"{domain}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            written.append(path)
    return written
