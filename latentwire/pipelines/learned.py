"""The learned wires, one family (`--pipeline learned`, `--pipeline DIR`):

* `PooledLMPipeline` -- the pooled LM encoder (latentwire/encoder/lmenc.py): a
  fine-tuned copy of the receiver's LM reads the paragraph, its final states
  mean-pooled over every r tokens (M = ceil(L / r)), optionally squeezed to
  d_z quantized codes; the receiver maps them into its embedding space. A
  folder of `latentwire train-encoder` (encoder.json + safetensors), or the
  weights shipped for the default model (`--pipeline learned`).
* `LearnedSeqPipeline` -- the v0.1 sequence compressor (latentwire/encoder/seqcomp.py),
  kept as a labelled variant: a small encoder on the frozen sender's hidden
  states at one layer; a run folder's `seq_compressor.pt` (`--pipeline
  RUN_DIR`, `--seq-path`), or trained by `latentwire run --sequence learned`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data import context_token_ids
from ..wire.wire import Payload, pack_uints, read_varint, unpack_uints, varint
from .base import Pipeline
from .tokens import budget
from ..encoder.lmenc import META, load_encoder
from ..errors import LatentWireError
from ..encoder.weights import shipped_encoder


class LearnedSeqPipeline(Pipeline):
    """The learned compressor as a sender/receiver pair on the wire."""
    reads = "embeds"
    learned = True

    def __init__(self, lm, comp, layer: int, name: str | None = None, sender=None):
        super().__init__()
        self.lm, self.comp, self.layer, self.sender = lm, comp, layer, sender
        self.name = name or f"learned_r{comp.ratio}"
        self.hits = self.windows = 0  # vocab decoder: windows whose first token the receiver's top choice is

    @torch.no_grad()
    def encode(self, text, ids):
        from ..encoder.seqcomp import context_states  # upward: the layers contract lists it
        if self.sender is not None:  # another model: it reads its own tokens of the text
            ids = context_token_ids(self.sender.tokenizer, text)
        h = context_states(self.sender or self.lm, ids, self.layer)
        if not len(h):
            return Payload(b"", 0)
        dev = self._dev()
        z, _ = self.comp.encode(h[None].to(dev), torch.ones((1, len(h)), dtype=torch.bool, device=dev))
        z = z[0]
        assert z.shape[0] == budget(len(ids), self.comp.ratio)
        data = self.comp.quantizer.to_bytes(z.cpu())
        if self.comp.decoder == "vocab" and self.sender is None:
            top = self.comp.vocab_logits(self.comp.quantizer.from_bytes(data, self.comp.dim).to(dev)).argmax(-1)
            first = torch.tensor(list(ids)[::self.comp.ratio], device=top.device)
            self.hits += int((top.view(-1) == first).sum())
            self.windows += len(first)
        return Payload(data, positions=int(z.shape[0]))

    @torch.no_grad()
    def decode(self, data):
        if not data:
            return torch.zeros((0, self.lm.d_model))
        z = self.comp.quantizer.from_bytes(data, self.comp.dim)
        return self.comp.decode(z.to(self._dev())).float()

    def _dev(self):
        return next(self.comp.parameters()).device

    def describe(self):
        c = self.comp
        out = {"name": self.name, "kind": "learned", "ratio": c.ratio, "dims": c.dim, "bits": c.bits,
               "layer": self.layer, "decoder": c.decoder}
        if self.windows:  # what the vocab decoder recovers of the windows' first tokens on the sent paragraphs
            out["window_token_recovery"] = self.hits / self.windows
        return out | ({"sender": self.sender.source} if self.sender is not None else {})


def from_file(lm, path: str | Path, sender=None, flag: str = "--seq-path") -> LearnedSeqPipeline:
    """A saved compressor (checked against the receiver and sender models; one-line errors naming `flag`)."""
    from ..encoder.seqcomp import load_compressor  # upward: the layers contract lists it
    comp, meta = load_compressor(lm, path, sender, flag=flag)
    comp.to(lm.device if lm.device.type == "cuda" else "cpu")
    return LearnedSeqPipeline(lm, comp, meta["shape"]["layer"], sender=sender)


def default_name(enc, meta: dict, first_m: bool | None = None) -> str:
    """lmenc_r{r}[_z{d_z}x{bits}][_emb][_firstm][_s{seed}]: a row per shape, start (_emb: --enc-start embeds),
    input (_firstm: --enc-input first-m) and seed, so that a bytes sweep, two seeds, two read-ins and the first-M
    control sit in one run. `_firstm` is a name, not a role (not `NAME:first-m`, as `:other` is): such an
    encoder is a wire of its own (the shipped one is), and the first-M control of its twin only when the twin
    is in the same run (`first_m_of`, compare.add_controls)."""
    seed = (meta.get("record", {}).get("config") or {}).get("enc_seed", 0)
    first_m = enc.first_m if first_m is None else first_m
    return (f"lmenc_r{enc.ratio}" + (f"_z{enc.d_z}x{enc.bits}" if enc.d_z else "")
            + ("_emb" if enc.start == "embeds" else "") + ("_firstm" if first_m else "")
            + (f"_s{seed}" if seed else ""))


class PooledLMPipeline(Pipeline):
    """The pooled LM encoder on the wire. Sender: the encoder's codes of the context, written by its quantizer
    (16-bit floats, or d_z values at `bits` bits); receiver: codes -> the vectors the frozen LM reads. Each
    paragraph is encoded alone (a payload does not depend on what else was sent)."""
    reads = "embeds"
    learned = True

    def __init__(self, lm, enc, name: str | None = None, meta: dict | None = None):
        super().__init__()
        self.lm, self.enc, self.meta = lm, enc, meta or {}
        self.ratio = enc.ratio
        self.name = name or default_name(enc, self.meta)
        self.weights_digest = self.meta.get("digest")  # what the payload's frame names, with the receiver's
        if enc.first_m:  # the control of the full encoder of the same shape and seed (compare.add_controls)
            self.first_m_of = default_name(enc, self.meta, first_m=False)

    def _dev(self):
        return next(self.enc.parameters()).device

    @property
    def id_bits(self) -> int:
        """Bits of a token id on the side-channel wire: ceil(log2 V), as `truncate` sends them."""
        return max(1, math.ceil(math.log2(self.enc.sender.get_input_embeddings().num_embeddings)))

    @torch.no_grad()
    def encode(self, text, ids):
        src, r = self.enc.sender_input(ids)
        if not src:
            return Payload(b"", 0)
        x = torch.tensor([src], dtype=torch.long, device=self._dev())
        z, _ = self.enc.encode(x, torch.ones_like(x, dtype=torch.bool), r)
        assert z.shape[1] == budget(len(ids), self.ratio)
        codes = self.enc.quantizer.to_bytes(z[0].float().cpu())
        if self.enc.sends_ids:  # M, then the M ids at ceil(log2 V) bits (truncation's), then the codes
            codes = varint(len(src)) + pack_uints(np.asarray(src), self.id_bits) + codes
        return Payload(codes, positions=int(z.shape[1]))

    @torch.no_grad()
    def decode(self, data):
        if not data:
            return torch.zeros((0, self.lm.d_model))
        data, base = bytes(data), None
        if self.enc.sends_ids:
            m, used = read_varint(data)
            n = (m * self.id_bits + 7) // 8
            ids = torch.as_tensor(unpack_uints(data[used:used + n], self.id_bits, m), device=self._dev())[None]
            base = self.enc.mean_embeds(ids, torch.ones_like(ids, dtype=torch.bool), 1)[0]
            data = data[used + n:]
        z = self.enc.quantizer.from_bytes(data, self.enc.code_dim).to(self._dev())
        return self.enc.decode(z, base).float()

    def describe(self):
        e = self.enc
        out = {"name": self.name, "kind": "learned", "encoder": "pooled-lm", "ratio": e.ratio, "d_z": e.d_z,
               "bits": e.bits, "input": "first-m" if e.first_m else "all", "start": e.start}
        rec = self.meta.get("record", {})
        for k in ("steps", "seconds", "heldout_f1", "examples_seen"):
            if k in rec:
                out[f"train_{k}"] = rec[k]
        if "tune" in self.meta.get("shape", {}) or "enc_tune" in self.meta.get("shape", {}):
            out["tune"] = self.meta["shape"].get("enc_tune")
        return out | ({"weights_bytes": self.meta["bytes"]} if "bytes" in self.meta else {})


def encoder_pipeline(lm, folder: str | Path, flag: str = "--pipeline") -> PooledLMPipeline:
    """A trained encoder's folder (encoder.json + safetensors) as a pipeline for receiver `lm`."""
    enc, meta = load_encoder(lm, folder, flag)
    enc.to(lm.device)
    return PooledLMPipeline(lm, enc, meta=meta)


def build_learned(ctx) -> Pipeline:
    """`--pipeline learned`: the learned wire of ctx.run_dir (an encoder folder, or a v0.1 run's
    seq_compressor.pt), else the encoder shipped for the receiver model."""
    if ctx.run_dir is not None:
        if (Path(ctx.run_dir) / META).is_file():
            return encoder_pipeline(ctx.lm, ctx.run_dir)
        return from_file(ctx.lm, Path(ctx.run_dir) / "seq_compressor.pt", ctx.sender, flag="--pipeline")
    folder = shipped_encoder(ctx.lm)
    if folder is None:
        raise LatentWireError("--pipeline learned: no trained encoder is shipped for this receiver model; train one "
                              "(`latentwire train-encoder`, docs/encoder.md) and give its folder (--pipeline DIR)")
    return encoder_pipeline(ctx.lm, folder, flag="--pipeline learned")


__all__ = ["LearnedSeqPipeline", "PooledLMPipeline", "build_learned", "encoder_pipeline", "from_file"]
