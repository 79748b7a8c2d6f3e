"""Command line: only wiring. Flags are generated from the config dataclasses
(their docstrings are the --help text), so a flag and its field never drift.

  latentwire eval      text baseline on SQuAD / the built-in set
  latentwire run       the whole Stage 1 pipeline and its report
  latentwire sweep     many runs from a YAML/TOML file
  latentwire diagnose  the seed's five hypotheses, tested

`run` and `eval` also run under `torchrun --nproc_per_node N -m latentwire`
(or `accelerate launch`): training is data-parallel, evaluation sharded.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import fields

from .config import GROUPS as _GROUPS
from .config import RunConfig, apply_preset, field_docs
from .errors import LatentWireError


def _add_group(p: argparse.ArgumentParser, key: str, cls, suppress: bool = False) -> None:
    g = p.add_argument_group(key)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")  # argparse formats help
        dest = f"{key}.{f.name}"
        default = argparse.SUPPRESS if suppress else f.default
        if t is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            base = next((a for a in typing.get_args(t) if a is not type(None)), t)
            g.add_argument(flag, dest=dest, type=base, default=default, help=help_, metavar=f.name.upper())


def _explicit(argv) -> set[str]:
    """The config fields the user gave on the command line (group.field)."""
    p = _Parser(prog="latentwire", add_help=False)
    for key in _GROUPS:
        _add_group(p, key, _GROUPS[key], suppress=True)
    args, _ = p.parse_known_args(argv if argv is not None else sys.argv[1:])
    return set(vars(args))


def _build(args, groups, explicit: set[str] | None = None) -> RunConfig:
    """The config: defaults, then --preset, then every flag given explicitly
    (so `--preset seed --calibration rms` keeps rms)."""
    cfg = RunConfig()
    for key in groups:
        sub = getattr(cfg, key)
        for f in fields(sub):
            setattr(sub, f.name, getattr(args, f"{key}.{f.name}"))
    if explicit is not None:
        apply_preset(cfg, keep={k.split(".")[1] for k in explicit})
    cfg.out = args.out
    cfg.progress = not args.no_progress
    if hasattr(args, "controls"):
        cfg.controls = args.controls
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(2, f"latentwire: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="latentwire", description="Compressed-then-reconstructed input embeddings for a frozen LLM.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pe = sub.add_parser("eval", help="text baseline: batched greedy generation, SQuAD EM/F1")
    for key in ("model", "data", "eval"):
        _add_group(pe, key, _GROUPS[key])
    pe.add_argument("--out", default="runs/eval", help="run folder (default: runs/eval)")
    pe.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr = sub.add_parser("run", help="fit compressor, train adapter, evaluate, diagnose, report")
    for key in _GROUPS:
        _add_group(pr, key, _GROUPS[key])
    pr.add_argument("--out", default="runs/latest", help="run folder (default: runs/latest)")
    pr.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                    help="also evaluate the linear-PCA-inverse control (default: on)")
    pr.add_argument("--no-cache", action="store_true", help="recompute the text baseline instead of reusing it")
    pr.add_argument("--resume", action="store_true", help="continue training from the run folder's checkpoints (ckpt.pt, ckpt_phase2.pt)")
    pr.add_argument("--overwrite", action="store_true", help="start over in a run folder that already holds a run")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    ps = sub.add_parser("sweep", help="many runs from a YAML/TOML file; results.csv, resumable, plots")
    ps.add_argument("file", help="sweep file (out/base/grid/runs)")
    ps.add_argument("--out", default=None, help="sweep folder (default: the file's `out`, else runs/sweep)")
    ps.add_argument("--no-cache", action="store_true", help="recompute the text baseline instead of reusing it")
    pd = sub.add_parser("diagnose", help="test the seed's five hypotheses against a configuration (seed preset)")
    for key in _GROUPS:
        _add_group(pd, key, _GROUPS[key])
    pd.set_defaults(**{"adapter.preset": "seed", "data.max_eval": 300})
    pd.add_argument("--h3-phase2-steps", type=int, default=30, help="Phase 2 steps for hypothesis 3 (default: 30)")
    pd.add_argument("--out", default="runs/diagnose", help="diagnose folder (default: runs/diagnose)")
    pd.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from . import dist
    ok = False
    try:
        # under torchrun / accelerate launch: join the process group (no-op alone)
        if args.cmd in ("eval", "run"):
            dist.init()
        if args.cmd == "eval":
            from .run import text_baseline_eval
            cfg = _build(args, ("model", "data", "eval"))
            m = text_baseline_eval(cfg)
            if not m:  # a rank other than 0 under a launcher: rank 0 prints
                ok = True
                return 0
            t = m["pipelines"]["text"]
            print(f"| pipeline | n | F1 | 95% CI | EM |\n|---|---|---|---|---|\n| text | {t['n']} | {t['f1']:.2f} | "
                  f"{t['f1_ci95'][0]:.1f}-{t['f1_ci95'][1]:.1f} | {t['exact_match']:.2f} |")
            print(f"run folder: {cfg.out} (predictions.jsonl, metrics.json)")
        elif args.cmd == "run":
            from .run import run_experiment
            cfg = _build(args, tuple(_GROUPS), _explicit(argv))
            run_experiment(cfg, use_cache=not args.no_cache, resume=args.resume, overwrite=args.overwrite)
        elif args.cmd == "sweep":
            from .sweep import apply_overrides, expand, load_sweep_file, run_sweep
            spec = load_sweep_file(args.file)
            base = apply_overrides(RunConfig(), spec.get("base") or {}, where=f"sweep file {args.file}: base")
            base.progress = False
            out = args.out or spec.get("out") or "runs/sweep"
            rows = run_sweep(base, expand(spec), out, use_cache=not args.no_cache)
            print(f"{len(rows)} runs in {out}/results.csv; plots in {out}/")
            if spec.get("compare"):
                from pathlib import Path

                from .sweep import compare_runs
                print(compare_runs(rows, spec["compare"], Path(out), base.eval.n_boot, base.data.seed), end="")
                print(f"paired comparisons: {out}/compare.md")
        else:
            from .sweep import run_diagnose
            explicit = _explicit(argv)
            cfg = _build(args, tuple(_GROUPS))
            if args.h3_phase2_steps < 1:
                raise LatentWireError("--h3-phase2-steps must be >= 1")
            run_diagnose(cfg, args.out, phase2_steps=args.h3_phase2_steps, keep={k.split(".")[1] for k in explicit})
            print(f"report: {args.out}/diagnose_report.md")
        ok = True
    except LatentWireError as e:
        print(f"latentwire: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = f" -- continue with: latentwire run --resume --out {args.out} (same flags)" if args.cmd == "run" else ""
        print(f"latentwire: interrupted{': ' + str(e) if str(e) else ''}{hint}", file=sys.stderr)
        return 130
    finally:
        dist.shutdown(wait=ok)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
