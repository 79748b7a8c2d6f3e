"""Text-baseline benchmark: batched greedy generation from inputs_embeds vs
the seed's one-question-at-a-time `model.generate` loop (same prompts, same
run, outputs compared), and the cold vs cached load time of the default
GGUF model.

  python benchmarks/text_baseline.py [--n 64] [--batch-size 8] [--squad-eval PATH]

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


def throughput(lm, prompts, batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """Questions/s of our batched loop (inputs_embeds, left-padded, stop at
    newline) vs the seed's loop (one question per `model.generate` call)."""
    from latentwire.evaluate import generate_predictions, generate_seed_loop
    generate_predictions(lm, prompts[:2], batch_size=2, max_new_tokens=2, progress=False)  # warm-up
    t = time.perf_counter()
    batched = generate_predictions(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = generate_seed_loop(lm, prompts, max_new_tokens=max_new_tokens)
    ts = time.perf_counter() - t
    return {"n": len(prompts), "batch_size": batch_size, "batched_s": tb, "seed_loop_s": ts, "speedup": ts / tb,
            "identical": sum(a == s for a, s in zip(batched, single))}


def format_throughput(r: dict) -> str:
    return "\n".join([
        "| generation | questions | wall s | questions/s |", "|---|---|---|---|",
        f"| batched (batch {r['batch_size']}, left-padded, from inputs_embeds, stop at newline) | {r['n']} | "
        f"{r['batched_s']:.1f} | {r['n'] / r['batched_s']:.2f} |",
        f"| one at a time, `model.generate` (the seed's loop) | {r['n']} | {r['seed_loop_s']:.1f} | "
        f"{r['n'] / r['seed_loop_s']:.2f} |",
        f"\nspeed-up batched / seed loop: **{r['speedup']:.2f}x**; identical answers: {r['identical']}/{r['n']}"])


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
        data = f"{squad_eval} (first {n} questions, round-robin over articles)"
    else:
        ex = synthetic_squad(60, seed)
        data = f"built-in synthetic set (seed {seed}, first {n} questions)"
    ex = interleave_by_title(ex)[:n]
    b = PromptBuilder(lm.tokenizer, template, 512)
    return [b.build(e) for e in ex], data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="questions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--template", default="fewshot")
    ap.add_argument("--squad-eval", default=None, help="SQuAD JSON; default: the built-in synthetic set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from latentwire.models import load_model
    lt = load_times(args.model)
    lm = load_model(args.model)
    prompts, data = eval_prompts(lm, args.n, args.template, args.squad_eval, args.seed)
    r = throughput(lm, prompts, args.batch_size, args.max_new_tokens)
    print(f"model: {args.model} ({lm.source}), device {lm.device}, dtype {lm.dtype}, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"data: {data}, template {args.template}, max_new_tokens {args.max_new_tokens}\n")
    print(format_throughput(r) + "\n")
    print("| model load | wall s |\n|---|---|")
    print(f"| cold (dequantize GGUF, write cache) | {lt['cold_s']:.1f} |")
    print(f"| cached (safetensors) | {lt['cached_s']:.2f} |")
    print(f"\ncold / cached: **{lt['cold_s'] / lt['cached_s']:.0f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
