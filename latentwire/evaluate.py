"""Evaluation: batched greedy generation from `input_ids` or `inputs_embeds`,
and scoring of a pipeline's predictions.

A *pipeline* is a function from a batch of original input embeddings to the
embeddings the frozen LLM will read: identity for the text baseline,
PCA-inverse for the linear control, adapter(compressor(.)) for LatentWire.
Positions marked in `keep` (BOS, kept prefix, answer-cue anchor) pass through
unchanged -- those are the seed's "evaluation setup" switches.

Generation is a plain greedy loop with a KV cache rather than
`model.generate`, so that the ids path and the embeds path are the same code
(tested to give identical outputs) and stopping at newline is exact.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data import Prompt
from .errors import LatentWireError
from .metrics import aggregate, score_example

# [N, d] -> [N, d], row-wise: a row's output depends only on that row (every
# compressor and adapter here is per token); diagnostics rely on it.
EmbedTransform = Callable[[torch.Tensor], torch.Tensor]


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: EOS, and every token whose text has a newline."""
    cached = getattr(tokenizer, "_latentwire_stop_ids", None)
    if cached is not None:
        return cached
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    ids = {i for i, t in enumerate(texts) if "\n" in t}
    for special in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)):
        if special is not None:
            ids.add(int(special))
    out = sorted(ids)
    tokenizer._latentwire_stop_ids = out
    return out


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model, attention_mask: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None, max_new_tokens: int = 16,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy decoding for a left-padded batch, from ids *or* embeddings.

    Position ids are computed from the mask so that a left-padded row gets
    the same positions as it would alone. A row stops at its first stop token
    (kept in the output so the caller can cut the text at the newline).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids / inputs_embeds")
    emb_layer = model.get_input_embeddings()
    dev = emb_layer.weight.device
    mask = attention_mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {"attention_mask": mask, "position_ids": pos, "use_cache": True}
    if input_ids is not None:
        out = model(input_ids=input_ids.to(dev), **kw)
    else:
        out = model(inputs_embeds=inputs_embeds.to(dev, emb_layer.weight.dtype), **kw)
    cache_name = _cache_kw(model)
    B = mask.shape[0]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    gen: list[list[int]] = [[] for _ in range(B)]
    last_pos = pos[:, -1:]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for b in torch.nonzero(~done).flatten().tolist():
            gen[b].append(int(nxt[b]))
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        last_pos = last_pos + 1
        kw = {"attention_mask": mask, "position_ids": last_pos, "use_cache": True, cache_name: _get_cache(out)}
        if input_ids is not None:
            out = model(input_ids=nxt[:, None], **kw)
        else:
            # generated tokens are the model's own: they enter as original embeddings
            out = model(inputs_embeds=emb_layer(nxt[:, None]), **kw)
    return gen


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text up to the first newline, special tokens dropped, stripped."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


def keep_mask(prompt: Prompt, keep_bos: bool, keep_prefix: int, keep_cue: bool) -> torch.Tensor:
    """Positions that bypass the compressor (original embeddings)."""
    L = len(prompt.ids)
    m = torch.zeros(L, dtype=torch.bool)
    if keep_bos:
        m[:prompt.n_bos] = True
    if keep_prefix:
        m[prompt.n_bos:prompt.n_bos + keep_prefix] = True
    if keep_cue and prompt.n_cue:
        m[L - prompt.n_cue:] = True
    return m


@dataclass
class EvalSwitches:
    """The seed's evaluation-setup suspects, as switches (see config.EvalConfig)."""
    keep_bos: bool = True
    keep_prefix: int = 0
    keep_cue: bool = False


