"""The main job, stage by stage: load model -> data -> fit compressor ->
train adapter -> evaluate (text baseline, linear-PCA control, LatentWire)
-> diagnostics -> report. Also `text_baseline_eval` for `latentwire eval`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import __version__, dist
from .adapters import LinearAdapter, build_adapter, load_adapter_state, save_adapter
from .compress import check_meta, load_compressor, make_compressor, read_artifact
from .config import RunConfig
from .data import Example, PromptBuilder, interleave_by_title, load_squad_hub, load_squad_json, split_by_title, \
    synthetic_squad
from .diagnose import diagnose, findings, summary_lines
from .errors import LatentWireError
from .evaluate import EvalSwitches, generate_predictions, score_predictions, span_payloads, text_pipeline
from .wire import EmbeddingPipeline, FloatQuantizer, make_quantizer, wire_stats
from .metrics import bootstrap_ci
from .models import cache_root, load_model
from .report import metrics_table, write_report
from .runio import JsonlLogger, NullLogger, read_jsonl, seed_everything, write_json, write_jsonl
from .train import train_phase1, train_phase2, vocab_recon_metrics, vocab_sample


def load_data(cfg: RunConfig) -> tuple[list[Example], list[Example], dict]:
    """Train/eval examples from disjoint articles, and a description."""
    d = cfg.data

    def load(src, flag, split):
        return load_squad_hub(split) if src == "hub" else load_squad_json(src, flag)

    if d.squad_train is None and d.squad_eval is not None:  # `latentwire eval` needs no training data
        ev, rev = load(d.squad_eval, "--squad-eval", "validation")
        train, desc = [], {"train": None, "eval": rev.source, "eval_report": asdict(rev)}
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
    if d.max_eval:
        ev = ev[:d.max_eval]
    desc["eval_articles"] = len({e.title for e in ev})
    desc["train_articles"] = len({e.title for e in train})
    return train, ev, desc


def training_pool(builder: PromptBuilder, train: Sequence[Example]) -> torch.Tensor:
    """Token ids of the training text: each distinct context once, every
    question, plus the template's fixed parts -- what the compressor is fitted
    on and what Phase 1 samples corpus tokens from."""
    ids: list[int] = list(builder.prefix_ids) + list(builder.cue_ids)
    seen: set[str] = set()
    for e in train:
        if e.context not in seen:
            seen.add(e.context)
            ids += builder._ids(e.context)
        ids += builder._ids(e.question)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Inputs:
    """What the data stage gives the rest of a run."""
    train: list[Example]  # training examples (the fit articles)
    eval: list[Example]
    desc: dict
    prompts: list  # evaluation prompts
    pool: torch.Tensor  # token ids the compressor is fitted on and Phase 1 samples from
    select: torch.Tensor  # token occurrences of held-out training articles: Phase 1 picks its best state on them


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
    return Inputs(train, ev, desc, [builder.build(e) for e in ev], training_pool(builder, train), sel)


def seq_prompt_builder(cfg: RunConfig, lm) -> PromptBuilder:
    """Prompts of the learned sequence compressor's training, under --seq-max-tokens."""
    return PromptBuilder(lm.tokenizer, cfg.data.template, cfg.seq.seq_max_tokens, cfg.data.bos != "none",
                         flag="--seq-max-tokens")


def seq_train_prompts(cfg: RunConfig, lm, train: Sequence[Example]) -> list:
    """The learned compressor's training prompts, articles round-robin, so that
    the first --seq-max-questions span every training article."""
    b2 = seq_prompt_builder(cfg, lm)
    return [b2.build(e) for e in interleave_by_title(train)]


