"""The learned sequence compressor (latentwire/seqcomp.py) on the wire: the
sender runs the frozen sender LLM over the context alone, encodes its hidden
states into M = ceil(L / r) quantized codes (the payload); the receiver maps
the codes into its embedding space. Loaded from a run folder's
`seq_compressor.pt` (`--pipeline RUN_DIR`, `--seq-path`), or trained by
`latentwire run --sequence learned`."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import context_token_ids
from ..wire import Payload
from .base import Pipeline
from .tokens import budget


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
        from ..seqcomp import context_states
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
    from ..seqcomp import load_compressor
    comp, meta = load_compressor(lm, path, sender, flag=flag)
    comp.to(lm.device if lm.device.type == "cuda" else "cpu")
    return LearnedSeqPipeline(lm, comp, meta["shape"]["layer"], sender=sender)


def build_learned(ctx) -> LearnedSeqPipeline:
    """`--pipeline learned`: the compressor of ctx.run_dir, else the weights shipped for the default model."""
    from ..errors import LatentWireError
    if ctx.run_dir is not None:
        return from_file(ctx.lm, Path(ctx.run_dir) / "seq_compressor.pt", ctx.sender, flag="--pipeline")
    from ..weights import shipped_compressor
    path = shipped_compressor(ctx.lm)
    if path is None:
        raise LatentWireError("--pipeline learned: no trained compressor is shipped for this model; give a run "
                              "folder of `latentwire run --sequence learned` (--pipeline RUN_DIR)")
    return from_file(ctx.lm, path, ctx.sender, flag="--pipeline learned")


__all__ = ["LearnedSeqPipeline", "build_learned", "from_file"]
