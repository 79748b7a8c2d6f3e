"""Learning curves of `latentwire train-encoder` runs: held-out F1 through the
wire against examples seen and against CPU minutes of training steps, with
the text, truncation at equal positions (r = the runs' --enc-ratio) and
nothing on the same held-out questions as lines.

Each run folder's heldout.jsonl (one row per evaluation: step, F1, seconds)
and config.json are read; the reference lines are computed once on the
runs' held-out questions (the same split: same data, seed and hold-out
sizes, checked) and kept in --out/references.json, reused -- and said so --
only when the model's weights, the questions, the ratio and the template are
identical. Where a run logged each question's score (train-encoder does),
a point gets its 95% bootstrap interval and its paired difference from
truncation on the same questions (a band on the plot; columns in the table),
and, where the reference run (--paired-with, default the first of --runs)
logged them at the same step, its paired difference from that run. A second
plot, losses.png, draws the training losses each run logged (train_log.jsonl,
running means): runs with the same seed see the same batches at each step.

  python benchmarks/encoder_curves.py --runs runs/enc/top2 --squad-train ../shared/squad/train-v1.1-first44.json \
      --out docs/encoder-curves
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REFERENCES = ("text", "truncate", "none")
# the training-loss terms train_log.jsonl holds, by stage: losses.png draws one panel each, loss_table a row each
LOSS_TERMS = (("A", "ce", "stage A: reconstruction + continuation CE"), ("B", "ce", "stage B: answer CE"),
              ("B", "kl", "stage B: KL to the teacher"))


def load_run(folder: Path) -> dict:
    """A run's config.json and evaluations (one-line errors naming the folder)."""
    from latentwire.errors import LatentWireError
    from latentwire.util.runio import read_jsonl
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LatentWireError(f"--runs {folder}: no readable config.json ({e})") from None
    evals = read_jsonl(folder / "heldout.jsonl", skip_bad=True) if (folder / "heldout.jsonl").is_file() else []
    if not evals:
        raise LatentWireError(f"--runs {folder}: no held-out evaluation in heldout.jsonl yet")
    log = folder / "train_log.jsonl"
    steps = [e for e in (read_jsonl(log, skip_bad=True) if log.is_file() else []) if "step" in e and "ce" in e]
    batch = cfg["enc"]["enc_batch"]
    points = [{"step": e["step"], "examples": e["step"] * batch, "cpu_min": e["seconds"] / 60,
               "f1": e["heldout_f1"], **({"f1s": e["f1s"]} if e.get("f1s") else {})} for e in evals]
    return {"name": folder.name, "folder": str(folder), "config": cfg, "points": points,
            "losses": [{"step": e["step"], "stage": e["stage"], "ce": e["ce"], "kl": e.get("kl")} for e in steps]}


