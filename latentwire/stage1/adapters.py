"""Adapters k -> d_model: what turns the compressed vector back into an
embedding the frozen LLM can read.

* `MLPAdapter` -- the seed's MLP, generalised (input LayerNorm, hidden_mult,
  dropout, linear skip path initialised as the PCA inverse, output LayerNorm
  as in the seed, and an output calibration: none | rms | learned).
* `VocabAdapter` -- uses the receiver's own embedding table, which the
  receiver always has: a softmax over the exact top-k nearest vocabulary
  codes in compressed space (learned temperature), mixing the *original*
  embedding rows. The vocabulary is finite; nearest-neighbour search in a
  36-d PCA space of SmolLM2's table still finds the right token for ~99.97%
  of ids, so reconstruction becomes retrieval, not regression.
* `LinearAdapter` -- the compressor's own inverse (PCA inverse), untrained:
  the control the seed never ran.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wire.compress import check_meta, read_artifact
from ..config import AdapterConfig
from ..errors import LatentWireError
from ..util.runio import atomic_torch_save


def rms(x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
    return x.pow(2).mean(dim=dim, keepdim=keepdim).clamp_min(1e-12).sqrt()


class MLPAdapter(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig, target_rms: float,
                 pca_inverse: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        hidden = d_in * cfg.hidden_mult
        self.in_norm = nn.LayerNorm(d_in) if cfg.input_norm else nn.Identity()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.drop = nn.Dropout(cfg.dropout)
        self.skip = nn.Linear(d_in, d_out) if cfg.residual else None
        if self.skip is not None and cfg.init_pca and pca_inverse is not None:
            comps, mean = pca_inverse  # [k, d], [d]
            with torch.no_grad():
                self.skip.weight.copy_(comps.T)
                self.skip.bias.copy_(mean)
                # start exactly at the PCA inverse; the MLP learns the residual
                self.fc2.weight.zero_()
                self.fc2.bias.zero_()
        self.out_norm = nn.LayerNorm(d_out) if cfg.output_norm else nn.Identity()
        self.register_buffer("target_rms", torch.tensor(float(target_rms)))
        self.log_scale = nn.Parameter(torch.zeros(())) if cfg.calibration == "learned" else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(F.gelu(self.fc1(self.in_norm(z)))))
        if self.skip is not None:
            y = y + self.skip(z)
        y = self.out_norm(y)
        if self.cfg.calibration == "rms":
            # every token gets the embedding table's mean RMS: fixes the scale
            # (the seed's output LayerNorm put it at ~1, far from the table's)
            y = y * (self.target_rms / rms(y))
        elif self.cfg.calibration == "learned":
            y = y * self.log_scale.exp()
        return y


class VocabAdapter(nn.Module):
    """Soft nearest-neighbour decoder over the compressed vocabulary."""

    def __init__(self, codebook: torch.Tensor, table: torch.Tensor, cfg: AdapterConfig, chunk: int = 2048):
        super().__init__()
        self.cfg = cfg
        self.chunk = chunk
        # Derived from the frozen model + compressor; rebuilt on load, not saved.
        self.register_buffer("codebook", codebook.float(), persistent=False)  # [V, k]
        self.register_buffer("table", table.float(), persistent=False)  # [V, d]
        self.register_buffer("code_sq", codebook.float().pow(2).sum(-1), persistent=False)
        self.register_buffer("table_rms", rms(table.float()).squeeze(-1), persistent=False)
        self.topk = min(cfg.vocab_topk, codebook.shape[0])
        # Temperature in squared-distance units, initialised at a small share of
        # the typical nearest-neighbour distance so the softmax starts sharp.
        with torch.no_grad():
            s = codebook[torch.randperm(codebook.shape[0], generator=torch.Generator().manual_seed(0))[:512]].float()
            d2 = torch.cdist(s, codebook.float()).pow(2)
            d2[d2 < 1e-9] = float("inf")
            nn_d2 = d2.min(-1).values
            nn_d2 = nn_d2[torch.isfinite(nn_d2)]
            init_t = max(float(nn_d2.median()) * 0.05, 1e-6) if nn_d2.numel() else 1.0
        self.log_temp = nn.Parameter(torch.tensor(math.log(init_t)))
        self.log_scale = nn.Parameter(torch.zeros(())) if cfg.calibration == "learned" else None

    def candidates(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k nearest codes: (squared distances [N, k], ids [N, k])."""
        zf = z.float()
        d2 = zf.pow(2).sum(-1, keepdim=True) - 2 * zf @ self.codebook.T + self.code_sq
        d2, idx = torch.topk(d2, self.topk, dim=-1, largest=False)
        return d2.clamp_min(0), idx

    def _forward_chunk(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the search is discrete; gradients flow through d2 below
            _, idx = self.candidates(z)
        zf = z.float()
        d2 = (zf[:, None, :] - self.codebook[idx]).pow(2).sum(-1)
        w = torch.softmax(-d2 / self.log_temp.exp(), dim=-1)  # [N, k]
        y = torch.einsum("nk,nkd->nd", w, self.table[idx])
        if self.cfg.calibration == "rms":
            # the expected RMS of the mixed rows: a near-one-hot mix keeps the
            # chosen token's own norm; a soft mix is re-inflated to it
            y = y * ((w * self.table_rms[idx]).sum(-1, keepdim=True) / rms(y))
        elif self.cfg.calibration == "learned":
            y = y * self.log_scale.exp()
        return y

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        z = z.reshape(-1, shape[-1])
        out = torch.cat([self._forward_chunk(z[i:i + self.chunk]) for i in range(0, z.shape[0], self.chunk)]) \
            if z.shape[0] else z.new_zeros(0, self.table.shape[1])
        return out.reshape(*shape[:-1], self.table.shape[1])

    @torch.no_grad()
    def nearest_ids(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.candidates(z[i:i + self.chunk])[1][:, 0] for i in range(0, z.shape[0], self.chunk)])


