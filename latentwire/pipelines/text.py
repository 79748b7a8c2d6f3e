"""The text itself, on two wires: UTF-8 (`text`, the reference every row is
compared with) and the frozen LLM's own arithmetic code (`ac`).

Both are lossless, so the receiver reads exactly the context's own token
ids and answers exactly as the text pipeline does (retention is 100% by
construction; the run checks it: agreement 100%). What `ac` changes is the
cost: ~4 bits a token instead of ~39 for UTF-8, paid for with one LLM step
per token at each end (the sender encodes with p(token | head, earlier
tokens), the receiver decodes with the same distributions, computed by the
same step-by-step passes).
"""
from __future__ import annotations

import torch

from ..data import context_token_ids
from ..wire import LMArithmeticCodec, Payload, TextCodec, Utf8Codec
from .base import Pipeline


class TextPipeline(Pipeline):
    """The context's text through a lossless `codec`; the receiver reads its own token ids of it."""
    reads = "ids"
    deterministic_answers = True  # the description, the model and the code decide them: cacheable

    def __init__(self, codec: TextCodec, lm=None, name: str = "text"):
        super().__init__()
        self.codec, self.lm, self.name = codec, lm, name

    def encode(self, text, ids):
        return self.encode_many([(text, ids)])[0]

    def decode(self, data):
        return self.decode_many([data])[0]

    def encode_many(self, items):
        return [Payload(d, positions=len(ids)) for d, (_, ids) in zip(self.codec.encode_many(items), items)]

    def decode_many(self, datas):
        return [torch.tensor(x, dtype=torch.long) for x in self.codec.decode_many(datas)]

    def describe(self):
        return {"name": self.name, "kind": self.name, "codec": self.codec.name}


def text_pipeline(tokenizer, lm=None) -> TextPipeline:
    """The text baseline: the context sent as UTF-8, tokenized by the receiver."""
    return TextPipeline(Utf8Codec(lambda t: context_token_ids(tokenizer, t)), lm)


def build_text(ctx) -> TextPipeline:
    return text_pipeline(ctx.lm.tokenizer, ctx.lm)


def build_ac(ctx) -> TextPipeline:
    """The context's own ids, arithmetic-coded with the receiver LLM after its prompt head."""
    return TextPipeline(LMArithmeticCodec(ctx.lm, ctx.head_ids), ctx.lm, name="ac")


__all__ = ["TextPipeline", "build_ac", "build_text", "text_pipeline"]
