"""The frozen LLM reading [head][reading][tail]: the forward helpers every
fitting, training, probing and evaluation loop shares.

* the *head* is the receiver's own prompt before the context (shots,
  'Context:'), identical for every prompt of a run: its KV cache is computed
  once (`head_cache`) and copied to every row;
* the *reading* is what a receiver made of a payload: token ids [M],
  embeddings [M, d] or a `KVReading` (per-layer keys/values of M positions);
* the *tail* is the receiver's own text after the context (question, cue,
  answer, or a probe).

Why one place: the per-paragraph fit, the learned compressor's training, the
probes of a finished run and generation must put the same positions at the
same places, or a loss would measure one thing and the evaluation another.
"""
from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch

from ..errors import LatentWireError
from .models import cache_kwarg, get_cache


def logits_kw(model) -> dict:
    """Ask for the last position's logits only, where the model supports it:
    a prefill over [B, L] would otherwise materialise [B, L, vocab] logits
    (for SmolLM2, 49k columns: a fifth of the prefill's FLOPs, all unused)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def right_pad(segs: Sequence[torch.Tensor], width: int | None = None):
    """Right-pad [n_i, ...] tensors into [B, S, ...] and a bool mask [B, S]."""
    S = max(len(s) for s in segs) if width is None else width
    x = torch.zeros((len(segs), S) + tuple(segs[0].shape[1:]), dtype=segs[0].dtype, device=segs[0].device)
    m = torch.zeros((len(segs), S), dtype=torch.bool, device=segs[0].device)
    for i, s in enumerate(segs):
        x[i, :len(s)] = s
        m[i, :len(s)] = True
    return x, m


def cache_copy(cache, n: int):
    """n rows that each continue from a one-row KV cache."""
    c = copy.deepcopy(cache)
    if n != 1:
        c.batch_repeat_interleave(n)
    return c


@torch.no_grad()
def head_cache(lm, head_ids: Sequence[int]):
    """KV cache of the prefix every prompt shares (shots, 'Context:'), one row."""
    x = torch.tensor([list(head_ids)], dtype=torch.long, device=lm.device)
    return get_cache(lm.model(input_ids=x, use_cache=True, **logits_kw(lm.model)))


def kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [B, kv_heads, T, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(model, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A KV cache holding these per-layer (keys, values); gradients flow into them."""
    from transformers import DynamicCache
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers], config=model.config)


def forward_after(lm, cache, n_past: int, x: torch.Tensor, mask: torch.Tensor, ids: bool, past_mask=None,
                  keep: torch.Tensor | None = None, hidden: bool = False):
    """Run rows [B, S] (right-padded ids or embeddings, `mask` [B, S]) after a
    B-row cache of n_past positions (`past_mask` [B, n_past]: which of them
    are real; default all). `keep`: positions (of S) whose logits are wanted
    (default all) -- a [B, S, vocab] tensor is most of the cost of a short row.
    `hidden`: run the model without its output head and return its final
    hidden states (`.last_hidden_state`, [B, S, d]); `head_logits` then
    scores only the positions a loss needs (a few a row, where `keep` must
    keep the span from the first to the last in every row)."""
    B, S = mask.shape
    pm = torch.ones((B, n_past), dtype=torch.long, device=mask.device) if past_mask is None else past_mask.long()
    attn = torch.cat([pm, mask.long()], 1)
    pos = (pm.sum(1, keepdim=True) + torch.arange(S, device=mask.device)[None]).expand(B, S)
    kw = {"attention_mask": attn, "position_ids": pos, "use_cache": True, cache_kwarg(lm.model): cache}
    model = lm.model
    if hidden:
        model = decoder_stack(lm.model)
    elif keep is not None and "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        kw["logits_to_keep"] = keep
    return model(input_ids=x, **kw) if ids else model(inputs_embeds=x.to(lm.dtype), **kw)


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The LM without its output head (embeddings, blocks, final norm)."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:
        dec = getattr(model, "model", None)
    if dec is None:
        raise LatentWireError(f"{type(model).__name__}: cannot find its decoder stack (model.model)")
    return dec


