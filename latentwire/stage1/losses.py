"""Loss terms. Each function returns a dict of named terms plus `loss`, the
weighted sum, so the training loop logs every term separately. All of them
are safe on empty masks (they return 0 with a gradient path, not NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean() if x.numel() else x.sum()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                        w_cos: float = 1.0, w_mse: float = 1.0) -> dict[str, torch.Tensor]:
    """Phase 1: w_cos * (1 - cos) + w_mse * MSE, per token, averaged over mask.

    MSE is per element (mean over d), as in the seed; cosine is per token.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
    mse = (pred.float() - target.float()).pow(2).mean(-1)
    cos_term = _masked_mean(1.0 - cos, mask)
    mse_term = _masked_mean(mse, mask)
    return {"loss": w_cos * cos_term + w_mse * mse_term, "cos_loss": cos_term, "mse": mse_term,
            "cos": 1.0 - cos_term.detach()}


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Phase 2: teacher-forced CE on answer tokens. `logits[:, t]` predicts
    `labels[:, t]` (already aligned); positions with ignore_index are skipped."""
    mask = labels != ignore_index
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    """Phase 2: KL(teacher || student) of next-token distributions at masked
    positions, scaled by T^2 (Hinton et al.) so the gradient scale is T-free."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1) * (t * t)
    return _masked_mean(kl, mask)
