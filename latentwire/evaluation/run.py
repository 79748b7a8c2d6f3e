"""The main job, stage by stage: load the model and the data -> Stage 1
(fit the compressor and quantizer, train the adapter) -> the learned
compressor (train or load) -> build every pipeline through the registry ->
the text answers (cached) -> every pipeline on the same questions, learned
ones beside their controls (compare.py) -> diagnostics -> metrics.json and
the report. Also `text_baseline_eval` for `latentwire eval`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..util import dist
from .answers import cached_predictions, sharded_predictions, text_predictions
from .compare import (add_controls, answer_split, control_deltas, measure_readings, pipeline_ratio, pipeline_entry, probe_set, score_rows, send_all,
                      wire_entry)
from ..config import RunConfig
from ..data import Example, PromptBuilder, interleave_by_title, load_squad_hub, load_squad_json, split_by_title, \
    synthetic_squad
from ..errors import LatentWireError
from .generate import EvalSwitches
from .metrics import pipeline_metrics
from ..llm.models import load_model
from ..pipelines import KINDS, BuildContext, build
from ..pipelines.text import text_pipeline
from .report import answer_split_table, controls_table, metrics_table, write_report
from .rundir import prepare_run_dir, write_predictions
from ..util.runio import JsonlLogger, NullLogger, seed_everything, write_json
from ..stage1.stage1 import Stage1, check_saved_artifacts, fit_stage1, training_pool
from ..wire.wire import text_references
from ..pipelines.cross import CrossModelPipeline, SenderIdsPipeline
from ..encoder.seqcomp import prepare_learned, read_compressor_file
from ..pipelines.learned import LearnedSeqPipeline
from ..pipelines.optimized import fit_summary


def load_data(cfg: RunConfig) -> tuple[list[Example], list[Example], dict]:
    """Train/eval examples from disjoint articles, and a description."""
    d = cfg.data

    def load(src, flag, split):
        return load_squad_hub(split) if src == "hub" else load_squad_json(src, flag)

    if d.squad_train is None and d.squad_eval is not None:  # `latentwire eval` needs no training data
        ev, rev = load(d.squad_eval, "--squad-eval", "validation")
        train, desc = [], {"train": None, "eval": rev.source, "eval_report": asdict(rev)}
    elif d.squad_train is not None and d.squad_eval is None:  # train-encoder holds out its own paragraphs
        train, rtr = load(d.squad_train, "--squad-train", "train")
        ev, desc = [], {"train": rtr.source, "eval": None, "train_report": asdict(rtr)}
    elif d.squad_train is not None:
        train, rtr = load(d.squad_train, "--squad-train", "train")
        ev, rev = load(d.squad_eval, "--squad-eval", "validation")
        shared = {e.title for e in train} & {e.title for e in ev}
        if shared:
            raise LatentWireError(f"--squad-train and --squad-eval share {len(shared)} article(s) "
                                  f"(e.g. {sorted(shared)[0]!r}); evaluation articles must be unseen")
        desc = {"train": rtr.source, "eval": rev.source, "train_report": asdict(rtr), "eval_report": asdict(rev)}
    else:
        allx = synthetic_squad(d.synthetic_articles, d.seed)
        train, ev = split_by_title(allx, d.eval_fraction, d.seed)
        desc = {"train": f"synthetic(articles={d.synthetic_articles}, seed={d.seed}) train split",
                "eval": "synthetic eval split (disjoint articles)"}
    if d.max_train_questions:
        train = train[:d.max_train_questions]
    ev = interleave_by_title(ev)
    if d.max_eval_contexts:  # the first N paragraphs (articles round-robin), every question on them
        keep = set(list(dict.fromkeys(e.context for e in ev))[:d.max_eval_contexts])
        ev = [e for e in ev if e.context in keep]
    if d.max_eval:
        ev = ev[:d.max_eval]
    desc["eval_articles"] = len({e.title for e in ev})
    desc["train_articles"] = len({e.title for e in train})
    return train, ev, desc


@dataclass
class Inputs:
    """What the data stage gives the rest of a run."""
    train: list[Example]  # training examples (the fit articles)
    eval: list[Example]
    desc: dict
    prompts: list  # evaluation prompts
    pool: torch.Tensor  # token ids the compressor is fitted on and Phase 1 samples from
    select: torch.Tensor  # token occurrences of held-out training articles: Phase 1 picks its best state on them
    builder: PromptBuilder  # the evaluation prompts' builder (template, budget)


def build_inputs(cfg: RunConfig, lm, data: tuple | None = None) -> Inputs:
    """Stage "data": train/eval examples, eval prompts, the training token
    pool, and the selection tokens: ~10% of the training articles (at least
    one) are held out of the pool, so that Phase 1 chooses its best state on
    text it was not fitted on -- never on evaluation articles. `data`: what
    load_data gave, when it was read earlier (before the model loaded)."""
    train, ev, desc = data if data is not None else load_data(cfg)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    select: list[Example] = []
    if len({e.title for e in train}) >= 2:
        train, select = split_by_title(train, 0.1, cfg.data.seed)
    sel_ids: list[int] = []
    for c in dict.fromkeys(e.context for e in select):
        sel_ids += builder.context_ids(c)
    sel = torch.tensor(sel_ids[:8192], dtype=torch.long)
    desc["select_articles"] = len({e.title for e in select})
    return Inputs(train, ev, desc, [builder.build(e) for e in ev], training_pool(builder, train), sel, builder)


def seq_prompt_builder(cfg: RunConfig, lm) -> PromptBuilder:
    """Prompts of the learned sequence compressor's training, under --seq-max-tokens."""
    return PromptBuilder(lm.tokenizer, cfg.data.template, cfg.seq.seq_max_tokens, cfg.data.bos != "none",
                         flag="--seq-max-tokens")