def fit_compressor(cfg: RunConfig, lm, pool: torch.Tensor, fp: dict):
    """Stage "compress": load --compressor-path (checked against `fp`), or fit
    PCA on the training tokens (streamed) or the vocabulary, or build the
    random/identity map. Fitting stays on the CPU."""
    k = cfg.compress.resolve_dim(lm.d_model)
    if cfg.compress.compressor_path:
        return load_compressor(cfg.compress.compressor_path, fp | {"kind": cfg.compress.compressor})
    if cfg.compress.compressor == "pca":
        src = pool if cfg.compress.fit_source == "corpus" else torch.arange(lm.vocab_size)
        return make_compressor("pca", k, cfg.data.seed).fit_token_ids(lambda t: lm.embed(t.to(lm.device)), src)
    return make_compressor(cfg.compress.compressor, k, cfg.data.seed).fit(d_model=lm.d_model)


def _fingerprint_sources() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("evaluate.py", "wire.py", "data.py", "models.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


# read once, when this module is imported (with the modules it imports): the
# code that generates answers is the code loaded now, even if the files on
# disk change while a long run goes on
_GENERATION_FINGERPRINT = _fingerprint_sources()


def generation_fingerprint() -> str:
    """sha256 of the source files whose code decides a text answer: the
    generation loop and prefix tree (evaluate), the wire the text takes
    (wire), prompt construction (data) and model loading (models), as they
    were when LatentWire was imported."""
    return _GENERATION_FINGERPRINT


def text_cache_key(lm, cfg: RunConfig) -> dict:
    """Everything that can change a text-baseline answer: the model's
    weights (content digest), dtype, device type, generation settings
    (batching and the shared-prefix switch change float rounding), library
    versions, and the generating code itself."""
    import transformers
    return {"model": lm.source, "weights": lm.weights_digest(), "dtype": str(lm.dtype), "device": lm.device.type,
            "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
            "share_prefix": cfg.eval.share_prefix, "torch": torch.__version__,
            "transformers": transformers.__version__, "latentwire": __version__, "code": generation_fingerprint()}


def _text_cache_path(key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root() / "text_baseline" / f"{h[:24]}.jsonl"


def _prompt_key(p) -> str:
    return hashlib.sha256(json.dumps(p.ids).encode()).hexdigest()[:32]


def text_predictions(lm, prompts, cfg: RunConfig, read_cache: bool = True, write_cache: bool = True,
                     stats: dict | None = None) -> list[str]:
    """Text-baseline answers. Greedy decoding is deterministic, so answers
    are cached per prompt under a key of everything that can change them
    (`text_cache_key`) and reused by later runs on the same questions
    (`--no-cache` to recompute). `stats` receives the hits and misses (for
    metrics.json). Rank 0 alone reads the cache and decides what to
    generate, so processes under a launcher cannot diverge."""
    key = text_cache_key(lm, cfg)
    path = _text_cache_path(key)
    d = dist.current()
    cache: dict[str, str] = {}
    keys = [_prompt_key(p) for p in prompts]
    if read_cache and d.is_main and path.exists():
        wanted = set(keys)
        for row in read_jsonl(path, skip_bad=True):
            if isinstance(row, dict) and row.get("key") in wanted and isinstance(row.get("prediction"), str):
                cache[row["key"]] = row["prediction"]
    cache = dist.broadcast(cache, d)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        new = sharded_predictions(lm, [prompts[i] for i in todo], None, None, cfg, desc="text baseline")
        if write_cache and d.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not (path.parent / (path.stem + ".key.json")).exists():
                write_json(path.parent / (path.stem + ".key.json"), key)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"key": keys[i], "prediction": p}) + "\n" for i, p in zip(todo, new)))
        cache.update({keys[i]: p for i, p in zip(todo, new)})
    if stats is not None:
        stats.update({"hits": len(prompts) - len(todo), "misses": len(todo), "read_cache": read_cache,
                      "path": str(path), "key": key})
    return [cache[k] for k in keys]


def sharded_predictions(lm, prompts, transform, switches, cfg: RunConfig, desc: str) -> list[str]:
    """generate_predictions over this process's share of the batches, merged
    across processes (a no-op split when there is one process)."""
    d = dist.current()
    mine = generate_predictions(lm, prompts, transform, switches, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                desc=desc, progress=cfg.progress and d.is_main, shard=(d.rank, d.world),
                                share_prefix=cfg.eval.share_prefix)
    return dist.gather_filled(mine, d)


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


