"""Token selection: the context reaches the receiver as M = ceil(L / r) of
its own tokens instead of all L, so the wire can be smaller than the text and
the receiver prefills fewer positions. The sender sees only the context,
never the question: one payload per paragraph serves all its questions.

* `truncate`  -- the first M context tokens (the token-budget baseline);
* `surprisal` -- the M context tokens the frozen LLM finds most surprising,
  -log p(token | head, earlier context tokens), kept in their order: the
  Selective-Context / LLMLingua token rule. Implemented here rather than with
  the `llmlingua` package, which cannot run offline on our model: its module
  fetches a tiktoken encoding at import, and it loads models with
  trust_remote_code=True (code from a model folder would run);
* `none`      -- nothing is sent (0 bytes, 0 positions): the receiver
  answers from the question alone, the floor every compressor must beat.

The kept ids cross as ceil(log2 V)-bit ids (`truncate`, `surprisal`), or
arithmetic-coded with the frozen LLM (`truncate+ac`, `surprisal+ac`: p(id |
head, the kept ids before it) -- the best lossless code for a sender and a
receiver that share the model; the receiver decodes them one LLM step a
token, then reads them). With another codec model (`--codec-model`), the
`+ac` kinds run on the codec model's side: it keeps M = ceil(L / r) of its
own tokens of the paragraph (surprisal scored by it) and codes them; the
receiver decodes them with it and reads the kept tokens' text, tokenized by
its own tokenizer (positions counted on the receiver).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..wire.wire import LMArithmeticCodec, Payload, TokenIdCodec
from .base import Pipeline
from .cross import with_codec

SELECT_KINDS = ("truncate", "surprisal", "none")


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
    """Keep M of the context's tokens and send their ids (`coding` ids: ceil(log2 V) bits each; ac: the LLM's
    arithmetic code); the receiver reads them as text."""
    reads = "ids"
    deterministic_answers = True  # the description, the model and the code decide them: cacheable

    def __init__(self, kind: str, ratio: float, vocab_size: int, lm=None, head_ids: Sequence[int] = (),
                 coding: str = "ids"):
        super().__init__()
        if kind not in SELECT_KINDS:
            raise ValueError(kind)
        if coding not in ("ids", "ac"):
            raise ValueError(coding)
        self.kind, self.ratio, self.lm, self.head, self.coding = kind, ratio, lm, list(head_ids), coding
        self.name = "none" if kind == "none" else f"{kind}_r{ratio:g}" + ("+ac" if coding == "ac" else "")
        self.codec = TokenIdCodec(vocab_size) if coding == "ids" else LMArithmeticCodec(lm, self.head)

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

    def encode(self, text, ids):
        return self.encode_many([(text, ids)])[0]

    def decode(self, data):
        return self.decode_many([data])[0]

    def encode_many(self, items):
        kept = [[ids[i] for i in self.keep(ids)] for _, ids in items]
        it = iter(self.codec.encode_many([("", k) for k in kept if k]))  # nothing kept: an empty payload
        return [Payload(next(it), positions=len(k)) if k else Payload(b"", 0) for k in kept]

    def decode_many(self, datas):
        got = iter(self.codec.decode_many([d for d in datas if d]))
        return [torch.tensor(next(got) if d else [], dtype=torch.long) for d in datas]

    def sent_ids(self, ids):
        """The ids the receiver decodes from this context's payload: the kept ones."""
        return [ids[i] for i in self.keep(ids)]

    @property
    def codec_lm(self):
        """The LLM that codes the bytes (None for ids)."""
        return self.lm if self.coding == "ac" else None

    def identity(self):
        """The receiver's token ids (its tokenizer), and with `ac` the codec (model and head) that codes them."""
        return super().identity() | ({"codec": self.codec.digest()} if self.coding == "ac" else {})

    def describe(self):
        d = {"name": self.name, "kind": self.kind, "ratio": self.ratio, "coding": self.coding}
        return d | ({"bits_per_id": self.codec.bits} if self.coding == "ids" else {})


def _build(kind: str, coding: str = "ids"):
    def build(ctx):
        ratio = 1 if kind == "none" else ctx.ratio
        if coding == "ac":  # the codec model's side when it is another model (cross.with_codec)
            return with_codec(ctx, lambda lm, head: TokenSelectPipeline(kind, ratio, lm.vocab_size, lm, head, coding))
        return TokenSelectPipeline(kind, ratio, ctx.lm.vocab_size, ctx.lm, ctx.head_ids, coding)
    return build


build_truncate, build_truncate_ac = _build("truncate"), _build("truncate", "ac")
build_surprisal, build_surprisal_ac = _build("surprisal"), _build("surprisal", "ac")
build_none = _build("none")

__all__ = ["SELECT_KINDS", "TokenSelectPipeline", "budget", "surprisal"]