def seq_train_prompts(cfg: RunConfig, lm, train: Sequence[Example]) -> list:
    """The learned compressor's training prompts, articles round-robin, so that
    the first --seq-max-questions span every training article."""
    b2 = seq_prompt_builder(cfg, lm)
    return [b2.build(e) for e in interleave_by_title(train)]


def _resolve_placement(cfg: RunConfig) -> tuple[str, str | None]:
    """Device and device_map for this process: one GPU per rank under a
    launcher; --device-map (one process spread over GPUs) only when alone."""
    d = dist.current()
    if d.enabled and cfg.model.device_map:
        raise LatentWireError("--device-map places one model across GPUs in a single process; it cannot be combined "
                              f"with {d.world} launched processes (drop --device-map, or launch one process)")
    if d.enabled and cfg.model.device == "auto" and torch.cuda.is_available():
        return f"cuda:{d.local_rank}", None
    return cfg.model.device, cfg.model.device_map


def eval_switches(cfg: RunConfig) -> EvalSwitches:
    """Which prompt positions cross the wire, from the flags."""
    return EvalSwitches(keep_bos=cfg.data.bos == "original", keep_prefix=cfg.eval.keep_prefix,
                        keep_cue=cfg.eval.anchor == "original", scope=cfg.eval.wire_scope)


def references(lm, prompts, cfg: RunConfig, log=print) -> dict:
    """The text references of these prompts' contexts (UTF-8, zstd, lzma, ids, the LLM's code), per the flags."""
    return text_references(lm, prompts, cfg.eval.lm_code_length, cfg.eval.ac_contexts, cfg.eval.batch_size, log)


def text_baseline_eval(cfg: RunConfig) -> dict:
    """`latentwire eval`: the text pipeline alone, written to cfg.out."""
    t0 = time.time()
    cfg.model.validate()
    cfg.data.validate(need_train=False)
    cfg.eval.validate()
    out = Path(cfg.out)
    d = dist.current()
    if d.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LatentWireError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    _, ev, desc = load_data(cfg)  # a bad data file is reported before the model loads
    device, device_map = _resolve_placement(cfg)
    lm = load_model(cfg.model.model, device, cfg.model.dtype, device_map=device_map)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    prompts = [builder.build(e) for e in ev]
    # always generated afresh here (this *is* the baseline measurement); the
    # answers are added to the cache that `latentwire run` reads
    preds = text_predictions(lm, prompts, cfg, read_cache=False)
    if not d.is_main:
        return {}
    rows = score_rows(prompts, preds)
    write_predictions(out, "predictions", rows)
    m = {"model": lm.source, "n_eval": len(prompts), "data": desc,
         "wire_references": references(lm, prompts, cfg),
         "pipelines": {"text": pipeline_metrics(rows, cfg.eval.n_boot, cfg.data.seed)
                       | {"wire": wire_entry(text_pipeline(lm.tokenizer, lm), prompts, EvalSwitches())}},
         "truncated_prompts": sum(p.truncated for p in prompts), "config": asdict(cfg)}
    m["wall_s"] = time.time() - t0
    write_json(out / "metrics.json", m)
    return m


def _quiet(*_a, **_k) -> None:
    pass


CROSS_KINDS = ("truncate", "surprisal", "none")
"""Kinds that run on a sender model other than the receiver: token choices, read by the receiver as text."""


