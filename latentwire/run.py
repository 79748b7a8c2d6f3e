"""The main job, stage by stage: load model -> data -> fit compressor ->
train adapter -> evaluate (text baseline, linear-PCA control, LatentWire)
-> diagnostics -> report. Also `text_baseline_eval` for `latentwire eval`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
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
from .evaluate import EvalSwitches, generate_predictions, score_predictions
from .metrics import bootstrap_ci
from .models import cache_root, load_model
from .report import metrics_table, write_report
from .runio import JsonlLogger, NullLogger, seed_everything, write_json, write_jsonl
from .train import recon_metrics, train_phase1, train_phase2


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


def build_inputs(cfg: RunConfig, lm) -> tuple[list[Example], list[Example], dict, list, torch.Tensor]:
    """Stage "data": train/eval examples, eval prompts, training token pool."""
    train, ev, desc = load_data(cfg)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    return train, ev, desc, [builder.build(e) for e in ev], training_pool(builder, train)


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


def _text_cache_path(lm, max_new_tokens: int) -> Path:
    key = hashlib.sha256(json.dumps([lm.source, str(lm.dtype), max_new_tokens, __version__]).encode()).hexdigest()
    return cache_root() / "text_baseline" / f"{key[:24]}.jsonl"


def _prompt_key(p) -> str:
    return hashlib.sha256(json.dumps(p.ids).encode()).hexdigest()[:32]


def text_predictions(lm, prompts, cfg: RunConfig, read_cache: bool = True, write_cache: bool = True) -> list[str]:
    """Text-baseline answers. Greedy decoding is deterministic and batched
    output equals one-at-a-time output (tested), so answers are cached per
    prompt -- keyed by (model, dtype, max_new_tokens, prompt ids) -- and reused
    by later runs on the same questions (`--no-cache` to recompute)."""
    path = _text_cache_path(lm, cfg.eval.max_new_tokens)
    cache: dict[str, str] = {}
    if read_cache and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = row["prediction"]
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a killed run: recompute that prompt
    keys = [_prompt_key(p) for p in prompts]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        new = sharded_predictions(lm, [prompts[i] for i in todo], None, None, cfg, desc="text baseline")
        if write_cache and dist.current().is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"key": keys[i], "prediction": p}) + "\n" for i, p in zip(todo, new)))
        cache.update({keys[i]: p for i, p in zip(todo, new)})
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
    """Which prompt positions keep their original embeddings, from the flags."""
    return EvalSwitches(keep_bos=cfg.data.bos == "original", keep_prefix=cfg.eval.keep_prefix,
                        keep_cue=cfg.eval.anchor == "original")


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
        out.mkdir(parents=True, exist_ok=True)
    device, device_map = _resolve_placement(cfg)
    lm = load_model(cfg.model.model, device, cfg.model.dtype, device_map=device_map)
    _, ev, desc = load_data(cfg)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    prompts = [builder.build(e) for e in ev]
    # always generated afresh here (this *is* the baseline measurement); the
    # answers are added to the cache that `latentwire run` reads
    preds = text_predictions(lm, prompts, cfg, read_cache=False)
    if not d.is_main:
        return {}
    rows, agg = score_predictions(prompts, preds)
    write_jsonl(out / "predictions.jsonl", rows)
    m = {"model": lm.source, "n_eval": len(prompts), "data": desc, "wall_s": time.time() - t0,
         "pipelines": {"text": _pipeline_metrics(rows, agg, cfg.eval.n_boot, cfg.data.seed)},
         "truncated_prompts": sum(p.truncated for p in prompts), "config": asdict(cfg)}
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
                   "adapter_phase2_state.pt", "metrics.json")


def config_diff(out: Path, config: RunConfig) -> list[str]:
    """Fields whose value differs between the run saved in `out` (its
    config.json) and `config`, as 'field is X there but Y now'; [] when none
    or when nothing is saved."""
    if not (out / "config.json").exists():
        return []
    saved = _flatten(json.loads((out / "config.json").read_text()))
    now = _flatten(json.loads(json.dumps(asdict(config))))
    return [f"{k} is {saved.get(k)!r} there but {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if k not in ("progress",) and saved.get(k) != now.get(k)]


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
    if overwrite and not resume:
        for f in RUN_STATE_FILES:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _quiet(*_a, **_k) -> None:
    pass


def run_experiment(cfg: RunConfig, use_cache: bool = True, resume: bool = False, overwrite: bool = False,
                   log=print) -> dict:
    """`latentwire run`: the whole Stage 1 Phase 1 pipeline into cfg.out."""
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

    device, device_map = _resolve_placement(cfg)
    lm = load_model(cfg.model.model, device, cfg.model.dtype, device_map=device_map)
    d_model, V = lm.d_model, lm.vocab_size
    cfg.compress.validate(d_model)
    k = cfg.compress.resolve_dim(d_model)
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens > max_pos:
        raise LatentWireError(f"--max-prompt-tokens {cfg.data.max_prompt_tokens} + --max-new-tokens "
                              f"{cfg.eval.max_new_tokens} exceeds the model's context window ({max_pos})")
    fp = lm.fingerprint() | {"compress_dim": k}
    # saved artifacts are checked before any work starts
    if cfg.compress.compressor_path:
        comp_meta = read_artifact("--compressor-path", cfg.compress.compressor_path)["meta"]
        check_meta("--compressor-path", cfg.compress.compressor_path, comp_meta, fp | {"kind": cfg.compress.compressor})
    if cfg.adapter.adapter_path:
        ad_meta = read_artifact("--adapter-path", cfg.adapter.adapter_path)["meta"]
        check_meta("--adapter-path", cfg.adapter.adapter_path, ad_meta, fp | {"adapter": cfg.adapter.adapter})
    events.log(event="model", source=lm.source, d_model=d_model, vocab=V, device=str(lm.device), dtype=str(lm.dtype))

    train, ev, desc, prompts, pool = build_inputs(cfg, lm)
    events.log(event="data", n_train=len(train), n_eval=len(ev), **{k2: v for k2, v in desc.items()})
    # the adapter trains where the LLM runs when that is a GPU (Phase 2 and
    # DDP over NCCL need it there); the compressor's fit stays on the CPU
    work = lm.device if lm.device.type == "cuda" else torch.device("cpu")
    table = lm.embedding_table().float().to(work)

    # --- compress: fit on training text only (streamed in chunks) -----------
    tc = time.time()
    comp = fit_compressor(cfg, lm, pool, fp)
    if d.is_main:
        comp.save(out / "compressor.pt", meta=fp | {"kind": comp.kind})
    evr = float(comp.explained_variance_ratio_.sum()) if hasattr(comp, "explained_variance_ratio_") else None
    events.log(event="compressor", kind=comp.kind, dim=k, fit_tokens=int(pool.numel()), wall_s=time.time() - tc,
               explained_variance_of_total=evr)
    log(f"compressor: {comp.kind} {d_model} -> {k}" + (f", explained variance {100 * evr:.1f}% of total" if evr else ""))

    z_table = comp.transform(table)

    # --- adapter: Phase 1 ---------------------------------------------------
    adapter = build_adapter(cfg.adapter, comp, table).to(work)
    if cfg.adapter.adapter_path:
        load_adapter_state(adapter, cfg.adapter.adapter_path, fp | {"adapter": cfg.adapter.adapter})
        adapter.eval()
        summary = {"steps": 0, "loaded_from": cfg.adapter.adapter_path}
    else:
        summary = train_phase1(adapter, z_table, table, pool, cfg.train, out, seed=cfg.data.seed,
                               progress=cfg.progress, resume=resume)
    sw = eval_switches(cfg)
    if cfg.train.phase2_steps and not cfg.adapter.adapter_path:
        b2 = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.train.phase2_max_tokens, cfg.data.bos != "none",
                           flag="--phase2-max-tokens")
        train_prompts = [b2.build(e) for e in train]
        summary |= train_phase2(lm, adapter, comp, train_prompts, sw, cfg.train, out, seed=cfg.data.seed,
                                progress=cfg.progress, resume=resume)
    if d.is_main:
        save_adapter(adapter, out / "adapter.pt", fp | {"adapter": cfg.adapter.adapter})
    events.log(event="trained", **summary)

    # --- evaluate -------------------------------------------------------------
    text_preds = text_predictions(lm, prompts, cfg, read_cache=use_cache)
    text_rows, text_agg = score_predictions(prompts, text_preds)
    if d.is_main:
        write_jsonl(out / "predictions_text.jsonl", text_rows)
    log(f"text baseline: F1 {text_agg['f1']:.2f} EM {text_agg['exact_match']:.2f} on {len(prompts)} questions")

    def recon(x: torch.Tensor) -> torch.Tensor:
        return adapter(comp.transform(x.float().to(work))).to(x.device)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return comp.inverse_transform(comp.transform(x.float().cpu())).to(x.device)

    pipelines = {"linear_inverse": linear, "latentwire": recon} if cfg.controls else {"latentwire": recon}
    if cfg.adapter.adapter == "linear":
        pipelines = {"latentwire": linear}
    nb, seed = cfg.eval.n_boot, cfg.data.seed
    metrics = {"model": lm.source, "d_model": d_model, "vocab_size": V, "n_eval": len(prompts), "data": desc,
               "compressor": {"kind": comp.kind, "dim": k, "ratio": d_model / k, "explained_variance": evr},
               "adapter": cfg.adapter.adapter + (" (seed preset)" if cfg.adapter.preset == "seed" else ""),
               "train": summary, "truncated_prompts": sum(p.truncated for p in prompts),
               "pipelines": {"text": _pipeline_metrics(text_rows, text_agg, nb, seed)}}
    diags = {}
    for name, fn in pipelines.items():
        mod = adapter if name == "latentwire" else None
        preds = sharded_predictions(lm, prompts, fn, sw, cfg, desc=name)
        if not d.is_main:
            continue  # scoring, diagnostics and writing happen once, on rank 0
        rows, agg = score_predictions(prompts, preds)
        for r, tp in zip(rows, text_preds):
            r["text_prediction"] = tp
            r["agree"] = r["prediction"] == tp
        write_jsonl(out / f"predictions_{name}.jsonl", rows)
        # the adapter ends on its best state, whose whole-vocabulary metrics
        # training already measured (~25 s on a CPU); Phase 2 changes it
        known = (summary.get("best") or {}).get("vocab_metrics") if not summary.get("phase2_steps") else None
        vocab_m = known if (mod is not None and known) else \
            recon_metrics(mod if mod is not None else LinearAdapter(comp), z_table, table, torch.arange(V))
        diag = diagnose(lm, prompts, fn, sw, text_preds, preds, table, cfg.eval.diagnostics_k,
                        vocab_recovery=vocab_m["token_recovery"])
        write_json(out / f"diagnostics_{name}.json", diag)
        diags[name] = diag
        ret, ret_ci = _retention(text_rows, rows, nb, seed)
        metrics["pipelines"][name] = _pipeline_metrics(rows, agg, nb, seed) | {
            "f1_retention": ret, "f1_retention_ci95": ret_ci, "agreement": diag["agreement"],
            "token_recovery_vocab": vocab_m["token_recovery"], "token_recovery_prompts": diag["token_recovery_prompts"],
            "cos": diag["cos"], "norm_ratio": diag["norm_ratio"], "norm_status": diag["norm_status"],
            "collapsed": diag["collapsed"]}
        metrics.setdefault("verdict", []).extend(findings(name, metrics["pipelines"][name], diag))
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