def fit_quantizer(cfg: RunConfig, lm, comp, pool: torch.Tensor):
    """Stage "quantize": --bits per code dimension; scalar levels are fitted
    on the codes of (up to 200k) training tokens, never on evaluation text."""
    q = make_quantizer(cfg.compress.bits, cfg.compress.quantizer)
    if cfg.compress.bits in (16, 32):
        return q
    g = torch.Generator().manual_seed(cfg.data.seed)
    ids = pool[torch.randperm(pool.numel(), generator=g)[:200_000]]
    with torch.no_grad():
        z = torch.cat([comp.transform(lm.embed(ids[i:i + 16384].to(lm.device)).float().cpu())
                       for i in range(0, ids.numel(), 16384)])
    return q.fit(z, seed=cfg.data.seed)


def stage1_pipeline(name: str, lm, comp, quant, decoder, work: torch.device, info: dict) -> EmbeddingPipeline:
    """Stage 1 as a sender/receiver: embed -> compressor -> quantizer ->
    bytes -> quantizer -> `decoder` (the adapter, or the compressor's inverse)."""
    return EmbeddingPipeline(name, lambda ids: lm.embed(ids.to(lm.device)),
                             lambda x: comp.transform(x.float().to(work)),
                             lambda z: decoder(z.float().to(work)), quant, comp.n_components, info)


def wire_report(lm, prompts, cfg: RunConfig, log=print) -> dict:
    """Bytes per context of every text reference on these prompts' contexts:
    UTF-8, zstd, lzma, token ids, the LLM's code length (bound) and its
    arithmetic coding (actual, on --ac-contexts contexts, decoded and checked)."""
    from .data import context_token_ids
    from .wire import LMArithmeticCodec, LzmaCodec, TokenIdCodec, Utf8Codec, ZstdCodec, lm_code_length_bits
    ctx = _distinct_contexts(prompts)
    ntok = [len(p.context_ids) for p in ctx]
    tokenize = lambda t: context_token_ids(lm.tokenizer, t)  # noqa: E731
    refs = {}
    codecs = [Utf8Codec(tokenize), LzmaCodec(tokenize), TokenIdCodec(lm.vocab_size)]
    try:
        codecs.insert(1, ZstdCodec(tokenize))
    except ImportError as e:  # a declared dependency; a bare GPU image may lack it: say so, measure the rest
        log(f"warning: {e}: the zstd reference is left out of this run's wire table")
    for codec in codecs:
        refs[codec.name] = wire_stats([len(codec.encode(p.context_text, p.context_ids)) for p in ctx], ntok)
    if cfg.eval.lm_code_length and ctx:
        head = ctx[0].head_ids
        bits = lm_code_length_bits(lm, head, [p.context_ids for p in ctx], batch_size=cfg.eval.batch_size)
        refs["lm_code_length"] = wire_stats([b / 8 for b in bits], ntok) | {"bound": True}
        n_ac = min(cfg.eval.ac_contexts, len(ctx))
        if n_ac:
            codec = LMArithmeticCodec(lm, head)
            sizes, ok = [], 0
            for p in ctx[:n_ac]:
                data = codec.encode(p.context_text, p.context_ids)
                ok += codec.decode(data) == list(p.context_ids)
                sizes.append(len(data))
            refs["lm_arithmetic"] = wire_stats(sizes, ntok[:n_ac]) | {
                "decoded_exactly": ok, "bound_same_contexts_mean": sum(bits[:n_ac]) / 8 / n_ac}
            if ok != n_ac:
                log(f"warning: LLM arithmetic coding decoded {ok} of {n_ac} contexts exactly")
    return refs


def write_predictions(out: Path, stem: str, rows: list[dict]) -> None:
    """One row per question (`stem`.jsonl) and the official SQuAD v1.1
    prediction file (`stem`.official.json: {question id: answer}), which the
    official evaluation script scores as is."""
    write_jsonl(out / f"{stem}.jsonl", rows)
    write_json(out / f"{stem}.official.json", {r["id"]: r["prediction"] for r in rows})


