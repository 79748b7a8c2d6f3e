"""Every pipeline LatentWire knows, by name, in one registry: the CLI
(`--pipeline`, `--sequence`, `latentwire pipelines`, `send`, `ask`), the
Python API (`latentwire.load_pipeline`) and the evaluation all build
pipelines through `build`. Adding a pipeline touches its family's module
and one line here.

A spec is one of:
* a kind's name (`text`, `ac`, `truncate`, `truncate+ac`, ...; kinds that
  take a ratio are built at `ctx.ratio`);
* a folder of `latentwire train-encoder` (`encoder.json`: the pooled LM
  encoder), or a run folder: its trained pipeline (`seq_compressor.pt`: the learned
  compressor; `compressor.pt` + `adapter.pt`: Stage 1);
* `package.module:Factory`: your own pipeline. `Factory(ctx)` is called with
  the `BuildContext` below and returns a `latentwire.Pipeline` (or a list of
  them). This imports your module: it runs your code, by your choice, as any
  plug-in does -- nothing else LatentWire loads from a path runs code.

Families live in their own modules (imported lazily, so that importing this
registry is cheap and cycle-free): text.py (text, ac), tokens.py (truncate,
surprisal, none, +ac), pooled.py (meanpool), stage1.py, learned.py,
optimized.py (the per-paragraph ceiling), cross.py (another sender model).
The payload file's frame (frame.py) labels a payload with these kinds.

May import: the models a pipeline loads (latentwire.stage1.adapters, latentwire.encoder.lmenc / weights), the
paragraph probes (latentwire.evaluation.probes), latentwire.wire, latentwire.llm, latentwire.config,
latentwire.data, latentwire.util, latentwire.errors -- and, inside a function, the v0.1 compressor
(latentwire.encoder.seqcomp), an upward import the layers contract in pyproject.toml lists.
Imported by: the package's __init__ (the public names), latentwire.api, latentwire.cli, the evaluation
(generate.py and above), Stage 1's training and stage, the encoder's training and seqcomp.py.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LatentWireError
from .base import EmbeddingPipeline, KVReading, Payload, Pipeline, check_pipeline


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str
    """One line for `latentwire pipelines`."""
    factory: str
    """module:function (relative to this package) called with a BuildContext."""
    ratio: bool = False
    """Built once per ratio r (M = ceil(L / r) positions)."""
    trained: bool = False
    """Needs trained weights: a run folder (or weights shipped for the default model)."""


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("text", "the paragraph as UTF-8; the receiver tokenizes it -- the reference every row is compared with",
         "text:build_text"),
    Kind("ac", "the paragraph's tokens arithmetic-coded with the frozen LLM (lossless, ~4 bits a token; one LLM "
               "step per token at each end)", "text:build_ac"),
    Kind("truncate", "the first M = ceil(L/r) context tokens, as ceil(log2 V)-bit ids", "tokens:build_truncate",
         ratio=True),
    Kind("truncate+ac", "the first M context tokens, arithmetic-coded with the frozen LLM", "tokens:build_truncate_ac",
         ratio=True),
    Kind("surprisal", "the M tokens the LLM finds most surprising, in order (LLMLingua's token rule), as ids",
         "tokens:build_surprisal", ratio=True),
    Kind("surprisal+ac", "the same tokens, arithmetic-coded with the frozen LLM", "tokens:build_surprisal_ac",
         ratio=True),
    Kind("none", "nothing (0 bytes): the question alone -- the floor", "tokens:build_none"),
    Kind("meanpool", "the mean of each r token embeddings, as floats (an untrained merge)", "pooled:build_meanpool",
         ratio=True),
    Kind("learned", "the pooled LM encoder: a fine-tuned copy of the LM reads the paragraph, its final states "
                    "mean-pooled over every r tokens (a train-encoder folder, or the weights shipped for the "
                    "default model; a v0.1 run folder's seq_compressor.pt too)",
         "learned:build_learned", trained=True),
    Kind("stage1", "Stage 1 of a run folder: PCA codes of every token's embedding + quantizer + adapter",
         "stage1:build_stage1", trained=True),
    Kind("opt-emb-copy", "the ceiling: M input vectors fitted per paragraph so that the receiver repeats it "
                         "(copying; started at truncation)", "optimized:build_emb_copy", ratio=True),
    Kind("opt-emb-use", "the ceiling: M input vectors fitted per paragraph by context distillation on probes "
                        "made from it (use; started at truncation)", "optimized:build_emb_use", ratio=True),
    Kind("opt-kv-copy", "the ceiling: per-layer keys/values of M positions fitted per paragraph for copying "
                        "(started at the first M tokens' own K/V = truncation)", "optimized:build_kv_copy",
         ratio=True),
    Kind("opt-kv-use", "the ceiling: per-layer keys/values of M positions fitted per paragraph by context "
                       "distillation on probes (started at truncation)", "optimized:build_kv_use", ratio=True),
]}


@dataclass
class BuildContext:
    """What a pipeline is built from (plug-ins receive it too)."""
    lm: Any
    """The receiving LLM (`models.LoadedModel`: .model, .tokenizer, .embed(), .device)."""
    head_ids: list[int]
    """The receiver's prompt before the context (BOS, few-shot shots, 'Context:'): its own text."""
    ratio: float = 4.0
    """Context tokens per position for kinds that compress the sequence: M = ceil(L / r)."""
    cfg: Any = None
    """The run's `config.RunConfig` (options of kinds that have them: --opt-*, --seq-*, --bits), or None."""
    sender: Any = None
    """The sending LLM when it is not `lm` (--sender-model), else None."""
    codec: Any = None
    """The LLM that arithmetic-codes the `+ac` / `ac` kinds when it is not `lm` (--codec-model), else None."""
    codec_head_ids: list[int] | None = None
    """The codec model's own prompt head (its tokens of the receiver's head text), when `codec` is given."""
    run_dir: str | None = None
    """A run folder to load trained weights from."""
    out: Path | None = None
    """This run's folder (pipelines that fit per paragraph keep their fits there, resumable)."""
    extra: dict = field(default_factory=dict)