class LinearAdapter(nn.Module):
    """The compressor's inverse, untrained (PCA: z @ components + mean)."""

    def __init__(self, compressor):
        super().__init__()
        self.compressor = compressor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.compressor.inverse_transform(z)


def build_adapter(cfg: AdapterConfig, compressor, table: torch.Tensor) -> nn.Module:
    """Construct the adapter named by cfg for a fitted compressor and the
    receiver's embedding table [V, d]."""
    d = table.shape[1]
    k = compressor.n_components
    if cfg.adapter == "linear":
        return LinearAdapter(compressor)
    if cfg.adapter == "vocab":
        with torch.no_grad():
            codebook = torch.cat([compressor.transform(table[i:i + 8192]) for i in range(0, table.shape[0], 8192)])
        return VocabAdapter(codebook, table, cfg)
    if cfg.adapter == "mlp":
        inv = (compressor.components_, compressor.mean_) if getattr(compressor, "kind", "") == "pca" else None
        return MLPAdapter(k, d, cfg, target_rms=float(rms(table).mean()), pca_inverse=inv)
    raise LatentWireError(f"--adapter: unknown adapter {cfg.adapter!r}")


def save_adapter(adapter: nn.Module, path: str | Path, meta: dict) -> None:
    atomic_torch_save({"state_dict": adapter.state_dict(), "meta": meta}, path)


def load_adapter_state(adapter: nn.Module, path: str | Path, expect: dict) -> dict:
    """Load weights after checking the saved fingerprint (model, d_model,
    vocabulary, compression dim, adapter kind) against this run."""
    blob = read_artifact("--adapter-path", path)
    check_meta("--adapter-path", path, blob["meta"], expect)
    adapter.load_state_dict(blob["state_dict"])
    return blob["meta"]