def _wire(pipe, prompts, sw) -> dict:
    """Bytes and positions of a pipeline's payloads over the distinct contexts."""
    payloads, ntok = span_payloads(pipe, prompts, sw)
    by_ctx = {tuple(p.context_ids): pl.positions for p, pl in zip(_distinct_contexts(prompts), payloads)} \
        if pipe.reads_ids or sw.scope == "context" else {}
    prefill = [len(p.ids) - len(p.context_ids) + by_ctx[tuple(p.context_ids)] for p in prompts] if by_ctx else \
        [len(p.ids) for p in prompts]
    return wire_stats([p.nbytes for p in payloads], ntok, [p.positions for p in payloads]) | pipe.describe() | {
        "prompt_positions_mean": sum(prefill) / max(1, len(prefill))}


def _distinct_contexts(prompts) -> list:
    """One prompt per distinct context, in first-seen order (as span_payloads)."""
    seen: dict[tuple, object] = {}
    for p in prompts:
        seen.setdefault(tuple(p.context_ids), p)
    return list(seen.values())


def _pipeline_metrics(rows: list[dict], agg: dict, n_boot: int, seed: int) -> dict:
    f1s = [r["f1"] for r in rows]
    ems = [r["em"] for r in rows]
    return {"f1": agg["f1"], "exact_match": agg["exact_match"], "n": agg["n"],
            "f1_ci95": list(bootstrap_ci(f1s, n_boot, seed)), "em_ci95": list(bootstrap_ci(ems, n_boot, seed))}


def _retention(text_rows, rows, n_boot, seed) -> tuple[float | None, list[float] | None]:
    """Reconstructed F1 / text F1 with a paired bootstrap over questions."""
    t = sum(r["f1"] for r in text_rows)
    if t == 0:
        return None, None
    ret = sum(r["f1"] for r in rows) / t
    pairs = torch.tensor([[a["f1"], b["f1"]] for a, b in zip(text_rows, rows)], dtype=torch.float64)
    ci = bootstrap_ci(pairs, n_boot, seed, stat=lambda x: x[:, 1].sum() / x[:, 0].sum().clamp_min(1e-12))
    return ret, list(ci)


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
    rows, agg = score_predictions(prompts, preds)
    write_predictions(out, "predictions", rows)
    m = {"model": lm.source, "n_eval": len(prompts), "data": desc,
         "wire_references": wire_report(lm, prompts, cfg),
         "pipelines": {"text": _pipeline_metrics(rows, agg, cfg.eval.n_boot, cfg.data.seed)
                       | {"wire": _wire(text_pipeline(lm.tokenizer), prompts, EvalSwitches())}},
         "truncated_prompts": sum(p.truncated for p in prompts), "config": asdict(cfg)}
    m["wall_s"] = time.time() - t0
    write_json(out / "metrics.json", m)
    return m


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# what a run leaves that a later --resume would read: --overwrite removes all of it
RUN_STATE_FILES = ("ckpt.pt", "ckpt_phase2.pt", "train_log.jsonl", "events.jsonl", "adapter_best_state.pt",
                   "adapter_phase2_state.pt", "metrics.json", "ckpt_seq.pt", "seq_train_log.jsonl")


def config_diff(out: Path, config: RunConfig, saved: dict | None = None) -> list[str]:
    """Fields whose value differs between the run saved in `out` (its
    config.json, or `saved`) and `config`, as 'field is X there but Y now';
    [] when none or when nothing is saved."""
    if saved is None:
        if not (out / "config.json").exists():
            return []
        saved = json.loads((out / "config.json").read_text())
    flat = _same_paths(_flatten(saved))
    now = _same_paths(_flatten(json.loads(json.dumps(asdict(config)))))
    return [f"{k} is {flat.get(k)!r} there but {now.get(k)!r} now" for k in sorted(set(flat) | set(now))
            if k not in NOT_COMPARED and flat.get(k) != now.get(k)]


