"""Every LatentWire benchmark in one command; prints the tables and rewrites
BENCHMARKS.md (the file in the repository is this script's unedited output).

  python benchmarks/run_all.py                      # default size, < 30 min on 2 CPU cores
  python benchmarks/run_all.py --max-eval 500 --epochs 3 --md BENCHMARKS-500.md   # bigger

Data: real SQuAD from --squad-dir (default: $LATENTWIRE_SQUAD_DIR, else
../shared/squad beside the repository) -- train-v1.1-first44.json for fitting
and training, dev-v1.1-part-a.json for evaluation -- or the built-in
synthetic set when neither exists. Sections, each figure a ratio or a
quality measure taken side by side in this run:

1. quality vs compression: text baseline, vocab and mlp adapters at
   2x..64x, the linear-PCA-inverse control, the seed preset (one
   `latentwire run` per cell, benchmarks/stage1_grid.py);
2. generation throughput: our loop against batched `model.generate` with
   the newline as a stop (what a user would pick), each factor on its own,
   every timing repeated (benchmarks/text_baseline.py);
3. compressor fit at 1M tokens: streamed PCA vs the seed's collect-all +
   svd_lowrank, wall time and peak memory (benchmarks/pca_fit.py);
4. training cost: steps and wall time to 95% F1 retention at 4x and 16x
   (benchmarks/training_cost.py);
5. memory: peak resident memory of `latentwire run` at its default size.

Sections 1, 4 and 5 are independent runs; they go to --jobs worker
processes with one torch thread each (on this 2-core machine two
single-thread jobs finish sooner than one two-thread job: much of a run is
Python-bound). Sections 2 and 3 run afterwards, alone, with all threads,
because they are timings. Finished quality cells in --out are reused.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _squad_paths(squad_dir: str | None) -> tuple[str | None, str | None]:
    cands = [squad_dir, os.environ.get("LATENTWIRE_SQUAD_DIR"), str(ROOT.parent / "shared" / "squad")]
    for d in cands:
        if d and (Path(d) / "train-v1.1-first44.json").is_file() and (Path(d) / "dev-v1.1-part-a.json").is_file():
            return str(Path(d) / "train-v1.1-first44.json"), str(Path(d) / "dev-v1.1-part-a.json")
        if d == squad_dir and d:
            raise SystemExit(f"--squad-dir {d}: needs train-v1.1-first44.json and dev-v1.1-part-a.json")
    return None, None


def _exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so that `with Pool` terminates the workers and
    `subprocess.run` kills its child on the way out (by default a SIGTERM
    kills only the process it is sent to and orphans the rest)."""
    import signal

    def _raise(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise)


def _worker_init() -> None:
    # A worker keeps SIGTERM's default action: Pool.terminate() must kill it
    # whatever it is doing. A Python handler (SIGTERM -> SystemExit) only runs
    # when the interpreter next checks for signals; a signal that lands just
    # before an idle worker blocks on the task queue's lock is never acted on,
    # and terminate() then waits for that worker forever (seen: 1 run in ~4).
    import torch
    torch.set_num_threads(1)