def kind_names() -> list[str]:
    return list(KINDS)


def is_plugin(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def run_dir_kind(path: Path) -> str | None:
    """learned | stage1 | None: what a run folder holds."""
    if (path / "encoder.json").is_file() or (path / "seq_compressor.pt").is_file():
        return "learned"
    if (path / "compressor.pt").is_file() and (path / "adapter.pt").is_file():
        return "stage1"
    return None


def _call(factory: str, ctx: BuildContext, where: str):
    mod, _, fn = factory.partition(":")
    if not mod.startswith(".") and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a plug-in in the working directory, as `python -m` would find it
    try:
        module = importlib.import_module(mod, package=__name__)
    except ImportError as e:
        raise LatentWireError(f"{where}: cannot import module {mod!r} ({e})") from None
    if not fn or not callable(getattr(module, fn, None)):
        raise LatentWireError(f"{where}: module {mod!r} has no callable {fn!r}")
    return getattr(module, fn)(ctx)


def build(spec: str, ctx: BuildContext, flag: str = "--pipeline") -> list[Pipeline]:
    """The pipeline(s) a spec names (see the module docstring), each with its receiver `lm` set."""
    spec = spec.strip()
    where = f"{flag} {spec}"
    if spec in KINDS:
        got = _call("." + KINDS[spec].factory, ctx, where)
    elif Path(spec).is_dir():
        kind = run_dir_kind(Path(spec))
        if kind is None:
            raise LatentWireError(f"{where}: this folder holds no trained pipeline (no encoder.json, no "
                                  "seq_compressor.pt, and no compressor.pt + adapter.pt)")
        ctx2 = BuildContext(**{**ctx.__dict__, "run_dir": spec})
        got = _call("." + KINDS[kind].factory, ctx2, where)
    elif is_plugin(spec):
        got = _call(spec, ctx, where)
    else:
        raise LatentWireError(f"{where}: not a pipeline kind ({', '.join(KINDS)}), a run folder, or "
                              "package.module:Factory")
    pipes = list(got) if isinstance(got, (list, tuple)) else [got]
    for p in pipes:
        check_pipeline(p, where)
        if getattr(p, "lm", None) is None:
            p.lm = ctx.lm
    return pipes


__all__ = ["BuildContext", "EmbeddingPipeline", "KINDS", "KVReading", "Kind", "Payload", "Pipeline", "build",
           "is_plugin", "kind_names", "run_dir_kind"]
