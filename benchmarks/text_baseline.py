"""Text-baseline throughput, each factor measured on its own, against the
loop a user would write instead: `model.generate` on left-padded batches
with the newline as a stop. Six loops on the same prompts, each timed
--repeats times (median, min-max), answers compared with the baseline's:

  1. `model.generate`, one question at a time, to --max-new-tokens (the seed's loop)
  2. the same, stopping at the newline                     (1 -> 2: the newline stop)
  3. `model.generate`, batches of --batch-size, newline stop (2 -> 3: batching) <- baseline
  4. ours, batched, full prefill per row                   (3 -> 4: our loop at equal work)
  5. ours + the shared-prefix tree per batch               (4 -> 5: a paragraph's questions share it)
  6. ours + the run's prefix (the shots) prefilled once    (5 -> 6) = the default

Also the cold vs cached load time of the default GGUF model.

  python benchmarks/text_baseline.py [--n 96] [--batch-size 8] [--repeats 3] [--squad-eval PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


def prefill_positions(prompts, batch_size: int, share_prefix: bool, max_new_tokens: int = 16,
                      window: int | None = None, run_prefix: bool = False) -> int:
    """Positions the prefills compute (padding included) under our batching,
    with or without the shared-prefix tree (the same choice generation makes),
    and with the run's common prefix counted once -- the work, independent of timing."""
    from latentwire.llm.decode import choose_tree, common_prefix_len, tree_cost
    from latentwire.evaluation.generate import plan_batches
    total, shared_once = 0, 0
    run_len = min(common_prefix_len(torch.tensor(prompts[0].ids), torch.tensor(p.ids)) for p in prompts)
    for idx in plan_batches(prompts, batch_size, share_prefix):
        rows = [torch.tensor(prompts[i].ids) for i in idx]
        levels = choose_tree(rows, max_new_tokens, window) if share_prefix else None
        total += tree_cost(levels) if levels else len(rows) * max(map(len, rows))
        if run_prefix and levels:
            shared_once += run_len
    return total - shared_once + (run_len if shared_once else 0)


@torch.no_grad()
def hf_generate(lm, prompts, batch_size: int, max_new_tokens: int, newline_stop: bool) -> list[str]:
    """`model.generate` as a user would call it: greedy, left-padded batches
    (sorted by length), stopping at EOS -- and, with `newline_stop`, at every
    token whose text holds a newline (the same stop set as ours)."""
    from latentwire.llm.decode import decode_answer, left_pad, stop_token_ids
    tok = lm.tokenizer
    stops = stop_token_ids(tok) if newline_stop else [tok.eos_token_id]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([prompts[i].ids for i in idx], tok.pad_token_id)
        gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=tok.pad_token_id)
        for i, g in zip(idx, gen[:, ids.shape[1]:].tolist()):
            out[i] = decode_answer(tok, g)
    return out


LOOPS = [  # (key, label)
    ("gen1_full", "`model.generate`, one at a time, to max_new_tokens (the seed's loop)"),
    ("gen1_nl", "`model.generate`, one at a time, newline stop"),
    ("genB_nl", "`model.generate`, batched, left padding, newline stop (**baseline**)"),
    ("ours_full", "ours, batched, full prefill per row (`--no-share-prefix`)"),
    ("ours_tree", "ours + shared-prefix tree per batch"),
    ("ours_run", "ours + the run's prefix prefilled once (default)"),
]


def throughput(lm, prompts, batch_size: int = 8, max_new_tokens: int = 16, repeats: int = 3) -> dict:
    from latentwire.llm.decode import sliding_window
    from latentwire.evaluation.generate import generate_predictions
    run = {
        "gen1_full": lambda: hf_generate(lm, prompts, 1, max_new_tokens, False),
        "gen1_nl": lambda: hf_generate(lm, prompts, 1, max_new_tokens, True),
        "genB_nl": lambda: hf_generate(lm, prompts, batch_size, max_new_tokens, True),
        "ours_full": lambda: generate_predictions(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                  share_prefix=False, progress=False),
        "ours_tree": lambda: generate_predictions(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                  run_prefix_cache=False, progress=False),
        "ours_run": lambda: generate_predictions(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                 progress=False),
    }
    generate_predictions(lm, prompts[:2], batch_size=2, max_new_tokens=2, progress=False)  # warm-up
    hf_generate(lm, prompts[:2], 2, 2, True)
    w = sliding_window(lm.model)
    r = {"n": len(prompts), "batch_size": batch_size, "repeats": repeats,
         "paragraphs": len({p.example.context for p in prompts}),
         "positions": {"gen1_full": sum(len(p.ids) for p in prompts), "gen1_nl": sum(len(p.ids) for p in prompts),
                       "genB_nl": prefill_positions(prompts, batch_size, False, max_new_tokens, w),
                       "ours_full": prefill_positions(prompts, batch_size, False, max_new_tokens, w),
                       "ours_tree": prefill_positions(prompts, batch_size, True, max_new_tokens, w),
                       "ours_run": prefill_positions(prompts, batch_size, True, max_new_tokens, w, run_prefix=True)},
         "times": {k: [] for k in run}, "answers": {}}
    # interleaved repeats: a slow spell of a shared machine hits every loop alike
    for _ in range(repeats):
        for k, fn in run.items():
            t = time.perf_counter()
            r["answers"][k] = fn()
            r["times"][k].append(time.perf_counter() - t)
    r["median"] = {k: statistics.median(v) for k, v in r["times"].items()}
    base = r["answers"]["genB_nl"]
    r["equal"] = {k: sum(a == b for a, b in zip(v, base)) for k, v in r["answers"].items()}
    return r