# Data files named by path: one file spelled relative or absolute is one value (a relative spelling in a saved
# config is read against the working directory of the run that saved it, which config.json does not record, so
# both sides are resolved against the current one -- what a rerun from here would read).
PATH_FIELDS = ("data.squad_train", "data.squad_eval")


def _same_paths(flat: dict) -> dict:
    return {k: (os.path.realpath(v) if k in PATH_FIELDS and isinstance(v, str) and v != "hub" else v)
            for k, v in flat.items()}


# Fields that change neither an answer nor a trained weight: progress bars; `out`, the folder the saved config
# was read from, however it is spelled (relative or absolute); the learned compressor's reference losses, measured
# beside training without touching its random streams (a run saved before the field existed is still the same run).
NOT_COMPARED = ("progress", "out", "seq.seq_ref_questions")


def finished_metrics(cfg: RunConfig) -> tuple[dict | None, str]:
    """A finished run's metrics, to be reused only when the run's resolved
    config equals `cfg` (every field: data, questions, epochs, bits, ...);
    else (None, why not)."""
    mpath = Path(cfg.out) / "metrics.json"
    if not mpath.exists():
        return None, "not run yet"
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None, "its metrics.json is unreadable"
    cfg.validate()  # resolve what validate() fills in (steps_per_epoch), as the run did
    diff = config_diff(Path(cfg.out), cfg, saved=m.get("config") or {})
    return (m, "") if not diff else (None, f"{len(diff)} field(s) differ; first: {diff[0]}")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, config: RunConfig | None = None,
                    main: bool = True) -> None:
    """Never silently mix or destroy runs: a folder that already holds a run
    needs --resume (continue it) or --overwrite (start over)."""
    held = [f for f in ("ckpt.pt", "metrics.json", "train_log.jsonl") if (out / f).exists()]
    if held and not (resume or overwrite):
        raise LatentWireError(f"--out {out}: already holds a run ({', '.join(held)}); "
                              "pass --resume to continue it or --overwrite to start over")
    if resume and not (out / "ckpt.pt").exists():
        raise LatentWireError(f"--resume: {out} has no ckpt.pt to resume from")
    if resume and config is not None:
        diff = config_diff(out, config)
        if diff:
            raise LatentWireError(f"--resume: the flags differ from the run being resumed ({len(diff)} field(s)); "
                                  f"first: {diff[0]}")
    if not main:  # every rank checks; one rank cleans and creates
        return
    try:
        if overwrite and not resume:
            for f in RUN_STATE_FILES:
                (out / f).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LatentWireError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None


def _quiet(*_a, **_k) -> None:
    pass