def build_pipelines(cfg: RunConfig, lm, prompts, builder: PromptBuilder, out: Path, sender=None,
                    learned=None, codec=None) -> dict:
    """Every --sequence kind at every --sequence-ratios ratio and every --pipeline spec, built through the
    registry (`learned`: the compressor trained or loaded by this run). With --sender-model, token kinds are
    chosen on the sender and read by the receiver through text, plus the `sender_ids` row. `codec`: the
    --codec-model of the LLM-coded kinds, when it is not the receiver."""
    head = prompts[0].head_ids
    ratios = cfg.eval.sequence_ratio_list() or [4.0]

    def head_of(model) -> list[int]:  # another model's own prompt head (its tokens of the same text)
        return PromptBuilder(model.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens,
                             cfg.data.bos != "none").build(prompts[0].example).head_ids
    ctx = BuildContext(lm=lm, head_ids=head, cfg=cfg, out=out, extra={"builder": builder}, codec=codec,
                       codec_head_ids=None if codec is None else head_of(codec))
    s_ctx = None
    if sender is not None:
        s_ctx = BuildContext(lm=sender, head_ids=head_of(sender), cfg=cfg, out=out)

    def make(spec: str, ratio: float) -> list:
        if s_ctx is not None and spec in CROSS_KINDS:
            return [CrossModelPipeline(p, sender.tokenizer, lm.tokenizer, sender.source, lm)
                    for p in build(spec, BuildContext(**{**s_ctx.__dict__, "ratio": ratio}))]
        return build(spec, BuildContext(**{**ctx.__dict__, "ratio": ratio, "sender": sender}))

    pipes: dict = {}
    if sender is not None:
        pipes["sender_ids"] = SenderIdsPipeline(sender.tokenizer, sender.vocab_size, lm.vocab_size, sender.source, lm)
    specs = cfg.eval.sequence_kinds() + cfg.eval.pipeline_specs()
    per_ratio = [s for s in specs if s in KINDS and KINDS[s].ratio]
    for spec in [s for s in specs if s not in per_ratio]:  # once each, then every ratio kind at each ratio
        if spec == "learned" and learned is not None:
            pipes[learned.name] = learned
            continue
        kind, at, r = spec.partition("@")  # KIND@r: that kind at that ratio only
        for p in make(kind, float(r)) if at else make(spec, ratios[0]):
            pipes[p.name] = p
    for r in ratios:
        for spec in per_ratio:
            for p in make(spec, r):
                pipes[p.name] = p
    return pipes, lambda kind, r: make(kind, r)[0]