def _task(kind: str, payload: dict) -> dict:
    """One independent unit of sections 1, 4, 5 (runs in a worker process)."""
    sys.path.insert(0, str(HERE))
    t0 = time.time()
    if kind == "warm":
        # fill the text-baseline cache once so the cells do not all compute it
        from latentwire.config import RunConfig
        from latentwire.llm.models import load_model
        from latentwire.evaluation.answers import text_predictions
        from latentwire.evaluation.run import build_inputs
        cfg = RunConfig()
        cfg.model.model = payload["model"]
        cfg.data.squad_train, cfg.data.squad_eval = payload["squad_train"], payload["squad_eval"]
        cfg.data.max_eval, cfg.progress = payload["max_eval"], False
        lm = load_model(cfg.model.model)
        text_predictions(lm, build_inputs(cfg, lm).prompts, cfg)  # the prompts every cell will build
        return {"kind": kind, "wall_s": time.time() - t0}
    if kind == "cell":
        from stage1_grid import cell_config, cell_rows, run_cell
        a = argparse.Namespace(**payload["args"])
        m = run_cell(cell_config(a, payload["adapter"], payload["ratio"], payload["controls"], payload["preset"]))
        return {"kind": kind, "rows": cell_rows(m, payload["adapter"], payload["ratio"], payload["preset"]),
                "text": m["pipelines"]["text"], "wall_s": time.time() - t0}
    if kind == "cost":
        from training_cost import cost_to_retention
        return {"kind": kind, "row": cost_to_retention(**payload), "wall_s": time.time() - t0}
    if kind == "memory":
        out = payload["out"]
        # the child asks Linux for SIGTERM when its worker dies (prctl
        # PR_SET_PDEATHSIG = 1), so that killing the benchmark ends this run
        # too instead of orphaning it, and exits at once if the worker died
        # before it asked (elsewhere the call fails and is skipped)
        code = ("import os, resource, sys, json, ctypes, signal\n"
                "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
                f"if os.getppid() != {os.getpid()}:\n    sys.exit(128 + signal.SIGTERM)\n"
                "from latentwire.cli import main\n"
                f"rc = main(['run', '--model', {payload['model']!r}, '--out', {out!r}, '--overwrite', '--no-progress'])\n"
                "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode != 0:
            raise RuntimeError(f"latentwire run failed: {p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        m = json.loads((Path(out) / "metrics.json").read_text())
        return {"kind": kind, "peak_rss_mb": r["maxrss_kb"] / 1024, "run_wall_s": m["wall_s"], "metrics": m,
                "wall_s": time.time() - t0}
    raise ValueError(kind)


def _machine() -> str:
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil
        mem = f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem}, no GPU used; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-dir", default=None, help="folder with train-v1.1-first44.json and dev-v1.1-part-a.json")
    ap.add_argument("--synthetic", action="store_true", help="use the built-in synthetic set even if SQuAD is there")
    ap.add_argument("--max-eval", type=int, default=32, help="evaluation questions per quality cell")
    ap.add_argument("--epochs", type=int, default=1, help="Phase 1 epochs per quality cell")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--cost-ratios", type=float, nargs="+", default=[4, 16])
    ap.add_argument("--cost-epochs", type=int, default=1, help="training-cost search: at most this many epochs")
    ap.add_argument("--throughput-n", type=int, nargs="+", default=[96],
                    help="question counts for the throughput comparison (more questions share more paragraphs)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per throughput loop (median, min-max)")
    ap.add_argument("--pca-tokens", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes for sections 1, 4, 5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    t_all = time.time()
    tr, ev = (None, None) if args.synthetic else _squad_paths(args.squad_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])

    # --- sections 1, 4, 5: independent runs in worker processes -------------
    grid_args = {"model": args.model, "squad_train": tr, "squad_eval": ev, "max_eval": args.max_eval,
                 "template": "fewshot", "seed": args.seed, "epochs": args.epochs, "out": str(out / "grid"),
                 "dtype": "auto"}
    from stage1_grid import grid_cells
    ns = argparse.Namespace(ratios=args.ratios, adapters=["vocab", "mlp"], controls_at=[4.0], seed_preset_at=[4.0])
    tasks = [("memory", {"out": str(out / "default_run"), "model": args.model})]
    tasks += [("cost", {"model": args.model, "squad_train": tr, "squad_eval": ev, "adapter": a, "ratio": r,
                        "n_probe": args.max_eval, "epochs": args.cost_epochs, "seed": args.seed})
              for a in ("mlp", "vocab") for r in args.cost_ratios]
    tasks += [("cell", {"args": grid_args, "adapter": a, "ratio": r, "controls": c, "preset": p})
              for a, r, c, p in grid_cells(ns)]
    _exit_on_sigterm()
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the workers' torch at import
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_worker_init) as pool:  # on an exception: terminate()
        list(_imap(pool, [("warm", grid_args)]))
        results = list(_imap(pool, tasks))
        pool.close()  # done: the workers exit on their own, no signal sent
        pool.join()
    os.environ.pop("OMP_NUM_THREADS", None)
    t_parallel = time.time() - t_all

    # --- sections 2, 3: timings, alone, all threads ---------------------------
    from pca_fit import compare, format_result
    from text_baseline import eval_prompts, format_throughput, throughput

    from latentwire.llm.models import display_name, load_model
    lm = load_model(args.model)
    thr = []
    for n in args.throughput_n:
        prompts, tdata = eval_prompts(lm, n, "fewshot", ev, args.seed)
        thr.append(throughput(lm, prompts, 8, 16, args.repeats))
    pca = compare(args.model, args.pca_tokens, lm.d_model // 4, tr)  # 4x

    # --- report -----------------------------------------------------------------
    from stage1_grid import markdown_table
    from training_cost import format_cost
    cells = [r for r in results if r["kind"] == "cell"]
    rows = [row for c in cells for row in c["rows"]]
    text = cells[0]["text"]
    mem = next(r for r in results if r["kind"] == "memory")
    costs = sorted((r["row"] for r in results if r["kind"] == "cost"), key=lambda r: (r["adapter"], r["ratio"]))
    dm = mem["metrics"]
    lw = dm["pipelines"]["latentwire"]
    data = (f"`{tr}` (fit/train) and `{ev}` (evaluation, first {args.max_eval} questions round-robin over its "
            f"articles; disjoint articles)" if tr else
            f"the built-in synthetic set (train/eval split by article), first {args.max_eval} evaluation questions")
    md = [
        "# LatentWire benchmarks",
        "",
        f"Generated by `{cmd.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"in {(time.time() - t_all) / 60:.1f} min (sections 1, 4, 5 in {t_parallel / 60:.1f} min on {args.jobs} "
        "single-thread workers; 2 and 3 afterwards, alone). This file is that command's unedited output.",
        "",
        f"* machine: {_machine()}",
        f"* model: `{args.model}` ({display_name(dm['model'])}), fp32 on CPU, greedy decoding, at most 16 new tokens, stop at "
        "newline, few-shot template",
        f"* data: {data}",
        f"* seed {args.seed}; 95% intervals: bootstrap over questions, 1,000 resamples (retention: paired)",
        "",
        "## 1. Quality vs compression",
        "",
        f"Data: {data}. Text baseline on the same {text['n']} questions: F1 {text['f1']:.2f} "
        f"[{text['f1_ci95'][0]:.1f}, {text['f1_ci95'][1]:.1f}], EM {text['exact_match']:.2f}. "
        f"Each cell is one `latentwire run` (PCA fitted on the training text, Phase 1 for {args.epochs} epoch(s)); "
        "f1_retention = reconstructed F1 / text F1; agreement = identical answer to the text pipeline; "
        "token_recovery_vocab = share of all token ids whose reconstruction's nearest embedding row is itself.",
        "",
        markdown_table(rows),
        "",
        "## 2. Generation throughput",
        "",
        f"{tdata}; the text pipeline, batch size 8. Six loops on the same prompts, each step adding one "
        "thing, so that every factor is measured on its own: the newline stop (1 -> 2), batching (2 -> 3), our "
        "greedy loop at equal work (3 -> 4: last-position logits in prefill, our own stopping), the shared-prefix "
        "tree (4 -> 5: a prefix shared by a batch's rows -- the shots, and a paragraph asked about several times "
        "-- is prefilled once and its key/value cache copied), and the run's common prefix (the shots) prefilled "
        "once per run instead of once per batch (5 -> 6, the default). The baseline is loop 3, batched "
        "`model.generate` with the newline as a stop: what a user would pick. Each loop was timed "
        f"{args.repeats} times, interleaved (median, min-max); 'prefill positions' counts the prompt positions "
        "each computes, padding included; answers are compared with the baseline's.",
        "",
        format_throughput(thr),
        "",
        "## 3. Compressor fit",
        "",
        f"Data: the first {args.pca_tokens:,} context tokens of "
        + (f"`{tr}`." if tr else "the built-in synthetic set's training articles."),
        "",
        format_result(pca),
        "",
        "## 4. Training cost to 95% F1 retention",
        "",
        f"Data: {data}. Probe: the first {args.max_eval} evaluation questions; retention checked before training and after "
        "every epoch; training wall time excludes the probe generations, includes the per-epoch selection-set "
        "evaluation.",
        "",
        format_cost(costs),
        "",
        "## 5. Memory of `latentwire run` at its default size",
        "",
        "Data: the built-in synthetic set, whatever the other sections read (the default job's data). "
        "`latentwire run` with no flags (200 evaluation questions, 4x, vocab adapter), "
        "one torch thread:",
        "",
        "| peak resident memory | wall time | text F1 | LatentWire F1 | agreement |",
        "|---|---|---|---|---|",
        f"| {mem['peak_rss_mb']:.0f} MB | {mem['run_wall_s']:.0f} s | {dm['pipelines']['text']['f1']:.2f} | "
        f"{lw['f1']:.2f} | {100 * lw['agreement']:.1f}% |",
        "",
    ]
    text_md = "\n".join(md)
    Path(args.md).write_text(text_md)
    (out / "results.json").write_text(json.dumps({"cells": rows, "throughput": thr, "pca": pca, "cost": costs,
                                                  "memory": {k: v for k, v in mem.items() if k != "metrics"}},
                                                 indent=2, default=str))
    print(text_md)
    print(f"written: {args.md}")
    return 0


def _imap(pool, tasks):
    """Results in task order, with a line per finished task (long jobs first)."""
    pending = [pool.apply_async(_task, t) for t in tasks]
    for (kind, payload), p in zip(tasks, pending):
        while True:  # wake every second: a SIGTERM handler runs only between waits
            try:
                r = p.get(timeout=1.0)
                break
            except mp.TimeoutError:
                pass
        what = payload.get("adapter", "") + (f" x{payload['ratio']:g}" if "ratio" in payload else "")
        print(f"[bench] {kind} {what} done ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        yield r


if __name__ == "__main__":
    sys.exit(main())
