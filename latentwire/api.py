"""The Python API: a pipeline from a name or a run folder, its payload for a
paragraph, a frozen LLM's answer from a payload, and the evaluation of any
pipelines -- the same code paths as `latentwire send`, `ask` and `run`.

    import latentwire as lw
    pipe = lw.load_pipeline("truncate+ac", ratio=4)          # SmolLM2-135M-Instruct, offline
    payload = pipe.send(open("paragraph.txt").read())          # bytes (a latentwire.Payload)
    print(len(payload), "bytes,", payload.positions, "positions")
    print(lw.ask(pipe, payload, "Who founded the company?"))  # the evaluation's prompt and decoding
    metrics = lw.evaluate([pipe, lw.load_pipeline("none", lm=pipe.lm)], "dev-v1.1-part-a.json", max_eval=100)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .config import RunConfig
from .data import Example, PromptBuilder
from .errors import LatentWireError
from .pipelines import BuildContext, Pipeline, build, run_dir_kind


def _builder(lm, cfg: RunConfig) -> PromptBuilder:
    return PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")


def head_ids(builder: PromptBuilder) -> list[int]:
    """The receiver's prompt before the context (BOS, shots, 'Context:')."""
    p = builder.build(Example("head", "head", "", "?", ["-"]))
    return p.ids[:p.ctx_start]


def load_pipeline(spec: str = "text", model: str | None = None, ratio: float = 4.0, *, lm=None,
                  options: dict | None = None, out: str | Path | None = None, device: str = "auto",
                  dtype: str = "auto", flag: str = "--pipeline") -> Pipeline:
    """A pipeline by kind (`latentwire pipelines`), run folder or `package.module:Factory`, with its receiver
    model loaded (or `lm`, a model loaded before: pipelines that share it are compared on one receiver).

    `model`: the receiving LLM (an alias, a HF id, a folder, a .gguf); default: the run folder's model, else
    smollm2-135m. `ratio`: r for kinds that compress the sequence. `options`: config fields by name (e.g.
    {"opt_steps": 20, "template": "fewshot"}), as in a sweep file. `out`: a folder where per-paragraph fits
    are kept (opt-* kinds). The pipeline carries what `ask` needs: `.lm` and `.builder`."""
    from .models import DEFAULT_MODEL, load_model
    from .sweep import apply_overrides
    cfg = RunConfig()
    if Path(spec).is_dir() and run_dir_kind(Path(spec)) is not None and (Path(spec) / "config.json").is_file():
        saved = json.loads((Path(spec) / "config.json").read_text())
        model = model or saved.get("model", {}).get("model")
        cfg.data.template = saved.get("data", {}).get("template", cfg.data.template)
    if options:
        apply_overrides(cfg, options, where="options")
    cfg.validate()
    if lm is None:
        lm = load_model(model or DEFAULT_MODEL, device, dtype)
    elif model is not None and model not in (lm.name, lm.source):
        raise LatentWireError(f"--model {model}: the pipeline was given another loaded model ({lm.name})")
    builder = _builder(lm, cfg)
    ctx = BuildContext(lm=lm, head_ids=head_ids(builder), ratio=ratio, cfg=cfg, out=None if out is None else Path(out),
                       extra={"builder": builder})
    pipe = build(spec, ctx, flag=flag)[0]
    pipe.builder = builder
    return pipe


def ask(pipeline: Pipeline, payload: bytes, question: str, *, max_new_tokens: int = 16) -> str:
    """The receiver's answer to `question` from a payload: the evaluation's prompt (its template, the payload's
    reading where the context goes) and its greedy decoding."""
    from .generate import answer
    lm = pipeline.lm
    builder = getattr(pipeline, "builder", None) or PromptBuilder(lm.tokenizer, "fewshot")
    prompt = builder.build(Example("ask", "ask", "", question, ["-"]))
    return answer(lm, prompt, pipeline, bytes(payload), max_new_tokens)


def evaluate(pipelines: Sequence[Pipeline], squad_path: str | None = None, *, max_eval: int = 200,
             max_eval_contexts: int = 0, out: str | Path = "runs/evaluate", seed: int = 0, overwrite: bool = True,
             log=print) -> dict:
    """Score pipeline objects (any that implement the sender/receiver interface, on one receiver model) on
    SQuAD questions (`squad_path`: an official JSON file; None: the built-in synthetic set's evaluation
    articles) through the same evaluation, controls and report as `latentwire run`; returns metrics.json's
    content and writes the run folder `out`."""
    from .run import evaluate_run
    pipes = list(pipelines)
    if not pipes:
        raise LatentWireError("evaluate: no pipelines given")
    lm = pipes[0].lm
    if any(p.lm is not lm for p in pipes):
        raise LatentWireError("evaluate: every pipeline must read with the same loaded receiver model "
                              "(load_pipeline(..., lm=first.lm))")
    cfg = RunConfig()
    cfg.model.model = lm.name
    cfg.data.squad_eval, cfg.data.max_eval, cfg.data.max_eval_contexts, cfg.data.seed = \
        squad_path, max_eval, max_eval_contexts, seed
    cfg.eval.stage1 = False  # the pipelines are given: metrics.json "pipelines_given" describes them
    cfg.out, cfg.progress = str(out), False
    builder = getattr(pipes[0], "builder", None)
    if builder is not None:
        cfg.data.template = builder.template
    return evaluate_run(cfg, lm, pipes, overwrite=overwrite, log=log)


__all__ = ["ask", "evaluate", "head_ids", "load_pipeline"]
