"""A sender model and a different receiver model (--sender-model != --model).

Two models that differ in tokenizer, width and embedding scale share no
vector space and no token ids, so what a single-model pipeline sends must
be translated before another receiver can read it. For token pipelines the
translation is the text itself:

* `CrossModelPipeline` -- a token pipeline (truncate, surprisal, none) runs
  on the sender's own tokens (its tokenizer; surprisal scored by the sender
  LLM), sends their ids at the sender's ceil(log2 V) bits, and the receiver
  decodes them with the sender's tokenizer and re-tokenizes the text with its
  own. Bytes are the sender's; positions are counted on the receiver (what it
  prefills).
* `SenderIdsPipeline` -- what a per-token code (Stage 1) delivers at best:
  every context token's identity, i.e. the sender's token ids, here read by
  the receiver as if they were its own. A measured row, not an argument, for
  why Stage 1 does not cross models: a token id names a row of one model's
  table only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data import context_token_ids
from ..wire.wire import Payload, TokenIdCodec
from .base import Pipeline


def ids_to_text(tokenizer, ids: Sequence[int]) -> str:
    """The context text of a sender's context ids (`context_token_ids` adds one
    leading space, which is dropped here so that the receiver adds its own)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text[1:] if text.startswith(" ") else text


class CrossModelPipeline(Pipeline):
    """A sender-side token pipeline, read by another model through text (also an LLM-coded pipeline whose codec
    model is not the receiver: `with_codec`)."""
    reads = "ids"

    def __init__(self, inner: Pipeline, sender_tokenizer, receiver_tokenizer, sender: str, lm=None):
        super().__init__()
        self.lm = lm
        if not inner.reads_ids:
            raise ValueError(f"{inner.name}: only token pipelines cross models through text")
        self.inner, self.s_tok, self.r_tok, self.sender = inner, sender_tokenizer, receiver_tokenizer, sender
        self.name = inner.name

    def _receiver_ids(self, sender_ids: Sequence[int]) -> list[int]:
        return context_token_ids(self.r_tok, ids_to_text(self.s_tok, sender_ids)) if len(sender_ids) else []

    def encode(self, text, ids):
        return self.encode_many([(text, ids)])[0]

    def decode(self, data):
        return self.decode_many([data])[0]

    def encode_many(self, items):
        # `ids` are the receiver's tokens of the context; the sender tokenizes the text itself
        s_items = [(text, context_token_ids(self.s_tok, text)) for text, _ in items]
        pls = self.inner.send_many(s_items)
        if getattr(self.inner, "codec_lm", None) is not None:  # LLM-coded: the ids it will decode, not decoded
            sent = [self.inner.sent_ids(ids) for _, ids in s_items]
        else:
            sent = [x.tolist() for x in self.inner.receive_many(pls)]
        return [Payload(pl, positions=len(self._receiver_ids(s))) for pl, s in zip(pls, sent)]

    def decode_many(self, datas):
        return [torch.tensor(self._receiver_ids(x.tolist()), dtype=torch.long)
                for x in self.inner.receive_many(datas)]

    @property
    def codec_lm(self):
        """The model whose tokens (and code) the bytes are in."""
        return getattr(self.inner, "codec_lm", None) or self.inner.lm

    def identity(self):
        """Text reaches the receiver: the payload depends on the sending side's model (as the codec), not on it."""
        got = self.inner.identity()
        return got | {"receiver": None, "codec": got.get("codec") or got.get("receiver")}

    def describe(self):
        return self.inner.describe() | {"sender": self.sender, "via": "text (receiver re-tokenizes)"}


def with_codec(ctx, make) -> Pipeline:
    """`make(lm, head_ids)` on the receiver (no codec model, or the receiver's own), else on the codec model
    (ctx.codec, after its own head ctx.codec_head_ids) and read by the receiver through text."""
    codec = getattr(ctx, "codec", None)
    if codec is None or codec is ctx.lm:
        return make(ctx.lm, ctx.head_ids)
    return CrossModelPipeline(make(codec, ctx.codec_head_ids), codec.tokenizer, ctx.lm.tokenizer, codec.source,
                              ctx.lm)


class SenderIdsPipeline(Pipeline):
    """Every context token of the sender, as its id, read by the receiver as
    one of its own ids (ids beyond the receiver's vocabulary wrap modulo it)."""
    reads = "ids"
    name = "sender_ids"

    def __init__(self, sender_tokenizer, sender_vocab: int, receiver_vocab: int, sender: str, lm=None):
        super().__init__()
        self.lm = lm
        self.s_tok, self.v_r, self.sender = sender_tokenizer, receiver_vocab, sender
        self.codec = TokenIdCodec(sender_vocab)

    def encode(self, text, ids):
        s_ids = context_token_ids(self.s_tok, text)
        return Payload(self.codec.encode(text, s_ids), positions=len(s_ids))

    def decode(self, data):
        return torch.tensor(self.codec.decode(data), dtype=torch.long) % self.v_r

    def describe(self):
        return {"name": self.name, "kind": "sender_ids", "sender": self.sender, "bits_per_id": self.codec.bits,
                "via": "sender token ids read as the receiver's (Stage 1's best case)"}


def cross_pipelines(sender, receiver, inner: dict[str, Pipeline]) -> dict[str, Pipeline]:
    """The --sequence token pipelines built on the sender model, each read by
    the receiver through text, plus the sender_ids row."""
    out: dict[str, Pipeline] = {"sender_ids": SenderIdsPipeline(sender.tokenizer, sender.vocab_size,
                                                                receiver.vocab_size, sender.source, receiver)}
    for name, p in inner.items():
        out[name] = CrossModelPipeline(p, sender.tokenizer, receiver.tokenizer, sender.source, receiver)
    return out


__all__ = ["CrossModelPipeline", "SenderIdsPipeline", "cross_pipelines", "ids_to_text", "with_codec"]
