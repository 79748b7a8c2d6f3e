"""Command line: only wiring. Flags are generated from the config dataclasses
(their docstrings are the --help text), so a flag and its field never drift.

  latentwire run        every pipeline on the same questions, in bytes, with controls; the report
  latentwire send       a paragraph -> a payload file (its bytes, positions, and the text's sizes)
  latentwire ask        a payload file + a question -> the frozen LLM's answer
  latentwire pipelines  the kinds of pipeline, one line each
  latentwire train-encoder  train the pooled LM encoder (the learned wire); its folder is a --pipeline
  latentwire eval       the text pipeline alone on SQuAD / the built-in set
  latentwire sweep      many runs from a YAML/TOML file
  latentwire diagnose   the seed's five hypotheses, tested

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

# Each command imports what it runs inside its branch (the API, the run, the sweep, training): `latentwire --help`
# and a bad flag answer without loading them (start-up time).


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


DESCRIPTION = ("Can a frozen LLM still do its job when it reads a compressed representation -- cheaper than its own "
               "text -- instead of its own input? A pipeline is a sender (paragraph -> payload bytes) and a receiver "
               "(payload -> what the frozen LLM reads); `run` measures every pipeline on the same SQuAD questions "
               "against the text, in bytes, learned ones beside their controls.")


def _add_wire_args(p: argparse.ArgumentParser) -> None:
    """What `send` and `ask` share: the pipeline, its receiver model and ratio (both ends must agree)."""
    p.add_argument("--pipeline", required=True, metavar="SPEC",
                   help="a kind (`latentwire pipelines`), a run folder, or package.module:Factory")
    p.add_argument("--model", default=None, help="the receiving LLM (default: the run folder's, else smollm2-135m)")
    p.add_argument("--ratio", type=float, default=4.0, help="r for kinds that compress the sequence (default: 4)")
    p.add_argument("--codec-model", default=None,
                   help="the LLM that codes ac, truncate+ac, surprisal+ac (default: the receiver, --model)")
    p.add_argument("--template", default=None,
                   help="prompt template of the receiver (default: the run folder's, else fewshot)")
    p.add_argument("--fits", default=None, metavar="DIR",
                   help="opt-* kinds: keep per-paragraph fits here (a rerun with the same paragraph refits nothing)")
    _add_group(p, "opt", _GROUPS["opt"])


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="latentwire", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pw = sub.add_parser("send", help="a paragraph -> a payload file",
                        description="Send a paragraph: write the exact payload a pipeline's sender makes of it, and "
                                    "print its bytes and positions beside the paragraph's UTF-8 and zstd sizes.")
    _add_wire_args(pw)
    pw.add_argument("paragraph", help="a UTF-8 text file holding the paragraph (the context)")
    pw.add_argument("-o", "--output", required=True, help="where the payload's bytes go")
    pa = sub.add_parser("ask", help="a payload file + a question -> the answer",
                        description="Ask the frozen receiver LLM a question about a payload: it reads the payload "
                                    "where the paragraph would be (the evaluation's prompt and greedy decoding).")
    _add_wire_args(pa)
    pa.add_argument("payload", help="a payload file written by `latentwire send` with the same pipeline flags (its "
                                    "frame is checked: another pipeline, ratio or model is refused)")
    pa.add_argument("question", help="the question")
    pa.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default: 16)")
    pt = sub.add_parser("train-encoder", help="train the pooled LM encoder; its folder is then a --pipeline",
                        description="Train the pooled LM encoder (docs/encoder.md): a trainable copy of the receiver's "
                                    "LM reads each paragraph, its final states mean-pooled over every r tokens, "
                                    "through a projector into the frozen receiver's embedding space; stage A "
                                    "(reconstruction + continuation), stage B (answers, KL to the text); the best "
                                    "held-out state is saved as safetensors + encoder.json in --out.")
    for key in ("model", "data"):
        _add_group(pt, key, _GROUPS[key])
    from .config import EncConfig
    _add_group(pt, "enc", EncConfig)
    pt.add_argument("--out", required=True, help="the encoder's folder (weights, encoder.json, logs, ckpt.pt)")
    pt.add_argument("--resume", action="store_true",
                    help="continue from the folder's ckpt.pt (or, without one, from its saved weights)")
    pt.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("pipelines", help="the kinds of pipeline, one line each",
                   description="The kinds --pipeline / --sequence / `send` / `ask` accept, one line each.")
    pe = sub.add_parser("eval", help="the text pipeline alone: batched greedy generation, SQuAD EM/F1")
    for key in ("model", "data", "eval"):
        _add_group(pe, key, _GROUPS[key])
    pe.add_argument("--out", default="runs/eval", help="run folder (default: runs/eval)")
    pe.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr = sub.add_parser("run", help="every pipeline on the same questions, in bytes, with controls; the report",
                        description="Evaluate pipelines on the same questions as the text pipeline -- F1, retention, "
                                    "agreement, bytes and positions per context -- training or fitting what needs it "
                                    "(Stage 1, --sequence learned, opt-*), every learned pipeline beside its controls.")
    for key in _GROUPS:
        _add_group(pr, key, _GROUPS[key])
    pr.add_argument("--out", default="runs/latest", help="run folder (default: runs/latest)")
    pr.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                    help="also evaluate the linear-PCA-inverse control (default: on)")
    pr.add_argument("--no-cache", action="store_true",
                    help="generate every answer afresh instead of reading the answer cache (text, token pipelines, ac)")
    pr.add_argument("--resume", action="store_true", help="continue training from the run folder's checkpoints (ckpt.pt, ckpt_phase2.pt)")
    pr.add_argument("--overwrite", action="store_true", help="start over in a run folder that already holds a run")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    ps = sub.add_parser("sweep", help="many runs from a YAML/TOML file; results.csv, resumable, plots")
    ps.add_argument("file", help="sweep file (out/base/grid/runs)")
    ps.add_argument("--out", default=None, help="sweep folder (default: the file's `out`, else runs/sweep)")
    ps.add_argument("--no-cache", action="store_true",
                    help="generate every answer afresh instead of reading the answer cache (text, token pipelines, ac)")
    pd = sub.add_parser("diagnose", help="test the seed's five hypotheses against a configuration (seed preset)")
    for key in _GROUPS:
        _add_group(pd, key, _GROUPS[key])
    pd.set_defaults(**{"adapter.preset": "seed", "data.max_eval": 300})
    pd.add_argument("--h3-phase2-steps", type=int, default=30, help="Phase 2 steps for hypothesis 3 (default: 30)")
    pd.add_argument("--out", default="runs/diagnose", help="diagnose folder (default: runs/diagnose)")
    pd.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _wire_command(args) -> None:
    """`latentwire send` / `ask`: one pipeline, its receiver model, one payload file."""
    from pathlib import Path

    from .api import ask, load_pipeline
    from .config import OptConfig
    opts = {f.name: getattr(args, f"opt.{f.name}") for f in fields(OptConfig)}
    if args.template is not None:
        opts["template"] = args.template
    if args.cmd == "send":
        src = Path(args.paragraph)
        if not src.is_file():
            raise LatentWireError(f"paragraph {args.paragraph}: no such file")
        try:
            text = " ".join(src.read_bytes().decode("utf-8").split())
        except UnicodeDecodeError as e:
            raise LatentWireError(f"paragraph {args.paragraph}: not UTF-8 text (byte {e.start})") from None
        if not text:
            raise LatentWireError(f"paragraph {args.paragraph}: empty")
    else:
        src = Path(args.payload)
        if not src.is_file():
            raise LatentWireError(f"payload {args.payload}: no such file")
        data = src.read_bytes()
        if args.max_new_tokens < 1:
            raise LatentWireError("--max-new-tokens must be >= 1")
    if not args.ratio >= 1:
        raise LatentWireError(f"--ratio must be >= 1 (got {args.ratio:g})")
    from .pipelines import frame
    if args.cmd == "ask":  # what needs no model is checked before one loads
        frame.check(data, f"payload {args.payload}", frame.kind_label(args.pipeline, args.ratio))
    pipe = load_pipeline(args.pipeline, args.model, args.ratio, options=opts, out=args.fits,
                         codec_model=args.codec_model)
    if args.cmd == "ask":
        print(ask(pipe, data, args.question, max_new_tokens=args.max_new_tokens,
                  where=f"payload {args.payload}"))
        return
    from .util.runio import atomic_write_bytes
    payload = pipe.send(text)
    atomic_write_bytes(args.output, frame.wrap(pipe, payload))
    utf8 = len(text.encode("utf-8"))
    line = (f"{args.output}: {len(payload):,} bytes payload + {frame.FRAME_BYTES} bytes frame, {payload.positions} "
            f"positions ({pipe.name}); UTF-8 {utf8:,} bytes")
    try:
        import zstandard
        z = len(zstandard.ZstdCompressor(level=19).compress(text.encode("utf-8")))
        line += f", zstd -19 {z:,} bytes"
    except ImportError:
        z = None
    ratios = f"{len(payload) / utf8:.3f}x UTF-8" + (f", {len(payload) / z:.3f}x zstd" if z else "")
    print(f"{line}: the payload is {ratios}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from .util import dist
    ok = False
    try:
        # under torchrun / accelerate launch: join the process group (no-op alone)
        if args.cmd in ("eval", "run"):
            dist.init()
        if args.cmd == "pipelines":
            from .pipelines import KINDS
            w = max(map(len, KINDS))
            for k in KINDS.values():
                print(f"{k.name:<{w}}  {k.summary}" + (" [takes --ratio]" if k.ratio else ""))
            print(f"{'DIR':<{w}}  a trained pipeline's folder: a train-encoder folder, or a run folder's learned "
                  "compressor (v0.1) or Stage 1")
            print(f"{'pkg.mod:Factory':<{w}}  your own: Factory(BuildContext) -> a latentwire.Pipeline")
        elif args.cmd in ("send", "ask"):
            _wire_command(args)
        elif args.cmd == "train-encoder":
            from .config import EncConfig
            from .encoder.lmtrain import train_job
            cfg = _build(args, ("model", "data"))
            enc = EncConfig(**{f.name: getattr(args, f"enc.{f.name}") for f in fields(EncConfig)})
            meta = train_job(cfg, enc, args.out, resume=args.resume, progress=not args.no_progress,
                             argv=argv if argv is not None else sys.argv[1:])
            r = meta["record"]
            print(f"{args.out}: {r['steps']} steps in {r['seconds']:.0f} s, best held-out F1 {r['heldout_f1']:.2f} "
                  f"(step {r['best_step']}); {meta['bytes']:,} bytes of weights in {len(meta['files'])} file(s)")
        elif args.cmd == "eval":
            from .evaluation.run import text_baseline_eval
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
            from .evaluation.run import run_experiment
            cfg = _build(args, tuple(_GROUPS), _explicit(argv))
            run_experiment(cfg, use_cache=not args.no_cache, resume=args.resume, overwrite=args.overwrite)
        elif args.cmd == "sweep":
            from .evaluation.sweep import apply_overrides, expand, load_sweep_file, run_sweep
            spec = load_sweep_file(args.file)
            base = apply_overrides(RunConfig(), spec.get("base") or {}, where=f"sweep file {args.file}: base")
            base.progress = False
            out = args.out or spec.get("out") or "runs/sweep"
            rows = run_sweep(base, expand(spec), out, use_cache=not args.no_cache)
            print(f"{len(rows)} runs in {out}/results.csv; plots in {out}/")
            if spec.get("compare"):
                from pathlib import Path

                from .evaluation.sweep import compare_runs
                print(compare_runs(rows, spec["compare"], Path(out), base.eval.n_boot, base.data.seed), end="")
                print(f"paired comparisons: {out}/compare.md")
        else:
            from .evaluation.sweep import run_diagnose
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
