"""Stage 1 on the wire: one code per context token. The sender embeds the
context's tokens with the frozen LLM's table, projects them with the fitted
compressor (PCA to --compress-dim) and quantizes the codes (--bits); the
receiver dequantizes and maps each code back into the embedding space with
the adapter (`vocab`: retrieval over its own table; `mlp`; or the PCA inverse,
the `linear_inverse` control). Fitted and trained by `latentwire run`
(latentwire/evaluation/run.py, stage "Stage 1"); loaded from a run folder here."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LatentWireError
from .base import EmbeddingPipeline
from ..stage1.adapters import build_adapter, load_adapter_state
from ..wire.compress import load_compressor
from ..config import AdapterConfig
from ..util.runio import safe_torch_load
from ..wire.wire import make_quantizer, quantizer_from_state


def stage1_pipeline(name: str, lm, comp, quant, decoder, work: torch.device, info: dict) -> EmbeddingPipeline:
    """Stage 1 as a sender/receiver: embed -> compressor -> quantizer ->
    bytes -> quantizer -> `decoder` (the adapter, or the compressor's inverse)."""
    return EmbeddingPipeline(name, lambda ids: lm.embed(ids.to(lm.device)),
                             lambda x: comp.transform(x.float().to(work)),
                             lambda z: decoder(z.float().to(work)), quant, comp.n_components, info, lm=lm)


def from_run_dir(lm, run_dir: str | Path, flag: str = "--pipeline") -> EmbeddingPipeline:
    """The `latentwire` pipeline of a Stage 1 run folder: its compressor.pt,
    quantizer.pt (for --bits 1..8) and adapter.pt, each checked against `lm`."""
    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    fp = lm.fingerprint()
    comp = load_compressor(run / "compressor.pt", fp | {"kind": cfg["compress"]["compressor"]})
    bits = cfg["compress"]["bits"]
    if bits in (16, 32):
        quant = make_quantizer(bits)
    elif (run / "quantizer.pt").is_file():
        quant = quantizer_from_state(safe_torch_load(run / "quantizer.pt", flag))
    else:
        raise LatentWireError(f"{flag} {run}: --bits {bits} needs the run's quantizer.pt (runs made before it was "
                              "saved must be run again)")
    acfg = AdapterConfig(**{k: v for k, v in cfg["adapter"].items() if k in AdapterConfig.__dataclass_fields__})
    table = lm.embedding_table().float()
    adapter = build_adapter(acfg, comp, table)
    load_adapter_state(adapter, run / "adapter.pt", fp | {"compress_dim": comp.n_components,
                                                          "adapter": acfg.adapter})
    adapter.eval()
    return stage1_pipeline("latentwire", lm, comp, quant, adapter, torch.device("cpu"),
                           {"compressor": comp.kind, "adapter": acfg.adapter, "run": str(run)})


def build_stage1(ctx) -> EmbeddingPipeline:
    if ctx.run_dir is None:
        raise LatentWireError("--pipeline stage1: give the run folder of a Stage 1 run (--pipeline RUN_DIR)")
    return from_run_dir(ctx.lm, ctx.run_dir)


__all__ = ["build_stage1", "from_run_dir", "stage1_pipeline"]
