"""Text-baseline benchmark: batched greedy generation from inputs_embeds vs
the seed's one-question-at-a-time `model.generate` loop (same prompts, same
run, outputs compared), and the cold vs cached load time of the default
GGUF model.

  python benchmarks/text_baseline.py [--n 32 96] [--batch-size 8] [--squad-eval PATH]

Cold load = dequantizing the GGUF into a fresh, empty cache folder; cached
load = loading the safetensors that the cold load left behind.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch


def prefill_positions(prompts, batch_size: int, share_prefix: bool, max_new_tokens: int = 16,
                      window: int | None = None) -> int:
    """Positions the prefills compute (padding included) under our batching,
    with or without the shared-prefix tree (the same choice generation makes)
    -- the work, independent of timing."""
    from latentwire.evaluate import choose_tree, plan_batches, tree_cost
    total = 0
    for idx in plan_batches(prompts, batch_size, share_prefix):
        rows = [torch.tensor(prompts[i].ids) for i in idx]
        levels = choose_tree(rows, max_new_tokens, window) if share_prefix else None
        total += tree_cost(levels) if levels else len(rows) * max(map(len, rows))
    return total


def throughput(lm, prompts, batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """Questions/s of our batched loop (inputs_embeds, stop at newline), with
    and without the shared-prefix prefill, vs the seed's loop (one question
    per `model.generate` call); answers compared with the seed loop's."""
    from latentwire.evaluate import generate_predictions, generate_seed_loop, sliding_window
    generate_predictions(lm, prompts[:2], batch_size=2, max_new_tokens=2, progress=False)  # warm-up
    r = {"n": len(prompts), "batch_size": batch_size,
         "paragraphs": len({p.example.context for p in prompts}),
         "seed_positions": sum(len(p.ids) for p in prompts)}
    answers = {}
    for name, share in (("shared", True), ("plain", False)):
        t = time.perf_counter()
        answers[name] = generate_predictions(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                             share_prefix=share)
        r[f"{name}_s"] = time.perf_counter() - t
        r[f"{name}_positions"] = prefill_positions(prompts, batch_size, share, max_new_tokens,
                                                   sliding_window(lm.model))
    t = time.perf_counter()
    single = generate_seed_loop(lm, prompts, max_new_tokens=max_new_tokens)
    r["seed_loop_s"] = time.perf_counter() - t
    for name in ("shared", "plain"):
        r[f"{name}_speedup"] = r["seed_loop_s"] / r[f"{name}_s"]
        r[f"{name}_identical"] = sum(a == s for a, s in zip(answers[name], single))
    r["speedup"], r["identical"] = r["shared_speedup"], r["shared_identical"]
    return r


def format_throughput(results: list[dict]) -> str:
    """One table over every question count measured."""
    lines = ["| questions (paragraphs) | generation | prefill positions | wall s | questions/s | "
             "vs seed loop | answers = seed loop's |", "|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"{r['n']} ({r['paragraphs']})"
        lines += [
            f"| {head} | one at a time, `model.generate` (the seed's loop) | {r['seed_positions']:,} | "
            f"{r['seed_loop_s']:.1f} | {r['n'] / r['seed_loop_s']:.2f} | 1.00x | - |",
            f"| {head} | batched {r['batch_size']}, full prefill per row | {r['plain_positions']:,} | "
            f"{r['plain_s']:.1f} | {r['n'] / r['plain_s']:.2f} | {r['plain_speedup']:.2f}x | "
            f"{r['plain_identical']}/{r['n']} |",
            f"| {head} | batched {r['batch_size']}, shared-prefix prefill (default) | {r['shared_positions']:,} | "
            f"{r['shared_s']:.1f} | {r['n'] / r['shared_s']:.2f} | **{r['shared_speedup']:.2f}x** | "
            f"{r['shared_identical']}/{r['n']} |"]
    return "\n".join(lines)


def load_times(model: str) -> dict:
    """Cold (dequantize the GGUF into a fresh, private cache) vs cached load."""
    old = os.environ.get("LATENTWIRE_CACHE")
    from latentwire.models import load_model
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
    ap.add_argument("--n", type=int, nargs="+", default=[32, 96], help="question counts to time")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--template", default="fewshot")
    ap.add_argument("--squad-eval", default=None, help="SQuAD JSON; default: the built-in synthetic set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from latentwire.models import load_model
    lt = load_times(args.model)
    lm = load_model(args.model)
    results = []
    for n in args.n:
        prompts, data = eval_prompts(lm, n, args.template, args.squad_eval, args.seed)
        results.append(throughput(lm, prompts, args.batch_size, args.max_new_tokens))
    print(f"model: {args.model} ({lm.source}), device {lm.device}, dtype {lm.dtype}, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"data: {data}, template {args.template}, max_new_tokens {args.max_new_tokens}\n")
    print(format_throughput(results) + "\n")
    print("| model load | wall s |\n|---|---|")
    print(f"| cold (dequantize GGUF, write cache) | {lt['cold_s']:.1f} |")
    print(f"| cached (safetensors) | {lt['cached_s']:.2f} |")
    print(f"\ncold / cached: **{lt['cold_s'] / lt['cached_s']:.0f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