def run_experiment(cfg: RunConfig, use_cache: bool = True, resume: bool = False, overwrite: bool = False,
                   log=print) -> dict:
    """`latentwire run` into cfg.out: the text baseline, Stage 1 (fit, train,
    evaluate; unless --no-stage1), the learned compressor (trained here), and
    every --sequence / --pipeline pipeline, all scored on the same questions
    through the wire, the learned ones beside their controls."""
    t0 = time.time()
    cfg.validate()
    out = Path(cfg.out)
    d = dist.current()
    prepare_run_dir(out, resume, overwrite, cfg, main=d.is_main)
    dist.barrier(d)
    if not d.is_main:  # one process writes; the others compute their share quietly
        log = _quiet
    events = JsonlLogger(out / "events.jsonl") if d.is_main else NullLogger()
    if d.is_main:
        write_json(out / "config.json", asdict(cfg))
    seed_everything(cfg.data.seed)

    data = load_data(cfg)  # a bad data file is reported before the model loads
    if "learned" in cfg.eval.sequence_kinds():
        for flag, path in (("--seq-path", cfg.seq.seq_path), ("--seq-sender-path", cfg.seq.seq_sender_path)):
            if path:
                read_compressor_file(path, flag)  # so is a bad saved compressor
    device, device_map = _resolve_placement(cfg)
    lm = load_model(cfg.model.model, device, cfg.model.dtype, device_map=device_map)
    cfg.compress.validate(lm.d_model)
    k = cfg.compress.resolve_dim(lm.d_model)
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens > max_pos:
        raise LatentWireError(f"--max-prompt-tokens {cfg.data.max_prompt_tokens} + --max-new-tokens "
                              f"{cfg.eval.max_new_tokens} exceeds the model's context window ({max_pos})")
    sender = None
    if cfg.model.cross():  # the model on the sending side, when it is not the receiver
        sender = load_model(cfg.model.sender_model, device, cfg.model.dtype, device_map=device_map)
        events.log(event="sender_model", source=sender.source, d_model=sender.d_model, vocab=sender.vocab_size)
    codec = None
    if cfg.model.codec_model is not None and cfg.model.codec_model != cfg.model.model:
        codec = load_model(cfg.model.codec_model, device, cfg.model.dtype, device_map=device_map)
        events.log(event="codec_model", source=codec.source, d_model=codec.d_model, vocab=codec.vocab_size)
    fp = lm.fingerprint() | {"compress_dim": k}
    if cfg.eval.stage1:  # saved artifacts are checked before any work starts
        check_saved_artifacts(cfg, fp)
    events.log(event="model", source=lm.source, d_model=lm.d_model, vocab=lm.vocab_size, device=str(lm.device),
               dtype=str(lm.dtype))

    inp = build_inputs(cfg, lm, data)
    prompts = inp.prompts
    events.log(event="data", n_train=len(inp.train), n_eval=len(inp.eval), **dict(inp.desc.items()))
    sw = eval_switches(cfg)
    stage1 = None
    if cfg.eval.stage1:
        stage1 = Stage1(*fit_stage1(cfg, lm, inp, fp, k, out, events, resume, log, sw))
    learned, seq_summary = None, None
    if "learned" in cfg.eval.sequence_kinds():
        comp, layer, seq_summary = prepare_learned(lm, cfg.seq, seq_train_prompts(cfg, lm, inp.train),
                                                   prompts[0].head_ids, out, cfg.seq.seq_seed, cfg.progress, resume,
                                                   log, use_cache=use_cache, sender=sender)
        learned = LearnedSeqPipeline(lm, comp, layer, sender=sender)
        events.log(event="seq_trained", **{k2: v for k2, v in seq_summary.items() if k2 not in ("first", "last")})

    pipes: dict = {} if stage1 is None else stage1.pipelines(cfg, lm)
    built, baseline = build_pipelines(cfg, lm, prompts, inp.builder, out, sender, learned, codec)
    pipes |= built
    head = {"compressor": None if stage1 is None else stage1.describe(cfg, lm, k),
            "adapter": None if stage1 is None else
            cfg.adapter.adapter + (" (seed preset)" if cfg.adapter.preset == "seed" else ""),
            "train": {} if stage1 is None else stage1.summary, "seq_train": seq_summary}
    if sender is not None:
        head["sender_model"] = {"model": sender.source, "d_model": sender.d_model, "vocab_size": sender.vocab_size}
    if codec is not None:
        head["codec_model"] = {"model": codec.source, "vocab_size": codec.vocab_size}
    return evaluate_pipelines(cfg, lm, inp, pipes, baseline, out, head, t0, use_cache=use_cache, log=log,
                              stage1=stage1)


