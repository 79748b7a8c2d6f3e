"""Answers: generation across processes, and the text pipeline's answers
cached by everything that can change them.

Greedy decoding is deterministic, so the text baseline's answers -- the
reference every pipeline is compared with, and the slowest part of a small
run -- are cached per prompt under a key of the model's weights, dtype,
device, generation settings, library versions and the generating code itself
(`text_cache_key`). A run says how many it generated and how many it read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import __version__
from ..util import dist
from ..config import RunConfig
from .generate import generate_predictions
from ..llm.models import cache_root
from ..util.runio import read_jsonl, write_json


def _fingerprint_sources() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent.parent
    for name in ("llm/decode.py", "evaluation/generate.py", "llm/forward.py", "wire/wire.py", "data.py", "llm/models.py",
                 "pipelines/base.py", "pipelines/text.py", "pipelines/tokens.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


# read once, when this module is imported (with the modules it imports): the
# code that generates answers is the code loaded now, even if the files on
# disk change while a long run goes on
_GENERATION_FINGERPRINT = _fingerprint_sources()


def generation_fingerprint() -> str:
    """sha256 of the source files whose code decides a text answer: the
    decoding loops and prefix tree (decode, forward), the evaluation's rows
    (generate), the wire the text and the token pipelines take (wire,
    pipelines/base, text, tokens), prompt construction (data) and model
    loading (models), as they were when LatentWire was imported."""
    return _GENERATION_FINGERPRINT


def text_cache_key(lm, cfg: RunConfig) -> dict:
    """Everything that can change a text-baseline answer: the model's
    weights (content digest), dtype, device type, generation settings
    (batching and the shared-prefix switch change float rounding), library
    versions, and the generating code itself."""
    import transformers
    return {"model": lm.source, "weights": lm.weights_digest(), "dtype": str(lm.dtype), "device": lm.device.type,
            "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
            "share_prefix": cfg.eval.share_prefix, "torch": torch.__version__,
            "transformers": transformers.__version__, "latentwire": __version__, "code": generation_fingerprint()}


def _text_cache_path(key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / "answers" / f"{h[:24]}.jsonl"


def _prompt_key(p) -> str:
    return hashlib.sha256(json.dumps(p.ids).encode()).hexdigest()[:32]


def text_predictions(lm, prompts, cfg: RunConfig, read_cache: bool = True, write_cache: bool = True,
                     stats: dict | None = None) -> list[str]:
    """Text-baseline answers, cached (see cached_predictions)."""
    return cached_predictions(lm, prompts, cfg, None, read_cache, write_cache, stats)


def cached_predictions(lm, prompts, cfg: RunConfig, pipe=None, read_cache: bool = True, write_cache: bool = True,
                       stats: dict | None = None) -> list[str]:
    """Answers of the text pipeline (`pipe` None) or of a pipeline whose answers its description, the model and
    the code decide (`deterministic_answers`: the token pipelines, the LLM-coded text). Greedy decoding is
    deterministic, so answers are cached per prompt under a key of everything that can change them
    (`text_cache_key`, plus the pipeline's description) and reused by later runs on the same questions
    (`--no-cache` to recompute). `stats` receives the hits and misses (for metrics.json). Rank 0 alone reads
    the cache and decides what to generate, so processes under a launcher cannot diverge."""
    key = text_cache_key(lm, cfg) | ({} if pipe is None else {"pipeline": pipe.describe()})
    path = _text_cache_path(key)
    d = dist.current()
    cache: dict[str, str] = {}
    keys = [_prompt_key(p) for p in prompts]
    if read_cache and d.is_main and path.exists():
        wanted = set(keys)
        for row in read_jsonl(path, skip_bad=True):
            if isinstance(row, dict) and row.get("key") in wanted and isinstance(row.get("prediction"), str):
                cache[row["key"]] = row["prediction"]
    cache = dist.broadcast(cache, d)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        new = sharded_predictions(lm, [prompts[i] for i in todo], pipe, None, cfg,
                                  desc="text baseline" if pipe is None else pipe.name)
        if write_cache and d.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not (path.parent / (path.stem + ".key.json")).exists():
                write_json(path.parent / (path.stem + ".key.json"), key)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"key": keys[i], "prediction": p}) + "\n" for i, p in zip(todo, new)))
        cache.update({keys[i]: p for i, p in zip(todo, new)})
    if stats is not None:
        stats.update({"hits": len(prompts) - len(todo), "misses": len(todo), "read_cache": read_cache,
                      "path": str(path), "key": key})
    return [cache[k] for k in keys]


def sharded_predictions(lm, prompts, transform, switches, cfg: RunConfig, desc: str) -> list[str]:
    """generate_predictions over this process's share of the batches, merged
    across processes (a no-op split when there is one process)."""
    d = dist.current()
    mine = generate_predictions(lm, prompts, transform, switches, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                desc=desc, progress=cfg.progress and d.is_main, shard=(d.rank, d.world),
                                share_prefix=cfg.eval.share_prefix)
    return dist.gather_filled(mine, d)
