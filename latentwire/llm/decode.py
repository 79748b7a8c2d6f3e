"""Greedy decoding: an answer's token ids (and its text, cut at the first
newline) from what a frozen LLM reads -- a batch of rows (ids [L] or
embeddings [L, d]) or a KV cache and its mask.

* `greedy_generate`: one prefill of a left-padded batch, then the loop
  (`_decode`); `kv_generate`: the same after a KV cache (a receiver's
  keys/values);
* `tree_generate` and its planning (`prefix_tree`, `choose_tree`,
  `RunPrefix`): a prefix several rows share, prefilled once;
* `BatchDecoder`: a run's batches, each through the tree or in full;
* `generate_one_at_a_time`, `generate_seed_loop`: reference loops over
  prompts' ids, one at a time (the tests compare the batched loops with them).

Why a module of its own: these loops know nothing of prompts, wire spans,
pipelines or payloads. `generate.py` maps a prompt and a pipeline's payload
to the tensors read here (the evaluation's rows); what crosses the wire can
change without touching how an answer is decoded, and the loops are tested
against each other (ids vs embeddings, tree vs full prefill, batched vs one
at a time) on tensors alone.

The loop is a plain greedy loop with a KV cache rather than `model.generate`,
so that the ids path and the embeds path are the same code (tested to give
identical outputs) and stopping at the newline is exact.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .forward import logits_kw
from .models import cache_kwarg as _cache_kw
from .models import get_cache as _get_cache


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


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


def pad_rows(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ids ([L]) or embeddings ([L, d]) rows into a batch and its mask."""
    if rows[0].dim() == 1:
        return left_pad([r.tolist() for r in rows], pad_id)
    L = max(len(r) for r in rows)
    x = torch.zeros((len(rows), L, rows[0].shape[-1]), dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            x[i, L - len(r):] = r
            mask[i, L - len(r):] = 1
    return x, mask



def _decode(model, out, mask: torch.Tensor, last_pos: torch.Tensor, use_ids: bool, max_new_tokens: int,
            stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy decoding after a prefill whose last column is every row's last
    prompt token. A row stops at its first stop token (kept in the output so
    the caller can cut the text at the newline)."""
    emb_layer = model.get_input_embeddings()
    dev = mask.device
    cache_name = _cache_kw(model)
    B = mask.shape[0]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    gen: list[list[int]] = [[] for _ in range(B)]
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
        if use_ids:
            out = model(input_ids=nxt[:, None], **kw)
        else:
            # generated tokens are the model's own: they enter as original embeddings
            out = model(inputs_embeds=emb_layer(nxt[:, None]), **kw)
    return gen


@torch.no_grad()
def greedy_generate(model, attention_mask: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None, max_new_tokens: int = 16,
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy decoding for a left-padded batch, from ids *or* embeddings.

    Position ids are computed from the mask so that a left-padded row gets
    the same positions as it would alone.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids / inputs_embeds")
    emb_layer = model.get_input_embeddings()
    dev = emb_layer.weight.device
    mask = attention_mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {"attention_mask": mask, "position_ids": pos, "use_cache": True, **logits_kw(model)}
    if input_ids is not None:
        out = model(input_ids=input_ids.to(dev), **kw)
    else:
        out = model(inputs_embeds=inputs_embeds.to(dev, emb_layer.weight.dtype), **kw)
    return _decode(model, out, mask, pos[:, -1:], input_ids is not None, max_new_tokens, stop_ids)



@torch.no_grad()
def kv_generate(model, cache, past_mask: torch.Tensor, tails: Sequence[Sequence[int]], *, pad_id: int = 0,
                max_new_tokens: int = 16, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy decoding after a B-row KV cache (`past_mask` [B, P]: which of
    its positions are real): each row's tail ids, left-padded so that every
    row's last column is its last token, then the loop; positions come from
    the mask, so a row sees the positions it would alone."""
    dev = past_mask.device
    x, tmask = left_pad(tails, pad_id)
    mask = torch.cat([past_mask.long(), tmask.to(dev)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    S = x.shape[1]
    out = model(input_ids=x.to(dev), attention_mask=mask, position_ids=pos[:, -S:], use_cache=True,
                **{_cache_kw(model): cache}, **logits_kw(model))
    return _decode(model, out, mask, pos[:, -1:], True, max_new_tokens, stop_ids)


# ------------------------------------------------------- shared-prefix prefill
#
# Every few-shot prompt starts with the same shots, and SQuAD asks ~5
# questions about each paragraph, so the rows of a batch often begin with the
# same tokens. A causal LM's keys/values for a prefix do not depend on what
# follows it, so a shared prefix can be prefilled once and its cache copied to
# every row that shares it. We use a three-level tree per batch:
#   level 0: the prefix common to every row (the shots)      -- 1 node
#   level 1: each group's shared part (the paragraph), or, for a row that
#            shares nothing more, all of it but its last token -- G nodes
#   level 2: each row's own tail (question + answer cue)       -- B nodes
# Each level is one forward pass over its nodes, each node's segment padded on
# its left (mask 0) so that its last column is a real token; the cache and the
# mask are copied from parents to children between levels. Position ids come
# from the mask, so a row sees exactly the positions and keys it would alone.
# Shared parts are found by comparing the rows the LLM will read (ids, or the
# reconstructed embeddings bit for bit), so any pipeline is handled exactly.


class CacheNotCopyable(RuntimeError):
    """The model's KV cache has no batch_select_indices: no tree prefill."""


def sliding_window(model) -> int | None:
    """The attention window of a sliding-window model (Mistral, Gemma 2/3),
    else None. Windows count cache columns, not positions, so the padding
    a tree puts between levels would shift them: the tree is used only
    when the whole sequence fits in the window."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    w = getattr(cfg, "sliding_window", None)
    if w and getattr(cfg, "use_sliding_window", True) is not False:
        return int(w)
    return None


@dataclass
class Level:
    """One level of the prefix tree: node j continues node parent[j] of the
    level above with segs[j] ([n] ids or [n, d] embeddings; may be empty)."""
    parent: list[int]
    segs: list[torch.Tensor]


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading positions where two rows (ids, or embeddings compared bit for
    bit over the last dimension) are equal."""
    m = min(len(a), len(b))
    if m == 0:
        return 0
    eq = a[:m] == b[:m]
    if eq.dim() > 1:
        eq = eq.all(-1)
    bad = torch.nonzero(~eq)
    return int(bad[0, 0]) if len(bad) else m


def prefix_tree(rows: Sequence[torch.Tensor], min_shared: int = 16) -> list[Level]:
    """The three levels above for these rows (level 2 node i = row i).

    Rows join a group when they share at least `min_shared` positions beyond
    the all-row prefix; a shared part stops one token short of the shortest
    member so that every row's last token is computed in level 2."""
    B = len(rows)
    shortest = min(len(r) for r in rows)
    if shortest < 1:
        raise ValueError("empty prompt")
    p0 = min([common_prefix_len(rows[0], r) for r in rows] + [shortest - 1])
    reps: list[int] = []  # a representative row per group
    ends: list[int] = []  # where the group's shared part ends
    group_of: list[int] = []
    for i, r in enumerate(rows):
        for g, rep in enumerate(reps):
            n = common_prefix_len(rows[rep], r)
            if n >= p0 + min_shared:
                ends[g] = min(ends[g], n, len(r) - 1)
                group_of.append(g)
                break
        else:
            reps.append(i)
            ends.append(len(r) - 1)
            group_of.append(len(reps) - 1)
    return [Level([0], [rows[0][:p0]]),
            Level([0] * len(reps), [rows[rep][p0:e] for rep, e in zip(reps, ends)]),
            Level(group_of, [rows[i][ends[group_of[i]]:] for i in range(B)])]


def tree_cost(levels: Sequence[Level]) -> int:
    """Positions a tree prefill computes (padding included)."""
    return sum(len(lv.segs) * max(len(s) for s in lv.segs) for lv in levels)


def choose_tree(rows: Sequence[torch.Tensor], max_new_tokens: int, window: int | None = None) -> list[Level] | None:
    """The prefix tree for a batch's rows when it computes fewer positions
    than prefilling every row in full and, for a sliding-window model, the
    whole sequence (tree columns + new tokens) fits the window; else None."""
    if len(rows) < 2:
        return None
    levels = prefix_tree(rows)
    columns = sum(max(len(s) for s in lv.segs) for lv in levels) + max_new_tokens
    if tree_cost(levels) < len(rows) * max(len(r) for r in rows) and (window is None or columns <= window):
        return levels
    return None


class RunPrefix:
    """The KV cache of the prefix every prompt of a run starts with (the
    few-shot shots and 'Context:'), computed once per run and copied into
    each batch's tree instead of being prefilled once per batch. `length`:
    positions shared by all prompts (from their ids); the stored segment is
    compared bit for bit with each batch's, so a pipeline whose prefix
    differs simply does not use it."""

    def __init__(self, length: int):
        self.length = length
        self.seg: torch.Tensor | None = None
        self.cache = None
        self.hits = 0

    def take(self, seg: torch.Tensor):
        """(a copy of the cache, its length) when `seg` starts with the stored prefix; else (None, 0)."""
        n = 0 if self.seg is None else len(self.seg)
        if n and len(seg) >= n and torch.equal(seg[:n].to(self.seg.device), self.seg):
            self.hits += 1
            return copy.deepcopy(self.cache), n
        return None, 0


@torch.no_grad()
def tree_generate(model, levels: Sequence[Level], *, use_ids: bool, pad_id: int = 0, max_new_tokens: int = 16,
                  stop_ids: Sequence[int] = (), run_prefix: RunPrefix | None = None) -> list[list[int]]:
    """Greedy decoding for the rows at the leaves of a prefix tree, each
    level prefilled once (see above); same results as greedy_generate on the
    full rows, up to float rounding. With `run_prefix`, the root's first
    positions come from the run's cached prefix (computed by the first batch)."""
    emb_layer = model.get_input_embeddings()
    dev, dtype = emb_layer.weight.device, emb_layer.weight.dtype
    cache_name = _cache_kw(model)
    cache, mask, out, pos = None, None, None, None
    levels = list(levels)
    if run_prefix is not None and run_prefix.length > 0 and len(levels[0].segs) == 1:
        root = levels[0].segs[0]
        cache, n = run_prefix.take(root)
        if cache is not None:
            mask = torch.ones((1, n), dtype=torch.long, device=dev)
            levels[0] = Level(levels[0].parent, [root[n:]])
        elif run_prefix.seg is None and len(root) >= run_prefix.length:
            # first batch: prefill the run's prefix alone, keep a copy, then go on
            head = root[:run_prefix.length]
            mask = torch.ones((1, len(head)), dtype=torch.long, device=dev)
            x = head[None].to(dev) if use_ids else head[None].to(dev, dtype)
            kw = {"attention_mask": mask, "position_ids": torch.arange(len(head), device=dev)[None],
                  "use_cache": True, **logits_kw(model)}
            out = model(input_ids=x, **kw) if use_ids else model(inputs_embeds=x, **kw)
            cache = _get_cache(out)
            run_prefix.seg, run_prefix.cache = head.detach().clone(), copy.deepcopy(cache)
            levels[0] = Level(levels[0].parent, [root[len(head):]])
    for k, lv in enumerate(levels):
        n = len(lv.segs)
        S = max(len(s) for s in lv.segs)
        parent = torch.tensor(lv.parent, dtype=torch.long, device=dev)
        mask = torch.zeros((n, 0), dtype=torch.long, device=dev) if mask is None else mask[parent]
        if cache is not None and lv.parent != list(range(n)):
            if not hasattr(cache, "batch_select_indices"):
                raise CacheNotCopyable(f"{type(cache).__name__} cannot be copied across rows")
            cache.batch_select_indices(parent)
        if S == 0:
            if k == len(levels) - 1:
                raise ValueError("the last level must give every row at least one token")
            continue
        seg_mask = torch.zeros((n, S), dtype=torch.long, device=dev)
        if use_ids:
            x = torch.full((n, S), pad_id, dtype=torch.long, device=dev)
        else:
            x = torch.zeros((n, S, lv.segs[0].shape[-1]), dtype=dtype, device=dev)
        for j, s in enumerate(lv.segs):
            if len(s):
                x[j, S - len(s):] = s.to(dev, x.dtype)
                seg_mask[j, S - len(s):] = 1
        mask = torch.cat([mask, seg_mask], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"attention_mask": mask, "position_ids": pos[:, -S:], "use_cache": True, **logits_kw(model)}
        if cache is not None:
            kw[cache_name] = cache
        out = model(input_ids=x, **kw) if use_ids else model(inputs_embeds=x, **kw)
        cache = _get_cache(out)
    return _decode(model, out, mask, pos[:, -1:], use_ids, max_new_tokens, stop_ids)


class BatchDecoder:
    """Greedy decoding of a run's batches on one model, batch after batch: a
    batch of rows ([L] ids or [L, d] embeddings) goes through the prefix tree
    when that computes fewer positions than prefilling every row in full and
    fits a sliding window (choose_tree), else every row is prefilled in full,
    left-padded. `run_prefix`: the run's common prefix, prefilled once
    (RunPrefix). A model whose cache cannot be copied across rows is warned
    about once and prefilled in full from then on."""

    def __init__(self, model, pad_id: int, stop_ids: Sequence[int], max_new_tokens: int = 16,
                 share_prefix: bool = True, run_prefix: RunPrefix | None = None):
        self.model, self.pad_id, self.stop_ids, self.max_new_tokens = model, pad_id, stop_ids, max_new_tokens
        self.share_prefix, self.run_prefix = share_prefix, run_prefix
        self.window = sliding_window(model)

    def __call__(self, rows: Sequence[torch.Tensor]) -> list[list[int]]:
        use_ids = rows[0].dim() == 1
        kw = {"max_new_tokens": self.max_new_tokens, "stop_ids": self.stop_ids}
        levels = choose_tree(rows, self.max_new_tokens, self.window) if self.share_prefix else None
        if levels is not None:
            try:
                return tree_generate(self.model, levels, use_ids=use_ids, pad_id=self.pad_id,
                                     run_prefix=self.run_prefix, **kw)
            except CacheNotCopyable as e:
                warnings.warn(f"{e}: prefilling every row in full (as with --no-share-prefix)")
                self.share_prefix = False
        x, mask = pad_rows(rows, self.pad_id)
        return greedy_generate(self.model, mask, **({"input_ids": x} if use_ids else {"inputs_embeds": x}), **kw)


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text up to the first newline, special tokens dropped, stripped."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()




@torch.no_grad()
def generate_one_at_a_time(lm, seqs: Sequence[Sequence[int]], max_new_tokens: int = 16, desc: str = "one-by-one",
                           progress: bool = True) -> list[str]:
    """The seed's evaluation loop: one prompt's ids per forward pass, no
    batching, read through the embedding module as the text baseline is."""
    stops = stop_token_ids(lm.tokenizer)
    out = []
    for s in tqdm(seqs, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor([list(s)], dtype=torch.long, device=lm.device)
        gen = greedy_generate(lm.model, torch.ones_like(ids), inputs_embeds=lm.embed(ids).float(),
                              max_new_tokens=max_new_tokens, stop_ids=stops)
        out.append(decode_answer(lm.tokenizer, gen[0]))
    return out


@torch.no_grad()
def generate_seed_loop(lm, seqs: Sequence[Sequence[int]], max_new_tokens: int = 16, desc: str = "seed loop",
                       progress: bool = True) -> list[str]:
    """The seed's evaluation, for comparison: one prompt's ids at a time through
    `model.generate(inputs_embeds=..., attention_mask=..., do_sample=False)`,
    which runs to EOS or `max_new_tokens` (no stop at the newline); the text
    is then cut at the first newline, as ours is."""
    out = []
    eos = lm.tokenizer.eos_token_id
    for s in tqdm(seqs, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor([list(s)], dtype=torch.long, device=lm.device)
        emb = lm.embed(ids)
        gen = lm.model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=eos)
        out.append(decode_answer(lm.tokenizer, gen[0].tolist()))
    return out