def format_throughput(results: list[dict]) -> str:
    lines = ["| questions (paragraphs) | loop | prefill positions | wall s, median [min-max] | questions/s | "
             "vs baseline | step factor | answers = baseline's |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"{r['n']} ({r['paragraphs']})"
        med = r["median"]
        prev = None
        for k, label in LOOPS:
            t = r["times"][k]
            step = "-" if prev is None else f"{med[prev] / med[k]:.2f}x"
            vs = med["genB_nl"] / med[k]
            vs_s = f"**{vs:.2f}x**" if k == "ours_run" else f"{vs:.2f}x"
            lines.append(f"| {head} | {label} | {r['positions'][k]:,} | {med[k]:.1f} [{min(t):.1f}-{max(t):.1f}] | "
                         f"{r['n'] / med[k]:.2f} | {vs_s} | {step} | {r['equal'][k]}/{r['n']} |")
            prev = k
    return "\n".join(lines)


def load_times(model: str) -> dict:
    """Cold (dequantize the GGUF into a fresh, private cache) vs cached load."""
    old = os.environ.get("LATENTWIRE_CACHE")
    from latentwire.llm.models import load_model
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LATENTWIRE_CACHE"] = cache
            t = time.perf_counter(); load_model(model); cold = time.perf_counter() - t
            t = time.perf_counter(); load_model(model); warm = time.perf_counter() - t
    finally:
        if old is None:
            os.environ.pop("LATENTWIRE_CACHE", None)
        else:
            os.environ["LATENTWIRE_CACHE"] = old
    return {"cold_s": cold, "cached_s": warm}


def eval_prompts(lm, n: int, template: str, squad_eval: str | None, seed: int = 0):
    from latentwire.data import PromptBuilder, interleave_by_title, load_squad_json, synthetic_squad
    if squad_eval:
        ex, _ = load_squad_json(squad_eval, "--squad-eval")
        data = f"{squad_eval} (the first questions, round-robin over articles, as `latentwire run` picks them)"
    else:
        ex = synthetic_squad(60, seed)
        data = f"built-in synthetic set (seed {seed}, the first questions)"
    ex = interleave_by_title(ex)[:n]
    b = PromptBuilder(lm.tokenizer, template, 512)
    return [b.build(e) for e in ex], data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, nargs="+", default=[96], help="question counts to time")
    ap.add_argument("--repeats", type=int, default=3, help="timings per loop (median and min-max reported)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--template", default="fewshot")
    ap.add_argument("--squad-eval", default=None, help="SQuAD JSON; default: the built-in synthetic set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from latentwire.llm.models import load_model
    lt = load_times(args.model)
    lm = load_model(args.model)
    results = []
    for n in args.n:
        prompts, data = eval_prompts(lm, n, args.template, args.squad_eval, args.seed)
        results.append(throughput(lm, prompts, args.batch_size, args.max_new_tokens, args.repeats))
    print(f"model: {args.model} ({lm.source}), device {lm.device}, dtype {lm.dtype}, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"data: {data}, template {args.template}, max_new_tokens {args.max_new_tokens}\n")
    print(format_throughput(results) + "\n")
    for r in results:
        m = r["median"]
        print(f"{r['n']} questions: newline stop {m['gen1_full'] / m['gen1_nl']:.2f}x, batching "
              f"{m['gen1_nl'] / m['genB_nl']:.2f}x, our loop at equal work {m['genB_nl'] / m['ours_full']:.2f}x, "
              f"shared-prefix tree {m['ours_full'] / m['ours_tree']:.2f}x, run prefix once "
              f"{m['ours_tree'] / m['ours_run']:.2f}x; ours (default) vs batched `model.generate`: "
              f"**{m['genB_nl'] / m['ours_run']:.2f}x**\n")
    print("| model load | wall s |\n|---|---|")
    print(f"| cold (dequantize GGUF, write cache) | {lt['cold_s']:.1f} |")
    print(f"| cached (safetensors) | {lt['cached_s']:.2f} |")
    print(f"\ncold / cached: **{lt['cold_s'] / lt['cached_s']:.0f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