def _stage1(cfg: RunConfig, lm, inp: Inputs, fp: dict, k: int, table: torch.Tensor, work, sw: EvalSwitches,
            out: Path, events, resume: bool, log):
    """Stage 1: fit the compressor and the quantizer on training text, train
    the adapter (Phase 1, then Phase 2 when asked), save both."""
    d = dist.current()
    pool, train = inp.pool, inp.train
    # --- compress: fit on training text only (streamed in chunks) -----------
    tc = time.time()
    comp = fit_compressor(cfg, lm, pool, fp)
    if d.is_main:
        comp.save(out / "compressor.pt", meta=fp | {"kind": comp.kind})
    evr = float(comp.explained_variance_ratio_.sum()) if hasattr(comp, "explained_variance_ratio_") else None
    events.log(event="compressor", kind=comp.kind, dim=k, fit_tokens=int(pool.numel()), wall_s=time.time() - tc,
               explained_variance_of_total=evr)
    log(f"compressor: {comp.kind} {lm.d_model} -> {k}" + (f", explained variance {100 * evr:.1f}% of total" if evr else ""))

    quant = fit_quantizer(cfg, lm, comp, pool)
    # the adapter learns from what the receiver will get: quantized codes
    z_table = quant.roundtrip(comp.transform(table)).detach() if cfg.compress.bits != 32 else comp.transform(table)

    # --- adapter: Phase 1 ---------------------------------------------------
    adapter = build_adapter(cfg.adapter, comp, table).to(work)
    vocab_ids = vocab_sample(lm.vocab_size, cfg.eval.vocab_metrics, cfg.data.seed)
    if cfg.adapter.adapter_path:
        load_adapter_state(adapter, cfg.adapter.adapter_path, fp | {"adapter": cfg.adapter.adapter})
        adapter.eval()
        summary = {"steps": 0, "loaded_from": cfg.adapter.adapter_path}
    else:
        summary = train_phase1(adapter, z_table, table, pool, cfg.train, out, seed=cfg.data.seed,
                               quick_ids=inp.select, progress=cfg.progress, resume=resume, vocab_ids=vocab_ids)
    if cfg.train.phase2_steps and not cfg.adapter.adapter_path:
        b2 = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.train.phase2_max_tokens, cfg.data.bos != "none",
                           flag="--phase2-max-tokens")
        train_prompts = [b2.build(e) for e in train]
        summary |= train_phase2(lm, adapter, lambda x: quant.roundtrip(comp.transform(x)), train_prompts, sw,
                                cfg.train, out, seed=cfg.data.seed,
                                progress=cfg.progress, resume=resume)
    if d.is_main:
        save_adapter(adapter, out / "adapter.pt", fp | {"adapter": cfg.adapter.adapter})
    events.log(event="trained", **summary)
    return comp, quant, adapter, z_table, vocab_ids, summary, evr