def running_mean(xs: list[float], n: int) -> list[float]:
    """The mean of each value and the n - 1 before it (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def plot_losses(runs: list[dict], path: Path, title: str, window: int = 50) -> bool:
    """The training losses each step logged (train_log.jsonl: the same batches in every run with the same seed,
    so equal steps compare like with like): stage A's reconstruction + continuation CE and stage B's answer CE
    and KL to the teacher, each a running mean over `window` steps. False when no run logged a step."""
    if not any(r["losses"] for r in runs):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {r["name"]: f"C{i % 10}" for i, r in enumerate(runs)}  # a run keeps its colour across panels
    for ax, (stage, key, label) in zip(axes, LOSS_TERMS):
        for r in runs:
            rows = [e for e in r["losses"] if e["stage"] == stage and e.get(key) is not None]
            if rows:
                ax.plot([e["step"] for e in rows], running_mean([e[key] for e in rows], window), lw=1,
                        color=colors[r["name"]])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"running mean over {window} steps")
    from matplotlib.lines import Line2D
    axes[2].legend([Line2D([], [], color=c) for c in colors.values()], list(colors), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heldout_prompts(runs: list[dict], squad_train: str | None, lm):
    """The held-out prompts every run evaluated on (refused when the runs' splits differ)."""
    from latentwire.config import EncConfig
    from latentwire.data import PromptBuilder, load_squad_json
    from latentwire.errors import LatentWireError
    from latentwire.encoder.lmtrain import split_training
    split_keys = ("enc_seed", "enc_heldout_paragraphs", "enc_heldout_questions", "enc_max_tokens")
    first = runs[0]["config"]
    for r in runs[1:]:
        for k in split_keys:
            if r["config"]["enc"][k] != first["enc"][k]:
                raise LatentWireError(f"--runs {r['folder']}: {k} differs from {runs[0]['folder']} (another "
                                      "held-out split)")
    path = squad_train or first["data"]["squad_train"]
    if not path:
        raise LatentWireError("--squad-train: the runs name no training file; give it")
    train = load_squad_json(path, "--squad-train")[0]
    d = first["data"]
    builder = PromptBuilder(lm.tokenizer, d["template"], d["max_prompt_tokens"], d["bos"] != "none")
    ec = EncConfig(**{k: first["enc"][k] for k in split_keys})
    return split_training(train, builder, ec)[1], path


def references(lm, prompts, ratio: int, template: str, out: Path, log=print) -> dict:
    """Each held-out question's F1 (0..1) under text, truncate_r<ratio> and none: {kind: [scores]}; from
    out/references.json when its key matches (and it holds per-question scores)."""
    from latentwire.api import load_pipeline
    from latentwire.encoder.lmtrain import code_version, mean100, prompts_scores
    from latentwire.util.runio import content_key, write_json
    key = content_key(lm.weights_digest(), [p.example.id for p in prompts], ratio, template)
    path = out / "references.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key and isinstance(old.get("scores"), dict):
            log(f"references reused from {path} (same weights, {len(prompts)} questions, r = {ratio}, {template})")
            return old["scores"]
    scores = {}
    for kind in REFERENCES:
        t0 = time.time()
        pipe = load_pipeline(kind, lm=lm, ratio=ratio, options={"template": template})
        scores[kind] = prompts_scores(lm, prompts, pipe)
        log(f"{kind}: F1 {mean100(scores[kind]):.2f} on {len(prompts)} held-out questions ({time.time() - t0:.0f} s)")
    write_json(path, {"key": key, "f1": {k: mean100(v) for k, v in scores.items()}, "scores": scores,
                      "questions": len(prompts), "ratio": ratio, "template": template, "code_version": code_version()})
    return scores


def intervals(runs: list[dict], ref_scores: dict, base: dict | None = None, n_boot: int = 1000, seed: int = 0
              ) -> None:
    """Add to every point that logged its questions' scores (train-encoder does since 2026-12-07): its F1's 95%
    bootstrap interval over the held-out questions (`ci`), the paired difference from truncation on the same
    questions with its interval (`d_trunc`), and -- where run `base` logged its scores at the same step -- the
    paired difference from `base` (`d_base`: one change against the recipe, at equal steps, on the same
    questions). Earlier points have the mean only."""
    from latentwire.evaluation.metrics import bootstrap_ci, paired_delta
    trunc = [{"f1": x} for x in ref_scores["truncate"]]
    at = {p["step"]: p["f1s"] for p in (base or {}).get("points", []) if len(p.get("f1s") or ()) == len(trunc)}
    for r in runs:
        for p in r["points"]:
            f1s = p.get("f1s")
            if not f1s or len(f1s) != len(trunc):
                continue
            p["ci"] = list(bootstrap_ci(f1s, n_boot, seed))
            p["d_trunc"] = list(paired_delta(trunc, [{"f1": x} for x in f1s], "f1", n_boot, seed))
            if r is not base and p["step"] in at:
                p["d_base"] = list(paired_delta([{"f1": x} for x in at[p["step"]]], [{"f1": x} for x in f1s], "f1",
                                                n_boot, seed))


def plot(runs: list[dict], ref: dict, ratio: int, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, label in ((axes[0], "examples", "examples seen"), (axes[1], "cpu_min", "CPU minutes of training steps")):
        for r in runs:
            line, = ax.plot([p[x] for p in r["points"]], [p["f1"] for p in r["points"]], marker="o", ms=3,
                            label=r["name"])
            band = [p for p in r["points"] if "ci" in p]
            if band:  # the 95% interval over the held-out questions, where the run logged their scores
                ax.fill_between([p[x] for p in band], [p["ci"][0] for p in band], [p["ci"][1] for p in band],
                                color=line.get_color(), alpha=0.15, lw=0)
            if x == "examples" and r["config"]["enc"]["enc_steps_a"]:  # where stage A ends
                ax.axvline(r["config"]["enc"]["enc_steps_a"] * r["config"]["enc"]["enc_batch"], color=line.get_color(),
                           ls=":", lw=0.8)
        for kind, style in zip(REFERENCES, ("-", "--", ":")):
            ax.axhline(ref[kind], color="gray", ls=style, lw=1,
                       label=f"{kind if kind != 'truncate' else f'truncate r={ratio}'} {ref[kind]:.1f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out F1 (greedy, through the wire)")
    axes[0].set_title("dotted vertical: the end of stage A", fontsize=8)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.93))  # below the text line, above the curves
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: list[dict], ref: dict, base: str) -> str:
    lines = ["| run | step | examples | CPU min | held-out F1 [95% CI] | vs truncation (paired) [95% CI] | "
             f"vs {base} at the same step (paired) [95% CI] |", "|---|---|---|---|---|---|---|"]
    ci = lambda d: f"{d[0]:+.2f} [{d[1]:+.1f}, {d[2]:+.1f}]"  # noqa: E731
    for r in runs:
        for p in r["points"]:
            f1 = f"{p['f1']:.2f}" + (f" [{p['ci'][0]:.1f}, {p['ci'][1]:.1f}]" if "ci" in p else "")
            d = ci(p["d_trunc"]) if "d_trunc" in p else f"{p['f1'] - ref['truncate']:+.2f}"
            lines.append(f"| {r['name']} | {p['step']} | {p['examples']:,} | {p['cpu_min']:.1f} | {f1} | {d} | "
                         f"{ci(p['d_base']) if 'd_base' in p else '-'} |")
    return "\n".join(lines)


