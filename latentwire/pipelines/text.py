"""The text itself, on two wires: UTF-8 (`text`, the reference every row is
compared with) and the frozen LLM's own arithmetic code (`ac`).

Both are lossless, so the receiver reads exactly the context's own token
ids and answers exactly as the text pipeline does (retention is 100% by
construction; the run checks it: agreement 100%). What `ac` changes is the
cost: ~4 bits a token instead of ~39 for UTF-8, paid for with one LLM step
per token at each end (the sender encodes with p(token | head, earlier
tokens), the receiver decodes with the same distributions, computed by the
same step-by-step passes).

The coding model (`--codec-model`) is the receiver's own by default. Another
one -- a small model both ends hold, like a shared dictionary -- codes the
paragraph in its own tokens after its own prompt head; the receiving side
decodes those with it, reads their text and tokenizes it with the receiver's
tokenizer (`cross.CrossModelPipeline`; positions counted on the receiver),
so one payload serves any receiver LLM.
"""
from __future__ import annotations

import torch

from ..data import context_token_ids
from ..wire.wire import LMArithmeticCodec, Payload, TextCodec, Utf8Codec
from .base import Pipeline
from .cross import with_codec


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

    def sent_ids(self, ids):
        """The ids the receiver decodes from this context's payload (all of them: the code is lossless)."""
        return list(ids)

    @property
    def codec_lm(self):
        """The LLM that codes the bytes (None for UTF-8)."""
        return getattr(self.codec, "lm", None)

    def identity(self):
        """Text depends on no model; the LLM-coded text on its codec (model and head), not on the receiver."""
        coded = isinstance(self.codec, LMArithmeticCodec)
        return {"pipeline": self.name, "receiver": None, "codec": self.codec.digest() if coded else None,
                "weights": None}


def text_pipeline(tokenizer, lm=None) -> TextPipeline:
    """The text baseline: the context sent as UTF-8, tokenized by the receiver."""
    return TextPipeline(Utf8Codec(lambda t: context_token_ids(tokenizer, t)), lm)


def build_text(ctx) -> TextPipeline:
    return text_pipeline(ctx.lm.tokenizer, ctx.lm)


def build_ac(ctx):
    """The context's own ids, arithmetic-coded with the receiver LLM after its prompt head; with a codec model
    (ctx.codec), the codec's ids of the text, coded with it after its own head and read as text."""
    return with_codec(ctx, lambda lm, head: TextPipeline(LMArithmeticCodec(lm, head), lm, name="ac"))


__all__ = ["TextPipeline", "build_ac", "build_text", "text_pipeline"]