def head_logits(lm, h: torch.Tensor) -> torch.Tensor:
    """The LM's output head on final hidden states [..., d] -> logits [..., V]: what the model's own forward
    computes after its decoder stack (with the final soft-cap of models that have one, e.g. Gemma 2)."""
    logits = lm.model.get_output_embeddings()(h)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def context_kv(lm, hc, n_head: int, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The receiver's own keys/values of the context's tokens read after the head,
    per layer [kv_heads, L, head_dim] (RoPE at positions n_head ..)."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=lm.device)
    out = forward_after(lm, cache_copy(hc, 1), n_head, x, torch.ones_like(x, dtype=torch.bool), True,
                        keep=torch.tensor([x.shape[1] - 1], device=lm.device))
    return [(k[0, :, n_head:].clone(), v[0, :, n_head:].clone()) for k, v in kv_tensors(get_cache(out))]


def reading_cache(lm, hc, n_head: int, readings: Sequence, reads: str):
    """A B-row cache of [head][reading_b], each reading right-padded to the
    longest (padding masked), and its past mask [B, n_head + Mmax]. `reads`:
    ids | embeds | kv. For ids and embeddings the readings are run through the
    LLM (gradients flow into embeddings); K/V readings are concatenated
    (gradients flow into them)."""
    B = len(readings)
    dev = lm.device
    lens = [len(r) for r in readings]
    Mx = max(lens) if lens else 0
    past = torch.zeros((B, n_head + Mx), dtype=torch.bool, device=dev)
    past[:, :n_head] = True
    for b, n in enumerate(lens):
        past[b, n_head:n_head + n] = True
    if Mx == 0:
        return cache_copy(hc, B), past
    if reads == "kv":
        layers = []
        for i, (hk, hv) in enumerate(kv_tensors(hc)):
            ks, vs = [], []
            for r in readings:
                k, v = r.keys[i].to(dev, hk.dtype), r.values[i].to(dev, hv.dtype)
                pad = Mx - k.shape[1]
                if pad:
                    k = torch.cat([k, k.new_zeros(k.shape[0], pad, k.shape[2])], 1)
                    v = torch.cat([v, v.new_zeros(v.shape[0], pad, v.shape[2])], 1)
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat([hk.expand(B, -1, -1, -1), torch.stack(ks)], 2),
                           torch.cat([hv.expand(B, -1, -1, -1), torch.stack(vs)], 2)))
        return cache_from(lm.model, layers), past
    if reads == "ids":
        x, m = right_pad([r.to(dev).long() for r in readings])
    else:
        x, m = right_pad([r.to(dev).float() for r in readings])
    out = forward_after(lm, cache_copy(hc, B), n_head, x, m, reads == "ids", keep=torch.tensor([0], device=dev))
    return get_cache(out), past


def read_tails(lm, hc, n_head: int, readings: Sequence, reads: str, tails: Sequence[Sequence[int]],
               keep_from: int | None = None):
    """Logits of each tail row read after [head][reading]: [B, S, V] for the
    right-padded tails (`keep_from`: only positions >= it). `readings`: one
    per tail, or one shared by all (computed once, its cache repeated).
    Gradients flow into embedding and K/V readings."""
    cache, past = reading_cache(lm, hc, n_head, readings, reads)
    if len(readings) == 1 and len(tails) > 1:
        cache.batch_repeat_interleave(len(tails))
        past = past.expand(len(tails), -1)
    x, m = right_pad([torch.tensor(list(t), dtype=torch.long, device=lm.device) for t in tails])
    keep = None if keep_from is None else torch.arange(keep_from, x.shape[1], device=lm.device)
    return forward_after(lm, cache, past.shape[1], x, m, True, past_mask=past, keep=keep).logits


__all__ = ["cache_copy", "cache_from", "context_kv", "decoder_stack", "forward_after", "head_cache", "head_logits",
           "kv_tensors", "logits_kw", "read_tails", "reading_cache", "right_pad"]
