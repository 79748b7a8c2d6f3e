"""The sender/receiver interface every pipeline implements.

A *pipeline* is a sender (the paragraph's text -> a `Payload`: the exact
bytes that cross the wire) and a receiver (those bytes -> what the frozen
LLM reads where the paragraph was). What the receiver gives, `reads`:

* ``"ids"``    -- a LongTensor [M] of the receiver's token ids (text, token
  selection, the LLM-coded text);
* ``"embeds"`` -- a float tensor [M, d] of input vectors (Stage 1, pooled,
  learned and optimized embeddings);
* ``"kv"``     -- a `KVReading`: per-layer keys and values of M positions,
  placed right after the receiver's own prompt head (prefix-tuning style).

Implement `encode` (the sender) and `decode` (the receiver); callers use
`send` / `receive`, which memoise both -- the sender never sees the
question, so every question about a paragraph reuses one payload, and a
receiver decodes each payload once -- and time them (seconds per context at
each end, reported beside the bytes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..wire.wire import Payload, Quantizer
from ..data import context_token_ids
from ..errors import LatentWireError

READS = ("ids", "embeds", "kv")


@dataclass
class KVReading:
    """Keys and values of M positions for every layer of the receiver, each
    [kv_heads, M, head_dim], with RoPE already applied at the positions
    start .. start + M - 1 (start = the length of the receiver's prompt head,
    which the payload names so that a receiver with another head refuses it)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int

    @property
    def positions(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    def __len__(self) -> int:
        return self.positions


class Pipeline:
    """A sender and a receiver (see the module docstring).

    Attributes a pipeline sets: `name` (its row in every report), `reads`,
    `lm` (the receiving LLM, a `models.LoadedModel`; `latentwire.ask` uses
    it) and `learned` (True for a trained or fitted pipeline: every run then
    reports its controls). A plug-in (`--pipeline package.module:Factory`) subclasses this
    and implements `encode` and `decode`."""
    name = "pipeline"
    reads = "embeds"
    lm = None
    learned = False  # trained or fitted: the run adds its controls (another paragraph's payload, none, truncation)
    weights_digest: str | None = None
    """A digest of the trained weights its payloads depend on (set by whoever loads them; None: none)."""

    def __init__(self):
        self._sent: dict[tuple, Payload] = {}
        self._read: dict[bytes, object] = {}
        self.send_s = self.receive_s = 0.0
        self.send_n = self.receive_n = 0

    # --- what a pipeline implements
    def encode(self, text: str, ids: Sequence[int]) -> Payload:
        """The sender: a context (its text, and the receiver's token ids of it) -> the payload."""
        raise NotImplementedError

    def decode(self, data: bytes):
        """The receiver: payload bytes -> ids [M], embeddings [M, d] or a KVReading."""
        raise NotImplementedError

    def encode_many(self, items: Sequence[tuple[str, Sequence[int]]]) -> list:
        """The sender over several contexts ((text, ids) pairs). One at a time here; a pipeline whose sender is
        faster in batches (the LLM-coded wires step 8 contexts together) overrides it."""
        return [self.encode(text, ids) for text, ids in items]

    def decode_many(self, datas: Sequence[bytes]) -> list:
        """The receiver over several payloads (see encode_many)."""
        return [self.decode(d) for d in datas]

    # --- what callers use
    @property
    def reads_ids(self) -> bool:
        return self.reads == "ids"

    def send(self, text: str, ids: Sequence[int] | None = None) -> Payload:
        """The payload of one context (memoised: each distinct context is sent once). `ids`: the receiver's
        tokens of `text` when the caller has them; else the receiver's tokenizer makes them."""
        if ids is None:
            ids = self.context_ids(text)
        return self.send_many([(text, ids)])[0]

    def send_many(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[Payload]:
        """The payloads of several contexts ((text, ids) pairs), through encode_many (memoised: each distinct
        context is encoded once); the seconds are shared out evenly over the contexts it encoded."""
        keys = [(tuple(ids), text) for text, ids in items]
        todo = list(dict.fromkeys(k for k in keys if k not in self._sent))
        if todo:
            t0 = time.perf_counter()
            got = self.encode_many([(text, list(ids)) for ids, text in todo])
            self.send_s += time.perf_counter() - t0
            self.send_n += len(todo)
            for k, pl in zip(todo, got):
                self._sent[k] = pl if isinstance(pl, Payload) else Payload(pl)
        return [self._sent[k] for k in keys]

    def receive_many(self, payloads: Sequence[bytes]) -> list:
        """What the LLM reads for several payloads, through decode_many (memoised: each payload is decoded once)."""
        keys = [bytes(p) for p in payloads]
        todo = list(dict.fromkeys(k for k in keys if k not in self._read))
        if todo:
            t0 = time.perf_counter()
            got = self.decode_many(todo)
            self.receive_s += time.perf_counter() - t0
            self.receive_n += len(todo)
            self._read.update(zip(todo, got))
        return [self._read[k] for k in keys]

    def receive(self, payload: bytes):
        """What the LLM reads for a payload (memoised per payload: a receiver decodes each once)."""
        return self.receive_many([payload])[0]

    def context_ids(self, text: str) -> list[int]:
        """The receiver's tokens of a context as it sits in a prompt (after 'Context:')."""
        if self.lm is None:
            raise ValueError(f"{self.name}: no receiver model to tokenize the context with")
        return context_token_ids(self.lm.tokenizer, text)

    def timing(self) -> dict:
        """Seconds per context at each end (what send/receive measured)."""
        return {"send_s_per_context": self.send_s / self.send_n if self.send_n else None,
                "receive_s_per_context": self.receive_s / self.receive_n if self.receive_n else None}

    def describe(self) -> dict:
        return {"name": self.name}

    def identity(self) -> dict:
        """What this pipeline's payloads depend on, for the frame of a payload file (latentwire/pipelines/frame.py): the
        `pipeline` label a reader must match (its `name`: the kind with its ratio), and digests of the `receiver`
        model, the `codec` model (an LLM that codes the bytes) and the trained `weights` -- None where the
        payload does not depend on it. The default (receiver and `weights_digest`) fits token-id and embedding
        pipelines and plug-ins; pipelines whose bytes are text or LLM-coded override it."""
        return {"pipeline": self.name, "receiver": self.lm.weights_digest() if self.lm is not None else None,
                "codec": None, "weights": self.weights_digest}

    # kept for callers written against the earlier interface
    def payload(self, ids: Sequence[int], text: str) -> Payload:
        return self.send(text, ids)


class EmbeddingPipeline(Pipeline):
    """Pipelines over embeddings: the sender embeds the context's ids with the
    frozen LLM's table, `encoder` maps [L, d] -> codes [M, k] (M = L for a
    per-token code, fewer for a sequence compressor) and the quantizer writes
    them as bytes; the receiver reads the bytes back and `decoder` maps
    [M, k] -> [M, d]. Stage 1 is encoder = compressor.transform, decoder =
    adapter; `transform` is the same chain as one tensor function
    (diagnostics, Phase 2), equal to receive(send(.)) (tested)."""

    def __init__(self, name: str, embed: Callable[[torch.Tensor], torch.Tensor],
                 encoder: Callable[[torch.Tensor], torch.Tensor], decoder: Callable[[torch.Tensor], torch.Tensor],
                 quantizer: Quantizer, k: int, info: dict | None = None, lm=None):
        super().__init__()
        self.name, self.embed, self.encoder, self.decoder = name, embed, encoder, decoder
        self.quantizer, self.k, self.info, self.lm = quantizer, k, info or {}, lm

    @torch.no_grad()
    def encode(self, text, ids):
        x = self.embed(torch.tensor(list(ids), dtype=torch.long)).float()
        z = self.encoder(x)
        return Payload(self.quantizer.to_bytes(z), positions=int(z.shape[0]))

    @torch.no_grad()
    def decode(self, data):
        return self.decoder(self.quantizer.from_bytes(data, self.k))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.roundtrip(self.encoder(x)))

    def describe(self):
        return {"name": self.name, "dims": self.k, "bits": self.quantizer.bits,
                "quantizer": self.quantizer.scheme} | self.info


def check_pipeline(obj, where: str) -> "Pipeline":
    """A plug-in's object, checked: the interface's methods and a known `reads` (one-line error naming `where`)."""
    missing = [m for m in ("send", "receive", "describe") if not callable(getattr(obj, m, None))]
    if missing:
        raise LatentWireError(f"{where}: gave {type(obj).__name__}, which has no {', '.join(missing)} "
                              "(subclass latentwire.Pipeline and implement encode and decode)")
    if getattr(obj, "reads", None) not in READS:
        raise LatentWireError(f"{where}: its `reads` is {getattr(obj, 'reads', None)!r}; one of {', '.join(READS)}")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        raise LatentWireError(f"{where}: its `name` must be a non-empty string (its row in the report)")
    return obj


__all__ = ["EmbeddingPipeline", "KVReading", "Payload", "Pipeline", "READS", "check_pipeline"]