def run_experiment(cfg: RunConfig, use_cache: bool = True, resume: bool = False, overwrite: bool = False,
                   log=print) -> dict:
    """`latentwire run` into cfg.out: the text baseline, Stage 1 (fit, train,
    evaluate; unless --no-stage1) and the --sequence pipelines (the learned
    one trained here), all scored on the same questions through the wire."""
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
        from .seqcomp import read_compressor_file
        for flag, path in (("--seq-path", cfg.seq.seq_path), ("--seq-sender-path", cfg.seq.seq_sender_path)):
            if path:
                read_compressor_file(path, flag)  # so is a bad saved compressor
    device, device_map = _resolve_placement(cfg)
    lm = load_model(cfg.model.model, device, cfg.model.dtype, device_map=device_map)
    d_model, V = lm.d_model, lm.vocab_size
    cfg.compress.validate(d_model)
    k = cfg.compress.resolve_dim(d_model)
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens > max_pos:
        raise LatentWireError(f"--max-prompt-tokens {cfg.data.max_prompt_tokens} + --max-new-tokens "
                              f"{cfg.eval.max_new_tokens} exceeds the model's context window ({max_pos})")
    sender = None
    if cfg.model.cross():  # the model on the sending side, when it is not the receiver
        sender = load_model(cfg.model.sender_model, device, cfg.model.dtype, device_map=device_map)
        events.log(event="sender_model", source=sender.source, d_model=sender.d_model, vocab=sender.vocab_size)
    fp = lm.fingerprint() | {"compress_dim": k}
    # saved artifacts are checked before any work starts
    if cfg.compress.compressor_path:
        comp_meta = read_artifact("--compressor-path", cfg.compress.compressor_path)["meta"]
        check_meta("--compressor-path", cfg.compress.compressor_path, comp_meta, fp | {"kind": cfg.compress.compressor})
    if cfg.adapter.adapter_path:
        ad_meta = read_artifact("--adapter-path", cfg.adapter.adapter_path)["meta"]
        check_meta("--adapter-path", cfg.adapter.adapter_path, ad_meta, fp | {"adapter": cfg.adapter.adapter})
    events.log(event="model", source=lm.source, d_model=d_model, vocab=V, device=str(lm.device), dtype=str(lm.dtype))

    inp = build_inputs(cfg, lm, data)
    train, ev, desc, prompts, pool = inp.train, inp.eval, inp.desc, inp.prompts, inp.pool
    events.log(event="data", n_train=len(train), n_eval=len(ev), **{k2: v for k2, v in desc.items()})
    # the adapter trains where the LLM runs when that is a GPU (Phase 2 and
    # DDP over NCCL need it there); the compressor's fit stays on the CPU
    work = lm.device if lm.device.type == "cuda" else torch.device("cpu")
    table = lm.embedding_table().float().to(work) if cfg.eval.stage1 else None

    sw = eval_switches(cfg)
    comp = quant = adapter = z_table = vocab_ids = None
    summary: dict = {}
    k_bits = cfg.compress.bits
    evr = None
    if cfg.eval.stage1:
        comp, quant, adapter, z_table, vocab_ids, summary, evr = _stage1(cfg, lm, inp, fp, k, table, work, sw, out,
                                                                         events, resume, log)
    seq_summary = None
    if "learned" in cfg.eval.sequence_kinds():
        from .seqcomp import prepare_learned
        learned, seq_summary = prepare_learned(lm, cfg.seq, seq_train_prompts(cfg, lm, train),
                                               prompts[0].head_ids, out,
                                               cfg.seq.seq_seed, cfg.progress, resume, log, use_cache=use_cache,
                                               sender=sender)
        events.log(event="seq_trained", **{k2: v for k2, v in seq_summary.items() if k2 not in ("first", "last")})

    # --- evaluate -------------------------------------------------------------
    cache_stats: dict = {}
    tg = time.time()
    text_preds = text_predictions(lm, prompts, cfg, read_cache=use_cache, stats=cache_stats)
    text_gen_s = time.time() - tg
    text_rows, text_agg = score_predictions(prompts, text_preds)
    if d.is_main:
        write_predictions(out, "predictions_text", text_rows)
    log(f"text baseline: F1 {text_agg['f1']:.2f} EM {text_agg['exact_match']:.2f} on {len(prompts)} questions "
        f"({cache_stats['misses']} generated, {cache_stats['hits']} read from the answer cache)")

    pipelines: dict = {}
    if comp is not None:
        info = {"compressor": comp.kind}
        linear = stage1_pipeline("linear_inverse", lm, comp, quant, comp.inverse_transform, work, info)
        recon = stage1_pipeline("latentwire", lm, comp, quant, adapter, work, info | {"adapter": cfg.adapter.adapter})
        pipelines = {"linear_inverse": linear, "latentwire": recon} if cfg.controls else {"latentwire": recon}
        if cfg.adapter.adapter == "linear":
            pipelines = {"latentwire": linear}
    nb, seed = cfg.eval.n_boot, cfg.data.seed
    text_pipe = text_pipeline(lm.tokenizer)
    refs = wire_report(lm, prompts, cfg, log) if d.is_main else {}
    metrics = {"model": lm.source, "d_model": d_model, "vocab_size": V, "n_eval": len(prompts), "data": desc,
               "compressor": None if comp is None else
               {"kind": comp.kind, "dim": k, "ratio": d_model / k, "explained_variance": evr,
                "bits": cfg.compress.bits, "quantizer": quant.scheme},
               "adapter": None if comp is None else
               cfg.adapter.adapter + (" (seed preset)" if cfg.adapter.preset == "seed" else ""),
               "train": summary, "seq_train": seq_summary, "truncated_prompts": sum(p.truncated for p in prompts),
               "wire_scope": cfg.eval.wire_scope, "wire_references": refs, "text_answer_cache": cache_stats,
               "pipelines": {"text": _pipeline_metrics(text_rows, text_agg, nb, seed)
                             | {"wire": _wire(text_pipe, prompts, sw),
                                # only meaningful when every answer was generated here
                                "s_per_question": text_gen_s / len(prompts) if not cache_stats["hits"] else None}}}
    if sender is not None:
        metrics["sender_model"] = {"model": sender.source, "d_model": sender.d_model, "vocab_size": sender.vocab_size}
    baselines = [k2 for k2 in cfg.eval.sequence_kinds() if k2 != "learned"]
    if baselines:
        from .sequence import sequence_pipelines
        # pooled embeddings are sent as floats (16 bits with --bits 16, else 32)
        quant_pool = FloatQuantizer(16 if k_bits == 16 else 32)
        if sender is None:
            pipelines |= sequence_pipelines(lm, baselines, cfg.eval.sequence_ratio_list(), prompts[0].head_ids,
                                            quant_pool)
        else:  # chosen on the sender's tokens (surprisal scored by the sender after its own head), read via text
            from .pair import cross_pipelines
            s_head = PromptBuilder(sender.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens,
                                   cfg.data.bos != "none").build(prompts[0].example).head_ids
            pipelines |= cross_pipelines(sender, lm, sequence_pipelines(
                sender, baselines, cfg.eval.sequence_ratio_list(), s_head, quant_pool))
    if seq_summary is not None:
        pipelines[learned.name] = learned
    diags = {}
    stage1 = {"linear_inverse", "latentwire"}
    for name, fn in pipelines.items():  # fn: the pipeline (sender + receiver)
        tg = time.time()
        preds = sharded_predictions(lm, prompts, fn, sw, cfg, desc=name)
        gen_s = time.time() - tg
        if not d.is_main:
            continue  # scoring, diagnostics and writing happen once, on rank 0
        rows, agg = score_predictions(prompts, preds)
        for r, tp in zip(rows, text_preds):
            r["text_prediction"] = tp
            r["agree"] = r["prediction"] == tp
        write_predictions(out, f"predictions_{name}", rows)
        ret, ret_ci = _retention(text_rows, rows, nb, seed)
        entry = _pipeline_metrics(rows, agg, nb, seed) | {
            "f1_retention": ret, "f1_retention_ci95": ret_ci, "agreement": sum(r["agree"] for r in rows) / len(rows),
            "s_per_question": gen_s / len(rows), "wire": _wire(fn, prompts, sw)}
        metrics["pipelines"][name] = entry
        if name not in stage1:
            continue  # per-token diagnostics apply to per-token (Stage 1) codes only
        mod = adapter if name == "latentwire" else None
        # the adapter ends on its best state, whose whole-vocabulary metrics
        # training measured once; Phase 2 changes it
        known = (summary.get("best") or {}).get("vocab_metrics") if not summary.get("phase2_steps") else None
        vocab_m = known if (mod is not None and known) else \
            vocab_recon_metrics(mod if mod is not None else LinearAdapter(comp), z_table, table, vocab_ids)
        diag = diagnose(lm, prompts, fn.transform, sw, text_preds, preds, table, cfg.eval.diagnostics_k,
                        vocab_recovery=vocab_m["token_recovery"])
        write_json(out / f"diagnostics_{name}.json", diag)
        diags[name] = diag
        entry |= {"token_recovery_vocab": vocab_m["token_recovery"], "token_recovery_vocab_ids": vocab_m["ids_measured"],
                  "token_recovery_vocab_ci95": vocab_m["token_recovery_ci95"],
                  "token_recovery_prompts": diag["token_recovery_prompts"], "cos": diag["cos"],
                  "norm_ratio": diag["norm_ratio"], "norm_status": diag["norm_status"], "collapsed": diag["collapsed"]}
        metrics.setdefault("verdict", []).extend(findings(name, entry, diag))
        for line in summary_lines(name, diag):
            log(line)
    if not d.is_main:
        return {}
    metrics["wall_s"] = time.time() - t0
    metrics["world_size"] = d.world
    metrics["config"] = asdict(cfg)
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, diags, asdict(cfg))
    log("\n" + metrics_table(metrics))
    log("\n".join(["", "verdict:"] + [f"- {v}" for v in metrics.get("verdict", [])]))
    log(f"\nrun folder: {out} (report.md, metrics.json, predictions_*.jsonl, diagnostics_*.json)")
    return metrics

