"""Compressors d_model -> k, sklearn-shaped (fit / partial_fit / transform /
inverse_transform), fitted attributes with a trailing underscore.

PCA streams a float64 covariance (sum x, sum x x^T) over batches, so fitting
on a million token embeddings needs O(d^2) memory, not O(N d) as the seed's
"collect everything, then svd_lowrank" did. `explained_variance_ratio_` is
against the *total* variance of the data (all d eigenvalues) -- the seed's
"100% variance" came from normalising over the kept components only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from ..errors import LatentWireError
from ..util.runio import atomic_torch_save, safe_torch_load
from ..llm.models import same_model_source


def svd_flip_components(components: torch.Tensor) -> torch.Tensor:
    """Deterministic signs: the largest-|.| entry of each component is positive
    (sklearn's `svd_flip(u_based_decision=False)`)."""
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


class Compressor:
    kind = "base"
    n_components: int
    n_features_in_: int

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        atomic_torch_save({"kind": self.kind, "state": self.state(), "meta": meta or {}}, path)


class PCA(Compressor):
    """Exact PCA from a streamed covariance (eigh in float64)."""
    kind = "pca"

    def __init__(self, n_components: int):
        self.n_components = int(n_components)
        self._n = 0
        self._sum = None
        self._sxx = None

    def partial_fit(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> "PCA":
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        if self._sum is None:
            d = x.shape[1]
            if not 1 <= self.n_components <= d:
                raise LatentWireError(f"--compress-dim {self.n_components} must be between 1 and d_model={d}")
            self._sum = torch.zeros(d, dtype=torch.float64)
            self._sxx = torch.zeros(d, d, dtype=torch.float64)
        x = x.cpu()
        w = None if weights is None else weights.detach().to(torch.float64).reshape(-1).cpu()
        if w is None:
            self._n += x.shape[0]
            self._sum += x.sum(0)
            self._sxx += x.T @ x
        else:
            self._n += float(w.sum())
            self._sum += (w[:, None] * x).sum(0)
            self._sxx += (x * w[:, None]).T @ x
        return self._finalize()

    def fit(self, batches: Iterable[torch.Tensor] | torch.Tensor) -> "PCA":
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        for b in batches:
            self.partial_fit(b)
        if self._n == 0:
            raise LatentWireError("PCA.fit: no data")
        return self

    def fit_token_ids(self, embed, ids: torch.Tensor, chunk: int = 16384) -> "PCA":
        """Stream token ids through `embed` (the model's embedding module) in
        chunks: memory is O(chunk * d + d^2), whatever the number of tokens."""
        for i in range(0, ids.numel(), chunk):
            with torch.no_grad():
                self.partial_fit(embed(ids[i:i + chunk]).float())
        if self._n == 0:
            raise LatentWireError("PCA.fit_token_ids: no tokens")
        return self

    def _finalize(self) -> "PCA":
        n = self._n
        mean = self._sum / n
        cov = self._sxx / n - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals = evals.flip(0).clamp(min=0)
        evecs = evecs.flip(1)
        comps = svd_flip_components(evecs[:, :self.n_components].T.contiguous())
        self.n_features_in_ = cov.shape[0]
        self.n_samples_seen_ = n
        self.mean_ = mean.float()
        self.components_ = comps.float()  # [k, d]
        total = float(evals.sum())
        self.explained_variance_ = evals[:self.n_components].float()
        self.explained_variance_ratio_ = (evals[:self.n_components] / total).float() if total > 0 else \
            torch.zeros(self.n_components)
        self.total_variance_ = total
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        c = self.components_.to(x.device, x.dtype)
        return (x - self.mean_.to(x.device, x.dtype)) @ c.T

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        c = self.components_.to(z.device, z.dtype)
        return z @ c + self.mean_.to(z.device, z.dtype)

    def state(self) -> dict:
        return {"n_components": self.n_components, "mean_": self.mean_, "components_": self.components_,
                "explained_variance_": self.explained_variance_,
                "explained_variance_ratio_": self.explained_variance_ratio_,
                "total_variance_": self.total_variance_, "n_samples_seen_": self.n_samples_seen_}

    @classmethod
    def from_state(cls, s: dict) -> "PCA":
        p = cls(s["n_components"])
        for k, v in s.items():
            if k != "n_components":
                setattr(p, k, v)
        p.n_features_in_ = p.components_.shape[1]
        return p


class RandomProjection(Compressor):
    """Gaussian random projection (scaled so norms are preserved in
    expectation); inverse is the pseudo-inverse. The seed's alternative."""
    kind = "random"

    def __init__(self, n_components: int, seed: int = 0):
        self.n_components = int(n_components)
        self.seed = seed

    def fit(self, batches=None, d_model: int | None = None) -> "RandomProjection":
        if d_model is None:
            first = batches if isinstance(batches, torch.Tensor) else next(iter(batches))
            d_model = first.shape[-1]
        g = torch.Generator().manual_seed(self.seed)
        self.n_features_in_ = d_model
        self.components_ = torch.randn(self.n_components, d_model, generator=g) / math.sqrt(self.n_components)
        self.pinv_ = torch.linalg.pinv(self.components_)  # [d, k]
        self.mean_ = torch.zeros(d_model)
        return self

    def transform(self, x):
        return x @ self.components_.to(x.device, x.dtype).T

    def inverse_transform(self, z):
        return z @ self.pinv_.to(z.device, z.dtype).T

    def state(self):
        return {"n_components": self.n_components, "seed": self.seed, "components_": self.components_,
                "pinv_": self.pinv_, "mean_": self.mean_}

    @classmethod
    def from_state(cls, s):
        r = cls(s["n_components"], s["seed"])
        r.components_, r.pinv_, r.mean_ = s["components_"], s["pinv_"], s["mean_"]
        r.n_features_in_ = r.components_.shape[1]
        return r


class Identity(Compressor):
    """No compression: a control that isolates the adapter and evaluation."""
    kind = "identity"

    def __init__(self, n_components: int | None = None):
        self.n_components = n_components

    def fit(self, batches=None, d_model: int | None = None):
        if d_model is None:
            first = batches if isinstance(batches, torch.Tensor) else next(iter(batches))
            d_model = first.shape[-1]
        self.n_components = self.n_features_in_ = d_model
        self.mean_ = torch.zeros(d_model)
        self.components_ = torch.eye(d_model)
        return self

    def transform(self, x):
        return x

    def inverse_transform(self, z):
        return z

    def state(self):
        return {"n_components": self.n_components}

    @classmethod
    def from_state(cls, s):
        return cls(s["n_components"]).fit(d_model=s["n_components"])


_KINDS = {"pca": PCA, "random": RandomProjection, "identity": Identity}


def make_compressor(kind: str, k: int, seed: int = 0) -> Compressor:
    if kind == "pca":
        return PCA(k)
    if kind == "random":
        return RandomProjection(k, seed)
    if kind == "identity":
        return Identity(k)
    raise LatentWireError(f"--compressor: unknown kind {kind!r}")


def check_meta(what: str, path: str | Path, meta: dict, expect: dict) -> None:
    """A saved artifact must match this run: model, d_model, vocabulary size,
    compression dim (and kind). The message names both sides."""
    for key, want in expect.items():
        have = meta.get(key)
        if have is not None and have != want and not (key == "model" and same_model_source(have, want)):
            raise LatentWireError(f"{what} {path}: {key} is {have!r} there but {want!r} in this run")


def read_artifact(what: str, path: str | Path) -> dict:
    blob = safe_torch_load(path, what)
    if not isinstance(blob, dict) or "meta" not in blob:
        raise LatentWireError(f"{what} {path}: not a LatentWire checkpoint (no 'meta')")
    return blob


def load_compressor(path: str | Path, expect: dict | None = None) -> Compressor:
    """Load a saved compressor; `expect` (model fingerprint + dim) must match."""
    blob = read_artifact("--compressor-path", path)
    check_meta("--compressor-path", path, blob["meta"], expect or {})
    return _KINDS[blob["kind"]].from_state(blob["state"])
