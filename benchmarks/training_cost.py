"""Training cost: Phase 1 steps and wall time until the adapter reaches a
target F1 retention (default 95% of the text pipeline's F1), at a given
compression ratio, on a fixed probe set of evaluation questions.

Retention is measured before training (step 0) and after every epoch (the
resolution of the answer is one epoch: 20 steps for vocab, 300 for mlp by
default). Wall time counts the training loop as `latentwire run` runs it
(including its per-epoch whole-vocabulary evaluation), not the probe
generations.

  python benchmarks/training_cost.py --squad-train TRAIN.json --squad-eval DEV.json --adapter mlp --ratio 4
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


class _Reached(Exception):
    pass


def cost_to_retention(model: str, squad_train: str | None, squad_eval: str | None, adapter: str, ratio: float,
                      n_probe: int = 40, target: float = 0.95, epochs: int = 3, seed: int = 0) -> dict:
    import torch

    from latentwire.stage1.adapters import build_adapter
    from latentwire.config import RunConfig
    from latentwire.llm.models import load_model
    from latentwire.evaluation.answers import sharded_predictions, text_predictions
    from latentwire.evaluation.compare import score_rows
    from latentwire.evaluation.run import build_inputs, eval_switches
    from latentwire.stage1.stage1 import fit_compressor
    from latentwire.util.runio import seed_everything
    from latentwire.stage1.train import train_phase1

    cfg = RunConfig()
    cfg.model.model = model
    cfg.data.squad_train, cfg.data.squad_eval, cfg.data.max_eval, cfg.data.seed = squad_train, squad_eval, n_probe, seed
    cfg.compress.ratio, cfg.adapter.adapter, cfg.train.epochs, cfg.progress = ratio, adapter, epochs, False
    cfg.validate()
    lm = load_model(cfg.model.model)
    # the stages of `latentwire run`, up to the adapter
    inp = build_inputs(cfg, lm)
    prompts, pool = inp.prompts, inp.pool
    table = lm.embedding_table().float().cpu()
    comp = fit_compressor(cfg, lm, pool, lm.fingerprint())
    z_table = comp.transform(table)
    seed_everything(seed)  # the adapter's initialisation must not depend on what this process ran before
    ad = build_adapter(cfg.adapter, comp, table)
    text_rows = score_rows(prompts, text_predictions(lm, prompts, cfg))
    text_f1 = sum(r["f1"] for r in text_rows)
    sw = eval_switches(cfg)

    @torch.no_grad()
    def retention() -> float:
        was = ad.training
        ad.eval()
        # as `latentwire run` generates (every --batch-size/... flag from cfg.eval)
        preds = sharded_predictions(lm, prompts, lambda x: ad(comp.transform(x.float())), sw, cfg, "probe")
        ad.train(was)
        rows = score_rows(prompts, preds)
        return sum(r["f1"] for r in rows) / text_f1 if text_f1 else float("nan")

    checks = [{"step": 0, "train_s": 0.0, "retention": retention()}]
    clock = {"train_s": 0.0, "t": time.perf_counter()}
    spe = cfg.train.steps_per_epoch

    def on_epoch(epoch: int, full: dict) -> None:
        clock["train_s"] += time.perf_counter() - clock["t"]
        checks.append({"step": epoch * spe, "train_s": clock["train_s"], "retention": retention(),
                       "token_recovery_vocab": full["token_recovery"]})
        clock["t"] = time.perf_counter()
        if checks[-1]["retention"] >= target:
            raise _Reached

    if checks[0]["retention"] < target:
        with tempfile.TemporaryDirectory() as d:
            clock["t"] = time.perf_counter()
            try:
                train_phase1(ad, z_table, table, pool, cfg.train, d, seed=seed, progress=False, on_epoch=on_epoch)
            except _Reached:
                pass
    hit = next((c for c in checks if c["retention"] >= target), None)
    return {"adapter": adapter, "ratio": ratio, "dim": comp.n_components, "n_probe": len(prompts), "target": target,
            "steps_per_epoch": spe, "max_steps": epochs * spe, "reached": hit is not None,
            "steps": hit["step"] if hit else None, "train_s": hit["train_s"] if hit else None,
            "best_retention": max(c["retention"] for c in checks), "checks": checks}


def _pct(x: float) -> str:
    return "undefined (text F1 is 0)" if x != x else f"{100 * x:.1f}%"


def format_cost(rows: list[dict]) -> str:
    out = ["| adapter | ratio | dim | probe questions | reached 95% retention | steps | training wall s | "
           "best retention seen | checked at steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['adapter']} | {r['ratio']:g}x | {r['dim']} | {r['n_probe']} | "
                   f"{'yes' if r['reached'] else 'no, within ' + str(r['max_steps']) + ' steps'} | "
                   f"{'-' if r['steps'] is None else r['steps']} | "
                   f"{'-' if r['train_s'] is None else format(r['train_s'], '.1f')} | "
                   f"{_pct(r['best_retention'])} | {', '.join(str(c['step']) for c in r['checks'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-train", default=None)
    ap.add_argument("--squad-eval", default=None)
    ap.add_argument("--adapter", default="vocab")
    ap.add_argument("--ratio", type=float, default=4)
    ap.add_argument("--n-probe", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    r = cost_to_retention(args.model, args.squad_train, args.squad_eval, args.adapter, args.ratio, args.n_probe,
                          epochs=args.epochs)
    print(format_cost([r]))
    print(json.dumps(r["checks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
