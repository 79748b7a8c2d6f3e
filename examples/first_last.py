"""A pipeline of your own, evaluated beside LatentWire's: the sender keeps the
paragraph's first and last sentence and sends their token ids; the receiver
reads those ids where the paragraph was.

    latentwire run --no-stage1 --pipeline examples.first_last:FirstLast,truncate --max-eval 100
    latentwire send --pipeline examples.first_last:FirstLast paragraph.txt -o p.bin

Run from the repository root (the module is imported from the working
directory). A plug-in is a callable that takes the run's BuildContext (the
receiver model `ctx.lm`, its prompt head, the ratio, the config) and returns a
`latentwire.Pipeline`: subclass it, set `name` and `reads`, and implement
`encode` (the sender: text + the receiver's ids -> Payload) and `decode` (the
receiver: bytes -> what the LLM reads).
"""
from __future__ import annotations

import re

import torch

from latentwire import Payload, Pipeline
from latentwire.wire.wire import TokenIdCodec


def first_and_last_sentence(text: str) -> str:
    """The first and the last sentence (one sentence: itself)."""
    parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return parts[0] if len(parts) < 2 else f"{parts[0]} {parts[-1]}"


class FirstLast(Pipeline):
    """Sender: the first and last sentence's token ids (ceil(log2 V) bits each). Receiver: those ids."""
    reads = "ids"

    def __init__(self, ctx):
        super().__init__()
        self.lm = ctx.lm
        self.name = "first_last"
        self.codec = TokenIdCodec(ctx.lm.vocab_size)

    def encode(self, text, ids):
        kept = self.context_ids(first_and_last_sentence(text))
        return Payload(self.codec.encode("", kept), positions=len(kept))

    def decode(self, data):
        return torch.tensor(self.codec.decode(data), dtype=torch.long)

    def describe(self):
        return {"name": self.name, "kind": "plug-in: first and last sentence", "bits_per_id": self.codec.bits}
