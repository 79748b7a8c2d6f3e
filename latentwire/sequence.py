"""Sequence compression: the context reaches the receiver as M = ceil(L / r)
positions instead of its L tokens, so the wire can be smaller than the text
and the receiver prefills fewer positions. The sender sees only the context,
never the question: one payload per paragraph serves all its questions.

Training-free baselines, each a sender/receiver pair (`wire.Pipeline`):

* `truncate`  -- the first M context tokens (the token-budget baseline);
* `surprisal` -- the M context tokens the frozen LLM finds most surprising,
  -log p(token | head, earlier context tokens), kept in their order: the
  Selective-Context / LLMLingua token rule. Implemented here rather than with
  the `llmlingua` package, which cannot run offline on our model: its module
  fetches a tiktoken encoding at import, and it loads models with
  trust_remote_code=True (code from a model folder would run);
* `meanpool`  -- the mean of each r consecutive token embeddings (what an
  untrained merge does to the receiver);
* `none`      -- nothing is sent (0 bytes, 0 positions): the receiver
  answers from the question alone, the floor every compressor must beat.

Token baselines send token ids at ceil(log2 V) bits; pooled vectors go
through the same quantizer as Stage 1 codes (--bits).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .wire import EmbeddingPipeline, Payload, Pipeline, Quantizer, TokenIdCodec

SEQUENCE_KINDS = ("truncate", "surprisal", "meanpool", "none")


def budget(n_tokens: int, ratio: float) -> int:
    """M = ceil(L / r) positions for a context of L tokens (at least 1 when L > 0)."""
    return min(n_tokens, max(1 if n_tokens else 0, math.ceil(n_tokens / ratio)))


@torch.no_grad()
def surprisal(lm, head_ids: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
    """-log2 p(token_i | head, tokens < i) for each context token, [L]."""
    full = torch.tensor([list(head_ids) + list(ids)], dtype=torch.long, device=lm.device)
    logp = torch.log_softmax(lm.model(input_ids=full).logits[0].double(), -1)
    n = len(head_ids)
    tgt = full[0, n:]
    return (-logp[n - 1:n - 1 + len(ids)].gather(-1, tgt[:, None])[:, 0] / math.log(2)).cpu()


class TokenSelectPipeline(Pipeline):
    """Keep M of the context's tokens and send their ids; the receiver reads them as text."""
    reads_ids = True

    def __init__(self, kind: str, ratio: float, vocab_size: int, lm=None, head_ids: Sequence[int] = ()):
        super().__init__()
        if kind not in ("truncate", "surprisal", "none"):
            raise ValueError(kind)
        self.kind, self.ratio, self.lm, self.head = kind, ratio, lm, list(head_ids)
        self.name = "none" if kind == "none" else f"{kind}_r{ratio:g}"
        self.codec = TokenIdCodec(vocab_size)

    def keep(self, ids: Sequence[int]) -> list[int]:
        """Indices of the kept tokens, in order."""
        if self.kind == "none":
            return []
        m = budget(len(ids), self.ratio)
        if self.kind == "truncate":
            return list(range(m))
        s = surprisal(self.lm, self.head, ids)
        # stable: among equal surprisal the earlier token wins
        order = np.argsort(-s.numpy(), kind="stable")[:m]
        return sorted(order.tolist())

    def send(self, ids, text):
        kept = [ids[i] for i in self.keep(ids)]
        return Payload(self.codec.encode("", kept), positions=len(kept))

    def receive(self, payload):
        return torch.tensor(self.codec.decode(payload.data), dtype=torch.long)

    def describe(self):
        return {"name": self.name, "kind": self.kind, "ratio": self.ratio, "bits_per_id": self.codec.bits}


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
                             lm.d_model, {"kind": "meanpool", "ratio": ratio})


def sequence_pipelines(lm, kinds: Sequence[str], ratios: Sequence[float], head_ids: Sequence[int],
                       quantizer: Quantizer) -> dict[str, Pipeline]:
    """The baselines named by --sequence at every --sequence-ratios ratio."""
    out: dict[str, Pipeline] = {}
    if "none" in kinds:
        out["none"] = TokenSelectPipeline("none", 1, lm.vocab_size)
    for r in ratios:
        for k in (k for k in kinds if k != "none"):
            p = meanpool_pipeline(lm, r, quantizer) if k == "meanpool" else \
                TokenSelectPipeline(k, r, lm.vocab_size, lm, head_ids)
            out[p.name] = p
    return out


__all__ = ["SEQUENCE_KINDS", "TokenSelectPipeline", "budget", "mean_pool",
           "meanpool_pipeline", "sequence_pipelines", "surprisal"]