@torch.no_grad()
def pipeline_embeds(lm, prompts: Sequence[Prompt], transform: EmbedTransform | None,
                    switches: EvalSwitches, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded embeddings the LLM reads for these prompts under a pipeline."""
    ids, mask = left_pad([p.ids for p in prompts], pad_id)
    dev = lm.device
    emb = lm.embed(ids.to(dev)).float()
    if transform is None:
        return emb, mask
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for i, p in enumerate(prompts):
        km = keep_mask(p, switches.keep_bos, switches.keep_prefix, switches.keep_cue)
        keep[i, ids.shape[1] - len(p.ids):] = km
    sel = (mask.bool() & ~keep).to(dev)
    out = emb.clone()
    if sel.any():
        out[sel] = transform(emb[sel]).to(out.dtype)
    limit = torch.finfo(lm.dtype).max if lm.dtype.is_floating_point else float("inf")
    if not torch.isfinite(out).all() or float(out.abs().max()) > limit:
        raise LatentWireError(f"the reconstructed embeddings are not finite in {lm.dtype} (max |x| "
                              f"{float(out.abs().max()):.3g}); use --dtype float32 or --calibration rms")
    return out, mask


def generate_predictions(lm, prompts: Sequence[Prompt], transform: EmbedTransform | None = None,
                         switches: EvalSwitches | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                         use_input_ids: bool = False, desc: str = "generate", progress: bool = True,
                         shard: tuple[int, int] = (0, 1)) -> list[str | None]:
    """Answers for every prompt, batched by length (less padding), in order.

    `shard=(rank, n)`: generate only batches j with j % n == rank and leave
    None elsewhere (dist.gather_filled merges the ranks). Batches are cut the
    same way for any n, so every question is generated in exactly the batch
    it would have had in a single process -- same padding, same numbers.
    """
    tok = lm.tokenizer
    switches = switches or EvalSwitches()
    stops = stop_token_ids(tok)
    rank, n_shards = shard
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    starts = list(range(0, len(order), batch_size))[rank::n_shards]
    preds: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=sum(len(order[s:s + batch_size]) for s in starts), desc=desc, disable=not progress, leave=False)
    for s in starts:
        idx = order[s:s + batch_size]
        batch = [prompts[i] for i in idx]
        if use_input_ids:
            assert transform is None, "the input_ids path is the text baseline only"
            ids, mask = left_pad([p.ids for p in batch], tok.pad_token_id)
            gen = greedy_generate(lm.model, mask, input_ids=ids, max_new_tokens=max_new_tokens, stop_ids=stops)
        else:
            emb, mask = pipeline_embeds(lm, batch, transform, switches, tok.pad_token_id)
            gen = greedy_generate(lm.model, mask, inputs_embeds=emb, max_new_tokens=max_new_tokens, stop_ids=stops)
        for i, g in zip(idx, gen):
            preds[i] = decode_answer(tok, g)
        bar.update(len(idx))
    bar.close()
    return preds


def generate_one_at_a_time(lm, prompts: Sequence[Prompt], max_new_tokens: int = 16, desc: str = "one-by-one",
                           progress: bool = True) -> list[str]:
    """The seed's evaluation loop: one question per forward pass, no batching."""
    return [generate_predictions(lm, [p], batch_size=1, max_new_tokens=max_new_tokens, progress=False)[0]
            for p in tqdm(prompts, desc=desc, disable=not progress, leave=False)]


@torch.no_grad()
def generate_seed_loop(lm, prompts: Sequence[Prompt], max_new_tokens: int = 16, desc: str = "seed loop",
                       progress: bool = True) -> list[str]:
    """The seed's evaluation, for comparison: one question at a time through
    `model.generate(inputs_embeds=..., attention_mask=..., do_sample=False)`,
    which runs to EOS or `max_new_tokens` (no stop at the newline); the text
    is then cut at the first newline, as ours is."""
    out = []
    eos = lm.tokenizer.eos_token_id
    for p in tqdm(prompts, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor([p.ids], dtype=torch.long, device=lm.device)
        emb = lm.embed(ids)
        gen = lm.model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=eos)
        out.append(decode_answer(lm.tokenizer, gen[0].tolist()))
    return out


def score_predictions(prompts: Sequence[Prompt], preds: Sequence[str]) -> tuple[list[dict], dict]:
    """Per-example rows (for predictions.jsonl) and the aggregate metrics."""
    rows = []
    for p, pred in zip(prompts, preds):
        s = score_example(pred, p.example.answers)
        rows.append({"id": p.example.id, "title": p.example.title, "question": p.example.question,
                     "gold": p.example.answers, "prediction": pred, "em": s["em"], "f1": s["f1"],
                     "prompt_tokens": len(p.ids), "truncated": p.truncated})
    return rows, aggregate(rows)