def evaluate_pipelines(cfg: RunConfig, lm, inp: Inputs, pipes: dict, baseline, out: Path, head: dict, t0: float,
                       use_cache: bool = True, log=print, stage1=None) -> dict:
    """The evaluation every run shares: the text answers (the reference of every row, cached), then every
    pipeline on the same questions, the learned ones beside their controls (`baseline(kind, r)` builds a
    missing `none` / truncation control), reading probes, metrics.json and the report."""
    d = dist.current()
    prompts = inp.prompts
    sw = eval_switches(cfg)
    cache_stats: dict = {}
    tg = time.time()
    text_preds = text_predictions(lm, prompts, cfg, read_cache=use_cache, stats=cache_stats)
    text_gen_s = time.time() - tg
    text_rows = score_rows(prompts, text_preds, text_preds)
    if d.is_main:
        write_predictions(out, "predictions_text", text_rows)
    nb, seed = cfg.eval.n_boot, cfg.data.seed
    text_entry = pipeline_entry(text_rows, text_rows, nb, seed)
    log(f"text baseline: F1 {text_entry['f1']:.2f} EM {text_entry['exact_match']:.2f} on {len(prompts)} questions "
        f"({cache_stats['misses']} generated, {cache_stats['hits']} read from the answer cache)")
    controls = add_controls(pipes, prompts, baseline)
    refs = references(lm, prompts, cfg, log) if d.is_main else {}
    metrics = {"model": lm.source, "d_model": lm.d_model, "vocab_size": lm.vocab_size, "n_eval": len(prompts),
               "data": inp.desc, **head, "truncated_prompts": sum(p.truncated for p in prompts),
               "wire_scope": cfg.eval.wire_scope, "wire_references": refs, "text_answer_cache": cache_stats,
               "pipelines": {"text": text_entry | {
                   "wire": wire_entry(text_pipeline(lm.tokenizer, lm), prompts, sw),
                   # only meaningful when every answer was generated here
                   "s_per_question": text_gen_s / len(prompts) if not cache_stats["hits"] else None}}}
    rows_by: dict[str, list] = {"text": text_rows}
    diags: dict = {}
    for name, pipe in pipes.items():
        send_all(pipe, prompts, sw, cfg.progress and d.is_main)
        wire = wire_entry(pipe, prompts, sw)
        tg, cached = time.time(), {}
        if getattr(pipe, "deterministic_answers", False):  # read from the answer cache when made before
            preds = cached_predictions(lm, prompts, cfg, pipe, read_cache=use_cache, stats=cached)
        else:
            preds = sharded_predictions(lm, prompts, pipe, sw, cfg, desc=name)
        gen_s = time.time() - tg
        if not d.is_main:
            continue  # scoring, diagnostics and writing happen once, on rank 0
        rows = score_rows(prompts, preds, text_preds)
        write_predictions(out, f"predictions_{name}", rows)
        rows_by[name] = rows
        entry = pipeline_entry(rows, text_rows, nb, seed) | {
            "s_per_question": gen_s / len(rows) if not cached.get("hits") else None, "wire": wire}
        if cached:
            entry["answer_cache"] = {k: cached[k] for k in ("hits", "misses", "path")}
            log(f"{name}: {cached['misses']} answers generated, {cached['hits']} read from the answer cache")
        if hasattr(pipe, "fitter"):
            entry["fits"] = fit_summary(pipe.fitter)
        metrics["pipelines"][name] = entry
        if stage1 is not None and name in stage1.names:
            diags[name] = stage1.diagnose(cfg, lm, prompts, name, pipe, sw, text_preds, preds, entry, out, log,
                                          metrics)
    if not d.is_main:
        return {}
    ratios = sorted({r for r in (pipeline_ratio(p) for p in pipes.values()) if r is not None})
    metrics["answer_split"] = answer_split(lm.tokenizer, prompts, rows_by, ratios, nb, seed, controls)
    if controls:
        for name, c in control_deltas(rows_by, controls, nb, seed).items():
            metrics["pipelines"][name]["controls"] = c
        probes = measure_readings(lm, prompts, probe_set(pipes | {"text": text_pipeline(lm.tokenizer, lm)},
                                                         controls), inp.builder, cfg.eval.probe_contexts)
        for name, r in probes.items():
            metrics["pipelines"].get(name, {})["reading_probe"] = r
        metrics["controls"] = controls
    metrics["wall_s"] = time.time() - t0
    metrics["world_size"] = d.world
    metrics["config"] = asdict(cfg)
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, diags, asdict(cfg))
    log("\n" + metrics_table(metrics))
    if controls:
        log("\n" + controls_table(metrics))
    if metrics.get("answer_split"):
        log("\n" + answer_split_table(metrics))
    if metrics.get("verdict"):
        log("\n".join(["", "verdict:"] + [f"- {v}" for v in metrics["verdict"]]))
    log(f"\nrun folder: {out} (report.md, metrics.json, predictions_*.jsonl)")
    return metrics


def evaluate_run(cfg: RunConfig, lm, pipes: Sequence, overwrite: bool = True, log=print) -> dict:
    """`latentwire.evaluate`: given pipeline objects on `lm`, the evaluation of `latentwire run` into cfg.out
    (evaluation data only; nothing is trained)."""
    t0 = time.time()
    cfg.data.validate(need_train=False)  # the evaluation settings are evaluate()'s own, checked by it
    out = Path(cfg.out)
    prepare_run_dir(out, False, overwrite, None)
    write_json(out / "config.json", asdict(cfg))
    seed_everything(cfg.data.seed)
    train, ev, desc = load_data(cfg)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    inp = Inputs(train, ev, desc, [builder.build(e) for e in ev], torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long), builder)
    pipes_d: dict = {}
    for p in pipes:
        if p.name in pipes_d or p.name == "text":
            raise LatentWireError(f"evaluate: two pipelines are named {p.name!r} (a row each needs its own name)")
        pipes_d[p.name] = p
    ctx = BuildContext(lm=lm, head_ids=inp.prompts[0].head_ids, cfg=cfg, extra={"builder": builder})

    def baseline(kind: str, r: float):
        return build(kind, BuildContext(**{**ctx.__dict__, "ratio": r}))[0]
    return evaluate_pipelines(cfg, lm, inp, pipes_d, baseline, out,
                              {"pipelines_given": [p.describe() for p in pipes]}, t0, log=log)
