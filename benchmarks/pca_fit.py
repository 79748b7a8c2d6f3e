"""Compressor fit: LatentWire's streamed-covariance PCA vs the seed's method
(collect every token embedding, then `torch.svd_lowrank`), on the same N
token embeddings of the default model. Each method runs in its own
subprocess; peak memory is the peak resident set size above the process's
RSS just before fitting (sampled every 2 ms with psutil).

  python benchmarks/pca_fit.py [--tokens 1000000] [--dim 144] [--squad-train PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _token_ids(args):
    import torch

    from latentwire.data import load_squad_json, synthetic_squad
    from latentwire.llm.models import load_model
    lm = load_model(args.model)
    if args.squad_train:
        ex, _ = load_squad_json(args.squad_train, "--squad-train")
        src = f"{args.squad_train} contexts+questions, cycled"
    else:
        ex = synthetic_squad(200, 0)
        src = "built-in synthetic set, cycled"
    seen, ids = set(), []
    for e in ex:
        if e.context not in seen:
            seen.add(e.context)
            ids += lm.tokenizer(e.context, add_special_tokens=False)["input_ids"]
        ids += lm.tokenizer(e.question, add_special_tokens=False)["input_ids"]
    t = torch.tensor(ids)
    reps = -(-args.tokens // t.numel())
    return lm, t.repeat(reps)[:args.tokens], src, t.numel()


def worker(args) -> None:
    import psutil
    import torch

    from latentwire.wire.compress import PCA
    lm, ids, src, distinct = _token_ids(args)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.method == "stream":
            p = PCA(args.dim).fit_token_ids(lm.embed, ids)
            comps = p.components_
            reported = float(p.explained_variance_ratio_.sum())
            true = reported
        else:
            # the seed: materialise [N, d], centre, randomized SVD of rank k
            x = torch.cat([lm.embed(ids[i:i + 65536]).float() for i in range(0, ids.numel(), 65536)])
            mean = x.mean(0)
            x -= mean
            u, s, v = torch.svd_lowrank(x, q=args.dim, niter=2)
            comps = v.T
            reported = float((s ** 2).sum() / (s ** 2).sum())  # normalised over the kept components: "100%"
            true = float((s ** 2).sum() / x.pow(2).sum())
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    torch.save(comps, args.comps_out)
    print(json.dumps({"method": args.method, "d_model": lm.d_model, "wall_s": wall, "peak_mb": (peak[0] - base) / 2 ** 20,
                      "reported_evr": reported, "true_evr": true, "source": src, "distinct_tokens": distinct}))


def compare(model: str, tokens: int, dim: int, squad_train: str | None) -> dict:
    """Both fits, each in its own subprocess (so peak memory is its own)."""
    import tempfile

    import torch
    res = {"model": model, "tokens": tokens, "dim": dim}
    with tempfile.TemporaryDirectory() as d:
        for m in ("stream", "seed"):
            cmd = [sys.executable, __file__, "--method", m, "--comps-out", os.path.join(d, m + ".pt"),
                   "--model", model, "--tokens", str(tokens), "--dim", str(dim)]
            if squad_train:
                cmd += ["--squad-train", squad_train]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[m] = json.loads(out.strip().splitlines()[-1])
        a, b = (torch.load(os.path.join(d, m + ".pt")) for m in ("stream", "seed"))
        # how much of the seed's subspace the exact one spans (1 = same subspace)
        res["overlap"] = float((a @ b.T).pow(2).sum() / dim)
    return res


def format_result(res: dict) -> str:
    s, z = res["stream"], res["seed"]
    return "\n".join([
        f"model {res['model']}, {res['tokens']:,} token embeddings ({s['source']}, {s['distinct_tokens']:,} before "
        f"cycling), {s.get('d_model', '?')} -> {res['dim']}\n",
        "| method | wall s | peak memory above start (MB) | explained variance it reports | of total variance |",
        "|---|---|---|---|---|",
        f"| streamed covariance + eigh (LatentWire) | {s['wall_s']:.1f} | {s['peak_mb']:.0f} | "
        f"{100 * s['reported_evr']:.1f}% | {100 * s['true_evr']:.1f}% |",
        f"| collect all + svd_lowrank (seed) | {z['wall_s']:.1f} | {z['peak_mb']:.0f} | "
        f"{100 * z['reported_evr']:.1f}% | {100 * z['true_evr']:.1f}% |",
        f"\npeak memory seed / LatentWire: **{z['peak_mb'] / max(s['peak_mb'], 1):.0f}x**; "
        f"wall time seed / LatentWire: **{z['wall_s'] / s['wall_s']:.2f}x**; subspace overlap {res['overlap']:.3f}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=144)
    ap.add_argument("--squad-train", default=None)
    ap.add_argument("--method", choices=["stream", "seed"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--comps-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.method:
        worker(args)
        return 0
    res = compare(args.model, args.tokens, args.dim, args.squad_train)
    print(format_result(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