def loss_table(runs: list[dict], base: dict) -> str:
    """Each run's mean training loss terms against `base`'s on the very same steps (the same batches, where the
    seeds agree): stage A's CE, stage B's answer CE and KL. A difference near 0 at equal steps says the change did
    not make the loss fall faster on the examples it trained on."""
    if len(runs) < 2:
        return "(one run: nothing to pair)"
    ref = {(e["stage"], e["step"]): e for e in base["losses"]}
    lines = [f"| run | stage | term | steps shared with {base['name']} | mean | {base['name']} on the same steps | "
             "difference |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r is base:
            continue
        for stage, key, _ in LOSS_TERMS:
            pairs = [(e[key], ref[(stage, e["step"])][key]) for e in r["losses"] if e["stage"] == stage
                     and e.get(key) is not None and (ref.get((stage, e["step"])) or {}).get(key) is not None]
            if pairs:
                a, b = (sum(x) / len(pairs) for x in zip(*pairs))
                lines.append(f"| {r['name']} | {stage} | {key} | {len(pairs)} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", action="append", required=True, help="a train-encoder folder (repeat, or comma-separate)")
    ap.add_argument("--squad-train", default=None, help="the runs' training file (default: as their config.json says)")
    ap.add_argument("--out", default="runs/encoder_curves", help="folder for curves.png, table.md, references.json")
    ap.add_argument("--paired-with", default=None, metavar="RUN",
                    help="the run (folder name) every other run is paired against at equal steps (default: the first)")
    a = ap.parse_args(argv)
    from latentwire.encoder.lmtrain import mean100
    from latentwire.errors import LatentWireError
    from latentwire.llm.models import display_name, load_model
    from latentwire.util.runio import atomic_write_text, write_json
    try:
        runs = [load_run(Path(f)) for arg in a.runs for f in arg.split(",") if f]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        model = runs[0]["config"]["model"]["model"]
        lm = load_model(model)
        prompts, data = heldout_prompts(runs, a.squad_train, lm)
        ratio = runs[0]["config"]["enc"]["enc_ratio"]
        names = [r["name"] for r in runs]
        if a.paired_with is not None and a.paired_with not in names:
            raise LatentWireError(f"--paired-with {a.paired_with}: not one of --runs ({', '.join(names)})")
        base = runs[names.index(a.paired_with or names[0])]
        ref_scores = references(lm, prompts, ratio, runs[0]["config"]["data"]["template"], out)
    except LatentWireError as e:
        print(f"encoder_curves.py: error: {e}", file=sys.stderr)
        return 2
    what = (f"model {display_name(lm.source)}, {len(prompts)} held-out questions of {data} (paragraphs held out of "
            f"training, seed {runs[0]['config']['enc']['enc_seed']}), greedy")
    ref = {k: mean100(v) for k, v in ref_scores.items()}
    intervals(runs, ref_scores, base)
    plot(runs, ref, ratio, out / "curves.png", what)
    plot_losses(runs, out / "losses.png", f"training losses, model {display_name(lm.source)}, {data}")
    cmd = "python benchmarks/encoder_curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"`{cmd}` ({what})\n\nreferences on the same questions: text {ref['text']:.2f}, truncate r={ratio} "
          f"{ref['truncate']:.2f}, none {ref['none']:.2f}\n\n{table(runs, ref, base['name'])}\n\n"
          f"training losses on the same steps (train_log.jsonl; plot: losses.png)\n\n{loss_table(runs, base)}\n")
    atomic_write_text(out / "table.md", md)
    write_json(out / "curves.json", {"runs": [{**{k: v for k, v in r.items() if k != "losses"},
                                               "points": [{k: v for k, v in p.items() if k != "f1s"}
                                                          for p in r["points"]]} for r in runs],
                                     "references": ref})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
