"""The evaluation's rows: what the frozen LLM reads for each prompt under a
pipeline, batched, and the answers decoded from it.

A *pipeline* (`wire.Pipeline`) is a sender and a receiver: the sender turns
the part of a prompt that crosses the wire (`wire_span`: the context, or with
`--wire-scope prompt` everything but the kept BOS/prefix/answer cue -- the
seed's setting) into a payload of bytes; the receiver turns the payload into
what the frozen LLM reads in its place. Every pipeline -- text, Stage 1, and
any later one -- reaches the LLM through `pipeline_rows` (ids, embeddings) or
`kv_rows` (keys/values), here: the prompt's own text around the receiver's
reading. Which prompts share a batch is decided here too (`plan_batches`):
`generate_predictions` answers a run's prompts; `answer`, one prompt from a
payload received from elsewhere (`latentwire.ask`).

The decoding itself -- greedy loops over ids, embeddings or a KV cache, the
shared-prefix tree -- is `decode.py`, which knows nothing of prompts, wire
spans or payloads: this module turns those into its tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data import Prompt
from ..llm.decode import (BatchDecoder, RunPrefix, common_prefix_len, decode_answer, greedy_generate, kv_generate, pad_rows,
                     stop_token_ids)
from ..errors import LatentWireError
from ..pipelines.base import EmbeddingPipeline, KVReading, Pipeline
from ..pipelines.text import text_pipeline
from ..wire.wire import FloatQuantizer, Payload
from ..llm.forward import head_cache, reading_cache

# [N, d] -> [N, d], row-wise: a row's output depends only on that row (every
# compressor and adapter here is per token); diagnostics rely on it.
EmbedTransform = Callable[[torch.Tensor], torch.Tensor]


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
                  payloads: Sequence[bytes] | None = None, embed_ids: bool = False) -> list[torch.Tensor]:
    """What the LLM reads for each prompt: the prompt's own text before and
    after the wire span, and in between what the receiver made of the
    payload (`payloads`: given per prompt, else each prompt's own). Ids ([L])
    for a pipeline that reads ids -- with `embed_ids`, read through the
    embedding module instead (the same numbers as `inputs_embeds`) --,
    embeddings ([L, d], float32) otherwise; a row may be shorter than the
    prompt (a sequence compressor sends fewer positions than tokens). Not for
    K/V readings (see kv_rows)."""
    payloads = prompt_payloads(prompts, pipeline, switches) if payloads is None else payloads
    rows = []
    for p, pl in zip(prompts, payloads):
        s, e = wire_span(p, switches, pipeline)
        got = pipeline.receive(pl)
        if pipeline.reads_ids:
            row = torch.cat([torch.tensor(p.ids[:s], dtype=torch.long), got.long().cpu(),
                             torch.tensor(p.ids[e:], dtype=torch.long)])
            rows.append(lm.embed(row.to(lm.device)).float() if embed_ids else row)
            continue
        ids = torch.tensor(p.ids, dtype=torch.long, device=lm.device)
        row = torch.cat([lm.embed(ids[:s]).float(), got.float().to(lm.device), lm.embed(ids[e:]).float()])
        limit = torch.finfo(lm.dtype).max if lm.dtype.is_floating_point else float("inf")
        if not torch.isfinite(row).all() or float(row.abs().max()) > limit:
            raise LatentWireError(f"the reconstructed embeddings are not finite in {lm.dtype} (max |x| "
                                  f"{float(row.abs().max()):.3g}); use --dtype float32 or --calibration rms")
        rows.append(row)
    return rows


@torch.no_grad()
def pipeline_embeds(lm, prompts: Sequence[Prompt], transform, switches: EvalSwitches,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded embeddings the LLM reads for these prompts under a pipeline."""
    return pad_rows(pipeline_rows(lm, prompts, as_pipeline(lm, transform), switches, embed_ids=True), pad_id)


def generate_predictions(lm, prompts: Sequence[Prompt], transform: Pipeline | EmbedTransform | None = None,
                         switches: EvalSwitches | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                         use_input_ids: bool = False, desc: str = "generate", progress: bool = True,
                         shard: tuple[int, int] = (0, 1), share_prefix: bool = True,
                         run_prefix_cache: bool = True) -> list[str | None]:
    """Answers for every prompt, batched (plan_batches), in order.

    `transform`: the pipeline (None: the text baseline; a per-token tensor
    function is wrapped by `as_pipeline`). `use_input_ids`: the text
    baseline reads its ids through `input_ids` (else through the embedding
    module as `inputs_embeds`, the same numbers).

    `share_prefix`: prefill a prefix shared by several rows of a batch once
    (decode.BatchDecoder) when that computes fewer positions than prefilling
    every row in full; with `run_prefix_cache`, the prefix shared by every
    prompt of the run (the shots) is prefilled once per run, not once per
    batch. `shard=(rank, n)`: generate only batches j with j % n == rank
    and leave None elsewhere (dist.gather_filled merges the ranks); every
    question is generated in exactly the batch it would have had in a single
    process -- same padding, same numbers. One prompt and a payload from
    elsewhere: `answer`.
    """
    tok = lm.tokenizer
    switches = switches or EvalSwitches()
    rank, n_shards = shard
    batches = plan_batches(prompts, batch_size, share_prefix)[rank::n_shards]
    pipe = as_pipeline(lm, transform)
    if use_input_ids and not pipe.reads_ids:
        raise ValueError("use_input_ids: only a text pipeline gives token ids")
    run_prefix = None
    if share_prefix and run_prefix_cache and len(prompts) > 1:
        first = torch.tensor(prompts[0].ids)
        run_prefix = RunPrefix(min(common_prefix_len(first, torch.tensor(p.ids)) for p in prompts))
    decoder = BatchDecoder(lm.model, tok.pad_token_id, stop_token_ids(tok), max_new_tokens, share_prefix, run_prefix)
    preds: list[str | None] = [None] * len(prompts)
    heads: dict[tuple, object] = {}
    bar = tqdm(total=sum(map(len, batches)), desc=desc, disable=not progress, leave=False)
    for idx in batches:
        ps = [prompts[i] for i in idx]
        if pipe.reads == "kv":
            gen = kv_generate(lm.model, *kv_rows(lm, ps, pipe, None, heads), pad_id=tok.pad_token_id,
                              max_new_tokens=max_new_tokens, stop_ids=decoder.stop_ids)
        else:
            gen = decoder(pipeline_rows(lm, ps, pipe, switches, embed_ids=not use_input_ids))
        for i, g in zip(idx, gen):
            preds[i] = decode_answer(tok, g)
        bar.update(len(idx))
    bar.close()
    return preds


@torch.no_grad()
def answer(lm, prompt: Prompt, pipeline: Pipeline, payload: bytes, max_new_tokens: int = 16) -> str:
    """One prompt's answer from a payload received from elsewhere
    (`latentwire.ask`: the prompt built around an empty context): its row --
    the payload's reading in the context's place, or its keys/values -- as
    generate_predictions would read it in a batch of one (no padding, no
    prefix tree: the same numbers), greedily decoded."""
    tok = lm.tokenizer
    kw = {"max_new_tokens": max_new_tokens, "stop_ids": stop_token_ids(tok)}
    if pipeline.reads == "kv":
        gen = kv_generate(lm.model, *kv_rows(lm, [prompt], pipeline, [payload], {}), pad_id=tok.pad_token_id, **kw)
    else:
        row = pipeline_rows(lm, [prompt], pipeline, EvalSwitches(), [payload], embed_ids=True)[0]
        gen = greedy_generate(lm.model, torch.ones((1, len(row)), dtype=torch.long), inputs_embeds=row[None], **kw)
    return decode_answer(tok, gen[0])


@torch.no_grad()
def kv_rows(lm, prompts: Sequence[Prompt], pipeline: Pipeline, payloads: Sequence[bytes] | None, heads: dict):
    """What the LLM reads for each prompt under a pipeline whose receiver
    gives keys and values: the cache of [head][reading] per row (readings
    padded to the longest, padding masked), its past mask, and each row's own
    ids after the context (question and cue) -- decode.kv_generate's inputs.
    `heads`: the head caches computed so far."""
    payloads = prompt_payloads(prompts, pipeline, EvalSwitches()) if payloads is None else payloads
    readings = [pipeline.receive(pl) for pl in payloads]
    head = tuple(prompts[0].head_ids)
    if any(tuple(p.head_ids) != head for p in prompts):
        raise ValueError("kv_rows: every prompt of a batch must share the prompt head")
    for r in readings:
        if not isinstance(r, KVReading):
            raise LatentWireError(f"{pipeline.name}: reads 'kv' but its receiver gave {type(r).__name__}")
        if r.positions and r.start != len(head):
            raise LatentWireError(f"{pipeline.name}: its keys/values were placed after a {r.start}-token prompt "
                                  f"head; this receiver's head has {len(head)} tokens (another template?)")
    if head not in heads:
        heads[head] = head_cache(lm, head)
    cache, past = reading_cache(lm, heads[head], len(head), readings, "kv")
    return cache, past, [p.ids[p.ctx_end:] for p in prompts]
