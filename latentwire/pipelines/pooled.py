"""`meanpool`: the mean of each r consecutive token embeddings, sent as
floats -- what an untrained merge of positions does to the receiver (it
cannot read it: the measured floor of "fewer positions" without learning)."""
from __future__ import annotations

import torch

from ..wire.wire import FloatQuantizer, Quantizer
from .base import EmbeddingPipeline
from .tokens import budget


def mean_pool(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[L, d] -> [ceil(L / r), d]: the mean of each run of r consecutive rows
    (the last run may be shorter). Integer r only."""
    r = int(ratio)
    if r != ratio or r < 1:
        raise ValueError(f"mean pooling needs an integer ratio (got {ratio})")
    L = x.shape[0]
    m = budget(L, r)
    idx = torch.arange(L, device=x.device) // r
    out = torch.zeros((m, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    counts = torch.bincount(idx, minlength=m).to(x.dtype)
    return out / counts[:, None]


def meanpool_pipeline(lm, ratio: float, quantizer: Quantizer) -> EmbeddingPipeline:
    return EmbeddingPipeline(f"meanpool_r{ratio:g}", lambda ids: lm.embed(ids.to(lm.device)),
                             lambda x: mean_pool(x.float(), ratio), lambda z: z.float().to(lm.device), quantizer,
                             lm.d_model, {"kind": "meanpool", "ratio": ratio}, lm=lm)


def build_meanpool(ctx) -> EmbeddingPipeline:
    """Pooled vectors as fp16 with --bits 16, else fp32."""
    bits = 16 if ctx.cfg is not None and ctx.cfg.compress.bits == 16 else 32
    return meanpool_pipeline(ctx.lm, ctx.ratio, FloatQuantizer(bits))


__all__ = ["build_meanpool", "mean_pool", "meanpool_pipeline"]
