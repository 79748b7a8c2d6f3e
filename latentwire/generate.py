"""Evaluation: batched greedy generation from `input_ids` or `inputs_embeds`,
and scoring of a pipeline's predictions.

A *pipeline* (`wire.Pipeline`) is a sender and a receiver: the sender turns
the part of a prompt that crosses the wire (`wire_span`: the context, or with
`--wire-scope prompt` everything but the kept BOS/prefix/answer cue -- the
seed's setting) into a payload of bytes; the receiver turns the payload into
what the frozen LLM reads in its place. Every pipeline -- text, Stage 1, and
any later one -- reaches the LLM through `pipeline_rows`, here.

Generation is a plain greedy loop with a KV cache rather than
`model.generate`, so that the ids path and the embeds path are the same code
(tested to give identical outputs) and stopping at newline is exact.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data import Prompt
from .errors import LatentWireError
from .forward import logits_kw
from .models import cache_kwarg as _cache_kw
from .models import get_cache as _get_cache
from .pipelines.base import EmbeddingPipeline, KVReading, Pipeline
from .pipelines.text import text_pipeline
from .wire import FloatQuantizer, Payload

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


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


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


def plan_batches(prompts: Sequence[Prompt], batch_size: int, share_prefix: bool = True,
                 min_shared: int = 16) -> list[list[int]]:
    """Which prompts go together, in order. Without prefix sharing: sorted by
    length (least padding). With it: prompts that share a prefix beyond the
    one common to all (questions on one paragraph) are kept together, groups
    ordered by length. Depends only on the prompts, never on the number of
    processes, so a sharded evaluation batches every question as one process
    would."""
    n = len(prompts)
    if not share_prefix or n < 2:
        order = sorted(range(n), key=lambda i: len(prompts[i].ids))
    else:
        lex = sorted(range(n), key=lambda i: prompts[i].ids)
        ids = [torch.tensor(prompts[i].ids) for i in lex]
        p0 = common_prefix_len(ids[0], ids[-1])  # the common prefix of a sorted list = first vs last
        groups, cur = [], [lex[0]]
        for a, b, i in zip(ids, ids[1:], lex[1:]):
            if common_prefix_len(a, b) >= p0 + min_shared:
                cur.append(i)
            else:
                groups.append(cur)
                cur = [i]
        groups.append(cur)
        groups.sort(key=lambda g: max(len(prompts[i].ids) for i in g))
        order = [i for g in groups for i in g]
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text up to the first newline, special tokens dropped, stripped."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


@dataclass
class EvalSwitches:
    """What crosses the wire (see config.EvalConfig): `scope` context (the
    default) sends the context's tokens only; `scope` prompt sends every
    prompt position except the kept ones -- BOS (keep_bos), the first
    `keep_prefix` tokens after it, the answer cue (keep_cue): the seed's
    "evaluation setup" suspects, as switches."""
    keep_bos: bool = True
    keep_prefix: int = 0
    keep_cue: bool = False
    scope: str = "context"


def wire_span(prompt: Prompt, switches: EvalSwitches, pipeline=None) -> tuple[int, int]:
    """[start, end) of the prompt positions that cross the wire (always the
    context for a pipeline that reads ids or K/V: they travel as text)."""
    if switches.scope == "context" or (pipeline is not None and pipeline.reads != "embeds"):
        return prompt.ctx_start, prompt.ctx_end
    L = len(prompt.ids)
    start = prompt.n_bos + switches.keep_prefix if (switches.keep_bos or switches.keep_prefix) else 0
    end = L - prompt.n_cue if switches.keep_cue else L
    return min(start, end), end


def wire_mask(prompt: Prompt, switches: EvalSwitches) -> torch.Tensor:
    """Bool [L]: True where the position crosses the wire (the rest is the receiver's own text)."""
    m = torch.zeros(len(prompt.ids), dtype=torch.bool)
    s, e = wire_span(prompt, switches)
    m[s:e] = True
    return m


def wire_text(prompt: Prompt, switches: EvalSwitches, pipeline=None) -> str:
    """The text of the wire span (the context's text in the default scope)."""
    if switches.scope == "context" or (pipeline is not None and pipeline.reads != "embeds"):
        return prompt.context_text
    return ""


def as_pipeline(lm, transform) -> Pipeline:
    """A pipeline from what a caller passed: a Pipeline; None (the text
    baseline); or a per-token tensor function [N, d] -> [N, d] (sent as the
    fp32 embeddings, transformed by the receiver)."""
    if transform is None:
        return text_pipeline(lm.tokenizer, lm)
    if isinstance(transform, Pipeline) or hasattr(transform, "receive"):
        return transform
    return EmbeddingPipeline("transform", lm.embed, lambda x: x, transform, FloatQuantizer(32), lm.d_model, lm=lm)


def span_payloads(pipeline: Pipeline, prompts: Sequence[Prompt], switches: EvalSwitches
                  ) -> tuple[list[Payload], list[int]]:
    """The payload of every distinct wire span (a paragraph asked about five
    times is sent once) and the number of tokens each replaces."""
    seen: dict[tuple, Payload] = {}
    for p in prompts:
        s, e = wire_span(p, switches, pipeline)
        key = tuple(p.ids[s:e])
        if key not in seen:
            seen[key] = pipeline.send(wire_text(p, switches, pipeline), p.ids[s:e])
    return list(seen.values()), [len(k) for k in seen]


def prompt_payloads(prompts: Sequence[Prompt], pipeline: Pipeline, switches: EvalSwitches) -> list[Payload]:
    """Each prompt's payload (the pipeline memoises one per distinct wire span)."""
    out = []
    for p in prompts:
        s, e = wire_span(p, switches, pipeline)
        out.append(pipeline.send(wire_text(p, switches, pipeline), p.ids[s:e]))
    return out


@torch.no_grad()
def pipeline_rows(lm, prompts: Sequence[Prompt], pipeline: Pipeline, switches: EvalSwitches,
                  payloads: Sequence[bytes] | None = None) -> list[torch.Tensor]:
    """What the LLM reads for each prompt: the prompt's own text before and
    after the wire span, and in between what the receiver made of the
    payload (`payloads`: given per prompt, else each prompt's own). Ids ([L])
    for a pipeline that reads ids, embeddings ([L, d], float32) otherwise; a
    row may be shorter than the prompt (a sequence compressor sends fewer
    positions than tokens). Not for K/V readings (see kv_rows)."""
    payloads = prompt_payloads(prompts, pipeline, switches) if payloads is None else payloads
    rows = []
    for p, pl in zip(prompts, payloads):
        s, e = wire_span(p, switches, pipeline)
        got = pipeline.receive(pl)
        if pipeline.reads_ids:
            rows.append(torch.cat([torch.tensor(p.ids[:s], dtype=torch.long), got.long().cpu(),
                                   torch.tensor(p.ids[e:], dtype=torch.long)]))
            continue
        ids = torch.tensor(p.ids, dtype=torch.long, device=lm.device)
        row = torch.cat([lm.embed(ids[:s]).float(), got.float().to(lm.device), lm.embed(ids[e:]).float()])
        limit = torch.finfo(lm.dtype).max if lm.dtype.is_floating_point else float("inf")
        if not torch.isfinite(row).all() or float(row.abs().max()) > limit:
            raise LatentWireError(f"the reconstructed embeddings are not finite in {lm.dtype} (max |x| "
                                  f"{float(row.abs().max()):.3g}); use --dtype float32 or --calibration rms")
        rows.append(row)
    return rows


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


@torch.no_grad()
def pipeline_embeds(lm, prompts: Sequence[Prompt], transform, switches: EvalSwitches,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded embeddings the LLM reads for these prompts under a pipeline."""
    pipe = as_pipeline(lm, transform)
    rows = pipeline_rows(lm, prompts, pipe, switches)
    if pipe.reads_ids:
        rows = [lm.embed(r.to(lm.device)).float() for r in rows]
    return pad_rows(rows, pad_id)


def generate_predictions(lm, prompts: Sequence[Prompt], transform: Pipeline | EmbedTransform | None = None,
                         switches: EvalSwitches | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                         use_input_ids: bool = False, desc: str = "generate", progress: bool = True,
                         shard: tuple[int, int] = (0, 1), share_prefix: bool = True,
                         run_prefix_cache: bool = True, payloads: Sequence[bytes] | None = None) -> list[str | None]:
    """Answers for every prompt, batched (plan_batches), in order.

    `transform`: the pipeline (None: the text baseline; a per-token tensor
    function is wrapped by `as_pipeline`). `use_input_ids`: the text
    baseline reads its ids through `input_ids` (else through the embedding
    module as `inputs_embeds`, the same numbers).

    `share_prefix`: prefill a prefix shared by several rows of a batch once
    (tree_generate) when that computes fewer positions than prefilling every
    row in full; with `run_prefix_cache`, the prefix shared by every prompt
    of the run (the shots) is prefilled once per run, not once per batch. `shard=(rank, n)`: generate only batches j with j % n == rank
    and leave None elsewhere (dist.gather_filled merges the ranks); every
    question is generated in exactly the batch it would have had in a single
    process -- same padding, same numbers. `payloads`: one per prompt, read
    instead of the prompts' own contexts (`latentwire.ask`: a payload received
    from elsewhere, the prompt built around an empty context).
    """
    tok = lm.tokenizer
    switches = switches or EvalSwitches()
    stops = stop_token_ids(tok)
    rank, n_shards = shard
    batches = plan_batches(prompts, batch_size, share_prefix)[rank::n_shards]
    pipe = as_pipeline(lm, transform)
    if use_input_ids and not pipe.reads_ids:
        raise ValueError("use_input_ids: only a text pipeline gives token ids")
    window = sliding_window(lm.model)
    run_prefix = None
    if share_prefix and run_prefix_cache and len(prompts) > 1:
        first = torch.tensor(prompts[0].ids)
        run_prefix = RunPrefix(min(common_prefix_len(first, torch.tensor(p.ids)) for p in prompts))
    preds: list[str | None] = [None] * len(prompts)
    heads: dict[tuple, object] = {}
    bar = tqdm(total=sum(map(len, batches)), desc=desc, disable=not progress, leave=False)
    for idx in batches:
        pls = None if payloads is None else [payloads[i] for i in idx]
        if pipe.reads == "kv":
            gen = kv_generate(lm, [prompts[i] for i in idx], pipe, pls, max_new_tokens, stops, heads)
            for i, g in zip(idx, gen):
                preds[i] = decode_answer(tok, g)
            bar.update(len(idx))
            continue
        rows = pipeline_rows(lm, [prompts[i] for i in idx], pipe, switches, pls)
        if pipe.reads_ids and not use_input_ids:
            rows = [lm.embed(r.to(lm.device)).float() for r in rows]
        x, mask = pad_rows(rows, tok.pad_token_id)
        levels = choose_tree(rows, max_new_tokens, window) if share_prefix else None
        gen = None
        if levels is not None:
            try:
                gen = tree_generate(lm.model, levels, use_ids=use_input_ids, pad_id=tok.pad_token_id,
                                    max_new_tokens=max_new_tokens, stop_ids=stops, run_prefix=run_prefix)
            except CacheNotCopyable as e:
                warnings.warn(f"{e}: prefilling every row in full (as with --no-share-prefix)")
                share_prefix = False
        if gen is None:
            kw = {"input_ids": x} if use_input_ids else {"inputs_embeds": x}
            gen = greedy_generate(lm.model, mask, max_new_tokens=max_new_tokens, stop_ids=stops, **kw)
        for i, g in zip(idx, gen):
            preds[i] = decode_answer(tok, g)
        bar.update(len(idx))
    bar.close()
    return preds


@torch.no_grad()
def kv_generate(lm, prompts: Sequence[Prompt], pipeline: Pipeline, payloads: Sequence[bytes] | None,
                max_new_tokens: int, stop_ids: Sequence[int], heads: dict) -> list[list[int]]:
    """Greedy answers for a pipeline whose receiver gives keys and values: the
    cache of [head][reading] per row (readings padded to the longest, padding
    masked), then each row's question and cue, left-padded so that every
    row's last column is its cue; positions come from the mask, so a row sees
    the positions it would alone. `heads`: the head caches computed so far."""
    from .forward import head_cache, reading_cache
    payloads = prompt_payloads(prompts, pipeline, EvalSwitches()) if payloads is None else payloads
    readings = [pipeline.receive(pl) for pl in payloads]
    head = tuple(prompts[0].head_ids)
    if any(tuple(p.head_ids) != head for p in prompts):
        raise ValueError("kv_generate: every prompt of a batch must share the prompt head")
    for r in readings:
        if not isinstance(r, KVReading):
            raise LatentWireError(f"{pipeline.name}: reads 'kv' but its receiver gave {type(r).__name__}")
        if r.positions and r.start != len(head):
            raise LatentWireError(f"{pipeline.name}: its keys/values were placed after a {r.start}-token prompt "
                                  f"head; this receiver's head has {len(head)} tokens (another template?)")
    if head not in heads:
        heads[head] = head_cache(lm, head)
    cache, past = reading_cache(lm, heads[head], len(head), readings, "kv")
    tails = [p.ids[p.ctx_end:] for p in prompts]
    x, tmask = left_pad(tails, lm.tokenizer.pad_token_id)
    dev = lm.device
    mask = torch.cat([past.long(), tmask.to(dev)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    S = x.shape[1]
    out = lm.model(input_ids=x.to(dev), attention_mask=mask, position_ids=pos[:, -S:], use_cache=True,
                   **{_cache_kw(lm.model): cache}, **logits_kw(lm.model))
    return _decode(lm.model, out, mask, pos[:, -1:], True, max_new_tokens, stop_ids)


def generate_one_at_a_time(lm, prompts: Sequence[Prompt], max_new_tokens: int = 16, desc: str = "one-by-one",
                           progress: bool = True) -> list[str]:
    """The seed's evaluation loop: one question per forward pass, no batching."""
    return [generate_predictions(lm, [p], batch_size=1, max_new_tokens=max_new_tokens, progress=False,
                                 share_prefix=False)[0]
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
